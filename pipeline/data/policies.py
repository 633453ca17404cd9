"""Per-example augmentation policies: RandAugment, TrivialAugment-Wide, AugMix, colour jitter, erasing.

Each builder returns `fn(image, seed) -> image` like the crops in
`pipeline.data.augment`: image float32 `[S, S, 3]` in [0, 1], seed an int
tensor of shape [2]; the same (image, seed) always gives the same output, and
every image draws its own operations and magnitudes.

Why not Keras's layers as they are: `keras.layers.RandAugment`, `AugMix`,
`RandomErasing` and `RandomColorJitter` draw their randomness from a
`keras.random.SeedGenerator` (a stateful variable; `keras.random.*` accepts
only an int or a generator as `seed`, not our per-example seed tensor), and
`RandAugment` picks its operations once per call, i.e. once per batch, then
computes all eleven operations and keeps the chosen ones with `where`. Under
parallel `tf.data` maps that would make runs unrepeatable and cost 11x. So
the random draws are `tf.random.stateless_*` from our seed, the chosen
operation runs alone through `tf.switch_case`, and the operations themselves
are Keras's where they are deterministic: `keras.layers.AutoContrast` and
`keras.layers.Equalization` (`value_range=(0, 1)`, on a batch of one: both
reduce over axes 1-2), `keras.ops.image.affine_transform` (rotate, shear,
translate) and `keras.ops.image.rgb_to_grayscale` (colour, contrast). The
randomised Keras layers have no public way to take given parameters, so
brightness, sharpness, posterize and solarize are the few lines of PIL's
definitions below.

Magnitudes: `m` in [0, 1] is the fraction of an operation's largest
strength (RandAugment's M / 10, Keras's `factor`). The ranges follow
torchvision (`RandAugment`, `TrivialAugmentWide`, `AugMix`), except that
TrivialAugment-Wide's 32-pixel translation is taken relative (32/224 of the
side) so small images are not shifted out of the frame.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Tuple

import keras
import tensorflow as tf

PolicyFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
FILL = 0.5  # grey fill of pixels moved in by a geometric operation (timm's 128)


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """`num` independent [2]-shaped seeds derived from one."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
    return [seeds[i] for i in range(num)]


def _uniform(seed, low=0.0, high=1.0):
    return tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high)


# ------------------------------------------------------------- operations
# Each op is op(image, strength) with strength already signed and scaled.


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, > 1 extrapolates."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _gray(image: tf.Tensor) -> tf.Tensor:
    return keras.ops.image.rgb_to_grayscale(image)


def brightness(image, strength):
    return _blend(tf.zeros_like(image), image, 1.0 + strength)


def color(image, strength):
    return _blend(tf.broadcast_to(_gray(image), tf.shape(image)), image, 1.0 + strength)


def contrast(image, strength):
    return _blend(tf.fill(tf.shape(image), tf.reduce_mean(_gray(image))), image, 1.0 + strength)


def sharpness(image, strength):
    """PIL's SHARPEN smoothing kernel (centre 5, neighbours 1, / 13); the border pixels stay."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    inner = tf.ones_like(smooth)
    mask = tf.pad(inner, [[1, 1], [1, 1], [0, 0]]) > 0
    smooth = tf.where(mask, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return _blend(smooth, image, 1.0 + strength)


def posterize(image, bits):
    """Keep the top `bits` (1-8) bits of every 8-bit value."""
    shift = tf.cast(8 - tf.clip_by_value(tf.round(bits), 1, 8), tf.int32)
    values = tf.cast(tf.round(image * 255.0), tf.int32)
    values = tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift)
    return tf.cast(values, tf.float32) / 255.0


def solarize(image, threshold):
    return tf.where(image >= threshold, 1.0 - image, image)


# float32 whatever the global dtype policy is when this module is imported (the data path is float32).
_AUTO_CONTRAST = keras.layers.AutoContrast(value_range=(0, 1), dtype="float32")
_EQUALIZATION = keras.layers.Equalization(value_range=(0, 1), dtype="float32")


def auto_contrast(image, strength):
    del strength
    return tf.cast(_AUTO_CONTRAST(image[None])[0], tf.float32)


def equalize(image, strength):
    del strength
    return tf.cast(_EQUALIZATION(image[None])[0], tf.float32)


def identity(image, strength):
    del strength
    return image


def _affine(image, matrix):
    """`matrix` (3x3) maps output (x, y, 1) to input pixels, about the image centre."""
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    cy, cx = (size[0] - 1) / 2, (size[1] - 1) / 2
    to_centre = tf.convert_to_tensor([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    back = tf.convert_to_tensor([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    full = back @ tf.convert_to_tensor(matrix, tf.float32) @ to_centre
    transform = tf.reshape(full, [9])[:8]
    out = keras.ops.image.affine_transform(image, transform, interpolation="bilinear",
                                           fill_mode="constant", fill_value=FILL)
    return tf.ensure_shape(out, image.shape)


# Geometric operations are matrices (strength, height, width) -> 3x3, so that a policy runs one
# `affine_transform` whichever of them it drew (`apply_one`).


def rotate(degrees, height, width):
    del height, width
    a = degrees * math.pi / 180.0
    c, s = tf.cos(a), tf.sin(a)
    return [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]


def shear_x(amount, height, width):
    del height, width
    return [[1.0, amount, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def shear_y(amount, height, width):
    del height, width
    return [[1.0, 0.0, 0.0], [amount, 1.0, 0.0], [0.0, 0.0, 1.0]]


def translate_x(fraction, height, width):
    del height
    return [[1.0, 0.0, fraction * width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def translate_y(fraction, height, width):
    del width
    return [[1.0, 0.0, 0.0], [0.0, 1.0, fraction * height], [0.0, 0.0, 1.0]]


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a policy: `strength(m) = offset + scale * m`, negated half the time if `signed`.

    fn: `fn(image, strength) -> image`, or with `affine` a matrix
    `fn(strength, height, width) -> 3x3` (see `rotate`).
    """

    fn: Callable
    scale: float = 0.0
    offset: float = 0.0
    signed: bool = False
    affine: bool = False


def apply_op(image: tf.Tensor, op: Op, strength) -> tf.Tensor:
    """`op` at an already signed and scaled `strength` (what `apply_one` runs when it draws `op`)."""
    if op.affine:
        return _affine(image, op.fn(strength, float(image.shape[0]), float(image.shape[1])))
    return tf.cast(op.fn(image, strength), tf.float32)


def _space(wide: bool) -> Dict[str, Op]:
    """torchvision's RandAugment space (`wide=False`) or TrivialAugment-Wide's."""
    enhance = 0.99 if wide else 0.9
    bits = 6.0 if wide else 4.0
    return {
        "identity": Op(identity),
        "shear_x": Op(shear_x, affine=True, scale=0.99 if wide else 0.3, signed=True),
        "shear_y": Op(shear_y, affine=True, scale=0.99 if wide else 0.3, signed=True),
        "translate_x": Op(translate_x, affine=True, scale=32 / 224 if wide else 150 / 331, signed=True),
        "translate_y": Op(translate_y, affine=True, scale=32 / 224 if wide else 150 / 331, signed=True),
        "rotate": Op(rotate, affine=True, scale=135.0 if wide else 30.0, signed=True),
        "brightness": Op(brightness, enhance, signed=True),
        "color": Op(color, enhance, signed=True),
        "contrast": Op(contrast, enhance, signed=True),
        "sharpness": Op(sharpness, enhance, signed=True),
        "posterize": Op(posterize, -bits, offset=8.0),
        "solarize": Op(solarize, -1.0, offset=1.0),
        "auto_contrast": Op(auto_contrast),
        "equalize": Op(equalize),
    }


RANDAUGMENT_OPS = _space(wide=False)
TRIVIALAUGMENT_OPS = _space(wide=True)
# AugMix (Hendrycks et al. 2020, torchvision's all_ops=True) in RandAugment's ranges, without identity.
AUGMIX_OPS = {k: v for k, v in RANDAUGMENT_OPS.items() if k != "identity"}


def apply_one(image: tf.Tensor, ops: Dict[str, Op], index: tf.Tensor, m: tf.Tensor,
              sign_seed: tf.Tensor) -> tf.Tensor:
    """Run only operation number `index` of `ops` at magnitude `m`.

    Why this shape: in a per-example `tf.data` map every node of every branch
    costs executor time even when not taken, so the geometric operations
    share one `affine_transform` (their matrices are a few scalars, chosen by
    `index`, applied under one `tf.cond`), and only the pixel operations are
    branches of a `tf.switch_case`.
    """
    table = list(ops.values())
    index = tf.cast(index, tf.int32)
    strength = tf.gather(tf.stack([op.offset + op.scale * m for op in table]), index)
    negate = (_uniform(sign_seed) < 0.5) & tf.gather(tf.constant([op.signed for op in table]), index)
    strength = tf.where(negate, -strength, strength)
    height, width = float(image.shape[0]), float(image.shape[1])
    if any(op.affine for op in table):
        eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        matrices = tf.stack([tf.convert_to_tensor(op.fn(strength, height, width) if op.affine else eye,
                                                  tf.float32) for op in table])
        moved = tf.cond(tf.gather(tf.constant([op.affine for op in table]), index),
                        lambda: _affine(image, tf.gather(matrices, index)), lambda: image)
    else:
        moved = image

    def branch(op: Op):
        if op.affine:
            return lambda: moved
        return lambda: tf.ensure_shape(tf.cast(op.fn(moved, strength), tf.float32), image.shape)

    return tf.switch_case(index, [branch(op) for op in table])


def _random_index(seed, n):
    return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=n, dtype=tf.int32)


def randaugment(num_ops: int = 2, magnitude: float = 9.0) -> PolicyFn:
    """RandAugment (Cubuk et al. 2020): `num_ops` operations drawn per image, each at M/10.

    magnitude: timm's / the paper's 0-10 scale (Keras's `factor` = M / 10).
    """
    m = tf.constant(magnitude / 10.0, tf.float32)

    def fn(image, seed):
        for op_seed in split_seed(seed, max(num_ops, 1))[:num_ops]:
            pick, sign = split_seed(op_seed, 2)
            image = apply_one(image, RANDAUGMENT_OPS, _random_index(pick, len(RANDAUGMENT_OPS)), m, sign)
        return image

    return fn


def trivialaugment() -> PolicyFn:
    """TrivialAugment-Wide (Müller & Hutter 2021): one operation, magnitude uniform over 31 levels."""

    def fn(image, seed):
        pick, level, sign = split_seed(seed, 3)
        m = tf.cast(_random_index(level, 31), tf.float32) / 30.0
        return apply_one(image, TRIVIALAUGMENT_OPS, _random_index(pick, len(TRIVIALAUGMENT_OPS)), m, sign)

    return fn


def _dirichlet_and_beta(seed, width: int, alpha: float) -> Tuple[tf.Tensor, tf.Tensor]:
    """Chain weights ~ Dirichlet(alpha) and the skip weight ~ Beta(alpha, alpha), from gammas."""
    w_seed, a_seed, b_seed = split_seed(seed, 3)
    g = tf.random.stateless_gamma([width], seed=w_seed, alpha=alpha)
    weights = g / tf.maximum(tf.reduce_sum(g), 1e-12)
    ga = tf.random.stateless_gamma([], seed=a_seed, alpha=alpha)
    gb = tf.random.stateless_gamma([], seed=b_seed, alpha=alpha)
    return weights, ga / tf.maximum(ga + gb, 1e-12)


def augmix(severity: float = 3.0, width: int = 3, depth: int = 3, alpha: float = 1.0) -> PolicyFn:
    """AugMix (torchvision's defaults): `width` chains of 1..`depth` ops at magnitude < severity/10, mixed.

    out = b * image + (1 - b) * sum_i w_i chain_i(image), w ~ Dirichlet(alpha), b ~ Beta(alpha, alpha).
    A chain shorter than `depth` runs identity in its remaining slots.
    """
    names = list(AUGMIX_OPS)
    ops = {"identity": RANDAUGMENT_OPS["identity"], **AUGMIX_OPS}

    def chain(image, seed):
        depth_seed, *slot_seeds = split_seed(seed, depth + 1)
        length = _random_index(depth_seed, depth) + 1
        for slot, slot_seed in enumerate(slot_seeds):
            pick, level, sign = split_seed(slot_seed, 3)
            index = tf.where(slot < length, _random_index(pick, len(names)) + 1, 0)
            image = apply_one(image, ops, index, _uniform(level, 0.0, severity / 10.0), sign)
        return image

    def fn(image, seed):
        mix_seed, *chain_seeds = split_seed(seed, width + 1)
        weights, skip = _dirichlet_and_beta(mix_seed, width, alpha)
        mixed = tf.add_n([weights[i] * chain(image, s) for i, s in enumerate(chain_seeds)])
        return tf.clip_by_value(skip * image + (1.0 - skip) * mixed, 0.0, 1.0)

    return fn


def color_jitter(strength: float) -> PolicyFn:
    """torchvision's ColorJitter(S, S, S): brightness, contrast, saturation factors in [1-S, 1+S], in that order."""

    def fn(image, seed):
        for op, s in zip((brightness, contrast, color), split_seed(seed, 3)):
            image = op(image, _uniform(s, -strength, strength))
        return image

    return fn


def random_erasing(probability: float, area=(0.02, 1 / 3), log_aspect=(math.log(0.3), math.log(1 / 0.3))
                   ) -> PolicyFn:
    """Random erasing (Zhong et al. 2020, timm's `pixel` mode): with `probability`, one box of uniform noise.

    The box covers `area` of the image at an aspect ratio log-uniform in
    0.3..3.3; one draw, clipped to the image (timm retries up to 10 times).
    Noise is uniform in [0, 1], our images' range (timm draws normal noise
    in the normalized space).
    """

    def fn(image, seed):
        on_seed, area_seed, aspect_seed, top_seed, left_seed, noise_seed = split_seed(seed, 6)
        height, width = image.shape[0], image.shape[1]
        target = _uniform(area_seed, *area) * height * width
        aspect = tf.exp(_uniform(aspect_seed, *log_aspect))
        h = tf.clip_by_value(tf.round(tf.sqrt(target * aspect)), 1.0, float(height))
        w = tf.clip_by_value(tf.round(tf.sqrt(target / aspect)), 1.0, float(width))
        top = tf.floor(_uniform(top_seed) * (height - h + 1))
        left = tf.floor(_uniform(left_seed) * (width - w + 1))
        rows = tf.range(height, dtype=tf.float32)[:, None, None]
        cols = tf.range(width, dtype=tf.float32)[None, :, None]
        box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        box = box & (_uniform(on_seed) < probability)
        noise = tf.random.stateless_uniform(tf.shape(image), seed=noise_seed)
        return tf.where(box, noise, image)

    return fn


# name -> builder(randaugment_ops, randaugment_magnitude): the `--augment` policies.
POLICIES: Dict[str, Callable[[int, float], PolicyFn]] = {
    "randaugment": randaugment,
    "trivialaugment": lambda ops, magnitude: trivialaugment(),
    "augmix": lambda ops, magnitude: augmix(),
}
