"""Durations as people write and read them: `--time_budget=90` (minutes), `30m`, `2h`; `4m 05s`, `70h 12m`.

Kept outside `pipeline.training` (whose package import loads TensorFlow) so that
`pipeline.cli` refuses a bad `--time_budget` before TensorFlow is imported.
"""
from __future__ import annotations

import re
from typing import Optional

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|m|min|h)?\s*$")
_UNIT_SECONDS = {None: 60.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_time_budget(text: Optional[str]) -> Optional[float]:
    """`--time_budget` in seconds: minutes (`90`), or `30m`, `2h`, `45s`; None stays None."""
    if text is None or str(text).strip() == "":
        return None
    match = _DURATION.match(str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--time_budget={text} is not a duration: give minutes (90) or 30m, 2h, 45s.")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """`42s`, `4m 05s`, `1h 10m`, `70h 12m`: what a person reads at a glance."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
