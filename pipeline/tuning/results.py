"""A search's results: every trial best first, as `trials.csv`, `best.cfg` and console text."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Optional, Sequence

from pipeline import rundir
from pipeline.tuning import layout
from pipeline.tuning.hypermodel import PipelineHyperModel
from pipeline.tuning.overrides import format_value


@dataclasses.dataclass
class TrialRow:
    """One line of trials.csv."""

    trial_id: str
    status: str
    tuner: str
    values: dict
    epochs: int
    objective: Optional[float]
    best_epoch: Optional[float]
    run_dir: str
    flags_text: str


@dataclasses.dataclass
class SearchResult:
    tune_dir: str
    role: str
    objective: str
    rows: list
    best: Optional[TrialRow]
    trials_csv: Optional[str]
    best_cfg: Optional[str]


def collect_results(oracle, hypermodel: PipelineHyperModel) -> list[TrialRow]:
    """Every trial the oracle knows, best first (unfinished and failed trials last)."""
    objective = hypermodel.objective
    rows = []
    for trial in oracle.trials.values():
        values = dict(trial.hyperparameters.values)
        epochs = values.get("tuner/epochs")
        run = hypermodel.trial_run_config(values, trial.trial_id, epochs=epochs)
        status = str(trial.status).lower()
        summary = rundir.read_json(rundir.path(run.model_dir, rundir.SUMMARY_FILE)) or {}
        if status == "completed" and summary.get("status") == "diverged":
            status = "diverged"
        info = rundir.read_json(rundir.path(run.model_dir, layout.TRIAL_INFO_FILE)) or {}
        completed = trial.status == "COMPLETED"
        value = trial.score if completed else None
        best_epoch = None
        if completed and trial.metrics.exists("best_epoch"):
            best_epoch = trial.metrics.get_last_value("best_epoch")
        rows.append(TrialRow(str(trial.trial_id), status, info.get("tuner_id", ""),
                             {n: values.get(n) for n in hypermodel.space.names}, run.train.epochs,
                             None if value is None else float(value), best_epoch, run.model_dir,
                             run.flags_text))
    sign = -1.0 if layout.OBJECTIVES[objective] == "max" else 1.0
    done = sorted((r for r in rows if r.objective is not None and math.isfinite(r.objective)),
                  key=lambda r: (sign * r.objective, r.trial_id))
    return done + sorted((r for r in rows if r not in done), key=lambda r: r.trial_id)


def write_trials_csv(rows: Sequence[TrialRow], names: Sequence[str], objective: str, filename: str) -> None:
    header = ["trial_id", "status", "tuner", *names, "epochs", objective, "best_epoch", "run_dir"]
    lines = []
    for r in rows:
        best_epoch = "" if r.best_epoch is None else _fmt_number(r.best_epoch)
        lines.append([r.trial_id, r.status, r.tuner, *(_csv_value(r.values.get(n)) for n in names), r.epochs,
                      "" if r.objective is None else f"{r.objective:.6g}", best_epoch, r.run_dir])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    rundir.write_text_atomic(filename, buf.getvalue())


def _csv_value(value) -> str:
    return "" if value is None else (format_value(value) if not isinstance(value, float) else f"{value:.6g}")


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def best_cfg_text(row: TrialRow, objective: str, verb: str, tune_dir: str) -> str:
    """best.cfg: the best trial's resolved flags with a header saying how to use them."""
    body = [line for line in row.flags_text.splitlines() if not line.startswith("#")]
    head = [f"# Best trial {row.trial_id} of the search in {tune_dir}: "
            f"{objective}={row.objective:.6g} (epoch {_fmt_number(row.best_epoch or 0)}); run: {row.run_dir}",
            "# Train the best model with:",
            f"#   python -m pipeline.{verb} --flagfile=<this file> [--model_dir=...]"]
    return "\n".join(head + body) + "\n"


def format_results(result: SearchResult, top: int = 5) -> str:
    """The search's outcome for the console: the top trials (a worker only says it is done)."""
    if result.role == "worker":
        return "worker finished: the chief writes trials.csv and best.cfg"
    rows = [r for r in result.rows if r.objective is not None][:top]
    if not rows:
        return f"no trial of {result.tune_dir} has finished yet."
    lines = [f"top {len(rows)} of {len(result.rows)} trials by {result.objective}:"]
    for r in rows:
        hps = " ".join(f"{k}={_csv_value(v)}" for k, v in r.values.items())
        lines.append(f"  trial {r.trial_id:>4}  {result.objective}={r.objective:.4f}  "
                     f"epoch {_fmt_number(r.best_epoch or 0)}/{r.epochs}  {hps}  [{r.status}] {r.run_dir}")
    lines.append(f"trials: {result.trials_csv}")
    if result.best_cfg:
        lines.append(f"best: {result.best_cfg}")
    return "\n".join(lines)


def write_results(oracle, hypermodel: PipelineHyperModel, *, role: str, verb: str) -> SearchResult:
    """trials.csv (every trial, best first) and best.cfg (once a trial has finished) in the tuning dir."""
    tune_dir, objective = hypermodel.tune_dir, hypermodel.objective
    rows = collect_results(oracle, hypermodel)
    trials_csv = rundir.path(tune_dir, layout.TRIALS_CSV)
    write_trials_csv(rows, hypermodel.space.names, objective, trials_csv)
    best = rows[0] if rows and rows[0].objective is not None else None
    best_cfg = None
    if best is not None:
        best_cfg = rundir.path(tune_dir, layout.BEST_CFG)
        rundir.write_text_atomic(best_cfg, best_cfg_text(best, objective, verb, tune_dir))
    return SearchResult(tune_dir, role, objective, rows, best, trials_csv, best_cfg)
