"""The data measurements run on: random images in memory, and a folder of JPEG files.

Importing this module registers the `random:<examples>x<size>[x<classes>]`
source with `pipeline.data`: random uint8 RGB images (seeded by
`DataConfig.seed`) held in memory, so a measurement of training or of the
input pipeline goes through the same tf.data pipeline as every other source
(shuffle, augmentation with per-example seeds, batching, prefetch) without
measuring a disk.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from pipeline import data, hyperrule
from pipeline.config import DataConfig

RANDOM_SOURCE = "random"
# Per-channel statistics of uniform uint8 noise scaled to [0, 1].
RANDOM_STATS = ((0.5, 0.5, 0.5), (0.2887, 0.2887, 0.2887))


def random_spec(examples: int, size: int, num_classes: int = 10) -> str:
    """`dataset=` string of the in-memory `random:` source, e.g. `random:1024x32x10`."""
    return f"{RANDOM_SOURCE}:{int(examples)}x{int(size)}x{int(num_classes)}"


def _parse_random_spec(spec: str) -> tuple[int, int, int]:
    """(examples, size, classes) of `<examples>x<size>[x<classes>]`; DataError otherwise."""
    try:
        parts = [int(p) for p in spec.split("x")]
        examples, size = parts[:2]
        classes = parts[2] if len(parts) > 2 else 10
        if len(parts) > 3 or min(examples, size, classes) < 1:
            raise ValueError
    except ValueError:
        raise data.DataError(
            f"dataset '{RANDOM_SOURCE}:{spec}' must be '{RANDOM_SOURCE}:<examples>x<size>"
            f"[x<classes>]', e.g. '{random_spec(1024, 32)}'.") from None
    return examples, size, classes


@data.register_source(RANDOM_SOURCE)
def random_source(spec: str, config: DataConfig) -> data.Source:
    """Square `size` random images with uniform labels; the whole set is the training split."""
    examples, size, classes = _parse_random_spec(spec)
    rng = np.random.default_rng(config.seed)
    images = rng.integers(0, 256, (examples, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, examples, dtype=np.int32)
    train = data.Split(tf.data.Dataset.from_tensor_slices((images, labels)), examples)
    return data.Source(class_names=[f"class{i}" for i in range(classes)], train=train, val=None,
                  test=None, native_size=size, in_memory=True, bytes_per_pixel=1, stats=RANDOM_STATS)


def default_augment(model_name: str, image_size: int) -> str:
    """The augmentation a real run of `model_name` would use: `bit` for BiT, else `cifar` up to 64 px."""
    from pipeline.models import get_spec
    if get_spec(model_name).family == "bit":
        return "bit"
    return "cifar" if image_size <= 64 else "inception_crop"


def stored_size(augment: str, image_size: int) -> int:
    """Side of the stored images: for `bit`, the BiT-HyperRule's resize for this crop
    (160 for a 128 crop, 512 for 480), else the 256/224 rule; else `image_size`."""
    if augment != "bit":
        return image_size
    # The rule's two (resize, crop) pairs: for small images and for the others.
    known = {crop: resize for resize, crop in (hyperrule.resolution((1, 1)),
                                               hyperrule.resolution((96, 96)))}
    return known.get(image_size, data.augment.default_resize_size(image_size))


def write_jpeg_folder(root: str, *, images: int = 256, classes: int = 4, min_side: int = 160,
                      max_side: int = 320, seed: int = 0, quality: int = 90) -> str:
    """Write `images` photo-like JPEGs (smooth colour fields plus noise, random sizes) into
    one subfolder per class under `root`; returns `root`."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        h, w = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
        coarse = rng.random((4, 4, 3)) * 255
        field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR),
                           dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.jpg"), quality=quality)
    return root
