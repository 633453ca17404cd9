"""What a data source is, and the registry `load_dataset` picks sources from.

A source loader turns the spec after its prefix (`folder:<path>` -> `<path>`)
and the `DataConfig` into a `Source`: class names and raw `Split`s, which the
shared tf.data pipeline (`pipeline.data.dataset`) decodes, caches, shuffles,
augments and batches the same way for every source. This module is the one
contract between the two, so a new source (the benchmark's `random:`) needs
nothing else.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import tensorflow as tf

from pipeline.config import DataConfig


class DataError(ValueError):
    """The requested data is missing, empty or unreadable (one-sentence message)."""


@dataclasses.dataclass
class Split:
    """One split before the shared pipeline.

    elements: unbatched raw items (file paths, encoded bytes or arrays).
    decode: `decode(item, base_size) -> (image uint8|float32 [h,w,3], label int32)`;
      None when elements already are `(image, label)`.
    """

    elements: tf.data.Dataset
    size: int
    decode: Optional[Callable[..., Tuple[tf.Tensor, tf.Tensor]]] = None


@dataclasses.dataclass
class Source:
    """What a source loader hands to `load_dataset`."""

    class_names: List[str]
    train: Split
    val: Optional[Split]
    test: Optional[Split]
    native_size: Optional[int]  # the stored square size, None when sizes vary
    typical_size: Optional[Tuple[int, int]] = None  # median (h, w) of a sample, for size rules
    in_memory: bool = False  # already in RAM: never cache
    bytes_per_pixel: int = 1  # stored dtype size, for the cache estimate
    stats: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    num_skipped: int = 0


SourceLoader = Callable[[str, DataConfig], Source]
SOURCES: Dict[str, SourceLoader] = {}


def register_source(prefix: str) -> Callable[[SourceLoader], SourceLoader]:
    """Decorator: `loader(spec, config)` serves `dataset="<prefix>:<spec>"` (or `<prefix>`)."""

    def decorator(loader: SourceLoader) -> SourceLoader:
        SOURCES[prefix] = loader
        return loader

    return decorator


def resolve(dataset: str) -> Tuple[str, str]:
    """`"folder:/x"` -> ("folder", "/x"); `"digits"` -> ("digits", ""); else TFDS."""
    prefix, sep, rest = dataset.partition(":")
    if sep and prefix in SOURCES:
        return prefix, rest
    if dataset in SOURCES:
        return dataset, ""
    return "tfds", dataset


def shorter_side_to(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes (antialiased) so the shorter side is `size`, keeping aspect; returns uint8.

    Sources with images of varying size decode through this, so the pipeline
    caches and augments images no larger than augmentation needs.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new_hw = tf.cast(tf.round(shape * scale), tf.int32)
    new_hw = tf.maximum(new_hw, size)
    resized = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    return tf.saturate_cast(tf.round(resized), tf.uint8)
