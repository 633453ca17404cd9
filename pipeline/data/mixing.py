"""Batch mixing for the trainer: MixUp, CutMix, and timm's per-batch switch between them.

Every function takes a batch `images` float [B, H, W, C], soft labels
[B, num_classes] and a stateless seed (int tensor [2]), and returns the mixed
batch with the same shapes and dtypes; the partner of each example comes from
a seeded permutation of the batch. The same seed gives the same batch, so the
trainer derives it from (run seed, epoch, step) and runs repeat.

Why not `keras.layers.MixUp` / `keras.layers.CutMix`: they draw from a
stateful `keras.random.SeedGenerator` (no stateless seed tensor), and CutMix
samples one box per image while timm (whose recipes people compare against)
uses one lambda and one box per batch with the label weight corrected to the
pasted area; both are a few lines of stateless ops here.
"""
from __future__ import annotations

import tensorflow as tf


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
    return [seeds[i] for i in range(num)]


def _beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
    """Beta(alpha, alpha) = Ga / (Ga + Gb) with Ga, Gb ~ Gamma(alpha)."""
    seed_a, seed_b = _split(seed, 2)
    ga = tf.random.stateless_gamma([], seed=seed_a, alpha=alpha)
    gb = tf.random.stateless_gamma([], seed=seed_b, alpha=alpha)
    return ga / tf.maximum(ga + gb, 1e-12)


def _permutation(seed: tf.Tensor, batch) -> tf.Tensor:
    return tf.argsort(tf.random.stateless_uniform([batch], seed=seed))


def _mix_labels(labels, perm, lam):
    lam = tf.cast(lam, labels.dtype)
    return lam * labels + (1 - lam) * tf.gather(labels, perm)


def mixup(
    images: tf.Tensor, labels_onehot: tf.Tensor, alpha: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp (Zhang et al. 2018) on a batch, as in BiT: one lambda per batch.

    Each example is blended with a partner from a seeded permutation of the
    batch: `lam * x + (1 - lam) * x[perm]`, labels alike, lam ~ Beta(alpha, alpha).
    alpha <= 0 returns the inputs unchanged.
    """
    if alpha <= 0:
        return images, labels_onehot
    # The seed split of the first MixUp (in pipeline.data.augment), so earlier runs repeat.
    seed_a, seed_b, seed_perm = _split(seed, 3)
    ga = tf.random.stateless_gamma([], seed=seed_a, alpha=alpha)
    gb = tf.random.stateless_gamma([], seed=seed_b, alpha=alpha)
    lam = ga / tf.maximum(ga + gb, 1e-12)
    perm = _permutation(seed_perm, tf.shape(images)[0])
    lam_x = tf.cast(lam, images.dtype)
    mixed_images = lam_x * images + (1 - lam_x) * tf.gather(images, perm)
    return mixed_images, _mix_labels(labels_onehot, perm, lam)


def cutmix_box(height, width, lam: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """timm's box: sides sqrt(1 - lam) of the image's, centre uniform, clipped; a bool [H, W, 1] mask."""
    cy_seed, cx_seed = _split(seed, 2)
    ratio = tf.sqrt(1.0 - lam)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    cut_h, cut_w = tf.floor(h_f * ratio), tf.floor(w_f * ratio)
    cy = tf.floor(tf.random.stateless_uniform([], seed=cy_seed) * h_f)
    cx = tf.floor(tf.random.stateless_uniform([], seed=cx_seed) * w_f)
    top, bottom = tf.clip_by_value(cy - cut_h // 2, 0, h_f), tf.clip_by_value(cy + cut_h // 2, 0, h_f)
    left, right = tf.clip_by_value(cx - cut_w // 2, 0, w_f), tf.clip_by_value(cx + cut_w // 2, 0, w_f)
    rows = tf.range(h_f)[:, None, None]
    cols = tf.range(w_f)[None, :, None]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def cutmix(
    images: tf.Tensor, labels_onehot: tf.Tensor, alpha: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """CutMix (Yun et al. 2019), one box per batch as timm: the partner's box is pasted in.

    lam ~ Beta(alpha, alpha) sets the box size; the label weight is then the
    share of the image NOT pasted over (timm's `correct_lam`), so labels sum
    to 1 and match the pasted area exactly. alpha <= 0 returns the inputs.
    """
    if alpha <= 0:
        return images, labels_onehot
    lam_seed, box_seed, perm_seed = _split(seed, 3)
    shape = tf.shape(images)
    box = cutmix_box(shape[1], shape[2], _beta(lam_seed, alpha), box_seed)
    perm = _permutation(perm_seed, shape[0])
    mixed = tf.where(box[None], tf.gather(images, perm), images)
    kept = 1.0 - tf.reduce_mean(tf.cast(box, tf.float32))
    return mixed, _mix_labels(labels_onehot, perm, kept)


def mix_batch(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, *, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, switch_prob: float = 0.5) -> tuple[tf.Tensor, tf.Tensor]:
    """timm's `Mixup(mode="batch")`: per batch CutMix with probability `switch_prob`, else MixUp.

    With only one alpha > 0, that one always (MixUp alone sees the seed as
    `mixup` always did, so earlier runs repeat); with neither, the batch as it
    is (no op is added).
    """
    if cutmix_alpha <= 0:
        return mixup(images, labels, mixup_alpha, seed)
    if mixup_alpha <= 0:
        return cutmix(images, labels, cutmix_alpha, seed)
    switch_seed, mix_seed = _split(seed, 2)
    use_cutmix = tf.random.stateless_uniform([], seed=switch_seed) < switch_prob
    return tf.cond(use_cutmix, lambda: cutmix(images, labels, cutmix_alpha, mix_seed),
                   lambda: mixup(images, labels, mixup_alpha, mix_seed))


def epoch_mixing(t, mixup_alpha: float, epoch: int) -> dict:
    """The mixing of epoch `epoch` (0-based) as `mix_batch` keywords: none from `t.mix_off_epoch` on.

    Args:
      t: the run's TrainConfig (`cutmix_alpha`, `mix_switch_prob`, `mix_off_epoch`).
      mixup_alpha: the run's MixUp alpha (`phases.mixup_alpha`: the flag or the HyperRule's).
      epoch: a Python int, so an epoch without mixing adds no operation at all.
    """
    off = t.mix_off_epoch > 0 and epoch >= t.mix_off_epoch
    return {"mixup_alpha": 0.0 if off else mixup_alpha, "cutmix_alpha": 0.0 if off else t.cutmix_alpha,
            "switch_prob": t.mix_switch_prob}
