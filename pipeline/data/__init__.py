"""Datasets for training and evaluation: `data.load_dataset(DataConfig) -> data.Datasets`.

Sources live in a registry keyed by the prefix of `DataConfig.dataset`
(`data.register_source` adds one):

* `digits` (default, embedded, offline): scikit-learn's 1,797 8x8 digits as
  32x32 RGB, a fixed 1,257 / 180 / 360 split (`sources.py`).
* `tfds:<name>` or a bare TFDS name (`cifar10`, `tf_flowers`, `imagenette/160px-v2`):
  read from `data_dir`, downloaded when possible, else a `DataError` (`sources.py`).
* `folder:<path>`: one subfolder per class, pre-split or split here by
  `val_fraction` / `test_fraction` with `seed`; bad files are skipped or, with
  `strict_images`, a `DataError` (`folder.py`).

Every source goes through the same tf.data pipeline (`dataset.py`); the
per-example augmentations and MixUp are in `augment.py`. Importing this
package registers the built-in sources.
"""
from pipeline.data import augment
from pipeline.data.dataset import Datasets, load_dataset
from pipeline.data.folder import IMAGE_EXTENSIONS
from pipeline.data.registry import (
    SOURCES,
    DataError,
    Source,
    SourceLoader,
    Split,
    register_source,
)
from pipeline.data.sources import KNOWN_STATS, TFDS_DEFAULT_SPLITS, digits_arrays

__all__ = [
    "DataError",
    "Datasets",
    "IMAGE_EXTENSIONS",
    "KNOWN_STATS",
    "SOURCES",
    "Source",
    "SourceLoader",
    "Split",
    "TFDS_DEFAULT_SPLITS",
    "augment",
    "digits_arrays",
    "load_dataset",
    "register_source",
]
