"""The data report on disk: `data_report.json`, `data_report.md` and its PNGs (matplotlib, Agg).

Why a separate module: `inspection` measures, this one only writes, so the
trainer's hook and `pipeline.inspect_data` write the same files, and the
measuring code stays free of matplotlib.
"""
from __future__ import annotations

import os
from typing import List

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after the backend choice)

from pipeline import rundir  # noqa: E402

REPORT_JSON = "data_report.json"
REPORT_MD = "data_report.md"
COUNTS_PNG = "class_counts.png"
ASPECT_PNG = "aspect_ratios.png"
_SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}


def _class_counts_figure(report: dict, filename: str) -> None:
    """Grouped bars: images per class, one bar per split."""
    names = report["class_names"]
    splits = report["splits"]
    fig = Figure(figsize=(max(4.0, min(16.0, 0.5 * len(names) * max(1, len(splits)) + 2)), 3.2), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(splits))
    for k, (split, summary) in enumerate(splits.items()):
        xs = [i + (k - (len(splits) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [summary["class_counts"].get(n, 0) for n in names], width, label=split,
               color=_SPLIT_COLORS.get(split))
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 8 else 0, ha="right"
                  if len(names) > 8 else "center", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("Images per class")
    ax.legend(fontsize=8)
    fig.savefig(filename)


def _aspect_figure(report: dict, filename: str) -> None:
    """Grouped bars: images per aspect-ratio bin (width / height, upright), one bar per split."""
    splits = report["splits"]
    labels = list(next(iter(splits.values()))["aspect_histogram"]) if splits else []
    fig = Figure(figsize=(6.4, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(splits))
    for k, (split, summary) in enumerate(splits.items()):
        xs = [i + (k - (len(splits) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [summary["aspect_histogram"][b] for b in labels], width, label=split,
               color=_SPLIT_COLORS.get(split))
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("aspect ratio, width:height (upright; portrait left, landscape right)")
    ax.set_ylabel("images")
    ax.set_title("Aspect ratios")
    ax.legend(fontsize=8)
    fig.savefig(filename)


def _md_table(headers: List[str], rows: List[List]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _spread_text(s: dict) -> str:
    return "–" if s["median"] is None else f"{s['min']} / {s['median']} / {s['max']}"


def markdown(report: dict) -> str:
    """The report for people: warnings first, then per-split tables and the duplicate listings."""
    splits = report["splits"]
    lines = [f"# Data report: `{report['dataset']}`", ""]
    lines += ["## Warnings", ""] + ([f"- {w}" for w in report["warnings"]] or ["None."]) + [""]
    lines += ["## Splits", ""]
    lines += _md_table(["split", "images", "width min/median/max", "height min/median/max",
                        "aspect (w/h) min/median/max", "channels", "formats", "EXIF-rotated"],
                       [[name, s["images"], _spread_text(s["width"]), _spread_text(s["height"]),
                         _spread_text(s["aspect_ratio"]),
                         ", ".join(f"{c}: {n}" for c, n in s["channels"].items()),
                         ", ".join(f"{f}: {n}" for f, n in s["formats"].items()), s["exif_rotated"]]
                        for name, s in splits.items()])
    lines += ["", f"![Images per class]({COUNTS_PNG})", "", "## Images per class", ""]
    lines += _md_table(["class"] + list(splits), [[c] + [s["class_counts"].get(c, 0) for s in splits.values()]
                                                  for c in report["class_names"]])
    imb = report.get("imbalance")
    if imb:
        lines += ["", f"Largest / smallest training class: {imb['largest'][0]} ({imb['largest'][1]}) / "
                      f"{imb['smallest'][0]} ({imb['smallest'][1]}), ratio {imb['ratio']}."]
    lines += ["", f"![Aspect ratios]({ASPECT_PNG})", "", "## Duplicates", ""]
    across = report["exact_duplicates"]["across"]
    lines.append(f"Exact copies across splits: {across['groups']} group(s).")
    lines += [f"- {' = '.join(g['files'])}" for g in across["listed"]]
    for split, w in report["exact_duplicates"]["within"].items():
        lines += ["", f"Exact copies within {split}: {w['extra_copies']} extra file(s)."]
        lines += [f"- {' = '.join(g)}" for g in w["listed"]]
    near = report["near_duplicates"]
    lines += ["", f"Near duplicates across splits (difference hash, at most {near['max_bits']} of 64 bits "
                  f"differ): {near['pairs']} pair(s)" + (f", the closest {len(near['listed'])} listed"
                                                         if near["pairs"] > len(near["listed"]) else "") + "."]
    lines += [f"- {p['a']} ~ {p['b']} ({p['distance']} bits)" for p in near["listed"]]
    if report["unreadable"]:
        lines += ["", "## Unreadable files (skipped)", ""] + [f"- {n}: {why}" for n, why in report["unreadable"]]
    scan = report.get("scan") or {}
    if scan:
        lines += ["", "## Scan", "", ", ".join(f"{k}: {v}" for k, v in scan.items())]
    return "\n".join(lines) + "\n"


def write_reports(report: dict, output_dir: str) -> List[str]:
    """Writes the JSON, the markdown and the PNGs into `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    files = [os.path.join(output_dir, name) for name in (REPORT_JSON, REPORT_MD, COUNTS_PNG, ASPECT_PNG)]
    _class_counts_figure(report, files[2])
    _aspect_figure(report, files[3])
    rundir.write_text_atomic(files[1], markdown(report))
    rundir.write_json_atomic(files[0], report)
    return files
