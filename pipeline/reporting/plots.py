"""Pictures of a run and of what its network learned (matplotlib, Agg backend, no FLAGS).

Run plots read the run directory (`pipeline.rundir`):
  curves      loss and accuracy per epoch, train against validation
  lr          the learning rate used per epoch (metrics.csv `lr`)
  confusion   the test (or val) confusion matrix with class names
  compare     val_accuracy and val_loss of several runs, labelled by the
              settings in which their config.json files differ
Model plots take a loaded Keras model (`load_run_model`):
  filters         the first convolution's filters (first Conv2D on 3 channels)
  feature_maps    activations of chosen layers for one image
  activation_max  inputs maximizing chosen filters (gradient ascent with
                  jitter, blur and L2 decay)
  gradcam         Grad-CAM heat map of the predicted class over one image

Layers are named by name or by index in `model.layers` (`list_layers`). A
layer inside a nested sub-model (Keras Applications keep theirs in one layer
"backbone") is named `backbone/<inner name>`; feature maps and activation
maximization reach it (the outer layers before the sub-model are applied
first), Grad-CAM takes outer-level layers only (default: the input of "pool",
which for those models is the backbone's last feature map). Layers inside a
`TFSMLayer` (TF-Hub SavedModels) cannot be reached; their filters neither.

Every figure has a fixed pixel size (inches * DPI, no tight bounding box) so
files are comparable between runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from typing import Iterable, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after the backend choice)

import numpy as np  # noqa: E402

from pipeline import rundir  # noqa: E402

DPI = 100
PLOTS_DIR = "plots"
POOL_LAYER = "pool"
LOGITS_LAYER = "logits"
KINDS = ("curves", "lr", "confusion", "filters", "feature_maps", "activation_max", "gradcam",
         "compare")
IMAGE_KINDS = ("feature_maps", "gradcam")
LayerRef = Union[str, int]

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"


# =========================================================================== helpers

def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, filename: str) -> str:
    """Write `fig` as PNG at its own size (atomic: temp file, then rename)."""
    directory = os.path.dirname(filename) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(filename)}")
    fig.savefig(tmp, dpi=DPI, format="png", facecolor="white")
    os.replace(tmp, filename)
    return filename


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def _run_name(model_dir: str) -> str:
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


def _to_unit(array: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (a constant array becomes 0.5)."""
    array = np.asarray(array, dtype=np.float32)
    lo, hi = float(array.min()), float(array.max())
    if hi - lo < 1e-12:
        return np.full_like(array, 0.5)
    return (array - lo) / (hi - lo)


def _grid(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def _image_axes(fig, rows, cols):
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    return axes


# =========================================================================== run plots

def curves_figure(model_dir: str) -> Figure:
    """Loss and accuracy per epoch, train (solid) against validation (dashed)."""
    rows = _metrics(model_dir)
    summary = rundir.read_json(rundir.path(model_dir, rundir.SUMMARY_FILE), {}) or {}
    best = summary.get("best_epoch")
    fig = _figure(11, 4.2)
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
    fig.suptitle(f"Training curves: {_run_name(model_dir)}", fontsize=13)
    return fig


def lr_figure(model_dir: str) -> Figure:
    """The learning rate of each epoch's first step, as metrics.csv recorded it."""
    rows = _metrics(model_dir)
    x, y = _column(rows, "lr")
    if not y:
        raise rundir.RunDirError(f"{rundir.METRICS_FILE} of {model_dir!r} has no lr column values.")
    fig = _figure(7, 4.2)
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
    ax.set_title(f"Learning-rate schedule: {_run_name(model_dir)}" + (f"\n({detail})" if detail else ""))
    ax.legend(loc="best", fontsize=9)
    return fig


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], *,
                     title: str = "Confusion matrix") -> Figure:
    """Counts annotated; colour is the share of the true class (row-normalized)."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    size = min(16.0, max(6.0, 0.45 * n + 2.5))
    fig = _figure(size + 1.2, size)
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


def compare_labels(configs: Sequence[dict], names: Optional[Sequence[str]] = None,
                   *, max_settings: int = 4) -> tuple[list[str], dict]:
    """Legend labels from the settings in which runs differ, and the settings they share.

    Args:
      configs: each run's config.json as a dict.
      names: fallback labels (run directory names) when runs do not differ or
        two labels would coincide.
      max_settings: at most this many differing settings per label.

    Returns:
      (labels like "optimizer=sgd", {setting: value} common to all runs).
    """
    flat = [flag_settings(c) for c in configs]
    names = list(names) if names is not None else [f"run {i + 1}" for i in range(len(configs))]
    keys = sorted(set().union(*flat)) if flat else []
    differing = [k for k in keys if len({_fmt_value(f.get(k)) for f in flat}) > 1]
    common = {k: flat[0].get(k) for k in keys if k not in differing} if flat else {}
    # Put the settings people compare first.
    order = ("model", "optimizer", "learning_rate", "schedule", "weights", "batch_size", "epochs")
    differing.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    labels = []
    for f, name in zip(flat, names):
        parts = [f"{k}={_fmt_value(f.get(k))}" for k in differing[:max_settings]]
        if len(differing) > max_settings:
            parts.append("...")
        labels.append(", ".join(parts) if parts else name)
    if len(set(labels)) < len(labels):
        labels = [f"{name}: {label}" if label != name else name for label, name in zip(labels, names)]
    return labels, common


_SKIPPED_SETTINGS = {"model_dir", "resume", "verbose", "tensorboard", "flags_text"}


def flag_settings(config: dict) -> dict:
    """A run's config.json flattened to flag names (`optimizer`, `learning_rate`, `model`, ...)."""
    out = {}
    for section, values in config.items():
        if section in _SKIPPED_SETTINGS:
            continue
        if not isinstance(values, dict):
            out[section] = values
            continue
        for key, value in values.items():
            if key in _SKIPPED_SETTINGS:
                continue
            if key in ("optimizer", "second_optimizer") and (value is None or isinstance(value, dict)):
                prefix = "" if key == "optimizer" else "second_"
                out[key] = None if value is None else value.get("name")
                for sub, sub_value in (value or {}).items():
                    if sub != "name":
                        out[prefix + sub] = sub_value
            elif section == "model" and key == "name":
                out["model"] = value
            else:
                out[key] = value
    return out


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt_value(v) for v in value) or "[]"
    return str(value)


def compare_figure(model_dirs: Sequence[str]) -> Figure:
    """val_accuracy and val_loss per epoch of several runs, labelled by their differences."""
    if len(model_dirs) < 2:
        raise ValueError("compare needs at least two run directories (positional arguments or "
                         "--runs=a,b).")
    metrics = [_metrics(d) for d in model_dirs]
    configs = [rundir.read_json(rundir.path(d, rundir.CONFIG_FILE), {}) for d in model_dirs]
    labels, common = compare_labels(configs, [_run_name(d) for d in model_dirs])
    fig = _figure(12, 4.8)
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
    shared = ", ".join(f"{k}={_fmt_value(common[k])}" for k in ("model", "dataset", "optimizer")
                       if k in common)
    fig.suptitle("Run comparison" + (f" (all: {shared})" if shared else ""), fontsize=13)
    return fig


# =========================================================================== models and layers

def load_run_model(model_dir: str, checkpoint: str = "best"):
    """The run's `best` (or `last`) checkpoint as a Keras model (not compiled)."""
    import keras

    import pipeline.models  # noqa: F401  (registers custom layers for loading)

    require_run(model_dir)
    name = rundir.BEST_CHECKPOINT if checkpoint == "best" else rundir.LAST_CHECKPOINT
    filename = rundir.path(model_dir, rundir.CHECKPOINT_DIR, name)
    if not os.path.exists(filename):
        raise rundir.RunDirError(f"{filename} is missing: the run finished no epoch.")
    return keras.saving.load_model(filename, compile=False)


def _is_model(layer) -> bool:
    import keras
    return isinstance(layer, keras.Model)


def _output_shape(layer) -> str:
    try:
        return str(tuple(layer.output.shape))
    except (AttributeError, ValueError, RuntimeError):
        return "?"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    index: str      # "12" or "3/45" for nested layers
    name: str       # "stem_conv" or "backbone/conv1_conv"
    kind: str       # class name
    output_shape: str


def list_layers(model, *, nested: bool = True) -> list[LayerInfo]:
    """Every layer with its index, name, class and output shape (nested models expanded)."""
    out = []

    def visit(m, prefix_index, prefix_name):
        for i, layer in enumerate(m.layers):
            out.append(LayerInfo(f"{prefix_index}{i}", f"{prefix_name}{layer.name}",
                                 type(layer).__name__, _output_shape(layer)))
            if nested and _is_model(layer):
                visit(layer, f"{prefix_index}{i}/", f"{prefix_name}{layer.name}/")

    visit(model, "", "")
    return out


def format_layers(model) -> str:
    rows = list_layers(model)
    width = max(len(r.name) for r in rows)
    kind_width = max(len(r.kind) for r in rows)
    lines = [f"{'index':>7}  {'name':<{width}}  {'layer':<{kind_width}}  output shape"]
    lines += [f"{r.index:>7}  {r.name:<{width}}  {r.kind:<{kind_width}}  {r.output_shape}" for r in rows]
    return "\n".join(lines)


def _all_names(model) -> list[str]:
    return [info.name for info in list_layers(model)]


def resolve_layer(model, ref: LayerRef) -> tuple[list, str]:
    """The chain [outer layer, ..., target layer] for a name, path (`a/b`) or index.

    Raises:
      ValueError: no such layer; the message lists close names.
    """
    if isinstance(ref, int) or (isinstance(ref, str) and re.fullmatch(r"-?\d+", ref.strip())):
        index = int(ref)
        try:
            layer = model.layers[index]
        except IndexError:
            raise ValueError(f"layer index {index} is out of range: the model has "
                             f"{len(model.layers)} layers (0..{len(model.layers) - 1}); see "
                             "--list_layers.") from None
        return [layer], layer.name
    ref = str(ref).strip()
    chain, current = [], model
    for part in ref.split("/"):
        if not _is_model(current) or part not in [layer.name for layer in current.layers]:
            close = difflib.get_close_matches(ref, _all_names(model), n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"no layer named {ref!r} in model {model.name!r}{hint} "
                             "(see --list_layers).")
        current = current.get_layer(part)
        chain.append(current)
    return chain, ref


def _call_input(layer):
    """The tensor a layer (also a nested Model) was first called on in its parent graph."""
    import keras
    return keras.layers.Layer.input.fget(layer)


def _call_output(layer):
    """The tensor a layer's first call produced in its parent graph (a nested Model's
    `output` property gives its own inner output instead)."""
    import keras
    return keras.layers.Layer.output.fget(layer)


def _layer_output(model, ref: LayerRef):
    """(a model from model.inputs to the layer's output, display name)."""
    import keras

    chain, name = resolve_layer(model, ref)
    if len(chain) == 1:
        return keras.Model(_model_input(model), _call_output(chain[0]), name="features"), name
    # Nested: outer graph up to the sub-model's input, then the sub-model's inner graph.
    outer = model
    fns = []
    for parent in chain[:-1]:
        fns.append(keras.Model(_model_input(outer), _call_input(parent)))
        outer = parent
    fns.append(keras.Model(_model_input(outer), chain[-1].output))
    x = keras.Input(shape=tuple(model.inputs[0].shape[1:]), dtype="float32")
    y = x
    for fn in fns:
        y = fn(y)
    return keras.Model(x, y, name="features"), name


def _model_input(model):
    """The model's single image input (models here take one tensor)."""
    if len(model.inputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs; plots need one image input.")
    return model.inputs[0]


def input_size(model, default: int = 224) -> tuple[int, int]:
    shape = tuple(model.inputs[0].shape)
    h, w = shape[1], shape[2]
    return (int(h or default), int(w or default))


def first_conv(model):
    """(layer, path) of the first Conv2D taking 3 input channels (nested models searched too)."""
    import keras

    def visit(m, prefix):
        for layer in m.layers:
            if _is_model(layer):
                found = visit(layer, f"{prefix}{layer.name}/")
                if found is not None:
                    return found
            elif isinstance(layer, keras.layers.Conv2D) and layer.built:
                if len(layer.kernel.shape) == 4 and layer.kernel.shape[2] == 3:
                    return layer, prefix + layer.name
        return None

    found = visit(model, "")
    if found is None:
        raise ValueError(f"model {model.name!r} has no Conv2D layer on 3 input channels (a TF-Hub "
                         "SavedModel backbone hides its layers).")
    return found


def gradcam_layer_name(model) -> str:
    """Name of the last 4-D activation before "pool" (default Grad-CAM/feature layer)."""
    return _gradcam_target(model, None)[1]


def _gradcam_target(model, ref: Optional[LayerRef]):
    """(KerasTensor of a 4-D activation in the outer graph, its display name)."""
    if ref is not None:
        chain, name = resolve_layer(model, ref)
        if len(chain) > 1:
            raise ValueError(f"Grad-CAM needs a layer of the outer model, not {name!r} inside "
                             f"{chain[0].name!r}; use {chain[0].name!r} itself.")
        tensor = _call_output(chain[0])
    else:
        names = [layer.name for layer in model.layers]
        if POOL_LAYER in names:
            pool = model.get_layer(POOL_LAYER)
            tensor = _call_input(pool)
            name = next((layer.name for layer in model.layers
                         if layer is not pool and _produces(layer, tensor)), "input of pool")
        else:
            candidates = [layer for layer in model.layers if len(_shape(layer)) == 4]
            if not candidates:
                raise ValueError(f"model {model.name!r} has no 4-D activation for Grad-CAM.")
            tensor, name = _call_output(candidates[-1]), candidates[-1].name
    if len(tensor.shape) != 4:
        raise ValueError(f"Grad-CAM needs a 4-D [batch, height, width, channels] activation; "
                         f"{name!r} has shape {tuple(tensor.shape)} (a TF-Hub backbone returning "
                         "pooled features has none).")
    return tensor, name


def _shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError, RuntimeError):
        return ()


def _produces(layer, tensor) -> bool:
    try:
        return _call_output(layer) is tensor
    except (AttributeError, ValueError, RuntimeError):
        return False


def default_feature_layers(model) -> list[str]:
    """First convolution and the last 4-D activation before "pool" (those that exist)."""
    names = []
    for pick in (lambda: first_conv(model)[1], lambda: gradcam_layer_name(model)):
        try:
            name = pick()
        except ValueError:
            continue
        if name not in names:
            names.append(name)
    return names


def load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """An image file as float32 RGB [H, W, 3] in [0, 1], resized to `size` (height, width)."""
    import tensorflow as tf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist.")
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        raise ValueError(f"{path!r} is not a readable image (JPEG, PNG, BMP or GIF).") from None
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, size, antialias=True)
    return np.clip(image.numpy(), 0.0, 1.0)


# =========================================================================== model plots

def filters_figure(model, *, max_filters: int = 64) -> Figure:
    """The first convolution's kernels as RGB patches (each min-max scaled on its own)."""
    import keras

    layer, path = first_conv(model)
    kernel = keras.ops.convert_to_numpy(keras.ops.cast(layer.kernel, "float32"))  # [kh, kw, 3, out]
    count = min(kernel.shape[-1], max_filters)
    rows, cols = _grid(count)
    cell = 1.0 if kernel.shape[0] <= 5 else 1.2
    fig = _figure(max(4.0, cols * cell + 0.4), rows * cell + 0.9)
    axes = _image_axes(fig, rows, cols)
    for i in range(count):
        ax = axes.flat[i]
        ax.imshow(_to_unit(kernel[..., i]), interpolation="nearest")
        ax.set_title(str(i), fontsize=8, pad=2)
    fig.suptitle(f"First convolution {path!r}: {count} of {kernel.shape[-1]} filters "
                 f"({kernel.shape[0]}x{kernel.shape[1]}x3)\neach scaled to its own min..max; "
                 "RGB = input channels", fontsize=10)
    return fig


def feature_maps(model, image: np.ndarray, layers: Sequence[LayerRef]) -> list[tuple[str, np.ndarray]]:
    """[(layer name, activation [H, W, C] or [C])] for one image [H, W, 3] in [0, 1]."""
    import keras

    out = []
    for ref in layers:
        sub, name = _layer_output(model, ref)
        value = sub(np.asarray(image, np.float32)[None], training=False)
        if isinstance(value, (list, tuple)):
            value = value[0]
        out.append((name, keras.ops.convert_to_numpy(keras.ops.cast(value, "float32"))[0]))
    return out


def feature_map_figure(image: np.ndarray, name: str, activation: np.ndarray, *,
                       max_channels: int = 32) -> Figure:
    """The input, then up to `max_channels` channels of a 4-D activation (or bars for a vector)."""
    if activation.ndim == 1:
        fig = _figure(9, 3.8)
        ax_img, ax = fig.subplots(1, 2, width_ratios=[1, 3])
        ax_img.imshow(image, interpolation="nearest")
        ax_img.set_title("input")
        ax_img.set_axis_off()
        ax.bar(range(len(activation)), activation, color=TRAIN_COLOR)
        ax.set_xlabel("unit")
        ax.set_ylabel("activation")
        ax.set_title(f"{name!r}: {len(activation)} units")
        return fig
    if activation.ndim != 3:
        raise ValueError(f"layer {name!r} gives an activation of shape {activation.shape}; "
                         "feature maps need [height, width, channels] or a vector.")
    channels = activation.shape[-1]
    count = min(channels, max_channels)
    # Show the most active channels first: an all-zero (dead) map says little.
    order = np.argsort(-activation.reshape(-1, channels).mean(axis=0))[:count]
    rows, cols = _grid(count + 1)
    fig = _figure(cols * 1.35 + 0.4, rows * 1.45 + 0.9)
    axes = _image_axes(fig, rows, cols)
    axes.flat[0].imshow(image, interpolation="nearest")
    axes.flat[0].set_title("input", fontsize=8, pad=2, fontweight="bold")
    for k, channel in enumerate(order, start=1):
        ax = axes.flat[k]
        values = activation[..., channel]
        ax.imshow(values, cmap="viridis", vmin=float(values.min()),
                  vmax=max(float(values.max()), float(values.min()) + 1e-6), interpolation="nearest")
        ax.set_title(f"ch {channel}: {values.min():.2g}..{values.max():.2g}", fontsize=7, pad=2)
    fig.suptitle(f"Feature maps of {name!r}: {activation.shape[0]}x{activation.shape[1]}, "
                 f"{count} of {channels} channels, highest mean first\n(each channel on its own "
                 "colour scale, min..max above it; yellow = high)", fontsize=10)
    return fig


@dataclasses.dataclass
class ActivationMaxResult:
    layer: str
    filters: list[int]
    images: np.ndarray          # [N, H, W, 3] in [0, 1]
    start: np.ndarray           # mean activation of each filter on the start image
    end: np.ndarray             # ... on the optimized image


def maximize_activation(model, layer: LayerRef, filters: Union[int, Sequence[int]] = 16, *,
                        steps: int = 128, step_size: float = 0.02, jitter: int = 2,
                        blur_every: int = 4, blur_sigma: float = 0.6, l2_decay: float = 0.002,
                        seed: int = 0) -> ActivationMaxResult:
    """Images in [0, 1] that maximize the mean activation of chosen filters of a layer.

    Gradient ascent on the image, one image per filter in one batch, with the
    usual regularizers so the patterns are not high-frequency noise: random
    jitter (roll by up to `jitter` pixels) before each step, a Gaussian blur
    every `blur_every` steps, decay of the pixels towards grey (`l2_decay`),
    RMS-normalized gradients and clipping to [0, 1].

    Args:
      model: the Keras model (inputs in [0, 1]).
      layer: name, `outer/inner` path or index of the layer.
      filters: how many (the first N) or which channel indices.
      steps, step_size, jitter, blur_every, blur_sigma, l2_decay: the ascent.
      seed: for the start noise.
    """
    import tensorflow as tf

    sub, name = _layer_output(model, layer)
    channels = int(sub.outputs[0].shape[-1])
    if isinstance(filters, int):
        filters = list(range(min(filters, channels)))
    filters = [int(f) for f in filters]
    bad = [f for f in filters if not 0 <= f < channels]
    if bad:
        raise ValueError(f"layer {name!r} has {channels} channels; no filter {bad}.")
    h, w = input_size(model)
    rng = np.random.default_rng(seed)
    start = (0.5 + 0.08 * rng.standard_normal((len(filters), h, w, 3))).clip(0, 1).astype(np.float32)
    index = tf.constant(filters, tf.int32)

    def objective(images):
        act = sub(images, training=False)
        act = tf.cast(act[0] if isinstance(act, (list, tuple)) else act, tf.float32)
        if len(act.shape) == 4:
            act = tf.reduce_mean(act, axis=(1, 2))
        return tf.gather(act, index, axis=1, batch_dims=1)  # [N]

    radius = max(1, int(math.ceil(2 * blur_sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur_sigma) ** 2)
    kernel2d = np.outer(taps, taps) / np.outer(taps, taps).sum()
    blur_kernel = tf.constant(np.tile(kernel2d[:, :, None, None], (1, 1, 3, 1)), tf.float32)

    @tf.function
    def ascend(x, do_blur):
        dy = tf.random.uniform([], -jitter, jitter + 1, dtype=tf.int32)
        dx = tf.random.uniform([], -jitter, jitter + 1, dtype=tf.int32)
        shifted = tf.roll(x, shift=[dy, dx], axis=[1, 2])
        with tf.GradientTape() as tape:
            tape.watch(shifted)
            total = tf.reduce_sum(objective(shifted))
        grad = tf.roll(tape.gradient(total, shifted), shift=[-dy, -dx], axis=[1, 2])
        grad /= tf.sqrt(tf.reduce_mean(tf.square(grad), axis=(1, 2, 3), keepdims=True)) + 1e-8
        x = x + step_size * grad
        x = 0.5 + (x - 0.5) * (1.0 - l2_decay)
        if do_blur:
            padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
            x = tf.nn.depthwise_conv2d(padded, blur_kernel, [1, 1, 1, 1], "VALID")
        return tf.clip_by_value(x, 0.0, 1.0)

    tf.random.set_seed(seed)
    x = tf.constant(start)
    before = objective(x).numpy()
    for step in range(steps):
        # No blur on the last steps: they sharpen what the blur smoothed.
        blur = bool(blur_every) and step % blur_every == blur_every - 1 and step < steps - blur_every
        x = ascend(x, tf.constant(blur))
    after = objective(x).numpy()
    return ActivationMaxResult(name, filters, x.numpy(), before, after)


def activation_max_figure(result: ActivationMaxResult) -> Figure:
    count = len(result.filters)
    rows, cols = _grid(count)
    fig = _figure(max(4.0, cols * 1.45 + 0.4), rows * 1.6 + 0.9)
    axes = _image_axes(fig, rows, cols)
    for k, f in enumerate(result.filters):
        ax = axes.flat[k]
        ax.imshow(result.images[k], interpolation="nearest")
        ax.set_title(f"filter {f}\n{result.start[k]:.2g} -> {result.end[k]:.2g}", fontsize=7, pad=2)
    fig.suptitle(f"Inputs maximizing filters of {result.layer!r}\n(gradient ascent with jitter, "
                 "blur and L2 decay; mean activation start -> end)", fontsize=10)
    return fig


@dataclasses.dataclass
class GradCam:
    layer: str
    class_index: int
    probabilities: np.ndarray   # softmax of the logits, [classes]
    heatmap: np.ndarray         # [H, W] at the input resolution, in [0, 1]
    coarse: np.ndarray          # [h, w] at the layer's resolution, in [0, 1]


def grad_cam(model, image: np.ndarray, *, layer: Optional[LayerRef] = None,
             class_index: Optional[int] = None) -> GradCam:
    """Grad-CAM (Selvaraju et al. 2017) of one image [H, W, 3] in [0, 1].

    Builds a sub-model from `model.inputs` to [activation, logits], where the
    activation is `layer` or, by default, the last 4-D activation before
    "pool"; weights each channel by the spatial mean of d logit / d activation
    of the predicted (or given) class, sums, keeps the positive part, and
    resizes to the input (bilinear).
    """
    import keras
    import tensorflow as tf

    tensor, name = _gradcam_target(model, layer)
    sub = keras.Model(_model_input(model), [tensor, model.outputs[0]], name="gradcam")
    x = tf.constant(np.asarray(image, np.float32)[None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        activation, logits = sub(x, training=False)
        logits = tf.cast(logits, tf.float32)
        c = int(tf.argmax(logits[0])) if class_index is None else int(class_index)
        target = logits[0, c]
    grads = tf.cast(tape.gradient(target, activation), tf.float32)[0]   # [h, w, k]
    activation = tf.cast(activation, tf.float32)[0]
    weights = tf.reduce_mean(grads, axis=(0, 1))
    cam = tf.nn.relu(tf.reduce_sum(activation * weights, axis=-1)).numpy()
    peak = cam.max()
    coarse = cam / peak if peak > 0 else cam
    h, w = np.asarray(image).shape[:2]
    fine = tf.image.resize(coarse[..., None], (h, w), method="bilinear").numpy()[..., 0]
    fine = fine / fine.max() if fine.max() > 0 else fine
    probabilities = tf.nn.softmax(logits[0]).numpy()
    return GradCam(name, c, probabilities, fine.astype(np.float32), coarse.astype(np.float32))


def gradcam_figure(image: np.ndarray, cam: GradCam, class_names: Optional[Sequence[str]] = None, *,
                   title: str = "") -> Figure:
    names = list(class_names) if class_names else [str(i) for i in range(len(cam.probabilities))]
    label = names[cam.class_index] if cam.class_index < len(names) else str(cam.class_index)
    fig = _figure(10, 3.9)
    ax_img, ax_map, ax_over = fig.subplots(1, 3)
    ax_img.imshow(image, interpolation="nearest")
    ax_img.set_title("input")
    shown = ax_map.imshow(cam.heatmap, cmap="jet", vmin=0, vmax=1, interpolation="nearest")
    ax_map.set_title(f"Grad-CAM ({cam.coarse.shape[0]}x{cam.coarse.shape[1]} map upsampled)")
    fig.colorbar(shown, ax=ax_map, fraction=0.046, pad=0.04)
    ax_over.imshow(image, interpolation="nearest")
    ax_over.imshow(cam.heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    ax_over.set_title("overlay")
    for ax in (ax_img, ax_map, ax_over):
        ax.set_xticks([])
        ax.set_yticks([])
    top = np.argsort(-cam.probabilities)[:3]
    ranking = ", ".join(f"{names[i] if i < len(names) else i} {cam.probabilities[i]:.1%}" for i in top)
    fig.suptitle(f"{title + ': ' if title else ''}predicted {label!r} "
                 f"(p={cam.probabilities[cam.class_index]:.1%}); layer {cam.layer!r}\n"
                 f"top classes: {ranking}", fontsize=10)
    return fig


# =========================================================================== file writers

def _out(out_dir: str, filename: str) -> str:
    return os.path.join(out_dir, filename)


def plot_curves(model_dir: str, out_dir: str) -> str:
    return save_figure(curves_figure(model_dir), _out(out_dir, "curves.png"))


def plot_lr(model_dir: str, out_dir: str) -> str:
    return save_figure(lr_figure(model_dir), _out(out_dir, "lr.png"))


def plot_confusion(model_dir: str, out_dir: str, *, split: str = "test",
                   checkpoint: str = "best") -> str:
    from pipeline.training import trainer as training

    require_run(model_dir)
    result = training.evaluate_checkpoint(model_dir, split=split, checkpoint=checkpoint)
    fig = confusion_figure(result["confusion"], result["class_names"],
                           title=f"Confusion matrix ({split} split, {checkpoint} checkpoint): "
                                 f"{_run_name(model_dir)}")
    return save_figure(fig, _out(out_dir, f"confusion_{split}.png"))


def plot_compare(model_dirs: Sequence[str], out_dir: str, filename: str = "compare.png") -> str:
    return save_figure(compare_figure(model_dirs), _out(out_dir, filename))


def plot_filters(model, out_dir: str) -> str:
    return save_figure(filters_figure(model), _out(out_dir, "filters.png"))


def plot_feature_maps(model, image: np.ndarray, layers: Sequence[LayerRef], out_dir: str, *,
                      max_channels: int = 32, tag: str = "") -> list[str]:
    paths = []
    for name, activation in feature_maps(model, image, layers):
        fig = feature_map_figure(image, name, activation, max_channels=max_channels)
        suffix = f"_{_safe_name(tag)}" if tag else ""
        paths.append(save_figure(fig, _out(out_dir, f"feature_maps_{_safe_name(name)}{suffix}.png")))
    return paths


def plot_activation_max(model, layers: Sequence[LayerRef], out_dir: str, *, filters: int = 16,
                        steps: int = 128) -> list[str]:
    paths = []
    for layer in layers:
        result = maximize_activation(model, layer, filters, steps=steps)
        paths.append(save_figure(activation_max_figure(result),
                                 _out(out_dir, f"activation_max_{_safe_name(result.layer)}.png")))
    return paths


def plot_gradcam(model, image: np.ndarray, out_dir: str, *, class_names=None, layer=None,
                 tag: str = "image") -> str:
    cam = grad_cam(model, image, layer=layer)
    fig = gradcam_figure(image, cam, class_names, title=tag)
    return save_figure(fig, _out(out_dir, f"gradcam_{_safe_name(tag)}.png"))


def default_out_dir(model_dir: str) -> str:
    return rundir.path(model_dir, PLOTS_DIR)


def parse_kinds(kinds: Iterable[str]) -> list[str]:
    """Validate `--what` values; `all` expands to every kind (in KINDS order)."""
    kinds = [k.strip() for k in kinds if k.strip()]
    if not kinds or "all" in kinds:
        return list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        close = {k: difflib.get_close_matches(k, KINDS, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ValueError(f"unknown --what {hints}; choose from all, {', '.join(KINDS)}.")
    return list(dict.fromkeys(kinds))


def default_activation_layers(model) -> list[str]:
    """The last Conv2D of the model (nested models searched): its filters are the most telling."""
    convs = [info.name for info in list_layers(model) if info.kind in ("Conv2D", "StandardizedConv2D")]
    return convs[-1:] if convs else default_feature_layers(model)[-1:]


def dataset_image(model_dir: str, split: str, index: int) -> tuple[np.ndarray, str]:
    """Image `index` of the run's `split` ("test" or "val", as evaluation sees it) and its class name."""
    import dataclasses as dc

    from pipeline import config as cfg
    from pipeline.data import sources as data_lib

    require_run(model_dir)
    run = cfg.from_dict(rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE)))
    datasets = data_lib.load_dataset(dc.replace(run.data, augment="none"))
    if split not in ("test", "val"):
        raise ValueError(f"--image={split}:{index}: the split must be test or val.")
    ds = datasets.test if split == "test" else datasets.val
    if ds is None:
        raise ValueError(f"the dataset of {model_dir!r} has no {split!r} split.")
    for image, label in ds.unbatch().skip(index).take(1):
        return np.clip(image.numpy().astype(np.float32), 0, 1), datasets.class_names[int(label)]
    raise ValueError(f"the {split} split of {model_dir!r} has no image {index}.")
