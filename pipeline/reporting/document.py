"""The document model of a report: blocks that `pipeline.reporting.render` writes as markdown and HTML.

One small model rendered twice, so report.md and report.html always say the
same thing; plus the number formats every report uses.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

Inline = Union[str, tuple]   # "text" | ("code", s) | ("b", s) | ("link", text, href)


@dataclasses.dataclass
class Para:
    parts: list
    kind: str = ""            # "" | "note" | "warn"


@dataclasses.dataclass
class Code:
    text: str


@dataclasses.dataclass
class Table:
    headers: list
    rows: list                # list of lists of Inline
    align: str = ""           # one of "l"/"r" per column ("" = all left)
    highlight: frozenset = frozenset()   # row indices to emphasize
    caption: str = ""
    scroll: bool = False      # HTML: a scrolling box for long tables


@dataclasses.dataclass
class Image:
    path: str                 # the PNG on disk
    href: str                 # relative link for markdown
    alt: str


@dataclasses.dataclass
class Facts:
    items: list               # (label, value, detail)


@dataclasses.dataclass
class Details:
    """Collapsed content: HTML only (markdown gets `markdown_note` instead)."""
    summary: str
    blocks: list
    markdown_note: Optional[list] = None


@dataclasses.dataclass
class Row:
    """Blocks side by side in HTML (wrapping on narrow screens), one after another in markdown."""
    blocks: list


@dataclasses.dataclass
class Section:
    title: str
    anchor: str
    blocks: list


@dataclasses.dataclass
class Document:
    title: str
    subtitle: str
    status: str               # badge text
    status_kind: str          # completed | diverged | running | interrupted | compare
    facts: Facts
    sections: list
    lead: list = dataclasses.field(default_factory=list)   # blocks before the first section


# Formats for people ("–" where a value is missing).

def pct(value, digits: int = 2) -> str:
    return "–" if value is None else f"{100.0 * float(value):.{digits}f}%"


def num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def lr_text(value) -> str:
    return "–" if value is None else f"{float(value):.4g}"


def duration(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def count(value) -> str:
    return "–" if value is None else f"{int(value):,}"
