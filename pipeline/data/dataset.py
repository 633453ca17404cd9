"""The shared tf.data pipeline behind every source: `load_dataset(DataConfig) -> Datasets`.

Every split is a batched `tf.data.Dataset` of `(image, label)`: image float32
`[B, H, W, 3]` RGB in [0, 1], label int32 `[B]`. Data never normalizes for a
model: `Datasets.mean` / `Datasets.std` are handed to models so they can.

Pipeline (tf.data performance guide): source -> parallel decode (+ resize of
variable-size images so the shorter side is the largest size augmentation
needs) -> cache (uint8, when `cache` and it fits in `CACHE_LIMIT_BYTES`) ->
shuffle(seed of the pass) -> augmentation (train, per-example stateless seeds
from the pass and the example's position: `TrainingStream`) or
`eval_transform` (val/test) -> batch -> prefetch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from pipeline import hyperrule
from pipeline.config import DataConfig
from pipeline.data import augment, balance
from pipeline.data.registry import SOURCES, DataError, Source, Split, resolve

AUTOTUNE = tf.data.AUTOTUNE
DEFAULT_IMAGE_SIZE = 224
CACHE_LIMIT_BYTES = 2 * 1024**3
STATS_MAX_IMAGES = 2000

# Every source is DATA-sharded. A folder source reads files inside a `map`, which
# tf.data's FILE auto-shard cannot split ("Found an unshardable source dataset").
SHARD_POLICY = tf.data.experimental.AutoShardPolicy.DATA


@dataclasses.dataclass(frozen=True)
class Datasets:
    """What `load_dataset` returns.

    Attributes:
      train: batched, shuffled, augmented `(image float32 [B,H,W,3] in [0,1], label int32 [B])`:
        the first pass of `stream` (the same order every time it is read).
      stream: the training split per epoch (`TrainingStream`), what training reads.
      val, test: batched with `eval_transform`; None when the source has no such split.
      class_names: label index -> name.
      num_train, num_val, num_test: examples per split (0 for a missing split).
      image_size: square side of every image the datasets yield.
      mean, std: per-channel RGB statistics of the training images in [0, 1].
      name: the dataset spec as given (`digits`, `cifar10`, `folder:/data/x`).
      num_skipped: files a folder source skipped as unreadable or not images.
    """

    train: tf.data.Dataset
    val: Optional[tf.data.Dataset]
    test: Optional[tf.data.Dataset]
    class_names: List[str]
    num_train: int
    num_val: int
    num_test: int
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    name: str
    num_skipped: int = 0
    stream: Optional["TrainingStream"] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 [0, 1]; float32 passes through."""
    return tf.image.convert_image_dtype(image, tf.float32)


def _decoded(split: Split, base_size: int) -> tf.data.Dataset:
    ds = split.elements
    if split.decode is not None:
        decode = split.decode
        ds = ds.map(lambda *item: decode(*item, base_size), num_parallel_calls=AUTOTUNE)
    return ds


def _mean_std(split: Split, base_size: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean/std over (up to) the first STATS_MAX_IMAGES training images."""

    def sums(image, label):
        del label
        x = _to_float(image)
        pixels = tf.cast(tf.shape(x)[0] * tf.shape(x)[1], tf.float32)
        return tf.reduce_sum(x, [0, 1]), tf.reduce_sum(tf.square(x), [0, 1]), pixels

    ds = _decoded(dataclasses.replace(split, elements=split.elements.take(STATS_MAX_IMAGES)), base_size)
    ds = ds.map(sums, num_parallel_calls=AUTOTUNE).batch(256)
    total, total_sq, count = np.zeros(3), np.zeros(3), 0.0
    for s, sq, n in ds.as_numpy_iterator():
        total += s.sum(0, dtype=np.float64)
        total_sq += sq.sum(0, dtype=np.float64)
        count += float(n.sum(dtype=np.float64))
    if count == 0:
        raise DataError("The training split is empty.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _finish(ds: tf.data.Dataset, batch_size: int, drop_remainder: bool) -> tf.data.Dataset:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = SHARD_POLICY
    return ds.with_options(options)


def _cached(split: Split, source: Source, config: DataConfig, base_size: int) -> bool:
    """Whether the decoded split fits the in-memory cache (and is worth caching)."""
    stored = source.native_size or base_size
    est_bytes = split.size * stored * stored * 3 * source.bytes_per_pixel
    if source.native_size is None:
        est_bytes = est_bytes * 4 // 3  # non-square images: the longer side is larger
    return config.cache and not source.in_memory and est_bytes < CACHE_LIMIT_BYTES


def _eval_pipeline(split: Split, source: Source, config: DataConfig, *, image_size: int,
                   resize_size: Optional[int], base_size: int) -> tf.data.Dataset:
    """Validation/test: decode (cache), `eval_transform`, batch; never drops a remainder."""
    ds = _decoded(split, base_size)
    if _cached(split, source, config, base_size):
        ds = ds.cache()
    transform = augment.eval_transform(image_size, resize_size)
    ds = ds.map(lambda image, label: (transform(_to_float(image)), label), num_parallel_calls=AUTOTUNE)
    return _finish(ds, config.batch_size, False)


def pass_seed(seed: int, index: int) -> int:
    """The shuffle seed of training pass `index` of a run seeded `seed`."""
    return seed * 1_000_003 + index


@dataclasses.dataclass(frozen=True)
class TrainingStream:
    """The training split as a pure function of (seed, epoch): what makes a resumed run exact.

    Why: a `shuffle(reshuffle_each_iteration=True)` and a `Dataset.random`
    draw their next epoch's order and augmentation seeds from state that lives
    in the process, so a resumed process would replay epoch 1's batches in
    epoch 5. Here pass `p` of the split is shuffled with `pass_seed(seed, p)`
    and example `i` of it is augmented with the stateless seed `(pass seed, i)`,
    so any pass can be rebuilt alone. The decoded split is cached once
    (`cache()` is shared by every pass built on it).

    Seeds are Python ints, passes are chained in Python: a tensor seed inside a
    `flat_map` breaks `Dataset.shuffle` when the global seed is 0 (TF's
    `get_seed` compares the pair to (0, 0) with a Python `==`).
    """

    elements: tf.data.Dataset  # decoded (and cached) examples, or undecoded items when `decode` is set
    decode: Optional[object]  # item -> (image, label), applied after the shuffle when not cached
    size: int
    augmentation: object  # fn(image float [0, 1], seed [2]) -> image
    seed: int
    shuffle_buffer: int
    batch_size: int
    drop_remainder: bool
    sampler: Optional[object] = None  # (elements, pass seed) -> a pass's items: `balance.sampler_for`

    def _pass(self, index: int, skip: int = 0) -> tf.data.Dataset:
        """Pass `index` unbatched and augmented, from its example `skip` on."""
        seed = pass_seed(self.seed, index)
        ds = self.elements.shuffle(max(1, min(self.shuffle_buffer, self.size)), seed=seed,
                                   reshuffle_each_iteration=False)
        if self.sampler is not None:  # --balanced_sampling: classes drawn equally, same pass length
            ds = self.sampler(self.elements, seed)
        if self.decode is not None:
            ds = ds.map(self.decode, num_parallel_calls=AUTOTUNE)
        ds = ds.enumerate()
        if skip:
            ds = ds.skip(skip)  # before decoding (cached) and augmentation: only reordering is repeated
        aug = self.augmentation
        return ds.map(lambda i, example: (aug(_to_float(example[0]), tf.stack([tf.constant(seed, tf.int64), i])),
                                          example[1]),
                      num_parallel_calls=AUTOTUNE)

    def epoch(self, epoch: int) -> tf.data.Dataset:
        """Batched pass `epoch` (0-based): an epoch that reads the split once."""
        return _finish(self._pass(epoch), self.batch_size, self.drop_remainder)

    def steps(self, epoch: int, steps_per_epoch: int) -> tf.data.Dataset:
        """`--steps_per_epoch` epochs: full batches `epoch * steps_per_epoch` onwards of the passes laid end to end."""
        examples = steps_per_epoch * self.batch_size
        first, skip = divmod(epoch * examples, self.size)
        last = (epoch * examples + examples - 1) // self.size
        ds = self._pass(first, skip)
        for index in range(first + 1, last + 1):
            ds = ds.concatenate(self._pass(index))
        return _finish(ds.take(examples), self.batch_size, True)


def training_stream(split: Split, source: Source, config: DataConfig, *, image_size: int,
                     resize_size: Optional[int], base_size: int) -> TrainingStream:
    decode = None
    elements = split.elements
    if _cached(split, source, config, base_size):
        elements = _decoded(split, base_size).cache()
    elif split.decode is not None:  # shuffle cheap items (paths, encoded bytes) before decoding
        split_decode = split.decode
        decode = lambda *item: split_decode(*item, base_size)  # noqa: E731
    return TrainingStream(elements=elements, decode=decode, size=split.size,
                          augmentation=augment.augmentation_for(config, image_size, resize_size),
                          seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                          batch_size=config.batch_size, drop_remainder=config.drop_remainder,
                          sampler=balance.sampler_for(config, len(source.class_names), split.size))


def _sizes(config: DataConfig, source: Source) -> Tuple[int, Optional[int]]:
    """(image_size, resize_size): the config's, else the stored size or BiT-HyperRule's."""
    image_size = config.image_size or source.native_size or DEFAULT_IMAGE_SIZE
    resize_size = config.resize_size
    if config.resolution_rule == "hyperrule" and not config.image_size:
        # BiT-HyperRule: decided by the stored size (varying sizes count as large).
        size = (source.native_size,) * 2 if source.native_size else source.typical_size
        resize_size, image_size = hyperrule.resolution(size or (DEFAULT_IMAGE_SIZE,) * 2)
    if resize_size is None and augment.crop_of(config.augment) == "bit":  # train and eval at the same scale
        resize_size = augment.default_resize_size(image_size)
    if resize_size is not None and resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than image_size {image_size}")
    return image_size, resize_size


# Sources whose splits are fixed (digits) or folders (train/ val/ test/, or fractions): no split names.
_NO_SPLIT_NAMES = ("digits", "folder")


def _check_split_flags(prefix: str, config: DataConfig):
    """--train_split/--val_split/--test_split name TFDS splits: refuse them where they would be ignored."""
    given = [f"--{name}={value}" for name, value in (("train_split", config.train_split),
             ("val_split", config.val_split), ("test_split", config.test_split)) if value is not None]
    if prefix in _NO_SPLIT_NAMES and given:
        how = ("its split is fixed" if prefix == "digits" else
               "use train/ val/ test/ subfolders or --val_fraction/--test_fraction")
        raise DataError(f"{' '.join(given)}: TFDS split names do not apply to --dataset={config.dataset} "
                        f"({how}).")


def load_dataset(config: DataConfig) -> Datasets:
    """Builds train/val/test input pipelines for `config.dataset`.

    Args:
      config: a DataConfig; see `pipeline.data` for `dataset` specs.

    Returns:
      Datasets with batched pipelines, class names, sizes, image size and
      training-set mean/std.

    Raises:
      DataError: the data is absent (and cannot be downloaded), a folder or
        class folder is missing or empty, a split name is unknown or given for
        digits or a folder, the data has fewer than 2 classes, or (with
        `strict_images`) a folder holds unreadable files.
      ValueError: an unknown augmentation or a bad size/batch setting.
    """
    if config.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {config.batch_size}")
    augment.check_augmentation(config.augment)
    prefix, spec = resolve(config.dataset)
    _check_split_flags(prefix, config)
    source = SOURCES[prefix](spec, config)
    if len(source.class_names) < 2:
        raise DataError(f"--dataset={config.dataset} has {len(source.class_names)} class "
                        f"({', '.join(source.class_names)}): a classifier needs at least 2.")
    image_size, resize_size = _sizes(config, source)
    base_size = max(image_size, resize_size or 0)

    mean, std = source.stats or _mean_std(source.train, base_size)
    sizes = dict(source=source, config=config, image_size=image_size, resize_size=resize_size,
                 base_size=base_size)
    build = functools.partial(_eval_pipeline, **sizes)
    stream = training_stream(source.train, **sizes)
    return Datasets(
        train=stream.epoch(0),
        val=build(source.val) if source.val else None,
        test=build(source.test) if source.test else None,
        stream=stream,
        class_names=list(source.class_names),
        num_train=source.train.size,
        num_val=source.val.size if source.val else 0,
        num_test=source.test.size if source.test else 0,
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        name=config.dataset,
        num_skipped=source.num_skipped,
    )
