"""Test-time augmentation (TTA): the views of a batch and the averaging of their probabilities.

One definition shared by `pipeline.evaluate --tta`, `pipeline.predict --tta` and
every export format (`pipeline.export --tta`, averaged inside the exported
graph), so "flip" means the same thing wherever a number is printed.

Modes (`TTA_MODES`):
  none        1 view: the images as they are.
  flip        2 views: the images, then their left-right mirror.
  flip_crops  10 views: the four corner crops and the centre crop of 87.5% of
              the side, each resized back to the input size (bilinear), each
              plain then mirrored, in the order
              [tl, tl_mirror, tr, tr_mirror, bl, bl_mirror, br, br_mirror, centre, centre_mirror].

The probabilities are averaged AFTER the softmax (the mean of per-view
probabilities, not the softmax of mean logits). A calibration temperature
divides each view's logits before its softmax.

Only TensorFlow operations that TFLite has as builtins and tf2onnx converts are
used (reverse, strided slices, plain bilinear resize: no CropAndResize, no
antialiasing), so the same function runs inside ONNX and LiteRT exports.

Usage:
    views = tta_views(images, "flip")                     # [V, B, H, W, C]
    probs = average_probabilities(tf.nn.softmax(model(flat_views)))  # see tta_probabilities
    probs = tta_probabilities(model, images, "flip_crops", temperature=1.3)  # [B, classes]
"""
from __future__ import annotations

TTA_MODES = ("none", "flip", "flip_crops")
VIEW_COUNTS = {"none": 1, "flip": 2, "flip_crops": 10}
CROP_FRACTION = 0.875


def view_count(mode: str) -> int:
    """How many views `mode` makes per image; ValueError naming the modes for an unknown one."""
    if mode not in VIEW_COUNTS:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    return VIEW_COUNTS[mode]


def _mirror(images):
    import tensorflow as tf
    return tf.reverse(images, axis=[2])


def _side(images, axis: int):
    """The static size of `axis` when known (so crops are plain slices), else the dynamic one."""
    import tensorflow as tf
    static = images.shape[axis]
    return static if static is not None else tf.shape(images)[axis]


def _corner_and_centre_crops(images) -> list:
    """The five 87.5% crops (tl, tr, bl, br, centre), each resized back to the input size."""
    import tensorflow as tf
    height, width = _side(images, 1), _side(images, 2)
    if isinstance(height, int) and isinstance(width, int):
        ch, cw = max(1, int(round(height * CROP_FRACTION))), max(1, int(round(width * CROP_FRACTION)))
    else:
        ch = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float32) * CROP_FRACTION), tf.int32))
        cw = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float32) * CROP_FRACTION), tf.int32))
    offsets = [(0, 0), (0, width - cw), (height - ch, 0), (height - ch, width - cw),
               ((height - ch) // 2, (width - cw) // 2)]
    crops = []
    for y, x in offsets:
        crop = images[:, y:y + ch, x:x + cw, :]
        crops.append(tf.image.resize(crop, tf.stack([height, width]), method="bilinear"))
    return crops


def tta_views(images, mode: str):
    """The TTA views of a batch, stacked: float32 [V, B, H, W, C] with V = `view_count(mode)`.

    Args:
      images: float [B, H, W, C] batch (any float dtype; cast to float32).
      mode: one of `TTA_MODES`.

    Returns:
      A tensor [V, B, H, W, C]; view 0 is always the images themselves
      (bit-identical), so `none` is the identity with a leading axis of 1.
    """
    import tensorflow as tf
    view_count(mode)
    images = tf.cast(images, tf.float32)
    if mode == "none":
        return images[None]
    if mode == "flip":
        return tf.stack([images, _mirror(images)])
    views = []
    for crop in _corner_and_centre_crops(images):
        views.extend([crop, _mirror(crop)])
    return tf.stack(views)


def average_probabilities(probabilities):
    """The mean over views of per-view probabilities: [V, B, classes] -> [B, classes] (float32)."""
    import tensorflow as tf
    return tf.reduce_mean(tf.cast(probabilities, tf.float32), axis=0)


def tta_probabilities(logits_fn, images, mode: str, *, temperature: float = 1.0):
    """Averaged TTA probabilities [B, classes] of `logits_fn` (e.g. a Keras model) on `images`.

    The V views go through `logits_fn` as one batch of V*B images; each view's
    float32 logits are divided by `temperature`, turned into probabilities,
    and the probabilities are averaged over views.

    Args:
      logits_fn: callable [N, H, W, C] -> logits [N, classes] (a model, training=False inside).
      images: [B, H, W, C] batch.
      mode: one of `TTA_MODES`.
      temperature: the calibration temperature (1.0 keeps the raw softmax).
    """
    import tensorflow as tf
    views = tta_views(images, mode)
    count = view_count(mode)
    shape = tf.shape(views)
    flat = tf.reshape(views, tf.concat([[shape[0] * shape[1]], shape[2:]], axis=0))
    logits = tf.cast(logits_fn(flat), tf.float32) / float(temperature)
    probabilities = tf.nn.softmax(logits, axis=-1)
    per_view = tf.reshape(probabilities, tf.stack([count, shape[1], tf.shape(probabilities)[-1]]))
    return average_probabilities(per_view)
