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

Names: the crops `cifar`, `inception_crop`, `bit`, `none`; a policy of
`pipeline.data.policies` (`randaugment`, `trivialaugment`, `augmix`) alone,
which runs after the `none` transform (resize only, no flip); or
`<crop>+<policy>` (`cifar+randaugment`): the crop (with its flip) first, then
the policy. Every combination is registered by name (`AUGMENT_PARTS`), so
`--augment` lists them all. `get_augmentation` adds, for any name, colour
jitter before the policy and random erasing after it.

`eval_transform` is the deterministic counterpart used for validation, test
and prediction; batch mixing (MixUp, CutMix) is in `pipeline.data.mixing`.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import tensorflow as tf

from pipeline.data import policies
from pipeline.data.mixing import mixup as mixup  # re-exported: its first home

AugmentFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
AugmentFactory = Callable[[int, Optional[int]], AugmentFn]

# Every `--augment` name -> factory(image_size, resize_size) with the policy options' defaults.
AUGMENTATIONS: Dict[str, AugmentFactory] = {}
# The crops alone, and what each name is made of: name -> (crop, policy or None).
CROPS: Dict[str, AugmentFactory] = {}
AUGMENT_PARTS: Dict[str, Tuple[str, Optional[str]]] = {}


def register_augmentation(name: str) -> Callable[[AugmentFactory], AugmentFactory]:
    """Decorator adding a crop factory to `AUGMENTATIONS` (and `CROPS`) under `name`."""

    def decorator(factory: AugmentFactory) -> AugmentFactory:
        if name in AUGMENTATIONS:
            raise ValueError(f"augmentation {name!r} is already registered")
        AUGMENTATIONS[name] = CROPS[name] = factory
        AUGMENT_PARTS[name] = (name, None)
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


def crop_of(name: str) -> str:
    """The crop `name` starts with (`bit` for `bit+randaugment`): it sets the resize scale."""
    check_augmentation(name)
    return AUGMENT_PARTS[name][0]


def get_augmentation(name: str, image_size: int, resize_size: Optional[int] = None, *,
                     randaugment_ops: int = 2, randaugment_magnitude: float = 9.0,
                     color_jitter: float = 0.0, random_erasing: float = 0.0) -> AugmentFn:
    """Returns the per-example augmentation `name` built for `image_size`.

    The crop, then colour jitter of strength `color_jitter` (0 = off), then
    the policy, then random erasing with probability `random_erasing` (0 =
    off), each with its own seed split from the example's. With no policy and
    both off this is the crop alone with the example's seed, as before.

    Raises:
      ValueError: `name` is not registered (the message lists the choices).
    """
    check_augmentation(name)
    crop, policy = AUGMENT_PARTS[name]
    crop_fn = CROPS[crop](image_size, resize_size)
    stages = []
    if color_jitter > 0:
        stages.append(policies.color_jitter(color_jitter))
    if policy is not None:
        stages.append(policies.POLICIES[policy](randaugment_ops, randaugment_magnitude))
    if random_erasing > 0:
        stages.append(policies.random_erasing(random_erasing))
    if not stages:
        return crop_fn

    def fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        crop_seed, *stage_seeds = _split_seed(seed, len(stages) + 1)
        image = crop_fn(image, crop_seed)
        for stage, stage_seed in zip(stages, stage_seeds):
            image = stage(image, stage_seed)
        return _finish(image, image_size)

    return fn


def augmentation_for(config, image_size: int, resize_size: Optional[int] = None) -> AugmentFn:
    """`get_augmentation` with a DataConfig's `augment` and policy options (the data pipeline's call)."""
    return get_augmentation(config.augment, image_size, resize_size,
                            randaugment_ops=config.randaugment_ops,
                            randaugment_magnitude=config.randaugment_magnitude,
                            color_jitter=config.color_jitter, random_erasing=config.random_erasing)


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


# ------------------------------------------------ policies, alone and after a crop


def _register_policies() -> None:
    """`<policy>` (after `none`) and `<crop>+<policy>` for every crop and policy, by name."""
    for policy in policies.POLICIES:
        for crop in list(CROPS):
            name = policy if crop == "none" else f"{crop}+{policy}"
            AUGMENTATIONS[name] = functools.partial(get_augmentation, name)
            AUGMENT_PARTS[name] = (crop, policy)


_register_policies()
