"""Classification metrics on NumPy arrays, shared by evaluation, reports and export calibration.

Pure NumPy (scikit-learn where it has the metric), no TensorFlow: reports and
the export's calibration call the same functions, so a number means the same
thing everywhere it is printed.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per-bin confidence, accuracy and count over `bins` equal-width confidence bins.

    Args:
      probabilities: [N, C] class probabilities (rows sum to 1).
      labels: [N] integer true classes.
      bins: number of equal-width bins on [0, 1] (the top bin includes 1.0).

    Returns:
      {"edges": [bins+1], "confidence": [bins], "accuracy": [bins], "count": [bins]};
      empty bins have confidence and accuracy NaN and count 0.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / count
        mean_acc = np.bincount(index, weights=correct, minlength=bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": mean_acc, "count": count}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width bins (Guo et al. 2017)."""
    b = reliability_bins(probabilities, labels, bins)
    total = b["count"].sum()
    if total == 0:
        return float("nan")
    filled = b["count"] > 0
    gaps = np.abs(b["accuracy"][filled] - b["confidence"][filled])
    return float(np.sum(gaps * b["count"][filled]) / total)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class), with probabilities floored at 1e-12."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(picked, 1e-12))))


def classification_report(labels: np.ndarray, predictions: np.ndarray, class_names) -> dict:
    """Per-class precision, recall, F1 and support, macro-F1 and balanced accuracy (scikit-learn).

    Why here: accuracy hides a class the model never gets right when that class
    is small; macro-F1 and balanced accuracy weigh every class alike, so they
    are what the evaluation, the report and the comparison print for
    imbalanced folders. Every class in `class_names` gets a row, also one
    absent from `labels` (support 0, scores 0); macro-F1 and balanced accuracy
    are scikit-learn's own (over the classes that occur), so they equal
    `f1_score(average="macro")` and `balanced_accuracy_score`.

    Returns:
      {"per_class_metrics": {name: {"precision", "recall", "f1", "support"}},
       "macro_f1", "balanced_accuracy", "accuracy"}.
    """
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(np.int64)
    predictions = np.asarray(predictions).astype(np.int64)
    classes = np.arange(len(class_names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0)
    per_class = {str(name): {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                 for i, name in enumerate(class_names)}
    return {"per_class_metrics": per_class,
            "macro_f1": macro_f1(labels, predictions),
            "balanced_accuracy": _balanced_accuracy(labels, predictions),
            "accuracy": float(np.mean(labels == predictions)) if len(labels) else float("nan")}


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """scikit-learn's `f1_score(average="macro")`: the unweighted mean F1 over the classes that occur."""
    from sklearn.metrics import f1_score

    if len(labels) == 0:
        return float("nan")
    return float(f1_score(np.asarray(labels), np.asarray(predictions), average="macro", zero_division=0))


def _balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """scikit-learn's balanced accuracy (mean recall over the true classes), quiet about unseen predictions."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    if len(labels) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": expected on small splits
        return float(balanced_accuracy_score(labels, predictions))


def confused_pairs(confusion: np.ndarray, class_names, top: int = 10) -> list:
    """The `top` most frequent (true, predicted) mistakes of a confusion matrix (rows = true classes).

    Returns:
      [{"true", "predicted", "count", "fraction"}] by count, largest first;
      `fraction` is the share of the true class's images sent to `predicted`.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")
    pairs = []
    for flat in order[:top]:
        i, j = np.unravel_index(flat, off.shape)
        if off[i, j] == 0:
            break
        pairs.append({"true": str(class_names[i]), "predicted": str(class_names[j]), "count": int(off[i, j]),
                      "fraction": float(off[i, j] / max(confusion[i].sum(), 1))})
    return pairs


def per_example_loss(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log p(true class) per example (floored like `negative_log_likelihood`): what ranks the mistakes."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    return -np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12))
