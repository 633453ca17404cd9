"""The run report's "Deployment" section: quantized vs float accuracy, calibration, rejection.

It reads `<run>/deploy.json`, which `pipeline.export` writes for the run's
latest deployment export (`pipeline.serving.deploy`): the test accuracy of
every written file measured in its own runtime next to the float Keras
model's (the accuracy a quantization costs is what a user decides on), ECE and
NLL on the test split before and after the temperature fitted on the
validation split, and the rejection table with its curve (accuracy on the
accepted images against the fraction rejected), so a user can pick
`--reject_below`. A run never exported that way gets no section.
"""
from __future__ import annotations

import os
from typing import Optional

from pipeline import rundir
from pipeline.reporting.document import Image, Para, Section, Table, num, pct

DEPLOY_FILE = "deploy.json"  # = pipeline.serving.deploy.DEPLOY_FILE (that module pulls in the serving code)
REJECTION_PLOT = "rejection_test.png"
RUNTIME_NAMES = {"keras_float_no_tta": "Keras, float32 (no TTA)", "saved_model": "SavedModel (TensorFlow)",
                 "onnxruntime": "model.onnx (onnxruntime)", "litert": "model.tflite (LiteRT interpreter)"}


def read_deploy_record(model_dir: str) -> Optional[dict]:
    return rundir.read_json(rundir.path(model_dir, DEPLOY_FILE), None)


def rejection_figure(rows: list, *, title: str):
    """Accuracy on accepted images (left axis) and fraction rejected (right axis) per threshold."""
    from pipeline.reporting import plots
    fig = plots.new_figure(5.5, 3.6)
    ax = fig.subplots()
    kept = [r for r in rows if r["accepted_accuracy"] is not None]
    ax.plot([r["threshold"] for r in kept], [r["accepted_accuracy"] for r in kept], "o-",
            color=plots.TRAIN_COLOR, label="accuracy on accepted")
    ax.set_xlabel("reject_below (top-class probability threshold)")
    ax.set_ylabel("accuracy on accepted images")
    other = ax.twinx()
    other.plot([r["threshold"] for r in rows], [r["rejected"] for r in rows], "s--", color=plots.VAL_COLOR,
               label="fraction rejected")
    other.set_ylabel("fraction rejected (unknown)")
    other.set_ylim(0, 1)
    ax.set_title(title)
    fig.legend(loc="lower left", fontsize=8)
    return fig


def _accuracy_blocks(record: dict) -> list:
    measured = record.get("test_accuracy") or {}
    if not measured:
        return []
    files = record.get("files") or {}
    quantize = (files.get("litert") or {}).get("quantize")
    float_acc = measured.get("keras_float_no_tta")
    rows = []
    for key, acc in measured.items():
        name = RUNTIME_NAMES.get(key, key) + (f", quantize={quantize}" if key == "litert" and quantize else "")
        drop = "–" if float_acc is None or key == "keras_float_no_tta" else f"{(acc - float_acc) * 100:+.2f} pt"
        rows.append([name, pct(acc), drop])
    return [Table(["runtime", "test accuracy", "vs float"], rows, "lrr",
                  caption="Test split, each file in its own runtime (with the export's TTA and rejection off).")]


def _calibration_blocks(record: dict) -> list:
    c = record.get("calibration")
    if not c:
        return []
    return [Table(["", "ECE (15 bins)", "NLL"],
                  [["raw softmax", num(c["ece_before"]), num(c["nll_before"])],
                   [f"temperature {c['temperature']:.3f}", num(c["ece_after"]), num(c["nll_after"])]], "lrr",
                  caption=f"Test split ({c['examples']} images); the temperature was fitted on the validation "
                          "split and changes probabilities, never the predicted class.")]


def _rejection_blocks(record: dict, model_dir: str, base_dir: str) -> list:
    rows = record.get("rejection") or []
    if not rows:
        return []
    table = Table(["reject_below", "rejected", "accuracy on accepted"],
                  [[f"{r['threshold']:.2f}", pct(r["rejected"]),
                    "–" if r["accepted_accuracy"] is None else pct(r["accepted_accuracy"])] for r in rows],
                  "rrr", caption="Test split, calibrated probabilities: pick --reject_below from this.")
    from pipeline.reporting import plots
    path = os.path.join(rundir.path(model_dir, plots.PLOTS_DIR), REJECTION_PLOT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    plots.save_figure(rejection_figure(rows, title="Rejection (test split)"), path)
    return [table, Image(path, os.path.relpath(path, base_dir).replace(os.sep, "/"), "Rejection curve")]


def deploy_sections(model_dir: str, base_dir: str) -> list:
    """[the Deployment section] for a run with a `deploy.json`, else []."""
    record = read_deploy_record(model_dir)
    if not record:
        return []
    settings = record.get("settings") or {}
    lead = Para(["Deployment export ", ("code", record.get("export", "?")),
                 f": format {settings.get('format', '?')}, quantize {settings.get('quantize', 'none')}, "
                 f"TTA {settings.get('tta', 'none')}, reject_below {settings.get('reject_below')}."])
    blocks = [lead, *_accuracy_blocks(record), *_calibration_blocks(record),
              *_rejection_blocks(record, model_dir, base_dir)]
    return [Section("Deployment: quantization, calibration, rejection", "deploy", blocks)]
