"""The built-in sources other than folders: `digits` (embedded) and TFDS.

* `digits` (default, embedded, offline): scikit-learn's 1,797 8x8 handwritten
  digits served as 32x32 RGB. Fixed split, independent of `seed`:
  1,257 train / 180 val / 360 test (see `_digits_source`).
* `tfds:<name>` or a bare TFDS name (`cifar10`, `tf_flowers`, `imagenette/160px-v2`):
  read from `data_dir` (downloaded when possible, else a `DataError`).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import re
import socket
import urllib.error
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline.config import DataConfig
from pipeline.data.registry import (
    DataError,
    Source,
    Split,
    register_source,
    shorter_side_to,
)
from pipeline.errors import short_reason

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


# -- digits


@functools.lru_cache(maxsize=1)
def digits_arrays() -> Tuple[np.ndarray, np.ndarray, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images float32 [1797, 32, 32, 3] in [0, 1], labels int32, (train, val, test) indices).

    Cached: the digits source and tests that need the raw test images share one copy.
    """
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
def _digits_source(spec: str, config: DataConfig) -> Source:
    """scikit-learn digits as 32x32 RGB float32 in [0, 1] (bilinear upscale, gray replicated).

    The split is fixed (stratified `train_test_split`, random_state=0, never
    `config.seed`, so the test set never changes): 20% test = 360, then 180
    (10% of all) val, 1,257 train.
    """
    del config
    if spec:
        raise DataError(f"dataset 'digits' takes no argument, got 'digits:{spec}'.")
    images, labels, (train, val, test) = digits_arrays()

    def split(index: np.ndarray) -> Split:
        ds = tf.data.Dataset.from_tensor_slices((images[index], labels[index]))
        return Split(ds, len(index))

    return Source(
        class_names=[str(d) for d in range(10)],
        train=split(train),
        val=split(val),
        test=split(test),
        native_size=32,
        in_memory=True,
        bytes_per_pixel=4,
    )


# -- TFDS


# tfds retries every failed HTTP connection 10 times with exponential backoff,
# so an offline machine waited ~204 s to hear "no network". 3 retries (sleeps of
# 0, 0.4 and 0.8 s) still ride out a dropped connection and answer in ~2 s.
TFDS_DOWNLOAD_RETRIES = 3


@contextlib.contextmanager
def tfds_download_retries(retries: int):
    """Bounds tfds's HTTP retries per URL while a dataset downloads (adapter).

    tfds has no public setting for this: its downloader builds a urllib3
    `Retry(total=MAX_RETRIES)` from the module constant at each request, so the
    constant is set for the duration and restored. If a tfds release drops
    the constant, downloads still work (only slower to fail) and
    `tests/test_data.py` fails on the missing attribute.
    """
    from tensorflow_datasets.core.download import downloader

    previous = getattr(downloader, "MAX_RETRIES", None)
    if not isinstance(previous, int):
        logging.warning("tensorflow_datasets has no downloader.MAX_RETRIES: download retries not bounded.")
        yield
        return
    downloader.MAX_RETRIES = retries
    try:
        yield
    finally:
        downloader.MAX_RETRIES = previous


def _exception_chain(err: BaseException):
    """`err`, then its causes/contexts (tfds and requests wrap the first failure)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def tfds_download_failure_reason(err: BaseException) -> str:
    """Why a TFDS download failed, as a clause: missing package, no network, not found, else generic.

    Told apart from the exception chain, so the user learns which fix applies
    (install a package, get network or copy prepared data, fix the source).
    """
    import requests

    network = (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError,
               requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    chain = list(_exception_chain(err))
    for e in chain:
        if isinstance(e, ImportError):
            module = f"the Python module {e.name!r}" if e.name else "a Python package"
            return f"{module} it needs is not installed (install it, or prepare the data elsewhere)"
    for e in chain:
        if isinstance(e, requests.exceptions.ProxyError):
            return "no network connection to its download server through the proxy (HTTPS_PROXY/HTTP_PROXY)"
        if isinstance(e, network):
            return "no network connection to its download server"
    for e in chain:
        status = re.search(r"HTTP code: (\d+)", str(e))
        response = getattr(e, "response", None)
        code = int(status.group(1)) if status else getattr(response, "status_code", None)
        if code in (404, 410):
            return f"its download URL was not found (HTTP {code}; a newer tensorflow-datasets may know the new one)"
        if code:
            return f"its download server answered HTTP {code}"
    return "the download or preparation failed"


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
        with tfds_download_retries(TFDS_DOWNLOAD_RETRIES):
            builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any download/prepare failure means "absent"

        raise DataError(
            f"TFDS dataset {name!r} is not prepared under --data_dir={where} and could not be "
            f"downloaded: {tfds_download_failure_reason(e)} ({short_reason(e)}); to work offline, "
            f"run `tfds build {name} --data_dir=<dir>` on a machine with network, copy <dir> "
            f"here and pass --data_dir=<dir>."
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


def _tfds_decoder(encoded: bool, native_size: Optional[int]):
    """`decode(image, label, base_size)` for TFDS examples: RGB uint8, square or shorter side resized."""

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
            image = shorter_side_to(tf.ensure_shape(image, [None, None, 3]), base_size)
        return image, tf.cast(label, tf.int32)

    return decode


def _tfds_split(builder, name: str, split: Optional[str], config: DataConfig, *,
                training: bool, decoders, decode) -> Optional[Split]:
    """One TFDS split as a `Split` of raw examples for `decode`, or None when `split` is None."""
    import tensorflow_datasets as tfds

    if split is None:
        return None
    info = builder.info
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
        decoders=decoders,
    )
    if size is None:  # metadata without split sizes (e.g. mocked): count the dataset
        size = max(int(ds.cardinality()), 0)
    return Split(ds, size, decode=decode)


@register_source("tfds")
def _tfds_source(name: str, config: DataConfig) -> Source:
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
    decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None  # decoded by `decode`
    decode = _tfds_decoder(encoded, native_size)

    d_train, d_val, d_test = _tfds_default_splits(builder, base, config)
    train_split = _optional_split(config.train_split, d_train)
    val_split = _optional_split(config.val_split, d_val)
    test_split = _optional_split(config.test_split, d_test)
    if train_split is None:
        raise DataError(f"TFDS dataset {name!r} needs a training split (--train_split).")
    make = functools.partial(_tfds_split, builder, name, config=config, decoders=decoders, decode=decode)
    return Source(
        class_names=class_names,
        train=make(train_split, training=True),
        val=make(val_split, training=False),
        test=make(test_split, training=False),
        native_size=native_size,
        stats=KNOWN_STATS.get(base),
    )
