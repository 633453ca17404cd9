"""The run directory: one run, one folder, everything needed to read, resume or repeat it.

Layout (names are the contract other commands rely on):
    flags.cfg       resolved flags; `--flagfile=<run>/flags.cfg` repeats the run
    config.json     the same settings as JSON, for library code (no absl needed)
    labels.txt      class names, one per line, in label order
    metrics.csv     one row per finished epoch (see METRIC_COLUMNS)
    summary.json    status, best epoch, test metrics, precision, device, timing
    tensorboard/    TensorBoard event files
    checkpoints/    best.keras, last.keras (model + optimizer), state.json

Every file is written atomically (temp file, then rename) so a crash never
leaves a half-written checkpoint or summary behind.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import re
import shutil
import tempfile

METRIC_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                  "epoch_seconds", "images_per_second")
FLAGS_FILE = "flags.cfg"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.txt"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.keras"
LAST_CHECKPOINT = "last.keras"
STATE_FILE = "state.json"
CHECKPOINTS = {"best": BEST_CHECKPOINT, "last": LAST_CHECKPOINT}
# How each epoch metric ranks epochs ("max": higher is better).
METRIC_MODES = {"val_accuracy": "max", "val_loss": "min", "accuracy": "max", "loss": "min"}


class RunDirError(ValueError):
    """A run directory is missing, incomplete, or would be overwritten."""


def slug(text: str) -> str:
    """`text` safe as one path component: runs of other characters than [A-Za-z0-9_.-] become `_`,
    and leading/trailing `_` and `.` go (no hidden names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.")


def run_name(model: str, dataset: str) -> str:
    """`<model>-<dataset>` as a slug; an image folder counts by its folder name (`folder-<name>`)."""
    if dataset.startswith("folder:"):
        dataset = "folder-" + os.path.basename(os.path.normpath(dataset[len("folder:"):]))
    return slug(f"{model}-{dataset}")


def default_model_dir(model: str, dataset: str, now: datetime.datetime | None = None,
                      root: str = "runs") -> str:
    """`runs/<model>-<dataset>-<YYYYmmdd-HHMMSS>` (see `run_name`)."""
    now = now or datetime.datetime.now()
    return os.path.join(root, f"{run_name(model, dataset)}-{now:%Y%m%d-%H%M%S}")


def path(model_dir: str, *parts: str) -> str:
    return os.path.join(model_dir, *parts)


def checkpoint_file(model_dir: str, which: str = "best") -> str:
    """Where a run keeps its `best` or `last` `.keras` checkpoint (whether or not it exists yet)."""
    if which not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    return os.path.join(model_dir, CHECKPOINT_DIR, CHECKPOINTS[which])


def require_checkpoint(model_dir: str, which: str = "best") -> str:
    """The run's `best`/`last` checkpoint file; RunDirError if the run or the file is missing."""
    filename = checkpoint_file(model_dir, which)
    if not os.path.isdir(model_dir):
        raise RunDirError(f"Run directory {model_dir!r} does not exist.")
    if not os.path.isfile(filename):
        raise RunDirError(f"{model_dir!r} has no {which} checkpoint ({filename} is missing): "
                          "not a run directory, or its training finished no epoch.")
    return filename


def improves(value: float, best: float | None, metric: str) -> bool:
    """Whether an epoch's `metric` value beats the best so far; a tie does (the later epoch wins)."""
    if best is None:
        return True
    return value >= best if METRIC_MODES[metric] == "max" else value <= best


def best_row(rows, metric: str) -> dict | None:
    """The epoch row (metrics.csv) best by `metric`, ties to the later epoch; None if no row has it."""
    best = None
    for row in rows:
        if row.get(metric) is not None and (best is None or improves(row[metric], best[metric], metric)):
            best = row
    return best


def write_text_atomic(filename: str, text: str) -> None:
    """Write `text` so readers see the old file or the new one, never a mix."""
    directory = os.path.dirname(filename) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(filename: str, data: dict) -> None:
    write_text_atomic(filename, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(filename: str, default=None):
    try:
        with open(filename, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def replace_atomic(filename: str, write) -> None:
    """`write(tmp)` a temp file beside `filename` (same extension), then rename it over `filename`.

    A reader sees the old file or the whole new one, never a part; a failed
    `write` leaves no temp file behind.
    """
    directory = os.path.dirname(filename) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(filename)}")
    try:
        write(tmp)
        os.replace(tmp, filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_model_atomic(model, filename: str) -> None:
    """`model.save` into a temp file beside `filename`, then rename over it."""
    replace_atomic(filename, model.save)


def copy_atomic(source: str, filename: str) -> None:
    """Copy `source` to a temp file beside `filename`, then rename over it."""
    replace_atomic(filename, lambda tmp: shutil.copyfile(source, tmp))


def prepare(model_dir: str, *, resume: bool) -> None:
    """Create a new run directory, or check that a resumable one exists.

    Raises:
      RunDirError: a new run would reuse a non-empty directory, or `resume`
        names a directory without a finished epoch.
    """
    state = path(model_dir, CHECKPOINT_DIR, STATE_FILE)
    if resume:
        if not os.path.exists(state):
            raise RunDirError(
                f"Cannot resume {model_dir!r}: it has no finished epoch ({state} is missing); "
                "start it again without --resume.")
        return
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        raise RunDirError(
            f"Run directory {model_dir!r} already holds a run; pass --resume to continue it "
            "or choose another --model_dir.")
    os.makedirs(path(model_dir, CHECKPOINT_DIR), exist_ok=True)


def read_metrics(model_dir: str) -> list[dict]:
    """Rows of metrics.csv as dicts of floats (epoch as int); [] if absent."""

    rows = []
    try:
        with open(path(model_dir, METRICS_FILE), newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows.append({k: (int(float(v)) if k == "epoch" else float(v)) if v not in ("", None)
                             else None for k, v in row.items()})
    except FileNotFoundError:
        pass
    return rows


def read_labels(model_dir: str) -> list[str]:
    with open(path(model_dir, LABELS_FILE), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def write_evaluation(model_dir: str, split: str, result: dict) -> None:
    """`evaluation_<split>.json` and `confusion_<split>.csv` (rows: true class, columns: predicted).

    Written by `pipeline.evaluate` and by reports, read back by reports.
    """
    names = result["class_names"]
    rows = [["true\\predicted", *names]] + [[n, *map(str, row)] for n, row in zip(names, result["confusion"])]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)  # quotes (and doubles quotes) where needed
    write_text_atomic(path(model_dir, f"confusion_{split}.csv"), text.getvalue())
    write_json_atomic(path(model_dir, f"evaluation_{split}.json"),
                      {k: v for k, v in result.items() if k != "confusion"})
