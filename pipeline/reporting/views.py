"""Pictures of what a run's network learned, from a loaded Keras model (`network.load_run_model`).

  filters         the first convolution's filters (first Conv2D on 3 channels)
  feature_maps    activations of chosen layers for one image
  activation_max  inputs maximizing chosen filters (gradient ascent with
                  jitter, blur and L2 decay)
  gradcam         Grad-CAM heat map of the predicted class over one image

Layers are named as `pipeline.reporting.network` resolves them. A TF-Hub
backbone (`TFSMLayer`) hides its layers, so its filters cannot be shown.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional, Sequence, Union

import numpy as np

from pipeline import rundir
from pipeline.reporting.network import LayerRef, first_conv, gradcam_target, input_size, layer_model, model_input
from pipeline.reporting.plots import TRAIN_COLOR, Figure, new_figure, require_run, save_figure


def file_part(text: str) -> str:
    """`text` as part of a PNG file name: runs of other characters than [A-Za-z0-9_.-] become `_`.

    Not `rundir.slug`: that also strips leading and trailing dots and may
    return "", which would change the names of files people already have.
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


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


def dataset_image(model_dir: str, split: str, index: int) -> tuple[np.ndarray, str]:
    """Image `index` of the run's `split` ("test" or "val", as evaluation sees it) and its class name."""
    from pipeline import config as cfg
    from pipeline import data  # imports TensorFlow

    require_run(model_dir)
    run = cfg.from_dict(rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE)))
    datasets = data.load_dataset(dataclasses.replace(run.data, augment="none"))
    if split not in ("test", "val"):
        raise ValueError(f"--image={split}:{index}: the split must be test or val.")
    ds = datasets.test if split == "test" else datasets.val
    if ds is None:
        raise ValueError(f"the dataset of {model_dir!r} has no {split!r} split.")
    for image, label in ds.unbatch().skip(index).take(1):
        return np.clip(image.numpy().astype(np.float32), 0, 1), datasets.class_names[int(label)]
    raise ValueError(f"the {split} split of {model_dir!r} has no image {index}.")


def filters_figure(model, *, max_filters: int = 64) -> Figure:
    """The first convolution's kernels as RGB patches (each min-max scaled on its own)."""
    import keras

    layer, path = first_conv(model)
    kernel = keras.ops.convert_to_numpy(keras.ops.cast(layer.kernel, "float32"))  # [kh, kw, 3, out]
    count = min(kernel.shape[-1], max_filters)
    rows, cols = _grid(count)
    cell = 1.0 if kernel.shape[0] <= 5 else 1.2
    fig = new_figure(max(4.0, cols * cell + 0.4), rows * cell + 0.9)
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
        sub, name = layer_model(model, ref)
        value = sub(np.asarray(image, np.float32)[None], training=False)
        if isinstance(value, (list, tuple)):
            value = value[0]
        out.append((name, keras.ops.convert_to_numpy(keras.ops.cast(value, "float32"))[0]))
    return out


def feature_map_figure(image: np.ndarray, name: str, activation: np.ndarray, *,
                       max_channels: int = 32) -> Figure:
    """The input, then up to `max_channels` channels of a 4-D activation (or bars for a vector)."""
    if activation.ndim == 1:
        fig = new_figure(9, 3.8)
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
    fig = new_figure(cols * 1.35 + 0.4, rows * 1.45 + 0.9)
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

    sub, name = layer_model(model, layer)
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
    fig = new_figure(max(4.0, cols * 1.45 + 0.4), rows * 1.6 + 0.9)
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

    tensor, name = gradcam_target(model, layer)
    sub = keras.Model(model_input(model), [tensor, model.outputs[0]], name="gradcam")
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
    fig = new_figure(10, 3.9)
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


def plot_filters(model, out_dir: str) -> str:
    return save_figure(filters_figure(model), os.path.join(out_dir, "filters.png"))


def plot_feature_maps(model, image: np.ndarray, layers: Sequence[LayerRef], out_dir: str, *,
                      max_channels: int = 32, tag: str = "") -> list[str]:
    paths = []
    for name, activation in feature_maps(model, image, layers):
        fig = feature_map_figure(image, name, activation, max_channels=max_channels)
        suffix = f"_{file_part(tag)}" if tag else ""
        paths.append(save_figure(fig, os.path.join(out_dir, f"feature_maps_{file_part(name)}{suffix}.png")))
    return paths


def plot_activation_max(model, layers: Sequence[LayerRef], out_dir: str, *, filters: int = 16,
                        steps: int = 128) -> list[str]:
    paths = []
    for layer in layers:
        result = maximize_activation(model, layer, filters, steps=steps)
        paths.append(save_figure(activation_max_figure(result),
                                 os.path.join(out_dir, f"activation_max_{file_part(result.layer)}.png")))
    return paths


def plot_gradcam(model, image: np.ndarray, out_dir: str, *, class_names=None, layer=None,
                 tag: str = "image") -> str:
    cam = grad_cam(model, image, layer=layer)
    fig = gradcam_figure(image, cam, class_names, title=tag)
    return save_figure(fig, os.path.join(out_dir, f"gradcam_{file_part(tag)}.png"))
