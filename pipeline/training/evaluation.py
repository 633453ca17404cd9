"""Evaluate a run's checkpoint on one of its splits (what `pipeline.evaluate` and reports show).

One pass over the split gives everything a person needs to see the model's
mistakes: loss and accuracy, per-class precision/recall/F1 (scikit-learn, via
`pipeline.metrics`), macro-F1 and balanced accuracy (what matters on an
imbalanced folder), the reliability bins and ECE, the most-confused class
pairs, and the highest-loss images themselves (kept as a running top-k, so a
large split never sits in memory). With `tta` the headline numbers are of the
test-time-augmented probabilities (`pipeline.tta`), and the accuracy of every
other requested mode is reported beside them.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import keras
import numpy as np

from pipeline import config as cfg
from pipeline import data, metrics, rundir, tta
from pipeline.models import load_model

TOP_LOSSES = 16          # highest-loss images kept for the report
THUMBNAIL_SIDE = 96      # their longest side in pixels (kept small: the report shows a grid)


def top_losses_file(model_dir: str, split: str) -> str:
    """`<run>/top_losses_<split>.npz`: the thumbnails beside evaluation_<split>.json."""
    return rundir.path(model_dir, f"top_losses_{split}.npz")


def load_model_weights(model: keras.Model, filename: str) -> None:
    """Load model weights only from a `.keras` checkpoint (its optimizer may differ)."""
    model.set_weights(load_model(filename).get_weights())


@dataclasses.dataclass
class _TopK:
    """The k highest-loss examples seen so far (images as uint8 thumbnails)."""

    k: int
    loss: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    images: np.ndarray = None

    def add(self, loss: np.ndarray, start: int, images) -> None:
        keep = np.argsort(-loss, kind="stable")[:self.k]  # only this batch's best can enter the top-k
        thumbs = _thumbnails(images, keep)
        loss, index = loss[keep], start + keep
        if self.images is not None:
            loss, index = np.concatenate([self.loss, loss]), np.concatenate([self.index, index])
            thumbs = np.concatenate([self.images, thumbs])
        order = np.argsort(-loss, kind="stable")[:self.k]
        self.loss, self.index, self.images = loss[order], index[order], thumbs[order]


def _thumbnails(images, rows: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    picked = tf.gather(tf.convert_to_tensor(images), rows)
    side = max(int(picked.shape[1]), int(picked.shape[2]))
    if side > THUMBNAIL_SIDE:
        scale = THUMBNAIL_SIDE / side
        size = (max(1, round(int(picked.shape[1]) * scale)), max(1, round(int(picked.shape[2]) * scale)))
        picked = tf.image.resize(picked, size, antialias=True)
    return np.clip(np.round(picked.numpy() * 255.0), 0, 255).astype(np.uint8)


def _split_dataset(model_dir: str, split: str):
    config = rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE))
    if config is None:
        raise rundir.RunDirError(f"{model_dir!r} is not a run directory (no {rundir.CONFIG_FILE}).")
    datasets = data.load_dataset(cfg.from_dict(config).data)
    ds = {"test": datasets.test, "val": datasets.val}.get(split)
    if ds is None:
        raise rundir.RunDirError(f"The dataset of {model_dir!r} has no {split!r} split to evaluate.")
    return ds, list(datasets.class_names)


def predict_split(model: keras.Model, ds, modes: Sequence[str], *, top_k: int = TOP_LOSSES):
    """Probabilities of `model` on every batch of `ds` for each TTA mode, and the top-k losses of the first.

    Returns:
      (labels [N], {mode: probabilities [N, C]}, _TopK of modes[0]).
    """
    def logits(x):
        return model(x, training=False)

    labels, probs, top, seen = [], {m: [] for m in modes}, _TopK(top_k), 0
    for x, y in ds:
        y = y.numpy().astype(np.int64)
        for mode in modes:
            probs[mode].append(tta.tta_probabilities(logits, x, mode).numpy().astype(np.float64))
        if top_k:
            top.add(metrics.per_example_loss(probs[modes[0]][-1], y), seen, x)
        labels.append(y)
        seen += len(y)
    return np.concatenate(labels), {m: np.concatenate(p) for m, p in probs.items()}, top


def _json_floats(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def summarize(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Every number of an evaluation from its labels and (averaged) probabilities."""
    n = len(class_names)
    preds = probabilities.argmax(-1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_class = {name: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, name in enumerate(class_names)}
    bins = metrics.reliability_bins(probabilities, labels)
    return {"loss": metrics.negative_log_likelihood(probabilities, labels),
            "accuracy": float((preds == labels).mean()), "per_class": per_class, "confusion": confusion,
            "class_names": list(class_names), "examples": int(len(labels)),
            **metrics.classification_report(labels, preds, class_names),
            "ece": metrics.expected_calibration_error(probabilities, labels),
            "reliability": {"edges": _json_floats(bins["edges"]), "confidence": _json_floats(bins["confidence"]),
                            "accuracy": _json_floats(bins["accuracy"]), "count": bins["count"].tolist()},
            "confused_pairs": metrics.confused_pairs(confusion, class_names)}


def evaluate_checkpoint(model_dir: str, *, split: str = "test", checkpoint: str = "best", tta_mode: str = "none",
                        compare_tta: Sequence[str] = ("none",), top_k: int = TOP_LOSSES):
    """Loss, accuracy, per-class P/R/F1, calibration and the worst images of a run's checkpoint.

    Args:
      model_dir: the run directory.
      split: `test` or `val`.
      checkpoint: `best` or `last`.
      tta_mode: the TTA of the headline numbers (`pipeline.tta.TTA_MODES`).
      compare_tta: other modes whose accuracy is reported in `tta_accuracy` too
        (the report shows accuracy with and without TTA).
      top_k: how many highest-loss images to keep.

    Returns a dict with `loss`, `accuracy`, `per_class` (name -> accuracy),
    `per_class_metrics` (name -> precision/recall/f1/support), `macro_f1`,
    `balanced_accuracy`, `ece`, `reliability`, `confused_pairs`, `confusion`
    (numpy [classes, classes], rows = true labels), `class_names`, `tta`,
    `tta_accuracy` (mode -> accuracy), `top_losses` (their index, true and
    predicted class, probabilities, loss) and `top_loss_images` (uint8
    thumbnails; `save_evaluation` writes them beside the JSON).
    """
    modes = [tta_mode] + [m for m in dict.fromkeys(compare_tta) if m != tta_mode]
    for mode in modes:
        tta.view_count(mode)  # an unknown mode is one line, before the data loads
    ds, class_names = _split_dataset(model_dir, split)
    filename = rundir.require_checkpoint(model_dir, checkpoint)
    labels, probs, top = predict_split(load_model(filename), ds, modes, top_k=top_k)
    result = summarize(labels, probs[tta_mode], class_names)
    result.update(split=split, checkpoint=checkpoint, tta=tta_mode,
                  tta_accuracy={m: float((p.argmax(-1) == labels).mean()) for m, p in probs.items()})
    chosen = probs[tta_mode]
    result["top_losses"] = [
        {"index": int(i), "true": class_names[labels[i]], "predicted": class_names[int(chosen[i].argmax())],
         "probability": float(chosen[i].max()), "true_probability": float(chosen[i, labels[i]]),
         "loss": float(loss)} for i, loss in zip(top.index, top.loss)]
    result["top_loss_images"] = top.images if top.images is not None else np.zeros((0, 1, 1, 3), np.uint8)
    return result


def save_evaluation(model_dir: str, split: str, result: dict) -> None:
    """evaluation_<split>.json, confusion_<split>.csv and top_losses_<split>.npz (thumbnails), atomically."""
    images = result.get("top_loss_images")
    rundir.write_evaluation(model_dir, split, {k: v for k, v in result.items() if k != "top_loss_images"})
    if images is not None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(buffer.getvalue())
        rundir.replace_atomic(top_losses_file(model_dir, split), write)


def evaluation_lines(result: dict) -> list[str]:
    """The evaluation as people read it in a terminal (what `pipeline.evaluate` prints)."""
    by_mode = ", ".join(f"{m} {a:.4f}" for m, a in result["tta_accuracy"].items())
    lines = [f"{result['split']}: loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, macro-F1 "
             f"{result['macro_f1']:.4f}, balanced accuracy {result['balanced_accuracy']:.4f}, ECE "
             f"{result['ece']:.4f} ({result['examples']} images, {result['checkpoint']} checkpoint, "
             f"TTA {result['tta']}; accuracy by TTA: {by_mode})"]
    width = max([len("class")] + [len(n) for n in result["class_names"]])
    lines.append(f"  {'class':<{width}}  precision  recall      F1  support")
    for name, m in result["per_class_metrics"].items():
        lines.append(f"  {name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  "
                     f"{m['support']:7d}")
    for pair in result["confused_pairs"][:5]:
        lines.append(f"  confused: {pair['true']} -> {pair['predicted']} ({pair['count']} images)")
    return lines


def evaluate_and_save(model_dir: str, *, split: str = "test", checkpoint: str = "best",
                      tta_mode: str = "none") -> dict:
    """`evaluate_checkpoint` (with the accuracy without TTA beside) and `save_evaluation`: `pipeline.evaluate`."""
    result = evaluate_checkpoint(model_dir, split=split, checkpoint=checkpoint, tta_mode=tta_mode,
                                 compare_tta=("none",))
    save_evaluation(model_dir, split, result)
    return result
