"""The names `pipeline.visualize --what` takes, apart from the plotting (so its flags load no matplotlib)."""
from __future__ import annotations

import difflib
from typing import Iterable

KINDS = ("curves", "lr", "confusion", "filters", "feature_maps", "activation_max", "gradcam",
         "compare")
IMAGE_KINDS = ("feature_maps", "gradcam")


def parse_kinds(kinds: Iterable[str]) -> list[str]:
    """Validate `--what` values; `all` expands to every kind (in KINDS order)."""
    kinds = [k.strip() for k in kinds if k.strip()]
    if not kinds or "all" in kinds:
        return list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        close = {k: difflib.get_close_matches(k, KINDS, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ValueError(f"unknown --what {hints}; choose from all, {', '.join(KINDS)}.")
    return list(dict.fromkeys(kinds))
