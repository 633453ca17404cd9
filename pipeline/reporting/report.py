"""Lab reports written for you: one run, or several runs side by side (no FLAGS in the library).

    python -m pipeline.report --model_dir=<run>
        writes <run>/report.md and a self-contained <run>/report.html (images
        inline as data URIs, CSS inline: it opens from disk, no server), with
        the PNG figures in <run>/plots/ (linked from the markdown).
    python -m pipeline.report --compare <run> <run> ... [--out=comparison]
    python -m pipeline.report --compare <tune_dir>
        one comparison (`comparison.md` / `.html`, or `<tune_dir>/comparison.*`
        for a tuning directory): a row per run, the flags in which they differ
        as columns, sorted by the objective, and one chart of their curves.

A run report holds: the command line that repeats the run, the data and its
split sizes, the model with its parameter count and a compact layer summary,
precision / strategy / device, the hyperparameters (config.json), the epoch
table (metrics.csv), best epoch, test accuracy and per-class accuracy, the
training curves, the learning-rate plot and the confusion matrix
(`pipeline.plots`), and for exported runs the export path and its signatures.

Sources, in order of preference (nothing is recomputed that the run already
has): summary.json, checkpoints/state.json and metrics.csv for the numbers;
`evaluation_test.json` + `confusion_test.csv` (written by `pipeline.evaluate`,
and by this module when it has to evaluate) while they are newer than
`checkpoints/best.keras`, else `training.evaluate_checkpoint`; exports are
found by their `assets/model_card.json`, whose `source_run` names the run.

Unfinished runs are reported, not refused: summary status "running" with no
live process on this machine (no process holds a file of the run open, and no
`pipeline.train|finetune|tune` process names it on its command line) reads
"interrupted after epoch N". A run without a test split says so.

Public API: `write_run_report`, `collect_run`, `run_document`, `run_status`,
`find_exports`, `write_comparison_report`, `collect_comparison`,
`comparison_document`, `expand_runs`, `render_markdown`, `render_html`.
"""
from __future__ import annotations

import base64
import collections
import csv
import dataclasses
import datetime
import html
import math
import os
import re
from typing import Iterable, Optional, Sequence, Union

from pipeline.reporting import plots
from pipeline import rundir

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
COMPARISON_STEM = "comparison"
STATE_PATH = (rundir.CHECKPOINT_DIR, rundir.STATE_FILE)
EXPORT_ROOT = "saved_models"
TRAINING_VERBS = ("train", "finetune", "tune")
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min"}
# The tuning directory's layout (pipeline.tuning's TRIALS_DIR, TRIALS_CSV, SEARCH_FILE), repeated
# here so that comparing runs does not import keras-tuner and TensorFlow.
TRIALS_DIR, TRIALS_CSV, SEARCH_FILE = "trials", "trials.csv", "search.json"
LAYER_ROWS = 6          # layer summary: first and last rows shown when the model is longer
PROBE_EXPORT_LEVELS = 3  # also look for saved_models/ in this many parent folders of a run

ReportError = rundir.RunDirError


# =========================================================================== document blocks
# One small document model, rendered twice (markdown and HTML), so both files
# always say the same thing.

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


# =========================================================================== formatting helpers

def _pct(value, digits: int = 2) -> str:
    return "–" if value is None else f"{100.0 * float(value):.{digits}f}%"


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def _lr(value) -> str:
    return "–" if value is None else f"{float(value):.4g}"


def _seconds(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _setting(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_setting(v) for v in value) or "[]"
    return str(value)


def _int(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def _run_name(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir))


def _mtime(filename: str) -> Optional[float]:
    try:
        return os.path.getmtime(filename)
    except OSError:
        return None


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


# =========================================================================== run status

@dataclasses.dataclass
class RunStatus:
    kind: str                  # completed | diverged | running | interrupted
    epochs_done: int
    text: str                  # one sentence for people
    live_pids: tuple = ()


def _proc_ancestors() -> set:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _names_run(argv: Sequence[str], cwd: str, run: str) -> bool:
    """Whether a training command line (`pipeline.train|finetune|tune`) writes into `run`."""
    verbs = "|".join(TRAINING_VERBS)
    if not any(re.search(rf"pipeline[./]({verbs})(\.py)?$", a) for a in argv[:3]):
        return False
    for arg in argv:
        match = re.fullmatch(r"--(model_dir|tune_dir)=(.+)", arg)
        if not match:
            continue
        target = os.path.realpath(os.path.join(cwd, os.path.expanduser(match[2])))
        if target == run or (match[1] == "tune_dir" and run.startswith(target + os.sep)):
            return True
    return False


def live_writers(model_dir: str) -> list[int]:
    """PIDs of processes on this machine that hold a file of the run open or train into it.

    Linux only (/proc); [] elsewhere. A process on another machine writing to a
    shared file system cannot be seen.
    """
    run = os.path.realpath(model_dir)
    if not os.path.isdir("/proc"):
        return []
    skip = _proc_ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        base = f"/proc/{entry}"
        try:
            with open(f"{base}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            cwd = os.readlink(f"{base}/cwd")
        except OSError:
            continue
        if argv and _names_run(argv, cwd, run):
            found.append(int(entry))
            continue
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{base}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(run + os.sep):
                found.append(int(entry))
                break
    return found


def _state(model_dir: str) -> dict:
    return rundir.read_json(rundir.path(model_dir, *STATE_PATH), {}) or {}


def run_status(model_dir: str, summary: Optional[dict] = None,
               metrics: Optional[list] = None) -> RunStatus:
    """Completed, diverged, still running, or interrupted after epoch N (never raises)."""
    summary = summary if summary is not None else (
        rundir.read_json(rundir.path(model_dir, rundir.SUMMARY_FILE), {}) or {})
    metrics = metrics if metrics is not None else rundir.read_metrics(model_dir)
    state = _state(model_dir)
    done = max([int(state.get("epochs_done") or 0), int(summary.get("epochs_done") or 0)]
               + [r["epoch"] for r in metrics if r.get("epoch") is not None])
    status = summary.get("status")
    if status == "completed":
        return RunStatus("completed", done, f"completed: {done} epoch{'s' * (done != 1)} trained.")
    if status == "diverged":
        return RunStatus("diverged", done, f"diverged: the loss became NaN or infinite in epoch "
                         f"{done + 1}; training stopped after epoch {done}, the best checkpoint is kept.")
    last = max(filter(None, (_mtime(rundir.path(model_dir, rundir.METRICS_FILE)),
                             _mtime(rundir.path(model_dir, rundir.SUMMARY_FILE)))), default=None)
    pids = tuple(live_writers(model_dir))
    so_far = (f"{done} epoch{'s' * (done != 1)} finished so far" if done
              else "no epoch finished yet")
    if pids:
        return RunStatus("running", done, f"still running (process {', '.join(map(str, pids))}): "
                         f"{so_far}; last update {_when(last)}.", pids)
    why = "no summary.json" if not summary else f"summary status {status!r}"
    if done:
        text = f"interrupted after epoch {done} ({why}, no live process; last update {_when(last)})."
    else:
        text = f"interrupted before finishing its first epoch ({why}, no live process)."
    return RunStatus("interrupted", done, text + f" Resume it with --resume --model_dir={model_dir}.")


# =========================================================================== exports

@dataclasses.dataclass
class Signature:
    name: str
    inputs: list               # (name, "dtype [shape]")
    outputs: list


@dataclasses.dataclass
class ExportInfo:
    path: str
    version: Optional[int]
    created: str
    checkpoint: str
    signatures: list           # Signature
    error: str = ""


def _candidate_export_roots(model_dir: str, export_roots: Optional[Iterable[str]]) -> list[str]:
    if export_roots is not None:
        roots = list(export_roots)
    else:
        roots = [os.path.join(os.getcwd(), EXPORT_ROOT)]
        parent = os.path.dirname(os.path.realpath(model_dir))
        for _ in range(PROBE_EXPORT_LEVELS):
            roots.append(os.path.join(parent, EXPORT_ROOT))
            parent = os.path.dirname(parent)
    seen, out = set(), []
    for root in roots:
        real = os.path.realpath(os.path.expanduser(root))
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            out.append(real)
    return out


def find_exports(model_dir: str, export_roots: Optional[Iterable[str]] = None) -> list[str]:
    """Export version directories whose model card names `model_dir` as its source, newest first.

    train records no export path in the run directory, so exports are found by
    their `assets/model_card.json` (`source_run`, or `source_checkpoint` inside
    the run) under `export_roots` (default: ./saved_models and saved_models/ in
    the run's parent folders).
    """
    from pipeline.serving import export

    run = os.path.realpath(model_dir)
    found = []
    for root in _candidate_export_roots(model_dir, export_roots):
        for name in sorted(os.listdir(root)):
            for version in export.list_versions(os.path.join(root, name)):
                path = os.path.join(root, name, str(version))
                card = export.read_model_card(path)
                source = card.get("source_run")
                checkpoint = card.get("source_checkpoint") or ""
                if (source and os.path.realpath(source) == run) or \
                        os.path.realpath(checkpoint).startswith(run + os.sep):
                    found.append((_mtime(path) or 0.0, path))
    return [path for _, path in sorted(found, reverse=True)]


def _spec_text(spec) -> str:
    dtype = getattr(getattr(spec, "dtype", None), "name", str(getattr(spec, "dtype", "?")))
    shape = getattr(spec, "shape", None)
    dims = "?" if shape is None or shape.rank is None else \
        "[" + ", ".join("batch" if i == 0 and d is None else ("?" if d is None else str(d))
                        for i, d in enumerate(shape.as_list())) + "]"
    return f"{dtype} {dims}"


def read_export(path: str) -> ExportInfo:
    """An export's signatures, read with `tf.saved_model.load(path).signatures`."""
    from pipeline.serving import export

    card = export.read_model_card(path)
    base = os.path.basename(os.path.normpath(path))
    info = ExportInfo(path, int(base) if base.isdigit() else None, str(card.get("created", "")),
                      str(card.get("checkpoint", "")), [])
    try:
        import tensorflow as tf
        loaded = tf.saved_model.load(path)
        names = sorted(loaded.signatures.keys(), key=lambda n: (n != "serving_default", n))
        for name in names:
            fn = loaded.signatures[name]
            _, kwargs = fn.structured_input_signature
            outputs = fn.structured_outputs
            outputs = outputs if isinstance(outputs, dict) else {"output": outputs}
            info.signatures.append(Signature(
                name, [(k, _spec_text(v)) for k, v in sorted(kwargs.items())],
                [(k, _spec_text(v)) for k, v in sorted(outputs.items())]))
    except Exception as e:  # a broken export is reported, not fatal
        info.error = f"{type(e).__name__}: {e}".splitlines()[0]
    return info


# =========================================================================== run data

@dataclasses.dataclass
class TestResult:
    available: bool
    reason: str = ""                 # why not, or where the numbers come from
    accuracy: Optional[float] = None
    loss: Optional[float] = None
    examples: Optional[int] = None
    per_class: dict = dataclasses.field(default_factory=dict)
    confusion: Optional[list] = None
    class_names: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunData:
    model_dir: str
    name: str
    config: dict
    summary: dict
    metrics: list
    status: RunStatus
    verb: str
    command: Optional[str]
    best_epoch: Optional[int]
    best_value: Optional[float]
    monitor: str
    test: TestResult
    layers: list = dataclasses.field(default_factory=list)   # plots.LayerInfo
    trainable_params: Optional[int] = None
    layer_error: str = ""
    exports: list = dataclasses.field(default_factory=list)  # ExportInfo
    figures: dict = dataclasses.field(default_factory=dict)  # kind -> PNG path
    figure_notes: dict = dataclasses.field(default_factory=dict)


def detect_verb(flags_text: Optional[str], config: dict) -> str:
    """The entry point that repeats the run: the flagfile's header comment, else from the config."""
    match = re.search(r"^#.*python -m pipeline\.(\w+)", flags_text or "", re.MULTILINE)
    if match:
        return match[1]
    train = config.get("train") or {}
    finetuned = (train.get("freeze_epochs") or 0) > 0 or (train.get("backbone_lr_multiplier") or 1.0) != 1.0
    return "finetune" if finetuned else "train"


def _best(metrics: list, state: dict, summary: dict) -> tuple:
    monitor = "val_accuracy" if any(r.get("val_accuracy") is not None for r in metrics) else "accuracy"
    epoch = state.get("best_epoch") or summary.get("best_epoch")
    value = state.get("best_value", summary.get("best_val_accuracy"))
    if epoch is None and metrics:
        rows = [r for r in metrics if r.get(monitor) is not None]
        if rows:
            best = rows[0]
            for r in rows:
                if r[monitor] >= best[monitor]:   # ties to the later epoch, like RunCheckpoint
                    best = r
            epoch, value = best["epoch"], best[monitor]
    return (int(epoch) if epoch is not None else None), value, monitor


def _read_confusion_csv(filename: str) -> tuple[list, list]:
    with open(filename, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, [[int(v) for v in row[1:]] for row in rows[1:]]


def _test_result(model_dir: str, summary: dict, status: RunStatus, *, evaluate: bool) -> TestResult:
    sizes = summary.get("split_sizes") or {}
    if "test" in sizes and not sizes.get("test"):
        return TestResult(False, "This run has no test split (0 test images): there is no test "
                                 "accuracy, per-class accuracy or confusion matrix; the best "
                                 "validation accuracy is its final number.")
    best = rundir.path(model_dir, rundir.CHECKPOINT_DIR, rundir.BEST_CHECKPOINT)
    result = TestResult(False, accuracy=summary.get("test_accuracy"), loss=summary.get("test_loss"),
                        examples=sizes.get("test"))
    evaluation = rundir.path(model_dir, "evaluation_test.json")
    confusion = rundir.path(model_dir, "confusion_test.csv")
    fresh = all(os.path.exists(p) and (_mtime(p) or 0) >= (_mtime(best) or 0) for p in (evaluation, confusion))
    cached = (rundir.read_json(evaluation, {}) or {}) if fresh else {}
    if fresh and result.accuracy is not None and cached.get("accuracy") is not None:
        # `pipeline.evaluate --checkpoint=last` writes the same files: trust them only when they
        # agree with the run's own test accuracy (within one image).
        fresh = abs(cached["accuracy"] - result.accuracy) <= 1.01 / max(int(cached.get("examples") or 1), 1)
    data = None
    if fresh:
        data = cached
        names, matrix = _read_confusion_csv(confusion)
        data.setdefault("class_names", names)
        data["confusion"] = matrix
        source = "per-class numbers from evaluation_test.json / confusion_test.csv (best checkpoint)"
    elif not os.path.exists(best):
        result.reason = "No best checkpoint yet: nothing to evaluate on the test split."
        return result
    elif status.kind == "running":
        result.reason = "The run is still training: no test evaluation yet."
        return result
    elif evaluate:
        from pipeline.training import trainer as training
        try:
            raw = training.evaluate_checkpoint(model_dir, split="test", checkpoint="best")
        except Exception as e:  # data not on this machine, unloadable checkpoint, ...
            result.reason = f"The test split could not be evaluated here ({type(e).__name__}: {e})."
            return result
        rundir.write_evaluation(model_dir, "test", raw)
        data = dict(raw, confusion=raw["confusion"].tolist())
        source = "per-class numbers from evaluating the best checkpoint (saved as evaluation_test.json)"
    else:
        result.reason = "Test evaluation skipped (evaluate=False)."
        return result
    result.available = True
    result.per_class = dict(data.get("per_class") or {})
    result.confusion = data["confusion"]
    result.class_names = list(data.get("class_names") or [])
    result.examples = data.get("examples", result.examples)
    if result.accuracy is None:   # interrupted runs: the report's own evaluation
        result.accuracy, result.loss = data.get("accuracy"), data.get("loss")
        source += "; the run itself never reached its final test evaluation"
    result.reason = source
    return result


def _layers(data: RunData) -> None:
    try:
        model = plots.load_run_model(data.model_dir)
    except Exception as e:
        data.layer_error = f"{type(e).__name__}: {e}".splitlines()[0]
        return
    data.layers = plots.list_layers(model)
    data.trainable_params = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    if not data.summary.get("parameters"):
        data.summary["parameters"] = int(model.count_params())


def _figures(data: RunData, plots_dir: str) -> None:
    jobs = [("curves", "curves.png", lambda: plots.curves_figure(data.model_dir)),
            ("lr", "lr.png", lambda: plots.lr_figure(data.model_dir))]
    if data.test.available and data.test.confusion is not None:
        import numpy as np
        jobs.append(("confusion", "confusion_test.png", lambda: plots.confusion_figure(
            np.asarray(data.test.confusion), data.test.class_names or rundir.read_labels(data.model_dir),
            title=f"Confusion matrix (test split, best checkpoint): {data.name}")))
    for kind, filename, make in jobs:
        try:
            data.figures[kind] = plots.save_figure(make(), os.path.join(plots_dir, filename))
        except (ValueError, OSError) as e:
            data.figure_notes[kind] = str(e)


def collect_run(model_dir: str, *, export_roots: Optional[Iterable[str]] = None, evaluate: bool = True,
                load_model: bool = True, read_signatures: bool = True,
                plots_dir: Optional[str] = None) -> RunData:
    """Everything a run report shows, read from the run directory (figures written to `plots_dir`).

    Args:
      model_dir: the run directory.
      export_roots: folders holding `<name>/<version>/` exports to search for
        this run's exports (default: ./saved_models and saved_models/ in the
        run's parent folders).
      evaluate: evaluate the best checkpoint on the test split when no fresh
        evaluation files exist (needs the dataset).
      load_model: load the best checkpoint for the layer summary.
      read_signatures: load each export to list its signatures.
      plots_dir: where the PNGs go (default `<run>/plots`).

    Raises:
      rundir.RunDirError: `model_dir` is missing or not a run directory.
    """
    plots.require_run(model_dir)
    config = rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE), {}) or {}
    summary = dict(rundir.read_json(rundir.path(model_dir, rundir.SUMMARY_FILE), {}) or {})
    metrics = rundir.read_metrics(model_dir)
    status = run_status(model_dir, summary, metrics)
    flags_file = rundir.path(model_dir, rundir.FLAGS_FILE)
    flags_text = None
    if os.path.exists(flags_file):
        with open(flags_file, encoding="utf-8") as f:
            flags_text = f.read()
    verb = detect_verb(flags_text, config)
    flagfile = os.path.join(os.path.normpath(model_dir), rundir.FLAGS_FILE)
    command = f"python -m pipeline.{verb} --flagfile={flagfile}" if flags_text is not None else None
    best_epoch, best_value, monitor = _best(metrics, _state(model_dir), summary)
    data = RunData(os.path.normpath(model_dir), _run_name(model_dir), config, summary, metrics, status, verb,
                   command, best_epoch, best_value, monitor,
                   _test_result(model_dir, summary, status, evaluate=evaluate))
    if load_model:
        _layers(data)
    for path in find_exports(model_dir, export_roots):
        data.exports.append(read_export(path) if read_signatures else ExportInfo(path, None, "", "", []))
    _figures(data, plots_dir or rundir.path(model_dir, plots.PLOTS_DIR))
    return data


# =========================================================================== run document

_OPTIMIZER_SETTINGS = {"optimizer", "learning_rate", "momentum", "nesterov", "weight_decay", "schedule",
                       "lr_boundaries", "lr_decay", "warmup_epochs", "switch_optimizer_epoch",
                       "backbone_lr_multiplier"}


def _hyperparameter_tables(config: dict) -> list:
    """config.json as tables of flag names: data, model, optimizer and schedule, the rest of training."""
    groups = {"Data": plots.flag_settings({"data": config.get("data") or {}}),
              "Model": plots.flag_settings({"model": config.get("model") or {}})}
    train = plots.flag_settings({"train": config.get("train") or {}})
    groups["Optimizer and schedule"] = {k: v for k, v in train.items()
                                        if k in _OPTIMIZER_SETTINGS or k.startswith("second_")}
    groups["Training"] = {k: v for k, v in train.items() if k not in groups["Optimizer and schedule"]}
    blocks, unset = [], []
    for title, values in groups.items():
        rows = []
        for key, value in values.items():
            if value is None:
                unset.append(key)
            else:
                rows.append([("code", key), _setting(value)])
        if rows:
            blocks.append(Table(["setting", "value"], rows, "ll", caption=title))
    if unset:
        blocks.append(Para(["Unset (the model's or the data's own default): "
                            + ", ".join(sorted(set(unset))) + "."], "note"))
    return blocks


def _layer_blocks(data: RunData) -> list:
    params = data.summary.get("parameters")
    parts = [("b", data.summary.get("model") or (data.config.get("model") or {}).get("name", "?")), ": ",
             ("b", _int(params)), " parameters"]
    if data.trainable_params is not None and params:
        parts.append(f" ({_int(data.trainable_params)} trainable, "
                     f"{_int(int(params) - data.trainable_params)} non-trainable)")
    blocks = [Para(parts + ["."])]
    if not data.layers:
        blocks.append(Para([f"Layer summary unavailable: {data.layer_error or 'model not loaded'}."], "note"))
        return blocks
    layers = data.layers
    counts = collections.Counter(layer.kind for layer in layers)
    count_table = Table(["type", "layers"], [[k, str(n)] for k, n in counts.most_common()], "lr",
                        caption=f"{len(layers)} layers by type")

    def row(layer):
        return [layer.index, ("code", layer.name), layer.kind, ("code", layer.output_shape)]

    headers = ["#", "layer", "type", "output shape"]
    if len(layers) <= 2 * LAYER_ROWS + 2:
        blocks += [Table(headers, [row(x) for x in layers], "rlll", caption="layers"), count_table]
        return blocks
    hidden = len(layers) - 2 * LAYER_ROWS
    rows = [row(x) for x in layers[:LAYER_ROWS]] + [["…", f"… {hidden} more layers …", "", ""]] + \
           [row(x) for x in layers[-LAYER_ROWS:]]
    blocks += [Table(headers, rows, "rlll", caption=f"first and last {LAYER_ROWS} layers"), count_table]
    every = f"python -m pipeline.visualize --model_dir={data.model_dir} --list_layers"
    full = Table(headers, [row(x) for x in layers], "rlll", scroll=True)
    blocks.append(Details(f"All {len(layers)} layers", [full], markdown_note=["Every layer: ", ("code", every), "."]))
    return blocks


def _epoch_table(data: RunData) -> Table:
    has_val = any(r.get("val_accuracy") is not None for r in data.metrics)
    headers = ["epoch", "loss", "accuracy"] + (["val_loss", "val_accuracy"] if has_val else []) + ["lr", "time"]
    rows, best = [], set()
    for i, r in enumerate(data.metrics):
        cells = [str(r["epoch"]), _num(r.get("loss")), _pct(r.get("accuracy"))]
        if has_val:
            cells += [_num(r.get("val_loss")), _pct(r.get("val_accuracy"))]
        cells += [_lr(r.get("lr")), _seconds(r.get("epoch_seconds"))]
        if r["epoch"] == data.best_epoch:
            best.add(i)
            cells[0] = f"{r['epoch']} (best)"
        rows.append(cells)
    return Table(headers, rows, "r" * len(headers), frozenset(best), scroll=len(rows) > 30)


def _figure(data: RunData, kind: str, alt: str, base_dir: str) -> list:
    if kind in data.figures:
        path = data.figures[kind]
        return [Image(path, os.path.relpath(path, base_dir).replace(os.sep, "/"), alt)]
    if kind in data.figure_notes:
        return [Para([f"No {alt.lower()}: {data.figure_notes[kind]}"], "note")]
    return []


def _test_blocks(data: RunData, confusion: list) -> list:
    t, summary = data.test, data.summary
    blocks = []
    if summary.get("split_sizes") and not (summary["split_sizes"].get("test")) and not t.available:
        return [Para([t.reason], "warn")]
    if t.accuracy is not None:
        blocks.append(Para(["Test accuracy ", ("b", _pct(t.accuracy)),
                            f" (loss {_num(t.loss)}) on {_int(t.examples)} images, best checkpoint "
                            f"(epoch {data.best_epoch})."]))
    if not t.available:
        blocks.append(Para([t.reason], "note"))
        return blocks
    names = t.class_names or list(t.per_class)
    rows, worst = [], None
    for i, name in enumerate(names):
        acc = t.per_class.get(name)
        row = t.confusion[i] if t.confusion is not None and i < len(t.confusion) else []
        total = sum(row)
        wrong = [(n, names[j]) for j, n in enumerate(row) if j != i and n]
        confused = max(wrong)[1] if wrong else "–"
        confused_n = max(wrong)[0] if wrong else 0
        rows.append([("code", name), _pct(acc), _int(total),
                     f"{confused} ({confused_n} image{'s' * (confused_n != 1)})" if wrong else "–"])
        if acc is not None and (worst is None or acc < worst[1]):
            worst = (i, acc)
    per_class = Table(["class", "accuracy", "test images", "most often mistaken for"], rows, "lrrl",
                      frozenset([worst[0]]) if worst else frozenset(),
                      caption="Per-class accuracy (the lowest highlighted)", scroll=len(rows) > 40)
    blocks += [Row([per_class] + confusion), Para([t.reason + "."], "note")]
    return blocks


def _export_blocks(data: RunData) -> list:
    if not data.exports:
        return [Para(["Not exported (no SavedModel under the export folders searched names this run as "
                      "its source). Export it with ", ("code", f"python -m pipeline.export "
                                                               f"--model_dir={data.model_dir}"), "."], "note")]
    blocks = []
    for info in data.exports:
        blocks.append(Para(["Export ", ("code", info.path),
                            f" (version {info.version}, {info.checkpoint or 'best'} checkpoint"
                            + (f", created {info.created}" if info.created else "") + "). Serve it with "
                            "TF Serving (tag serve)."]))
        if info.error:
            blocks.append(Para([f"Its signatures could not be read: {info.error}"], "warn"))
            continue
        rows = []
        for sig in info.signatures:
            rows.append([("code", sig.name),
                         "; ".join(f"{n}: {s}" for n, s in sig.inputs) or "–",
                         "; ".join(f"{n}: {s}" for n, s in sig.outputs) or "–"])
        if rows:
            blocks.append(Table(["signature", "inputs", "outputs"], rows, "lll"))
    return blocks


def run_document(data: RunData, base_dir: Optional[str] = None) -> Document:
    """The run report as blocks (`base_dir`: where the markdown file lives, for image links)."""
    base_dir = base_dir or data.model_dir
    s, status = data.summary, data.status
    sizes = s.get("split_sizes") or {}
    dataset = s.get("dataset") or (data.config.get("data") or {}).get("dataset", "?")
    wall = s.get("wall_seconds") if status.kind in ("completed", "diverged") else None
    if wall is None and data.metrics:
        wall_text = "≥ " + _seconds(sum(r.get("epoch_seconds") or 0 for r in data.metrics))
    else:
        wall_text = _seconds(wall)
    best_text = _pct(data.best_value) if data.monitor == "val_accuracy" else "– (no validation split)"
    test_text = _pct(data.test.accuracy) if data.test.accuracy is not None else (
        "no test split" if "test" in sizes and not sizes.get("test") else "–")
    facts = Facts([
        ("Status", status.kind, f"{status.epochs_done} epochs"),
        ("Test accuracy", test_text, "best checkpoint"),
        ("Best val_accuracy", best_text, f"epoch {data.best_epoch}" if data.best_epoch else ""),
        ("Parameters", _int(s.get("parameters")), s.get("model") or ""),
        ("Wall time", wall_text, "training, all phases"),
    ])
    sections = []

    lead = [] if status.kind == "completed" else [
        Para(["Status: ", ("b", status.text)], "warn" if status.kind in ("interrupted", "diverged") else "")]
    blocks = []
    if data.command:
        blocks += [Para(["Repeat this run (a new run directory; add ", ("code", "--model_dir=..."),
                         " to choose it):"]), Code(data.command)]
    else:
        blocks.append(Para(["No flags.cfg: this run was not started from the command line, so there is "
                            "no flagfile that repeats it; config.json below holds its settings."], "note"))
    sections.append(Section("Reproduce", "reproduce", blocks))

    # Data, model, hardware.
    split_rows = [[name, _int(sizes.get(name))] for name in ("train", "val", "test") if name in sizes]
    data_blocks = [Para(["Dataset ", ("code", str(dataset)), f": {_int(s.get('num_classes'))} classes, "
                         f"images {s.get('image_size', '?')}x{s.get('image_size', '?')}."])]
    if split_rows:
        data_blocks.append(Table(["split", "images"], split_rows, "lr"))
    if "test" in sizes and not sizes.get("test"):
        data_blocks.append(Para(["No test split."], "warn"))
    sections.append(Section("Data", "data", data_blocks))
    sections.append(Section("Model", "model", _layer_blocks(data)))
    hardware = [["precision", ("code", str(s.get("precision", "?")))],
                ["strategy", ("code", str(s.get("strategy", "?")))]]
    hardware += [[label, _setting(s[key])] for key, label in (
        ("replicas", "replicas"), ("workers", "workers"), ("per_replica_batch", "per-replica batch"),
        ("lr_scaling", "learning-rate scaling")) if s.get(key) is not None]
    hardware += [["device", str(s.get("device", "?"))],
                 ["TensorFlow / Keras", f"{s.get('tensorflow', '?')} / {s.get('keras', '?')}"]]
    sections.append(Section("Precision, strategy and device", "hardware", [Table(["", ""], hardware, "ll")]))
    sections.append(Section("Hyperparameters", "hyperparameters", _hyperparameter_tables(data.config)))

    # Training.
    if data.metrics:
        best = [f"Best epoch {data.best_epoch} of {status.epochs_done}"]
        if data.monitor == "val_accuracy":
            best.append(f" (val_accuracy {_pct(data.best_value)})")
        else:
            best.append(f" (chosen by training accuracy {_pct(data.best_value)}: no validation split)")
        train_blocks = [Para([("b", "".join(best)), "."]),
                        Row([_epoch_table(data)] + _figure(data, "lr", "Learning-rate schedule", base_dir))]
    else:
        train_blocks = [Para(["No finished epoch: metrics.csv is empty or missing."], "warn")]
        train_blocks += _figure(data, "lr", "Learning-rate schedule", base_dir)
    train_blocks += _figure(data, "curves", "Training curves", base_dir)
    sections.append(Section("Training", "training", train_blocks))

    sections.append(Section("Test results", "test", _test_blocks(data, _figure(data, "confusion",
                                                                             "Confusion matrix", base_dir))))
    sections.append(Section("Export", "export", _export_blocks(data)))
    subtitle = f"{s.get('model', '?')} on {dataset} · {data.model_dir}"
    return Document(f"Run report: {data.name}", subtitle, status.kind, status.kind, facts, sections, lead)


def write_run_report(model_dir: str, *, export_roots: Optional[Iterable[str]] = None,
                     evaluate: bool = True, load_model: bool = True,
                     read_signatures: bool = True) -> tuple[str, str]:
    """Write `<run>/report.md`, `<run>/report.html` and `<run>/plots/*.png`; returns (md, html) paths.

    Raises:
      rundir.RunDirError: `model_dir` is missing or not a run directory.
    """
    data = collect_run(model_dir, export_roots=export_roots, evaluate=evaluate, load_model=load_model,
                       read_signatures=read_signatures)
    document = run_document(data, model_dir)
    md = rundir.path(model_dir, REPORT_MD)
    page = rundir.path(model_dir, REPORT_HTML)
    rundir.write_text_atomic(md, render_markdown(document))
    rundir.write_text_atomic(page, render_html(document))
    return md, page


# =========================================================================== comparison

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


def is_tuning_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, TRIALS_DIR)) and (
        os.path.exists(os.path.join(path, TRIALS_CSV)) or os.path.exists(os.path.join(path, SEARCH_FILE)))


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
            raise ReportError(f"Run directory {path!r} does not exist.")
        if os.path.exists(rundir.path(path, rundir.CONFIG_FILE)):
            runs.append(os.path.normpath(path))
            continue
        if not is_tuning_dir(path):
            raise ReportError(f"{path!r} is neither a run directory (no {rundir.CONFIG_FILE}) nor a "
                              f"tuning directory (no {TRIALS_DIR}/ with {TRIALS_CSV}).")
        tune_dir = tune_dir or path
        trials_root = os.path.join(path, TRIALS_DIR)
        listed = []
        csv_file = os.path.join(path, TRIALS_CSV)
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


_COLUMN_ORDER = ("model", "optimizer", "learning_rate", "schedule", "weights", "batch_size", "epochs")


def _best_of(metrics: list, objective: str) -> tuple:
    rows = [r for r in metrics if r.get(objective) is not None]
    if not rows:
        return None, None
    sign = 1.0 if OBJECTIVES[objective] == "max" else -1.0
    best = rows[0]
    for r in rows:
        if sign * r[objective] >= sign * best[objective]:
            best = r
    return best[objective], best["epoch"]


def collect_comparison(paths: Sequence[str], *, objective: Optional[str] = None,
                       out_dir: Optional[str] = None, figure_path: Optional[str] = None) -> Comparison:
    """The comparison table (and chart, when `figure_path` is given) of runs or a tuning directory.

    Args:
      paths: run directories and/or tuning directories.
      objective: `val_accuracy` (default; or the search's own) or `val_loss`.
      out_dir: where the report goes (links to each run's report are relative to it).
      figure_path: where to write `plots.compare_figure` of the runs (None: no chart).
    """
    runs, tune_dir = expand_runs(paths)
    if objective is None and tune_dir:
        objective = (rundir.read_json(os.path.join(tune_dir, SEARCH_FILE), {}) or {}).get("objective")
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
        raise ReportError("Nothing to compare: none of the runs finished an epoch "
                          f"({', '.join(runs) or 'no runs found'}).")
    configs = [rundir.read_json(rundir.path(r, rundir.CONFIG_FILE), {}) or {} for r in usable]
    _, common = plots.compare_labels(configs, [_run_name(r) for r in usable])
    flat = [plots.flag_settings(c) for c in configs]
    columns = sorted({k for f in flat for k in f} - set(common),
                     key=lambda k: (_COLUMN_ORDER.index(k) if k in _COLUMN_ORDER else len(_COLUMN_ORDER), k))
    rows = []
    for run, settings in zip(usable, flat):
        summary = rundir.read_json(rundir.path(run, rundir.SUMMARY_FILE), {}) or {}
        metrics = rundir.read_metrics(run)
        status = run_status(run, summary, metrics)
        best_value, best_epoch = _best_of(metrics, objective)
        finished = status.kind in ("completed", "diverged") and summary.get("wall_seconds")
        wall = summary.get("wall_seconds") if finished else sum(r.get("epoch_seconds") or 0 for r in metrics)
        report = rundir.path(run, REPORT_HTML)
        rows.append(CompareRow(run, _run_name(run), {k: settings.get(k) for k in columns}, status.kind,
                               best_value, best_epoch, summary.get("test_accuracy"), status.epochs_done,
                               wall, not finished,
                               os.path.relpath(report, out_dir) if os.path.exists(report) else None))
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


def comparison_document(c: Comparison, base_dir: str) -> Document:
    label = f"best {c.objective}"
    headers = ["#", "run", *c.columns, label, "best epoch", "test accuracy", "epochs", "wall time", "status"]
    rows = []
    for i, r in enumerate(c.rows, start=1):
        name = ("link", r.name, r.report.replace(os.sep, "/")) if r.report else ("code", r.name)
        value = _pct(r.best_value) if c.objective == "val_accuracy" else _num(r.best_value)
        rows.append([str(i), name, *(_setting(r.settings.get(k)) for k in c.columns), value,
                     "–" if r.best_epoch is None else str(r.best_epoch), _pct(r.test_accuracy), str(r.epochs),
                     ("≥ " if r.wall_is_partial else "") + _seconds(r.wall_seconds), r.status])
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
                            ", ".join(f"{_run_name(r)}" for r, _ in c.skipped) + "."], "warn"))
    common_rows = [[("code", k), _setting(v)] for k, v in sorted(c.common.items()) if v is not None]
    sections = [Section("Runs", "runs", blocks)]
    chart = []
    if c.figure:
        chart.append(Image(c.figure, os.path.relpath(c.figure, base_dir).replace(os.sep, "/"),
                           "Validation curves of the runs"))
    elif c.figure_note:
        chart.append(Para([f"No chart: {c.figure_note}"], "note"))
    sections.append(Section("Validation curves", "curves", chart))
    sections.append(Section("Settings shared by every run", "common",
                            [Table(["setting", "value"], common_rows, "ll", scroll=True)] if common_rows else
                            [Para(["None."], "note")]))
    best = c.rows[0]
    facts = Facts([("Runs", str(len(c.rows)), c.source or "compared"),
                   (f"Best {c.objective}", _pct(best.best_value) if c.objective == "val_accuracy"
                    else _num(best.best_value), best.name),
                   ("Its test accuracy", _pct(best.test_accuracy), f"epoch {best.best_epoch}"),
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


# =========================================================================== markdown

def _md_inline(part, *, cell: bool = False) -> str:
    if isinstance(part, str):
        text = part
    elif part[0] == "code":
        text = f"`{part[1]}`"
    elif part[0] == "b":
        text = f"**{part[1]}**"
    elif part[0] == "link":
        text = f"[{part[1]}]({part[2]})"
    else:
        raise ValueError(f"unknown inline {part!r}")
    return text.replace("|", "\\|").replace("\n", " ") if cell else text


def _md_parts(parts) -> str:
    return "".join(_md_inline(p) for p in parts)


def _md_block(block) -> list[str]:
    if isinstance(block, Para):
        prefix = {"note": "> ", "warn": "> **Note:** "}.get(block.kind, "")
        return [prefix + _md_parts(block.parts), ""]
    if isinstance(block, Code):
        return ["```", block.text, "```", ""]
    if isinstance(block, Table):
        lines = [f"*{block.caption}*", ""] if block.caption else []
        cells = [[_md_inline(c, cell=True) for c in row] for row in block.rows]
        for i in block.highlight:
            if i < len(cells):
                cells[i] = [f"**{c}**" if c and c != "–" else c for c in cells[i]]
        align = block.align or "l" * len(block.headers)
        lines.append("| " + " | ".join(h or " " for h in block.headers) + " |")
        lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return lines + [""]
    if isinstance(block, Image):
        return [f"![{block.alt}]({block.href})", ""]
    if isinstance(block, Details):
        return [_md_parts(block.markdown_note), ""] if block.markdown_note else []
    if isinstance(block, Row):
        return [line for b in block.blocks for line in _md_block(b)]
    raise TypeError(f"unknown block {block!r}")


def render_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", "", f"*{doc.subtitle}*", ""]
    lines += [f"- **{label}:** {value}" + (f" ({detail})" if detail else "")
              for label, value, detail in doc.facts.items]
    lines.append("")
    for block in doc.lead:
        lines += _md_block(block)
    for section in doc.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += _md_block(block)
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines += ["---", f"*Written by `python -m pipeline.report` on {generated}.*", ""]
    return "\n".join(lines)


# =========================================================================== HTML

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --soft: #f5f7fa; --accent: #2f6fbd;
        --ok: #1f7a4d; --bad: #b3261e; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef2f6; color: var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 24px auto; padding: 28px 36px 20px; background: #fff;
       border: 1px solid var(--line); border-radius: 10px; }
header { border-bottom: 2px solid var(--line); padding-bottom: 12px; margin-bottom: 18px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h1 .badge { vertical-align: middle; margin-left: 10px; }
.subtitle { color: var(--muted); margin: 0; word-break: break-all; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.badge { display: inline-block; font-size: 12px; font-weight: 600; letter-spacing: .04em;
         text-transform: uppercase; padding: 3px 9px; border-radius: 999px; color: #fff;
         background: var(--muted); }
.badge.completed { background: var(--ok); } .badge.diverged { background: var(--bad); }
.badge.interrupted { background: var(--warn); } .badge.running { background: var(--accent); }
.badge.compare { background: var(--accent); }
.facts { display: grid; grid-template-columns: repeat(auto-fit, minmax(180px, 1fr)); gap: 12px;
         margin: 16px 0 6px; }
.fact { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.fact .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.fact .value { font-size: 22px; font-weight: 650; margin: 2px 0; }
.fact .detail { color: var(--muted); font-size: 12.5px; word-break: break-word; }
p { margin: 8px 0; }
p.note { color: var(--muted); font-size: 13.5px; }
p.nav { font-size: 13.5px; margin-top: 10px; }
p.warn { background: #fff6e0; border-left: 4px solid #e0a100; padding: 8px 12px; border-radius: 4px; }
code { font-family: "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; font-size: 13px;
       background: var(--soft); padding: 1px 5px; border-radius: 4px; }
pre { background: #1f2933; color: #e4e7eb; padding: 12px 16px; border-radius: 8px; overflow-x: auto; }
pre code { background: none; color: inherit; padding: 0; font-size: 13.5px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
caption { caption-side: top; text-align: left; font-weight: 600; color: var(--muted); padding: 4px 0; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; white-space: nowrap; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) td { background: #fafbfc; }
tr.hl td { background: #e3effd; font-weight: 600; }
.scroll { max-height: 460px; overflow: auto; border: 1px solid var(--line); border-radius: 6px;
          display: inline-block; }
.scroll table { margin: 0; }
.row { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
.row > div { flex: 0 1 auto; min-width: 0; } .row > div:last-child { flex: 1 1 420px; }
.tables { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; }
details { margin: 6px 0 12px; } summary { cursor: pointer; color: var(--accent); }
a { color: var(--accent); }
footer { color: var(--muted); font-size: 12.5px; margin-top: 30px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""


def _h(text) -> str:
    return html.escape(str(text), quote=True)


def _html_inline(part) -> str:
    if isinstance(part, str):
        return _h(part)
    if part[0] == "code":
        return f"<code>{_h(part[1])}</code>"
    if part[0] == "b":
        return f"<strong>{_h(part[1])}</strong>"
    if part[0] == "link":
        return f'<a href="{_h(part[2])}">{_h(part[1])}</a>'
    raise ValueError(f"unknown inline {part!r}")


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _html_table(block: Table) -> str:
    align = block.align or "l" * len(block.headers)
    cls = lambda i: ' class="r"' if i < len(align) and align[i] == "r" else ""  # noqa: E731
    out = ["<table>"]
    if block.caption:
        out.append(f"<caption>{_h(block.caption)}</caption>")
    if any(block.headers):
        out.append("<thead><tr>" + "".join(f"<th{cls(i)}>{_h(h)}</th>" for i, h in enumerate(block.headers))
                   + "</tr></thead>")
    out.append("<tbody>")
    for r, row in enumerate(block.rows):
        tr = ' class="hl"' if r in block.highlight else ""
        out.append(f"<tr{tr}>" + "".join(f"<td{cls(i)}>{_html_inline(c)}</td>" for i, c in enumerate(row))
                   + "</tr>")
    out.append("</tbody></table>")
    table = "".join(out)
    return f'<div class="scroll">{table}</div>' if block.scroll else table


def _html_block(block) -> str:
    if isinstance(block, Para):
        cls = f' class="{block.kind}"' if block.kind else ""
        return f"<p{cls}>{''.join(_html_inline(p) for p in block.parts)}</p>"
    if isinstance(block, Code):
        return f"<pre><code>{_h(block.text)}</code></pre>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        return (f'<figure><img src="{_data_uri(block.path)}" alt="{_h(block.alt)}"/>'
                f"<figcaption>{_h(block.alt)} ({_h(block.href)})</figcaption></figure>")
    if isinstance(block, Details):
        return (f"<details><summary>{_h(block.summary)}</summary>"
                + "".join(_html_block(b) for b in block.blocks) + "</details>")
    if isinstance(block, Row):
        return '<div class="row">' + "".join(f"<div>{_html_block(b)}</div>" for b in block.blocks) + "</div>"
    raise TypeError(f"unknown block {block!r}")


def _html_blocks(blocks) -> str:
    out, tables = [], []

    def flush():
        if len(tables) > 1:
            out.append('<div class="tables">' + "".join(tables) + "</div>")
        else:
            out.extend(tables)
        tables.clear()

    for block in blocks:   # consecutive small tables sit side by side
        if isinstance(block, Table) and not block.scroll and len(block.rows) <= 40:
            tables.append(_html_table(block))
            continue
        flush()
        out.append(_html_block(block))
    flush()
    return "\n".join(out)


def render_html(doc: Document) -> str:
    """A self-contained page: inline CSS, images as data URIs, no external references."""
    facts = "".join(f'<div class="fact"><div class="label">{_h(label)}</div>'
                    f'<div class="value">{_h(value)}</div><div class="detail">{_h(detail)}</div></div>'
                    for label, value, detail in doc.facts.items)
    nav = " · ".join(f'<a href="#{_h(s.anchor)}">{_h(s.title)}</a>' for s in doc.sections)
    sections = "\n".join(f'<section id="{_h(s.anchor)}"><h2>{_h(s.title)}</h2>\n'
                         f"{_html_blocks(s.blocks)}</section>" for s in doc.sections)
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            f"<title>{_h(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f'<header><h1>{_h(doc.title)}'
            f'<span class="badge {_h(doc.status_kind)}">{_h(doc.status)}</span></h1>\n'
            f'<p class="subtitle">{_h(doc.subtitle)}</p>\n<div class="facts">{facts}</div>\n'
            f'{_html_blocks(doc.lead)}\n<p class="nav">{nav}</p></header>\n{sections}\n'
            f"<footer>Written by <code>python -m pipeline.report</code> on {_h(generated)}.</footer>\n"
            "</main>\n</body>\n</html>\n")


def write_report(paths, *, compare: bool = False, out: Optional[str] = None,
                 objective: Optional[str] = None, export_roots=None, evaluate: bool = True):
    """One run's report, or a comparison of several runs (or of a tuning directory's trials).

    A comparison is made when `compare` is set, when several paths are given,
    or when the one path is a tuning directory. Returns (markdown path, html path).
    """
    if not paths:
        raise ValueError("give --model_dir=<run>, or --compare <run> <run> ... (or a tuning directory).")
    if compare or len(paths) > 1 or (os.path.isdir(paths[0]) and is_tuning_dir(paths[0])):
        return write_comparison_report(paths, out, objective=objective)
    if out:
        raise ValueError("--out is for --compare; a run's report goes into the run directory.")
    return write_run_report(paths[0], export_roots=export_roots, evaluate=evaluate)
