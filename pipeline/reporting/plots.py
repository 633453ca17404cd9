"""Figures of a run's numbers (matplotlib, Agg backend): curves, learning rate, confusion, comparison.

  curves      loss and accuracy per epoch, train against validation
  lr          the learning rate used per epoch (metrics.csv `lr`)
  confusion   the test (or val) confusion matrix with class names
  compare     val_accuracy and val_loss of several runs, labelled by the
              settings in which their config.json files differ

They read the run directory (`pipeline.rundir`); the network's own pictures
are `pipeline.reporting.views`. Every figure has a fixed pixel size (inches *
DPI, no tight bounding box) so files are comparable between runs.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after the backend choice)

import numpy as np  # noqa: E402

from pipeline import rundir  # noqa: E402
from pipeline.reporting.settings import compare_labels, format_value  # noqa: E402

DPI = 100
PLOTS_DIR = "plots"
TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"


def new_figure(width: float, height: float) -> Figure:
    """A figure of `width` x `height` inches at DPI, laid out by matplotlib (no tight crop)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, filename: str) -> str:
    """Write `fig` as PNG at its own size (atomic: temp file, then rename)."""
    rundir.replace_atomic(filename, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png", facecolor="white"))
    return filename


def run_label(model_dir: str) -> str:
    """A run as people name it in titles and tables: its directory's name."""
    return os.path.basename(os.path.normpath(model_dir))


def require_run(model_dir: str) -> None:
    """Raise RunDirError (one clear line) unless `model_dir` is a run directory."""
    if not os.path.isdir(model_dir):
        raise rundir.RunDirError(f"Run directory {model_dir!r} does not exist.")
    if not os.path.exists(rundir.path(model_dir, rundir.CONFIG_FILE)):
        raise rundir.RunDirError(f"{model_dir!r} is not a run directory (no {rundir.CONFIG_FILE}).")


def _metrics(model_dir: str) -> list[dict]:
    require_run(model_dir)
    rows = rundir.read_metrics(model_dir)
    if not rows:
        raise rundir.RunDirError(f"{model_dir!r} has no finished epoch ({rundir.METRICS_FILE} is "
                                 "missing or empty).")
    return rows


def _column(rows, key):
    xs = [r["epoch"] for r in rows if r.get(key) is not None]
    ys = [r[key] for r in rows if r.get(key) is not None]
    return xs, ys


def _wide_range(values, ratio: float) -> bool:
    positive = [v for v in values if v is not None and v > 0]
    return bool(positive) and max(positive) / min(positive) >= ratio


def _epoch_axis(ax, epochs):
    ax.set_xlabel("epoch")
    if epochs and max(epochs) <= 20:
        ax.set_xticks(range(1, max(epochs) + 1))
    ax.grid(True, alpha=0.3)


def curves_figure(model_dir: str) -> Figure:
    """Loss and accuracy per epoch, train (solid) against validation (dashed)."""
    rows = _metrics(model_dir)
    summary = rundir.read_json(rundir.path(model_dir, rundir.SUMMARY_FILE), {}) or {}
    best = summary.get("best_epoch")
    fig = new_figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, label in ((ax_loss, "loss", "loss (cross-entropy)"), (ax_acc, "accuracy", "accuracy")):
        x, y = _column(rows, key)
        ax.plot(x, y, "o-", color=TRAIN_COLOR, label=f"train {key}", markersize=4)
        vx, vy = _column(rows, f"val_{key}")
        if vy:
            ax.plot(vx, vy, "s--", color=VAL_COLOR, label=f"validation {key}", markersize=4)
        if best:
            ax.axvline(best, color="gray", linestyle=":", linewidth=1, label=f"best epoch ({best})")
        ax.set_ylabel(label)
        _epoch_axis(ax, x)
        ax.legend(loc="best", fontsize=9)
    if _wide_range(_column(rows, "loss")[1] + _column(rows, "val_loss")[1], 30):
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss (cross-entropy, log scale)")
    ax_loss.set_title("Loss")
    ax_acc.set_title("Accuracy")
    fig.suptitle(f"Training curves: {run_label(model_dir)}", fontsize=13)
    return fig


def lr_figure(model_dir: str) -> Figure:
    """The learning rate of each epoch's first step, as metrics.csv recorded it."""
    rows = _metrics(model_dir)
    x, y = _column(rows, "lr")
    if not y:
        raise rundir.RunDirError(f"{rundir.METRICS_FILE} of {model_dir!r} has no lr column values.")
    fig = new_figure(7, 4.2)
    ax = fig.subplots()
    ax.plot(x, y, "o-", color="#2ca02c", markersize=5, label="lr at each epoch's first step")
    if _wide_range(y, 50):
        ax.set_yscale("log")
        ax.set_ylabel("learning rate (log scale)")
    else:
        ax.set_ylabel("learning rate")
        ax.set_ylim(bottom=0)
    _epoch_axis(ax, x)
    config = rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE), {}) or {}
    train = config.get("train", {})
    detail = ", ".join(f"{k}={v}" for k, v in (("schedule", train.get("schedule")),
                                                ("warmup_epochs", train.get("warmup_epochs")))
                       if v not in (None, "", 0, 0.0))
    ax.set_title(f"Learning-rate schedule: {run_label(model_dir)}" + (f"\n({detail})" if detail else ""))
    ax.legend(loc="best", fontsize=9)
    return fig


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], *,
                     title: str = "Confusion matrix") -> Figure:
    """Counts annotated; colour is the share of the true class (row-normalized)."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    size = min(16.0, max(6.0, 0.45 * n + 2.5))
    fig = new_figure(size + 1.2, size)
    ax = fig.subplots()
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 10 or
                      max(len(c) for c in class_names) > 4 else 0, fontsize=9)
        ax.set_yticks(range(n), labels=class_names, fontsize=9)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = confusion.sum()
    accuracy = np.trace(confusion) / total if total else float("nan")
    ax.set_title(f"{title}\naccuracy {accuracy:.2%} on {int(total)} images")
    return fig


def compare_figure(model_dirs: Sequence[str]) -> Figure:
    """val_accuracy and val_loss per epoch of several runs, labelled by their differences."""
    if len(model_dirs) < 2:
        raise ValueError("compare needs at least two run directories (positional arguments or "
                         "--runs=a,b).")
    metrics = [_metrics(d) for d in model_dirs]
    configs = [rundir.read_json(rundir.path(d, rundir.CONFIG_FILE), {}) for d in model_dirs]
    labels, common = compare_labels(configs, [run_label(d) for d in model_dirs])
    fig = new_figure(12, 4.8)
    ax_acc, ax_loss = fig.subplots(1, 2)
    colors = matplotlib.colormaps["tab10"].colors
    all_losses = []
    for i, (rows, label) in enumerate(zip(metrics, labels)):
        color = colors[i % len(colors)]
        split = "val_" if any(r.get("val_accuracy") is not None for r in rows) else ""
        suffix = "" if split else " (train: no validation split)"
        x, y = _column(rows, f"{split}accuracy")
        ax_acc.plot(x, y, "o-", color=color, markersize=3, label=label + suffix)
        x, y = _column(rows, f"{split}loss")
        all_losses += y
        ax_loss.plot(x, y, "o-", color=color, markersize=3, label=label + suffix)
    ax_acc.set_title("Validation accuracy")
    ax_acc.set_ylabel("val_accuracy")
    ax_loss.set_title("Validation loss")
    ax_loss.set_ylabel("val_loss")
    if _wide_range(all_losses, 30):
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("val_loss (log scale)")
    epochs = [r["epoch"] for rows in metrics for r in rows]
    for ax in (ax_acc, ax_loss):
        _epoch_axis(ax, epochs)
    handles, texts = ax_acc.get_legend_handles_labels()
    fig.legend(handles, texts, loc="outside lower center", ncol=min(len(labels), 3), fontsize=9,
               title="runs differ in")
    shared = ", ".join(f"{k}={format_value(common[k])}" for k in ("model", "dataset", "optimizer")
                       if k in common)
    fig.suptitle("Run comparison" + (f" (all: {shared})" if shared else ""), fontsize=13)
    return fig


def plot_curves(model_dir: str, out_dir: str) -> str:
    return save_figure(curves_figure(model_dir), os.path.join(out_dir, "curves.png"))


def plot_lr(model_dir: str, out_dir: str) -> str:
    return save_figure(lr_figure(model_dir), os.path.join(out_dir, "lr.png"))


def plot_confusion(model_dir: str, out_dir: str, *, split: str = "test",
                   checkpoint: str = "best") -> str:
    from pipeline import training

    require_run(model_dir)
    result = training.evaluate_checkpoint(model_dir, split=split, checkpoint=checkpoint, top_k=0)
    fig = confusion_figure(result["confusion"], result["class_names"],
                           title=f"Confusion matrix ({split} split, {checkpoint} checkpoint): "
                                 f"{run_label(model_dir)}")
    return save_figure(fig, os.path.join(out_dir, f"confusion_{split}.png"))


def plot_compare(model_dirs: Sequence[str], out_dir: str, filename: str = "compare.png") -> str:
    return save_figure(compare_figure(model_dirs), os.path.join(out_dir, filename))


def default_out_dir(model_dir: str) -> str:
    return rundir.path(model_dir, PLOTS_DIR)

