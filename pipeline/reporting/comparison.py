"""Runs side by side: `comparison.md` / `.html`, a row per run, sorted by the objective.

The runs are run directories or a tuning directory's trials (`expand_runs`).
The flags in which they differ are the table's columns, the flags they share
are listed once, and one chart shows their validation curves. For a tuning
directory the report goes to `<tune_dir>/comparison.*` by default.

Nothing here imports TensorFlow: comparing runs reads their files only.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Optional, Sequence

from pipeline import rundir
from pipeline.reporting import plots
from pipeline.reporting.document import Document, Facts, Image, Para, Section, Table, duration, num, pct
from pipeline.reporting.render import render_html, render_markdown
from pipeline.reporting.run_report import REPORT_HTML
from pipeline.reporting.settings import differing_settings, flag_settings, setting_text
from pipeline.reporting.status import run_status
from pipeline.tuning import layout
from pipeline.tuning.layout import OBJECTIVES

COMPARISON_STEM = "comparison"


@dataclasses.dataclass
class CompareRow:
    model_dir: str
    name: str
    settings: dict              # differing flag -> value
    status: str
    best_value: Optional[float]  # best of the objective over epochs
    best_epoch: Optional[int]
    test_accuracy: Optional[float]
    epochs: int
    wall_seconds: Optional[float]
    wall_is_partial: bool
    report: Optional[str]       # the run's own report.html, when present
    per_class_f1: dict = dataclasses.field(default_factory=dict)  # class -> test F1 (evaluation_test.json)
    macro_f1: Optional[float] = None


@dataclasses.dataclass
class Comparison:
    objective: str
    columns: list               # differing flags, in display order
    common: dict                # flags shared by every run
    rows: list                  # CompareRow, sorted by the objective
    skipped: list               # (run, why)
    figure: Optional[str] = None
    figure_note: str = ""
    source: str = ""            # "tuning directory <dir>" or ""


def expand_runs(paths: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """Run directories from run directories and tuning directories (their trials).

    Returns:
      (run directories, the tuning directory when one was given, else None).

    Raises:
      rundir.RunDirError: a path does not exist, or is neither a run nor a tuning directory.
    """
    runs, tune_dir = [], None
    for path in paths:
        if not os.path.isdir(path):
            raise rundir.RunDirError(f"Run directory {path!r} does not exist.")
        if os.path.exists(rundir.path(path, rundir.CONFIG_FILE)):
            runs.append(os.path.normpath(path))
            continue
        if not layout.is_tuning_dir(path):
            raise rundir.RunDirError(f"{path!r} is neither a run directory (no {rundir.CONFIG_FILE}) nor a "
                                     f"tuning directory (no {layout.TRIALS_DIR}/ with {layout.TRIALS_CSV}).")
        tune_dir = tune_dir or path
        trials_root = os.path.join(path, layout.TRIALS_DIR)
        listed = []
        csv_file = os.path.join(path, layout.TRIALS_CSV)
        if os.path.exists(csv_file):
            with open(csv_file, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    run = row.get("run_dir") or ""
                    if not os.path.isdir(run):   # moved search directory: trials/<name>
                        run = os.path.join(trials_root, os.path.basename(os.path.normpath(run)))
                    listed.append(os.path.normpath(run))
        present = sorted(os.path.normpath(os.path.join(trials_root, n)) for n in os.listdir(trials_root)
                         if os.path.exists(os.path.join(trials_root, n, rundir.CONFIG_FILE)))
        real = {os.path.realpath(p) for p in listed}
        runs += [p for p in listed if os.path.exists(rundir.path(p, rundir.CONFIG_FILE))]
        runs += [p for p in present if os.path.realpath(p) not in real]
    unique, seen = [], set()
    for run in runs:
        if os.path.realpath(run) not in seen:
            seen.add(os.path.realpath(run))
            unique.append(run)
    return unique, tune_dir


def _compare_row(run: str, settings: dict, objective: str, out_dir: str) -> CompareRow:
    """One run's row: `settings` (its differing flags), best of `objective`, test accuracy, time."""
    summary = rundir.read_json(rundir.path(run, rundir.SUMMARY_FILE), {}) or {}
    metrics = rundir.read_metrics(run)
    status = run_status(run, summary, metrics)
    best = rundir.best_row(metrics, objective)
    finished = status.kind in ("completed", "diverged") and summary.get("wall_seconds")
    wall = summary.get("wall_seconds") if finished else sum(r.get("epoch_seconds") or 0 for r in metrics)
    report = rundir.path(run, REPORT_HTML)
    evaluation = rundir.read_json(rundir.path(run, "evaluation_test.json"), {}) or {}
    return CompareRow(run, plots.run_label(run), settings, status.kind,
                      best[objective] if best else None, best["epoch"] if best else None,
                      summary.get("test_accuracy"), status.epochs_done, wall, not finished,
                      os.path.relpath(report, out_dir) if os.path.exists(report) else None,
                      {name: m["f1"] for name, m in (evaluation.get("per_class_metrics") or {}).items()},
                      evaluation.get("macro_f1"))


def collect_comparison(paths: Sequence[str], *, objective: Optional[str] = None,
                       out_dir: Optional[str] = None, figure_path: Optional[str] = None) -> Comparison:
    """The comparison table (and chart, when `figure_path` is given) of runs or a tuning directory.

    Args:
      paths: run directories and/or tuning directories.
      objective: `val_accuracy` (default; or the search's own), `val_loss` or `val_macro_f1`.
      out_dir: where the report goes (links to each run's report are relative to it).
      figure_path: where to write `plots.compare_figure` of the runs (None: no chart).
    """
    runs, tune_dir = expand_runs(paths)
    if objective is None and tune_dir:
        objective = (rundir.read_json(os.path.join(tune_dir, layout.SEARCH_FILE), {}) or {}).get("objective")
    objective = objective or "val_accuracy"
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}.")
    out_dir = out_dir or os.getcwd()
    usable, skipped = [], []
    for run in runs:
        if rundir.read_metrics(run):
            usable.append(run)
        else:
            skipped.append((run, "no finished epoch"))
    if not usable:
        raise rundir.RunDirError("Nothing to compare: none of the runs finished an epoch "
                                 f"({', '.join(runs) or 'no runs found'}).")
    configs = [rundir.read_json(rundir.path(r, rundir.CONFIG_FILE), {}) or {} for r in usable]
    flat = [flag_settings(c) for c in configs]
    columns, common = differing_settings(flat)
    rows = [_compare_row(run, {k: settings.get(k) for k in columns}, objective, out_dir)
            for run, settings in zip(usable, flat)]
    sign = -1.0 if OBJECTIVES[objective] == "max" else 1.0
    rows.sort(key=lambda r: (r.best_value is None, sign * (r.best_value or 0.0), r.name))
    comparison = Comparison(objective, columns, common, rows, skipped,
                            source=f"tuning directory {tune_dir}" if tune_dir else "")
    if figure_path:
        ordered = [r.model_dir for r in rows]
        if len(ordered) < 2:
            comparison.figure_note = "one run only: nothing to chart side by side."
        else:
            try:
                comparison.figure = plots.save_figure(plots.compare_figure(ordered), figure_path)
            except (ValueError, OSError) as e:
                comparison.figure_note = str(e)
    return comparison


def _per_class_f1_blocks(rows: list) -> list:
    """Each class's test F1 per run, side by side (from each run's evaluation_test.json)."""
    scored = [r for r in rows if r.per_class_f1]
    if not scored:
        return [Para(["No run has a per-class evaluation (evaluation_test.json with F1): write one with ",
                      ("code", "python -m pipeline.evaluate --model_dir=<run>"), " or the run's report."], "note")]
    names = list(dict.fromkeys(n for r in scored for n in r.per_class_f1))
    table = [[("code", n), *(pct(r.per_class_f1.get(n)) for r in scored)] for n in names]
    table.append([("b", "macro-F1"), *(("b", pct(r.macro_f1)) for r in scored)])
    blocks = [Table(["class", *(r.name for r in scored)], table, "l" + "r" * len(scored),
                    caption="Test F1 per class (runs in the order of the table above)", scroll=len(table) > 40)]
    missing = [r.name for r in rows if not r.per_class_f1]
    if missing:
        blocks.append(Para(["No per-class evaluation yet: " + ", ".join(missing) + "."], "note"))
    return blocks


def comparison_document(c: Comparison, base_dir: str) -> Document:
    label = f"best {c.objective}"
    headers = ["#", "run", *c.columns, label, "best epoch", "test accuracy", "epochs", "wall time", "status"]
    rows = []
    for i, r in enumerate(c.rows, start=1):
        name = ("link", r.name, r.report.replace(os.sep, "/")) if r.report else ("code", r.name)
        value = pct(r.best_value) if c.objective != "val_loss" else num(r.best_value)
        rows.append([str(i), name, *(setting_text(r.settings.get(k)) for k in c.columns), value,
                     "–" if r.best_epoch is None else str(r.best_epoch), pct(r.test_accuracy), str(r.epochs),
                     ("≥ " if r.wall_is_partial else "") + duration(r.wall_seconds), r.status])
    align = "rl" + "l" * len(c.columns) + "rrrrrl"
    order = "descending" if OBJECTIVES[c.objective] == "max" else "ascending"
    blocks = [Para([f"{len(c.rows)} runs, sorted by best {c.objective} ({order}); the columns between run "
                    "and the results are the only flags in which the runs differ."
                    + (" Runs marked ≥ did not finish: their wall time is the sum of their epochs."
                       if any(r.wall_is_partial for r in c.rows) else "")]),
              Table(headers, rows, align, frozenset([0]), scroll=len(rows) > 30)]
    if not c.columns:
        blocks.append(Para(["The runs share every flag (e.g. repeated runs of one recipe)."], "note"))
    if c.skipped:
        blocks.append(Para(["Not compared (no finished epoch): " +
                            ", ".join(f"{plots.run_label(r)}" for r, _ in c.skipped) + "."], "warn"))
    common_rows = [[("code", k), setting_text(v)] for k, v in sorted(c.common.items()) if v is not None]
    sections = [Section("Runs", "runs", blocks)]
    chart = []
    if c.figure:
        chart.append(Image(c.figure, os.path.relpath(c.figure, base_dir).replace(os.sep, "/"),
                           "Validation curves of the runs"))
    elif c.figure_note:
        chart.append(Para([f"No chart: {c.figure_note}"], "note"))
    sections.append(Section("Validation curves", "curves", chart))
    sections.append(Section("Per-class F1", "per-class-f1", _per_class_f1_blocks(c.rows)))
    sections.append(Section("Settings shared by every run", "common",
                            [Table(["setting", "value"], common_rows, "ll", scroll=True)] if common_rows else
                            [Para(["None."], "note")]))
    best = c.rows[0]
    facts = Facts([("Runs", str(len(c.rows)), c.source or "compared"),
                   (f"Best {c.objective}", pct(best.best_value) if c.objective != "val_loss"
                    else num(best.best_value), best.name),
                   ("Its test accuracy", pct(best.test_accuracy), f"epoch {best.best_epoch}"),
                   ("Differing flags", str(len(c.columns)), ", ".join(c.columns[:4]) or "none")])
    return Document("Run comparison", c.source or ", ".join(r.name for r in c.rows[:6])
                    + (" …" if len(c.rows) > 6 else ""), "comparison", "compare", facts, sections)


def _stems(out: Optional[str], tune_dir: Optional[str]) -> str:
    if not out:
        return os.path.join(tune_dir, COMPARISON_STEM) if tune_dir else COMPARISON_STEM
    if os.path.isdir(out):
        return os.path.join(out, COMPARISON_STEM)
    stem, ext = os.path.splitext(out)
    return stem if ext.lower() in (".md", ".html", ".htm") else out


def write_comparison_report(paths: Sequence[str], out: Optional[str] = None, *,
                            objective: Optional[str] = None) -> tuple[str, str]:
    """Write `<out>.md`, `<out>.html` and `plots/<name>.png` beside them; returns (md, html).

    `out` is a path with or without `.md`/`.html`; default `./comparison`, or
    `<tune_dir>/comparison` when a tuning directory is compared.
    """
    _, tune_dir = expand_runs(paths)
    stem = _stems(out, tune_dir)
    base_dir = os.path.dirname(os.path.abspath(stem))
    figure = os.path.join(base_dir, plots.PLOTS_DIR, os.path.basename(stem) + ".png")
    c = collect_comparison(paths, objective=objective, out_dir=base_dir, figure_path=figure)
    document = comparison_document(c, base_dir)
    md, page = stem + ".md", stem + ".html"
    rundir.write_text_atomic(md, render_markdown(document))
    rundir.write_text_atomic(page, render_html(document))
    return md, page
