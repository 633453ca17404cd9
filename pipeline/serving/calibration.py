"""Temperature scaling and the rejection table an export's model card and the run report show.

Pure NumPy/SciPy on logits (no TensorFlow), so they are tested against their
definitions directly. Temperature scaling (Guo et al. 2017) fits ONE scalar T
on the validation logits, minimizing the negative log-likelihood of
softmax(logits / T): it changes how confident the probabilities are, never
which class is on top. ECE and NLL come from `pipeline.metrics`, the functions
every report uses.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from pipeline import metrics

# log(T) is searched in [-LOG_T_BOUND, LOG_T_BOUND]: T from 1/20 to 20.
LOG_T_BOUND = float(np.log(20.0))
REJECTION_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of `logits / temperature` in float64 (scipy's, numerically stable)."""
    from scipy.special import softmax as scipy_softmax
    return scipy_softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimizing NLL(softmax(logits / T), labels) (bounded 1-D search).

    Raises:
      ValueError: no examples, or logits and labels of different lengths.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if len(logits) == 0 or len(logits) != len(labels):
        raise ValueError(f"temperature fitting needs matching logits and labels, got {len(logits)} "
                         f"and {len(labels)}")
    rows = np.arange(len(labels))

    def nll(log_t):
        return -float(np.mean(log_softmax(logits / np.exp(log_t), axis=-1)[rows, labels]))

    result = minimize_scalar(nll, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE (15 bins) and NLL of `logits` before (T=1) and after `temperature`, plus the accuracy."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "examples": int(len(labels)),
        "accuracy": float((before.argmax(-1) == np.asarray(labels)).mean()),
        "ece_before": metrics.expected_calibration_error(before, labels),
        "ece_after": metrics.expected_calibration_error(after, labels),
        "nll_before": metrics.negative_log_likelihood(before, labels),
        "nll_after": metrics.negative_log_likelihood(after, labels),
    }


def rejection_table(probabilities: np.ndarray, labels: np.ndarray,
                    thresholds: Optional[Sequence[float]] = None) -> list[dict]:
    """Per threshold P: the fraction of images rejected (top probability < P) and the accuracy on the rest.

    `accepted_accuracy` is None when every image is rejected.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    top, correct = probabilities.max(-1), probabilities.argmax(-1) == labels
    rows = []
    for p in REJECTION_THRESHOLDS if thresholds is None else thresholds:
        accepted = top >= p
        rows.append({"threshold": float(p), "rejected": float(1.0 - accepted.mean()),
                     "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else None})
    return rows
