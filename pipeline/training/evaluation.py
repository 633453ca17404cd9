"""Evaluate a run's checkpoint on one of its splits (what `pipeline.evaluate` and reports show)."""
from __future__ import annotations

import os

import keras
import numpy as np

from pipeline import config as cfg
from pipeline import data, rundir
from pipeline.models import load_model


def load_model_weights(model: keras.Model, filename: str) -> None:
    """Load model weights only from a `.keras` checkpoint (its optimizer may differ)."""
    model.set_weights(load_model(filename).get_weights())


def evaluate_checkpoint(model_dir: str, *, split: str = "test", checkpoint: str = "best"):
    """Loss, accuracy, per-class accuracy and confusion matrix of a run's checkpoint.

    Returns a dict with `loss`, `accuracy`, `per_class` (name -> accuracy),
    `confusion` (numpy [classes, classes], rows = true labels), `class_names`.
    """
    config = rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE))
    if config is None:
        raise rundir.RunDirError(f"{model_dir!r} is not a run directory (no {rundir.CONFIG_FILE}).")
    run = cfg.from_dict(config)
    datasets = data.load_dataset(run.data)
    ds = {"test": datasets.test, "val": datasets.val, "train": None}.get(split)
    if ds is None:
        raise rundir.RunDirError(f"The dataset of {model_dir!r} has no {split!r} split to evaluate.")
    filename = rundir.checkpoint_file(model_dir, checkpoint)
    if not os.path.exists(filename):
        raise rundir.RunDirError(f"{filename} is missing: the run finished no epoch.")
    model = load_model(filename)
    labels, logits = [], []
    for x, y in ds:
        logits.append(model(x, training=False).numpy().astype(np.float32))
        labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    n = len(datasets.class_names)
    loss = float(keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)).mean())
    preds = logits.argmax(-1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_class = {name: float(confusion[i, i] / max(confusion[i].sum(), 1))
                 for i, name in enumerate(datasets.class_names)}
    return {"loss": loss, "accuracy": float((preds == labels).mean()), "per_class": per_class,
            "confusion": confusion, "class_names": list(datasets.class_names), "examples": int(len(labels))}
