"""Image augmentations as pure TensorFlow ops, repeatable by seed.

Every augmentation is a factory in `AUGMENTATIONS`, called as
`factory(image_size, resize_size)`, returning a per-example function
`fn(image, seed) -> image`:

* `image`: float32 HWC RGB in [0, 1], any height and width (the data pipeline
  hands over the stored image, which need not be `image_size` yet);
* `seed`: an int32/int64 tensor of shape [2], different for every example and
  epoch (the data pipeline draws it from a seeded `tf.data.Dataset.random`);
* the result: float32 `[image_size, image_size, 3]` in [0, 1].

All randomness comes from `tf.image.stateless_*` / `tf.random.stateless_*`
ops, so the same (image, seed) always gives the same output.

`eval_transform` is the deterministic counterpart used for validation, test
and prediction; `mixup` is a batch-level op for the trainer.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import tensorflow as tf

AugmentFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
AugmentFactory = Callable[[int, Optional[int]], AugmentFn]

AUGMENTATIONS: Dict[str, AugmentFactory] = {}


def register_augmentation(name: str) -> Callable[[AugmentFactory], AugmentFactory]:
    """Decorator adding a factory to `AUGMENTATIONS` under `name`."""

    def decorator(factory: AugmentFactory) -> AugmentFactory:
        if name in AUGMENTATIONS:
            raise ValueError(f"augmentation {name!r} is already registered")
        AUGMENTATIONS[name] = factory
        return factory

    return decorator


def list_augmentations() -> list[str]:
    """Names accepted by `get_augmentation` (and the `--augment` flag)."""
    return sorted(AUGMENTATIONS)


def check_augmentation(name: str) -> None:
    """Raises ValueError (listing the choices) unless `name` is registered.

    The data pipeline calls it before loading any data, so a typo fails fast.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {list_augmentations()}")


def get_augmentation(name: str, image_size: int, resize_size: Optional[int] = None) -> AugmentFn:
    """Returns the per-example augmentation `name` built for `image_size`.

    Raises:
      ValueError: `name` is not registered (the message lists the choices).
    """
    check_augmentation(name)
    return AUGMENTATIONS[name](image_size, resize_size)


def default_resize_size(image_size: int) -> int:
    """Resize-before-crop size when none is given: the 256/224 ratio, e.g. 224 -> 256, 32 -> 36."""
    return int(round(image_size * 8 / 7))


# ----------------------------------------------------------------- helpers


def _split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """`num` independent [2]-shaped seeds derived from one."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
    return [seeds[i] for i in range(num)]


def _resize(image: tf.Tensor, height: int, width: Optional[int] = None) -> tf.Tensor:
    """Bilinear resize to (height, width); a no-op when the static shape already matches."""
    width = height if width is None else width
    if image.shape[0] == height and image.shape[1] == width:
        return image
    return tf.image.resize(image, [height, width], method="bilinear")


def _finish(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Clip rounding error and pin the static shape so batching works."""
    image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 1.0)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Central `size` x `size` crop (image must be at least that large)."""
    shape = tf.shape(image)
    top = (shape[0] - size) // 2
    left = (shape[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


# ----------------------------------------------------------- augmentations


@register_augmentation("cifar")
def cifar(image_size: int, resize_size: Optional[int] = None) -> AugmentFn:
    """He et al. (2016): zero-pad 4 px (image_size // 8), random image_size crop, random flip.

    The image is first resized to image_size if it is not already that size.
    `resize_size` is unused.
    """
    del resize_size
    pad = max(1, image_size // 8)

    def fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        crop_seed, flip_seed = _split_seed(seed, 2)
        image = _resize(image, image_size)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="CONSTANT")
        image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_seed)
        return _finish(_flip(image, flip_seed), image_size)

    return fn


@register_augmentation("inception_crop")
def inception_crop(image_size: int, resize_size: Optional[int] = None) -> AugmentFn:
    """Random-resized crop (Szegedy et al.): area 8%-100%, aspect 3/4-4/3, resize, flip.

    `resize_size` is unused.
    """
    del resize_size

    def fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        box_seed, flip_seed = _split_seed(seed, 2)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=box_seed,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, [image_size, image_size], method="bilinear")
        return _finish(_flip(image, flip_seed), image_size)

    return fn


@register_augmentation("bit")
def bit(image_size: int, resize_size: Optional[int] = None) -> AugmentFn:
    """BiT-HyperRule: resize to resize_size square, random image_size crop, random flip.

    resize_size defaults to `default_resize_size(image_size)`; BiT itself uses
    160/128 for small images and 512/480 otherwise.
    """
    resize_size = resize_size or default_resize_size(image_size)
    if resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than image_size {image_size}")

    def fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        crop_seed, flip_seed = _split_seed(seed, 2)
        image = _resize(image, resize_size)
        image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_seed)
        return _finish(_flip(image, flip_seed), image_size)

    return fn


@register_augmentation("none")
def none(image_size: int, resize_size: Optional[int] = None) -> AugmentFn:
    """No augmentation: the same transform as evaluation (`eval_transform`)."""
    transform = eval_transform(image_size, resize_size)

    def fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        del seed
        return transform(image)

    return fn


def eval_transform(image_size: int, resize_size: Optional[int] = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """Deterministic evaluation transform `fn(image) -> image`.

    Resizes to image_size square; when resize_size is given, resizes to
    resize_size square and takes the central image_size crop (BiT / ImageNet
    style), matching the scale the `bit` augmentation trains at.
    """
    if resize_size is not None and resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than image_size {image_size}")

    def fn(image: tf.Tensor) -> tf.Tensor:
        if resize_size is None or resize_size == image_size:
            image = _resize(image, image_size)
        else:
            image = central_crop(_resize(image, resize_size), image_size)
        return _finish(image, image_size)

    return fn


# ------------------------------------------------------------------ mixup


def mixup(
    images: tf.Tensor, labels_onehot: tf.Tensor, alpha: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp (Zhang et al. 2018) on a batch, as in BiT: one lambda per batch.

    Each example is blended with a partner from a seeded permutation of the
    batch: `lam * x + (1 - lam) * x[perm]`, labels alike, lam ~ Beta(alpha, alpha).

    Args:
      images: float [B, H, W, C].
      labels_onehot: float [B, num_classes] (one-hot or already soft).
      alpha: Beta concentration; <= 0 returns the inputs unchanged.
      seed: int tensor of shape [2].

    Returns:
      (mixed_images, mixed_labels), same shapes and dtypes as the inputs.
    """
    if alpha <= 0:
        return images, labels_onehot
    seed_a, seed_b, seed_perm = _split_seed(seed, 3)
    # Beta(a, a) = Ga / (Ga + Gb) with Ga, Gb ~ Gamma(a).
    ga = tf.random.stateless_gamma([], seed=seed_a, alpha=alpha)
    gb = tf.random.stateless_gamma([], seed=seed_b, alpha=alpha)
    lam = ga / tf.maximum(ga + gb, 1e-12)
    batch = tf.shape(images)[0]
    perm = tf.argsort(tf.random.stateless_uniform([batch], seed=seed_perm))
    lam_x = tf.cast(lam, images.dtype)
    lam_y = tf.cast(lam, labels_onehot.dtype)
    mixed_images = lam_x * images + (1 - lam_x) * tf.gather(images, perm)
    mixed_labels = lam_y * labels_onehot + (1 - lam_y) * tf.gather(labels_onehot, perm)
    return mixed_images, mixed_labels
