"""A run's export for deployment: calibration, rejection table, quantization data and accuracy checks.

`export_run(model_dir, settings, ...)` is `export.export_run` with these
settings; `plan_for_run(model_dir, model, settings)` reads the run's own data config
(`config.json`, as `pipeline.evaluate` does) and returns the
`formats.DeployPlan` that `export.export_model` writes, plus the numbers the
model card and the run report show:

  * the temperature fitted on the validation logits of the exported
    checkpoint (`calibration.fit_temperature`), and ECE/NLL before and after
    on the test split (the shared `pipeline.metrics` functions);
  * the rejection table on the test split (accepted accuracy and fraction
    rejected per threshold), with the calibrated probabilities;
  * int8's representative dataset: `quantize_samples` training images;
  * the test accuracy of every written file IN ITS RUNTIME (onnxruntime, the
    LiteRT interpreter) next to the float Keras model's, measured on the
    unpublished version before it is renamed into place.

The same numbers go to `<run>/deploy.json`, which the run report's deploy
section reads.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import numpy as np

from pipeline import rundir
from pipeline.serving import calibration, export, formats, head, runtimes

DEPLOY_FILE = "deploy.json"


@dataclasses.dataclass(frozen=True)
class DeploySettings:
    """`pipeline.export`'s deployment flags.

    Attributes:
      format: `formats.FORMAT_CHOICES` (`all`: SavedModel, ONNX and LiteRT).
      quantize: LiteRT quantization (`formats.QUANTIZATIONS`).
      quantize_samples: training images int8 calibrates its ranges on.
      calibrate: fit a temperature on the validation split (skipped, with a note, without one).
      reject_below: add `is_unknown` (top probability below it); None: no rejection.
      tta: `pipeline.tta.TTA_MODES` mode averaged inside every format.
    """
    format: str = "saved_model"
    quantize: str = "none"
    quantize_samples: int = 256
    calibrate: bool = True
    reject_below: Optional[float] = None
    tta: str = "none"

    def formats(self) -> tuple:
        chosen = formats.formats_of(self.format)
        return chosen if "saved_model" in chosen else ("saved_model",) + chosen


def check_settings(settings: DeploySettings) -> None:
    """One-line ValueError for settings that cannot work, before any model or data is loaded."""
    chosen = settings.formats()
    if settings.quantize not in formats.QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(formats.QUANTIZATIONS)}")
    if settings.quantize != "none" and "litert" not in chosen:
        raise ValueError(f"--quantize={settings.quantize} applies to LiteRT: add --format=litert (or all)")
    if settings.quantize_samples < 1:
        raise ValueError("--quantize_samples must be at least 1")
    head.DeployOptions(tta=settings.tta, reject_below=settings.reject_below)  # validates both
    formats.check_installed(chosen)


def _arrays(dataset, limit: Optional[int] = None):
    """(images float32 [N,H,W,3], labels int64 [N]) of a batched dataset, at most `limit` images."""
    images, labels = [], []
    for x, y in dataset:
        images.append(np.asarray(x, dtype=np.float32))
        labels.append(np.asarray(y).astype(np.int64))
        if limit is not None and sum(len(b) for b in images) >= limit:
            break
    if not images:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def _logits(model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    return np.concatenate([np.asarray(model(images[i:i + batch_size], training=False), dtype=np.float32)
                           for i in range(0, len(images), batch_size)])


def _run_datasets(model_dir: str):
    from pipeline import config as cfg
    from pipeline import data
    config = rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE))
    if config is None:
        raise rundir.RunDirError(f"{model_dir!r} has no {rundir.CONFIG_FILE}: its data is unknown")
    return data.load_dataset(cfg.from_dict(config).data)


def _representative(images: np.ndarray):
    def generate():
        for image in images:
            yield [image[None].astype(np.float32)]
    return generate


def plan_for_run(model_dir: str, model, settings: DeploySettings):
    """(DeployPlan, report dict) for exporting `model`, a checkpoint of the run `model_dir`."""
    datasets = _run_datasets(model_dir)
    report = {"settings": dataclasses.asdict(settings)}
    temperature = 1.0
    if settings.calibrate and datasets.val is not None:
        val_x, val_y = _arrays(datasets.val)
        temperature = calibration.fit_temperature(_logits(model, val_x), val_y)
        report["validation_examples"] = int(len(val_y))
    elif settings.calibrate:
        print("note: the run has no validation split: no calibration (raw softmax)", file=sys.stderr)
    test_x, test_y = _arrays(datasets.test) if datasets.test is not None else (None, None)
    if test_x is not None:
        test_logits = _logits(model, test_x)
        report["calibration"] = calibration.calibration_summary(test_logits, test_y, temperature)
        report["rejection"] = calibration.rejection_table(calibration.softmax(test_logits, temperature),
                                                          test_y)
        report["float_test_accuracy"] = report["calibration"]["accuracy"]
    report["temperature"] = temperature
    representative = None
    if settings.quantize == "int8":
        samples, _ = _arrays(datasets.train, settings.quantize_samples)
        representative = _representative(samples)

    def check(directory: str) -> dict:
        if test_x is None:
            return {"test_accuracy": {}}
        # Every file in its runtime, with the export's TTA; the Keras float model without TTA beside.
        measured = {"keras_float_no_tta": report["float_test_accuracy"]}
        for path in runtimes.runtimes_of(directory):
            runtime = runtimes.open_runtime(path)
            measured[runtime.name] = runtimes.accuracy(runtime, test_x, test_y)
        report["test_accuracy"] = measured
        return {"test_accuracy": measured, "calibration": report.get("calibration"),
                "rejection": report.get("rejection")}

    options = head.DeployOptions(tta=settings.tta, temperature=temperature,
                                 reject_below=settings.reject_below)
    plan = formats.DeployPlan(options=options, formats=settings.formats(), quantize=settings.quantize,
                              representative=representative, check=check,
                              published=lambda path: write_run_record(model_dir, path, report))
    return plan, report


def write_run_record(model_dir: str, export_dir: str, report: dict) -> None:
    """`<run>/deploy.json`: the deploy numbers of the latest export of this run (the report reads it)."""
    card = rundir.read_json(os.path.join(export_dir, "assets", "model_card.json"), {}) or {}
    record = {**report, "export": os.path.abspath(export_dir), "files": card.get("files", {})}
    rundir.write_json_atomic(rundir.path(model_dir, DEPLOY_FILE), record)


def export_run(model_dir: str, settings: DeploySettings, **kwargs) -> str:
    """`export.export_run(model_dir, **kwargs)` writing what `settings` ask; returns the version folder.

    The settings are checked first (a bad combination or a missing extra is
    one line before the checkpoint is read); `<run>/deploy.json` is written
    once the version is published.
    """
    check_settings(settings)
    return export.export_run(model_dir, planner=lambda model: plan_for_run(model_dir, model, settings)[0],
                             **kwargs)
