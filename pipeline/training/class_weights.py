"""`--class_weight=none|balanced|<file.json>`: per-class loss weights, applied in our loop.

Keras's `fit(class_weight=...)` turns a {class index: weight} dict into sample
weights; our loop does not call `fit` (see `loop.py`), and its labels are
one-hot, possibly MixUp/CutMix-mixed and label-smoothed. So the weight of an
example is the label-weighted sum of the class weights, `sum_c y_c * w_c`, with
`y` the label the loss sees (after smoothing): for a one-hot label that is
Keras's weight of its class. The weighted per-example losses are summed and
divided by the number of examples, as Keras's `sum_over_batch_size` does with
sample weights. Only the training loss is weighted; validation and test report
the plain loss, so runs with and without weights compare.

`balanced` is scikit-learn's `compute_class_weight("balanced")`:
`n_examples / (n_classes * count_c)`, from the training split's label counts. A
JSON file maps class names (or indices) to weights; every class must be given.
(`pipeline.validation.check_recipes` checks the flag's form before TensorFlow.)
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf


def label_counts(datasets) -> np.ndarray:
    """Training examples per class, read from the labels of the training split (images left undecoded)."""
    num_classes = len(datasets.class_names)
    stream = getattr(datasets, "stream", None)
    if stream is not None:
        labels = stream.elements.map(lambda *item: item[1], num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    else:
        labels = datasets.train.map(lambda x, y: y)
    counts = np.zeros(num_classes, np.int64)
    for batch in labels.as_numpy_iterator():
        counts += np.bincount(np.asarray(batch).reshape(-1).astype(np.int64), minlength=num_classes)
    return counts


def balanced(counts: Sequence[int]) -> np.ndarray:
    """scikit-learn's balanced weights for these per-class counts (a class with no example gets 1)."""
    from sklearn.utils.class_weight import compute_class_weight

    counts = np.asarray(counts, np.int64)
    present = np.flatnonzero(counts)
    labels = np.repeat(present, counts[present])
    weights = np.ones(len(counts), np.float64)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights.astype(np.float32)


def from_file(filename: str, class_names: Sequence[str]) -> np.ndarray:
    """Weights from a JSON object keyed by class name or index (every class once)."""
    try:
        with open(filename, encoding="utf-8") as f:
            given = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--class_weight={filename} cannot be read as JSON ({e}).") from None
    if not isinstance(given, dict):
        raise ValueError(f"--class_weight={filename} must hold a JSON object {{\"class name\": weight}}.")
    index = {name: i for i, name in enumerate(class_names)}
    weights = np.full(len(class_names), np.nan, np.float32)
    for key, value in given.items():
        i = index.get(key, int(key) if str(key).isdigit() else None)
        if i is None or not 0 <= i < len(class_names):
            raise ValueError(f"--class_weight={filename}: unknown class {key!r}; classes: "
                             f"{', '.join(class_names[:10])}{'...' if len(class_names) > 10 else ''}.")
        if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"--class_weight={filename}: the weight of {key!r} must be a number >= 0.")
        weights[i] = value
    missing = [class_names[i] for i in np.flatnonzero(np.isnan(weights))]
    if missing:
        raise ValueError(f"--class_weight={filename} gives no weight for {', '.join(missing[:5])}.")
    return weights


def class_weights(spec: str, datasets) -> Optional[np.ndarray]:
    """The run's per-class weights (float32 [classes]), or None for `none` (the loop adds nothing)."""
    if spec == "none":
        return None
    if spec == "balanced":
        return balanced(label_counts(datasets))
    return from_file(spec, list(datasets.class_names))


def example_weights(y, weights, *, label_smoothing: float = 0.0):
    """Per-example weight `sum_c y_c w_c` of one-hot/mixed labels `y`, after the loss's label smoothing."""
    weights = tf.cast(weights, y.dtype)
    weighted = tf.linalg.matvec(y, weights)
    if label_smoothing:
        weighted = (1.0 - label_smoothing) * weighted + label_smoothing * tf.reduce_mean(weights)
    return weighted
