"""Datasets for training and evaluation: `load_dataset(DataConfig) -> Datasets`.

Sources live in a registry keyed by the prefix of `DataConfig.dataset`:

* `digits` (default, embedded, offline): scikit-learn's 1,797 8x8 handwritten
  digits served as 32x32 RGB. Fixed split, independent of `seed`:
  1,257 train / 180 val / 360 test (see `_digits_source`).
* `tfds:<name>` or a bare TFDS name (`cifar10`, `tf_flowers`, `imagenette/160px-v2`):
  read from `data_dir` (downloaded when possible, else a `DataError`).
* `folder:<path>`: one subfolder per class, pre-split (`train/`, `val/` or
  `validation/`, optional `test/`) or split here by `val_fraction` /
  `test_fraction` with `seed` (stratified, exact sizes). Extensions .jpg/.jpeg/
  .png/.bmp/.gif in any case (GIF: first frame); hidden files are ignored.
  Every file is checked before training: unreadable or non-image files are
  skipped with one warning naming them, or a `DataError` with `strict_images`.

Every split is a batched `tf.data.Dataset` of `(image, label)`: image float32
`[B, H, W, 3]` RGB in [0, 1], label int32 `[B]`. Data never normalizes for a
model: `Datasets.mean` / `Datasets.std` are handed to models so they can.

Pipeline (tf.data performance guide): source -> parallel decode (+ resize of
variable-size images so the shorter side is the largest size augmentation
needs) -> cache (uint8, when `cache` and it fits in `CACHE_LIMIT_BYTES`) ->
shuffle(seed) -> augmentation (train, per-example stateless seeds) or
`eval_transform` (val/test) -> batch -> prefetch.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline.data import augment as augment_lib
from pipeline.config import DataConfig
from pipeline.training.schedules import hyperrule_resolution

AUTOTUNE = tf.data.AUTOTUNE
DEFAULT_IMAGE_SIZE = 224
CACHE_LIMIT_BYTES = 2 * 1024**3
STATS_MAX_IMAGES = 2000
_MAX_NAMED_FILES = 10

# Supplied to models as per-channel statistics; CIFAR values are the standard
# ones over the 50k training images (a 45k subset differs in the 4th decimal).
KNOWN_STATS: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# (train, val, test) TFDS split strings when the config leaves them unset.
# cifar: He et al.'s 45k/5k train/val. imagenette: its `validation` split is
# the one papers report, so it is kept as the test set and val is carved
# from train.
TFDS_DEFAULT_SPLITS: Dict[str, Tuple[str, Optional[str], Optional[str]]] = {
    "cifar10": ("train[:45000]", "train[45000:]", "test"),
    "cifar100": ("train[:45000]", "train[45000:]", "test"),
    "tf_flowers": ("train[:80%]", "train[80%:90%]", "train[90%:]"),
    "oxford_flowers102": ("train", "validation", "test"),
    "oxford_iiit_pet": ("train[:90%]", "train[90%:]", "test"),
    "imagenette": ("train[:90%]", "train[90%:]", "validation"),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF"})  # what tf.io.decode_image reads

# Every source is DATA-sharded. A folder source reads files inside a `map`, which
# tf.data's FILE auto-shard cannot split ("Found an unshardable source dataset").
SHARD_POLICY = tf.data.experimental.AutoShardPolicy.DATA


class DataError(ValueError):
    """The requested data is missing, empty or unreadable (one-sentence message)."""


@dataclasses.dataclass(frozen=True)
class Datasets:
    """What `load_dataset` returns.

    Attributes:
      train: batched, shuffled, augmented `(image float32 [B,H,W,3] in [0,1], label int32 [B])`.
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def describe(datasets: Datasets) -> dict:
    """A JSON-friendly summary for run summaries and logs."""
    return {
        "name": datasets.name,
        "num_classes": datasets.num_classes,
        "num_train": datasets.num_train,
        "num_val": datasets.num_val,
        "num_test": datasets.num_test,
        "image_size": datasets.image_size,
        "mean": [round(float(m), 6) for m in datasets.mean],
        "std": [round(float(s), 6) for s in datasets.std],
        "num_skipped": datasets.num_skipped,
    }


# --------------------------------------------------------------- sources


@dataclasses.dataclass
class _Split:
    """One split before the shared pipeline.

    elements: unbatched raw items (file paths, encoded bytes or arrays).
    decode: `decode(item, base_size) -> (image uint8|float32 [h,w,3], label int32)`;
      None when elements already are `(image, label)`.
    """

    elements: tf.data.Dataset
    size: int
    decode: Optional[Callable[..., Tuple[tf.Tensor, tf.Tensor]]] = None


@dataclasses.dataclass
class _Source:
    """What a source loader hands to `load_dataset`."""

    class_names: List[str]
    train: _Split
    val: Optional[_Split]
    test: Optional[_Split]
    native_size: Optional[int]  # the stored square size, None when sizes vary
    typical_size: Optional[Tuple[int, int]] = None  # median (h, w) of a sample, for size rules
    in_memory: bool = False  # already in RAM: never cache
    bytes_per_pixel: int = 1  # stored dtype size, for the cache estimate
    stats: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    num_skipped: int = 0


SourceLoader = Callable[[str, DataConfig], _Source]
SOURCES: Dict[str, SourceLoader] = {}


def register_source(prefix: str) -> Callable[[SourceLoader], SourceLoader]:
    """Decorator: `loader(spec, config)` serves `dataset="<prefix>:<spec>"` (or `<prefix>`)."""

    def decorator(loader: SourceLoader) -> SourceLoader:
        SOURCES[prefix] = loader
        return loader

    return decorator


def _resolve(dataset: str) -> Tuple[str, str]:
    """`"folder:/x"` -> ("folder", "/x"); `"digits"` -> ("digits", ""); else TFDS."""
    prefix, sep, rest = dataset.partition(":")
    if sep and prefix in SOURCES:
        return prefix, rest
    if dataset in SOURCES:
        return dataset, ""
    return "tfds", dataset


def _to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 [0, 1]; float32 passes through."""
    return tf.image.convert_image_dtype(image, tf.float32)


def _shorter_side_to(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes (antialiased) so the shorter side is `size`, keeping aspect; returns uint8."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new_hw = tf.cast(tf.round(shape * scale), tf.int32)
    new_hw = tf.maximum(new_hw, size)
    resized = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    return tf.saturate_cast(tf.round(resized), tf.uint8)


# -- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = (digits.images.astype(np.float32) / 16.0)[..., None]  # [N, 8, 8, 1] in [0, 1]
    big = tf.image.resize(gray, [32, 32], method="bilinear").numpy()
    images = np.clip(np.repeat(big, 3, axis=-1), 0.0, 1.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=0.2, stratify=labels, random_state=0)
    n_val = round(0.1 * len(labels))
    train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=0)
    return images, labels, (train, val, test)


@register_source("digits")
def _digits_source(spec: str, config: DataConfig) -> _Source:
    """scikit-learn digits as 32x32 RGB float32 in [0, 1] (bilinear upscale, gray replicated).

    The split is fixed (stratified `train_test_split`, random_state=0, never
    `config.seed`, so the test set never changes): 20% test = 360, then 180
    (10% of all) val, 1,257 train.
    """
    del config
    if spec:
        raise DataError(f"dataset 'digits' takes no argument, got 'digits:{spec}'.")
    images, labels, (train, val, test) = _digits_arrays()

    def split(index: np.ndarray) -> _Split:
        ds = tf.data.Dataset.from_tensor_slices((images[index], labels[index]))
        return _Split(ds, len(index))

    return _Source(
        class_names=[str(d) for d in range(10)],
        train=split(train),
        val=split(val),
        test=split(test),
        native_size=32,
        in_memory=True,
        bytes_per_pixel=4,
    )


# -- TFDS


def _tfds_prepared_builder(name: str, data_dir: Optional[str]):
    """`tfds.builder` with the data in place, or a one-sentence DataError."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        known = tfds.list_builders()
        close = difflib.get_close_matches(name.split("/")[0], known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DataError(
            f"Unknown dataset {name!r}: it is not 'digits', 'folder:<path>' or a TFDS name{hint}."
        ) from None
    if builder.is_prepared():
        return builder
    where = data_dir or tfds.core.constants.DATA_DIR
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any download/prepare failure means "absent"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(
            f"TFDS dataset {name!r} is not prepared under --data_dir={where} and could not "
            f"be downloaded ({type(e).__name__}: {reason}); on a machine with network run "
            f"`tfds build {name} --data_dir=<dir>`, copy <dir> here and pass --data_dir=<dir>."
        ) from e
    return builder


def _tfds_num_examples(builder, split: str) -> Optional[int]:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        return None


def _tfds_default_splits(builder, base: str, config: DataConfig) -> Tuple[str, Optional[str], Optional[str]]:
    if base in TFDS_DEFAULT_SPLITS:
        return TFDS_DEFAULT_SPLITS[base]
    splits = set(builder.info.splits.keys())
    test = "test" if "test" in splits else None
    if "validation" in splits:
        return "train", "validation", test
    n = _tfds_num_examples(builder, "train")
    if n:
        n_val = max(1, round(n * config.val_fraction))
        return f"train[:{n - n_val}]", f"train[{n - n_val}:]", test
    pct = max(1, round(100 * config.val_fraction))
    return f"train[:{100 - pct}%]", f"train[{100 - pct}%:]", test


def _optional_split(value: Optional[str], default: Optional[str]) -> Optional[str]:
    """None -> default; "" or "none" -> no split."""
    if value is None:
        return default
    return None if value.strip().lower() in ("", "none") else value


@register_source("tfds")
def _tfds_source(name: str, config: DataConfig) -> _Source:
    """A TFDS dataset by name (see `TFDS_DEFAULT_SPLITS` for split defaults)."""
    import tensorflow_datasets as tfds

    if not name:
        raise DataError("dataset 'tfds:' needs a name, e.g. 'tfds:cifar10'.")
    builder = _tfds_prepared_builder(name, config.data_dir)
    info = builder.info
    base = name.split("/")[0]
    if not info.supervised_keys or len(info.supervised_keys) != 2:
        raise DataError(f"TFDS dataset {name!r} has no (image, label) supervised keys.")
    image_key, label_key = info.supervised_keys
    image_feature, label_feature = info.features[image_key], info.features[label_key]
    class_names = list(getattr(label_feature, "names", None) or [])
    if not class_names:
        raise DataError(f"TFDS dataset {name!r} has no class names for label {label_key!r}.")
    h, w = image_feature.shape[0], image_feature.shape[1]
    native_size = h if (h is not None and h == w) else None
    encoded = isinstance(image_feature, tfds.features.Image)

    d_train, d_val, d_test = _tfds_default_splits(builder, base, config)
    train_split = _optional_split(config.train_split, d_train)
    val_split = _optional_split(config.val_split, d_val)
    test_split = _optional_split(config.test_split, d_test)
    if train_split is None:
        raise DataError(f"TFDS dataset {name!r} needs a training split (--train_split).")

    def decode(image, label, base_size):
        if encoded:
            image = tf.io.decode_image(image, channels=3, expand_animations=False)
        elif image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        elif image.shape[-1] == 4:
            image = image[..., :3]
        if native_size is not None:
            image = tf.ensure_shape(image, [native_size, native_size, 3])
        else:
            image = _shorter_side_to(tf.ensure_shape(image, [None, None, 3]), base_size)
        return image, tf.cast(label, tf.int32)

    def make(split: Optional[str], training: bool) -> Optional[_Split]:
        if split is None:
            return None
        size = _tfds_num_examples(builder, split)
        if size is None and list(info.splits):
            raise DataError(
                f"Split {split!r} is not valid for TFDS dataset {name!r} "
                f"(splits: {sorted(info.splits.keys())}; set --train_split/--val_split/--test_split)."
            )
        read_config = tfds.ReadConfig(shuffle_seed=config.seed, try_autocache=False)
        ds = builder.as_dataset(
            split=split,
            as_supervised=True,
            shuffle_files=training and not config.cache,
            read_config=read_config,
            decoders={image_key: tfds.decode.SkipDecoding()} if encoded else None,
        )
        if size is None:  # metadata without split sizes (e.g. mocked): count the dataset
            size = max(int(ds.cardinality()), 0)
        return _Split(ds, size, decode=lambda image, label, b: decode(image, label, b))

    return _Source(
        class_names=class_names,
        train=make(train_split, training=True),
        val=make(val_split, training=False),
        test=make(test_split, training=False),
        native_size=native_size,
        stats=KNOWN_STATS.get(base),
    )


# -- image folders


def _visible_entries(path: str) -> List[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _class_dirs(root: str) -> List[str]:
    return [e.name for e in _visible_entries(root) if e.is_dir()]


def _files_under(path: str) -> List[str]:
    """All visible files below `path`, sorted, recursively."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def _image_problem(path: str) -> Optional[str]:
    """Why `path` cannot be fed to tf.io.decode_image, or None when it can."""
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file"
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt not in _DECODABLE_FORMATS:
            return f"unsupported format {fmt}"
        with Image.open(path) as im:  # verify() does not decode pixels; load() does
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"unreadable ({type(e).__name__})"
    return None


def _check_files(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """(path, problem) for every file that cannot be decoded."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(_image_problem, paths))
    return [(p, why) for p, why in zip(paths, problems) if why]


def _collect_split(split_dir: str, class_names: List[str], known: bool) -> Dict[str, List[str]]:
    """class -> files of one split folder; `known`: classes must be a subset of class_names."""
    found = _class_dirs(split_dir)
    if not found:
        raise DataError(f"Image folder {split_dir} has no class subfolders (one folder per class).")
    if known:
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise DataError(f"Image folder {split_dir} has classes not in train/: {extra}.")
    out = {}
    for name in found:
        files = _files_under(os.path.join(split_dir, name))
        if not files:
            raise DataError(f"Class folder {os.path.join(split_dir, name)} is empty.")
        out[name] = files
    return out


def _stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> List[np.ndarray]:
    """Indices for len(fractions) held-out parts plus the rest, stratified by label.

    Each class's examples get keys (rank + offset) / class_size with a random
    rank order and offset; taking the lowest keys first draws every class in
    proportion, and the part sizes are exact (round(fraction * N)).
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keys[idx] = (rng.permutation(len(idx)) + rng.uniform()) / len(idx)
    order = np.argsort(keys, kind="stable")
    parts, start = [], 0
    for f in fractions:
        n = int(round(f * len(labels)))
        parts.append(np.sort(order[start : start + n]))
        start += n
    parts.append(rng.permutation(order[start:]))
    return parts


@register_source("folder")
def _folder_source(path: str, config: DataConfig) -> _Source:
    """Images in one folder per class, pre-split or split here (see module docstring)."""
    if not path:
        raise DataError("dataset 'folder:' needs a path, e.g. 'folder:/data/flowers'.")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"Image folder {root} does not exist (from --dataset=folder:{path}).")

    train_dir = os.path.join(root, "train")
    presplit = os.path.isdir(train_dir) and bool(_class_dirs(train_dir))
    # split -> (its folder, class -> files)
    split_files: Dict[str, Tuple[str, Dict[str, List[str]]]] = {}
    if presplit:
        split_files["train"] = (train_dir, _collect_split(train_dir, [], known=False))
        class_names = sorted(split_files["train"][1])
        for split, names in (("val", ("val", "validation")), ("test", ("test",))):
            for n in names:
                d = os.path.join(root, n)
                if os.path.isdir(d):
                    split_files[split] = (d, _collect_split(d, class_names, known=True))
                    break
    else:
        split_files["all"] = (root, _collect_split(root, [], known=False))
        class_names = sorted(split_files["all"][1])

    # Check every file once, before anything trains.
    all_paths = [p for _, per_class in split_files.values() for files in per_class.values() for p in files]
    bad = _check_files(all_paths)
    if bad:
        names = [f"{os.path.relpath(p, root)} ({why})" for p, why in bad[:_MAX_NAMED_FILES]]
        more = f" and {len(bad) - _MAX_NAMED_FILES} more" if len(bad) > _MAX_NAMED_FILES else ""
        listing = ", ".join(names) + more
        if config.strict_images:
            raise DataError(
                f"{len(bad)} unreadable or non-image file(s) under {root} (--strict_images): {listing}."
            )
        logging.warning("Skipping %d unreadable or non-image file(s) under %s: %s", len(bad), root, listing)
    bad_set = {p for p, _ in bad}

    label_of = {name: i for i, name in enumerate(class_names)}

    def flatten(split: str) -> Tuple[np.ndarray, np.ndarray]:
        where, per_class = split_files[split]
        paths, labels = [], []
        for name, files in per_class.items():
            good = [p for p in files if p not in bad_set]
            if not good:
                raise DataError(f"Class folder {os.path.join(where, name)} has no readable images.")
            paths.extend(good)
            labels.extend([label_of[name]] * len(good))
        return np.array(paths), np.array(labels, dtype=np.int32)

    rng = np.random.default_rng(config.seed)
    if presplit:
        train_paths, train_labels = flatten("train")
        if "val" in split_files:
            val = flatten("val")
        else:  # carve val from train
            held, rest = _stratified_split(train_labels, [config.val_fraction], config.seed)
            val = (train_paths[held], train_labels[held])
            train_paths, train_labels = train_paths[rest], train_labels[rest]
        test = flatten("test") if "test" in split_files else None
        perm = rng.permutation(len(train_paths))  # random order: stats sample the first ones
        train = (train_paths[perm], train_labels[perm])
    else:
        paths, labels = flatten("all")
        test_idx, val_idx, train_idx = _stratified_split(
            labels, [config.test_fraction, config.val_fraction], config.seed
        )
        train = (paths[train_idx], labels[train_idx])
        val = (paths[val_idx], labels[val_idx])
        test = (paths[test_idx], labels[test_idx])

    def decode(path, label, base_size):
        raw = tf.io.read_file(path)
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        image = _shorter_side_to(tf.ensure_shape(image, [None, None, 3]), base_size)
        return image, label

    def make(arrays) -> Optional[_Split]:
        if arrays is None or len(arrays[0]) == 0:
            return None
        paths, labels = arrays
        return _Split(tf.data.Dataset.from_tensor_slices((paths, labels)), len(paths), decode=decode)

    return _Source(
        class_names=class_names,
        train=make(train),
        val=make(val),
        test=make(test),
        native_size=None,
        typical_size=_median_size(train[0]),
        num_skipped=len(bad),
    )


def _median_size(paths: Sequence[str], sample: int = 64) -> Optional[Tuple[int, int]]:
    """Median (height, width) of up to `sample` images (PIL reads only their headers)."""
    from PIL import Image

    sizes = []
    for path in list(paths)[:sample]:
        with Image.open(path) as im:
            sizes.append((im.height, im.width))
    return tuple(int(v) for v in np.median(np.array(sizes), axis=0)) if sizes else None


# -------------------------------------------------------------- pipeline


def _decoded(split: _Split, base_size: int) -> tf.data.Dataset:
    ds = split.elements
    if split.decode is not None:
        decode = split.decode
        ds = ds.map(lambda *item: decode(*item, base_size), num_parallel_calls=AUTOTUNE)
    return ds


def _mean_std(split: _Split, base_size: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
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


def _pipeline(
    split: _Split,
    source: _Source,
    config: DataConfig,
    *,
    training: bool,
    image_size: int,
    resize_size: Optional[int],
    base_size: int,
) -> tf.data.Dataset:
    stored = source.native_size or base_size
    est_bytes = split.size * stored * stored * 3 * source.bytes_per_pixel
    if source.native_size is None:
        est_bytes = est_bytes * 4 // 3  # non-square images: the longer side is larger
    cache = config.cache and not source.in_memory and est_bytes < CACHE_LIMIT_BYTES
    buffer = max(1, min(config.shuffle_buffer, split.size))

    ds = split.elements
    if training and not cache:  # shuffle cheap items (paths, encoded bytes) before decoding
        ds = ds.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True)
    ds = _decoded(dataclasses.replace(split, elements=ds), base_size)
    if cache:
        ds = ds.cache()
    if training:
        if cache:
            ds = ds.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True)
        aug = augment_lib.get_augmentation(config.augment, image_size, resize_size)
        seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(
            2, drop_remainder=True
        )
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda example, seed: (aug(_to_float(example[0]), seed), example[1]),
            num_parallel_calls=AUTOTUNE,
        )
    else:
        transform = augment_lib.eval_transform(image_size, resize_size)
        ds = ds.map(lambda image, label: (transform(_to_float(image)), label), num_parallel_calls=AUTOTUNE)
    # Eval never drops a remainder: every val/test example counts.
    ds = ds.batch(config.batch_size, drop_remainder=config.drop_remainder and training)
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = SHARD_POLICY
    return ds.with_options(options)


def load_dataset(config: DataConfig) -> Datasets:
    """Builds train/val/test input pipelines for `config.dataset`.

    Args:
      config: a DataConfig; see the module docstring for `dataset` specs.

    Returns:
      Datasets with batched pipelines, class names, sizes, image size and
      training-set mean/std.

    Raises:
      DataError: the data is absent (and cannot be downloaded), a folder or
        class folder is missing or empty, a split name is unknown, or (with
        `strict_images`) a folder holds unreadable files.
      ValueError: an unknown augmentation or a bad size/batch setting.
    """
    if config.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {config.batch_size}")
    if config.augment not in augment_lib.AUGMENTATIONS:
        raise ValueError(
            f"unknown augmentation {config.augment!r}; choose one of {augment_lib.list_augmentations()}"
        )
    prefix, spec = _resolve(config.dataset)
    source = SOURCES[prefix](spec, config)

    image_size = config.image_size or source.native_size or DEFAULT_IMAGE_SIZE
    resize_size = config.resize_size
    if config.resolution_rule == "hyperrule" and not config.image_size:
        # BiT-HyperRule: decided by the stored size (varying sizes count as large).
        size = (source.native_size,) * 2 if source.native_size else source.typical_size
        resize_size, image_size = hyperrule_resolution(size or (DEFAULT_IMAGE_SIZE,) * 2)
    if resize_size is None and config.augment == "bit":  # train and eval at the same scale
        resize_size = augment_lib.default_resize_size(image_size)
    if resize_size is not None and resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than image_size {image_size}")
    base_size = max(image_size, resize_size or 0)

    mean, std = source.stats or _mean_std(source.train, base_size)
    build = functools.partial(
        _pipeline, source=source, config=config, image_size=image_size,
        resize_size=resize_size, base_size=base_size,
    )
    return Datasets(
        train=build(source.train, training=True),
        val=build(source.val, training=False) if source.val else None,
        test=build(source.test, training=False) if source.test else None,
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
