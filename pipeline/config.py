"""Frozen settings objects built from flags by the entry points.

Library code takes these, never absl FLAGS, so it can be called from tests,
keras-tuner and notebooks with plain keyword arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are fed.

    dataset: `digits` (embedded), a TFDS name (`cifar10`, or `tfds:cifar10`),
      or `folder:<path>`.
    image_size: square model resolution; None keeps the source's own size
      (32 for digits, the stored size for TFDS/folders with one size, else 224).
    resize_size: for `bit` augmentation: resize to this, then crop image_size.
    augment: a name from `pipeline.augment.AUGMENTATIONS` (`cifar`, `inception_crop`,
      `bit`, `none`).
    batch_size: global batch size.
    """

    dataset: str = "digits"
    data_dir: Optional[str] = None
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    test_split: Optional[str] = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    image_size: Optional[int] = None
    resize_size: Optional[int] = None
    augment: str = "cifar"
    batch_size: int = 128
    seed: int = 0
    strict_images: bool = False
    cache: bool = True
    shuffle_buffer: int = 10_000
    drop_remainder: bool = False
