"""Everything a run report shows, read from the run directory (`collect_run`).

Sources, in order of preference (nothing is recomputed that the run already
has): summary.json, checkpoints/state.json and metrics.csv for the numbers;
`evaluation_test.json` + `confusion_test.csv` (written by `pipeline.evaluate`,
and by this module when it has to evaluate) while they are newer than
`checkpoints/best.keras`, else `training.evaluate_checkpoint`; exports are
found by their model card (`pipeline.reporting.exports`). A run without a test
split says so.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from typing import Iterable, Optional

import numpy as np

from pipeline import rundir
from pipeline.reporting import exports, mistakes, network, plots
from pipeline.reporting.status import RunStatus, mtime, read_state, run_status



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
    evaluation: dict = dataclasses.field(default_factory=dict)  # the whole saved evaluation (`mistakes`)


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
    layers: list = dataclasses.field(default_factory=list)   # network.LayerInfo
    trainable_params: Optional[int] = None
    layer_error: str = ""
    exports: list = dataclasses.field(default_factory=list)  # exports.ExportInfo
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
    """(best epoch, its value, the metric that chose it): the run's own record, else metrics.csv."""
    monitor = state.get("best_metric") or summary.get("best_metric") or (
        "val_accuracy" if any(r.get("val_accuracy") is not None for r in metrics) else "accuracy")
    epoch = state.get("best_epoch") or summary.get("best_epoch")
    value = state.get("best_value", summary.get("best_value", summary.get("best_val_accuracy")))
    if epoch is None:
        best = rundir.best_row(metrics, monitor)
        if best is not None:
            epoch, value = best["epoch"], best[monitor]
    return (int(epoch) if epoch is not None else None), value, monitor


def _read_confusion_csv(filename: str) -> tuple[list, list]:
    with open(filename, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, [[int(v) for v in row[1:]] for row in rows[1:]]


def _saved_evaluation(model_dir: str, best: str, accuracy: Optional[float]) -> Optional[dict]:
    """evaluation_test.json with its confusion matrix, if it is of the best checkpoint; else None.

    Newer than the checkpoint is not enough: `pipeline.evaluate --checkpoint=last`
    writes the same files, so they count only when they agree with the run's
    own test accuracy (within one image): the accuracy without TTA when it was
    evaluated with TTA. Files from before per-class F1 existed are stale too.
    """
    evaluation = rundir.path(model_dir, "evaluation_test.json")
    confusion = rundir.path(model_dir, "confusion_test.csv")
    if not all(os.path.exists(p) and (mtime(p) or 0) >= (mtime(best) or 0) for p in (evaluation, confusion)):
        return None
    data = rundir.read_json(evaluation, {}) or {}
    plain = (data.get("tta_accuracy") or {}).get("none", data.get("accuracy"))
    if "macro_f1" not in data or (accuracy is not None and plain is not None and
                                  not abs(plain - accuracy) <= 1.01 / max(int(data.get("examples") or 1), 1)):
        return None
    names, matrix = _read_confusion_csv(confusion)
    data.setdefault("class_names", names)
    data["confusion"] = matrix
    return data


def _test_result(model_dir: str, summary: dict, status: RunStatus, *, evaluate: bool) -> TestResult:
    sizes = summary.get("split_sizes") or {}
    if "test" in sizes and not sizes.get("test"):
        return TestResult(False, "This run has no test split (0 test images): there is no test "
                                 "accuracy, per-class accuracy or confusion matrix; the best "
                                 "validation accuracy is its final number.")
    best = rundir.checkpoint_file(model_dir, "best")
    result = TestResult(False, accuracy=summary.get("test_accuracy"), loss=summary.get("test_loss"),
                        examples=sizes.get("test"))
    data = _saved_evaluation(model_dir, best, result.accuracy)
    if data is not None:
        source = "per-class numbers from evaluation_test.json / confusion_test.csv (best checkpoint)"
    elif not os.path.exists(best):
        result.reason = "No best checkpoint yet: nothing to evaluate on the test split."
        return result
    elif status.kind == "running":
        result.reason = "The run is still training: no test evaluation yet."
        return result
    elif evaluate:
        from pipeline.training import evaluation  # imports TensorFlow
        try:  # with the accuracy under flip TTA beside (the report shows both)
            raw = evaluation.evaluate_checkpoint(model_dir, split="test", checkpoint="best",
                                                 compare_tta=("none", "flip"))
        except Exception as e:  # data not on this machine, unloadable checkpoint, ...
            result.reason = f"The test split could not be evaluated here ({type(e).__name__}: {e})."
            return result
        evaluation.save_evaluation(model_dir, "test", raw)
        data = {k: v for k, v in raw.items() if k != "top_loss_images"}
        data["confusion"] = raw["confusion"].tolist()
        source = "per-class numbers from evaluating the best checkpoint (saved as evaluation_test.json)"
    else:
        result.reason = "Test evaluation skipped (evaluate=False)."
        return result
    result.available = True
    result.per_class = dict(data.get("per_class") or {})
    result.confusion = data["confusion"]
    result.class_names = list(data.get("class_names") or [])
    result.evaluation = data
    result.examples = data.get("examples", result.examples)
    if result.accuracy is None:   # interrupted runs: the report's own evaluation
        result.accuracy, result.loss = data.get("accuracy"), data.get("loss")
        source += "; the run itself never reached its final test evaluation"
    result.reason = source
    return result


def _layers(data: RunData) -> None:
    try:
        model = network.load_run_model(data.model_dir)
    except Exception as e:
        data.layer_error = f"{type(e).__name__}: {e}".splitlines()[0]
        return
    data.layers = network.list_layers(model)
    data.trainable_params = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    if not data.summary.get("parameters"):
        data.summary["parameters"] = int(model.count_params())


def _figures(data: RunData, plots_dir: str) -> None:
    jobs = [("curves", "curves.png", lambda: plots.curves_figure(data.model_dir)),
            ("lr", "lr.png", lambda: plots.lr_figure(data.model_dir))]
    if data.test.available and data.test.confusion is not None:
        jobs.append(("confusion", "confusion_test.png", lambda: plots.confusion_figure(
            np.asarray(data.test.confusion), data.test.class_names or rundir.read_labels(data.model_dir),
            title=f"Confusion matrix (test split, best checkpoint): {data.name}")))
    jobs += mistakes.figure_jobs(data.model_dir, data.name, data.test.evaluation)
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
    best_epoch, best_value, monitor = _best(metrics, read_state(model_dir), summary)
    data = RunData(os.path.normpath(model_dir), plots.run_label(model_dir), config, summary, metrics, status,
                   verb, command, best_epoch, best_value, monitor,
                   _test_result(model_dir, summary, status, evaluate=evaluate))
    if load_model:
        _layers(data)
    for path in exports.find_exports(model_dir, export_roots):
        data.exports.append(exports.read_export(path) if read_signatures
                            else exports.ExportInfo(path, None, "", "", []))
    _figures(data, plots_dir or rundir.path(model_dir, plots.PLOTS_DIR))
    return data
