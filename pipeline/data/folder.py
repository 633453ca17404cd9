"""The `folder:<path>` source: images in one subfolder per class.

The folder is pre-split (`train/`, `val/` or `validation/`, optional `test/`)
or split here by `val_fraction` / `test_fraction` with `seed` (stratified,
exact sizes). Extensions .jpg/.jpeg/.png/.bmp/.gif in any case (GIF: first
frame); hidden files are ignored. Every file is checked before training (one
scan, `inspect_scan`, cached in `data_cache_dir`): unreadable or non-image
files are skipped with one warning naming them, or a `DataError` with
`strict_images`. Images are decoded upright by their EXIF orientation
(`exif`). `folder_splits` is the listing both the source and the data report
(`inspection`) use, so the report checks exactly the splits training reads.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline.config import DataConfig
from pipeline.data import exif
from pipeline.data.inspect_scan import IMAGE_EXTENSIONS, ImageInfo, ScanStats, scan_files
from pipeline.data.registry import (
    DataError,
    Source,
    Split,
    register_source,
    shorter_side_to,
)

__all__ = ["IMAGE_EXTENSIONS", "FolderData", "folder_splits", "stratified_split"]
_MAX_NAMED_FILES = 10

# split ("train", "val", "test", or "all" when not pre-split) -> (its folder, class -> files)
_SplitFiles = Dict[str, Tuple[str, Dict[str, List[str]]]]
_Arrays = Tuple[np.ndarray, np.ndarray]  # (paths, labels)


# -- listing


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


def _list_splits(root: str) -> Tuple[bool, _SplitFiles, List[str]]:
    """(pre-split?, the split folders' files, class names) of the folder at `root`."""
    train_dir = os.path.join(root, "train")
    presplit = os.path.isdir(train_dir) and bool(_class_dirs(train_dir))
    split_files: _SplitFiles = {}
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
    return presplit, split_files, class_names


# -- corrupt-file checks (one scan: `inspect_scan`, whose results the data report reuses)


def _bad_files(infos: Dict[str, ImageInfo], root: str, config: DataConfig) -> List[Tuple[str, str]]:
    """Warns about every file TensorFlow cannot decode, before anything trains, or raises (strict)."""
    bad = [(p, info.problem) for p, info in infos.items() if info.problem]
    if bad:
        names = [f"{os.path.relpath(p, root)} ({why})" for p, why in bad[:_MAX_NAMED_FILES]]
        more = f" and {len(bad) - _MAX_NAMED_FILES} more" if len(bad) > _MAX_NAMED_FILES else ""
        listing = ", ".join(names) + more
        if config.strict_images:
            raise DataError(
                f"{len(bad)} unreadable or non-image file(s) under {root} (--strict_images): {listing}."
            )
        logging.warning("Skipping %d unreadable or non-image file(s) under %s: %s", len(bad), root, listing)
    return bad


def _median_size(paths: Sequence[str], infos: Dict[str, ImageInfo]) -> Optional[Tuple[int, int]]:
    """Median (height, width) of the training images as stored (from the scan)."""
    sizes = [(infos[p].height, infos[p].width) for p in paths]
    return tuple(int(v) for v in np.median(np.array(sizes), axis=0)) if sizes else None


# -- splitting


def stratified_split(
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


def _assign(presplit: bool, flatten, config: DataConfig) -> Tuple[_Arrays, _Arrays, Optional[_Arrays]]:
    """(train, val, test) arrays: the folder's own splits, with val (and test) carved when missing.

    `flatten(split)` gives a split's (paths, labels), or None when the folder has no such split.
    """
    rng = np.random.default_rng(config.seed)
    if presplit:
        train_paths, train_labels = flatten("train")
        val = flatten("val")
        if val is None:  # carve val from train
            held, rest = stratified_split(train_labels, [config.val_fraction], config.seed)
            val = (train_paths[held], train_labels[held])
            train_paths, train_labels = train_paths[rest], train_labels[rest]
        test = flatten("test")
        perm = rng.permutation(len(train_paths))  # random order: stats sample the first ones
        return (train_paths[perm], train_labels[perm]), val, test
    paths, labels = flatten("all")
    test_idx, val_idx, train_idx = stratified_split(
        labels, [config.test_fraction, config.val_fraction], config.seed
    )
    return (paths[train_idx], labels[train_idx]), (paths[val_idx], labels[val_idx]), (
        paths[test_idx], labels[test_idx])


def _decode(path, label, base_size):
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    image = shorter_side_to(tf.ensure_shape(image, [None, None, 3]), base_size)
    return image, label


def _decode_upright(path, label, orientation, base_size):
    """`_decode` for splits holding EXIF-rotated files: turned upright before the resize."""
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    image = exif.upright(tf.ensure_shape(image, [None, None, 3]), orientation)
    return shorter_side_to(image, base_size), label


def _split(arrays: Optional[_Arrays], infos: Dict[str, ImageInfo]) -> Optional[Split]:
    """A Split of (path, label), or (path, label, orientation) when some file needs turning."""
    if arrays is None or len(arrays[0]) == 0:
        return None
    paths, labels = arrays
    orientation = np.array([infos[p].orientation for p in paths], dtype=np.int32)
    if (orientation == 1).all():  # the usual case: no per-image turn in the decode map
        return Split(tf.data.Dataset.from_tensor_slices((paths, labels)), len(paths), decode=_decode)
    return Split(tf.data.Dataset.from_tensor_slices((paths, labels, orientation)), len(paths),
                 decode=_decode_upright)


@dataclasses.dataclass
class FolderData:
    """A folder as training reads it: the splits' (paths, labels) after skipping bad files."""

    root: str
    presplit: bool
    class_names: List[str]
    splits: Dict[str, _Arrays]  # "train", "val", "test" (those present)
    infos: Dict[str, ImageInfo]  # every listed file's scan, the bad ones too
    bad: List[Tuple[str, str]]  # (path, problem)
    scan: ScanStats


def folder_splits(path: str, config: DataConfig, *, progress: bool = True) -> FolderData:
    """Lists, scans (cached) and splits the folder `path` as `folder:<path>` does for training."""
    if not path:
        raise DataError("dataset 'folder:' needs a path, e.g. 'folder:/data/flowers'.")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"Image folder {root} does not exist (from --dataset=folder:{path}).")
    presplit, split_files, class_names = _list_splits(root)
    all_paths = [p for _, per_class in split_files.values() for files in per_class.values() for p in files]
    infos, stats = scan_files(all_paths, root, cache_dir=config.data_cache_dir, progress=progress)
    bad = _bad_files(infos, root, config)
    bad_set = {p for p, _ in bad}
    label_of = {name: i for i, name in enumerate(class_names)}

    def flatten(split: str) -> Optional[_Arrays]:
        if split not in split_files:
            return None
        where, per_class = split_files[split]
        paths, labels = [], []
        for name, files in per_class.items():
            good = [p for p in files if p not in bad_set]
            if not good:
                raise DataError(f"Class folder {os.path.join(where, name)} has no readable images.")
            paths.extend(good)
            labels.extend([label_of[name]] * len(good))
        return np.array(paths), np.array(labels, dtype=np.int32)

    train, val, test = _assign(presplit, flatten, config)
    splits = {name: arrays for name, arrays in (("train", train), ("val", val), ("test", test))
              if arrays is not None and (name == "train" or len(arrays[0]))}
    return FolderData(root, presplit, class_names, splits, infos, bad, stats)


@register_source("folder")
def _folder_source(path: str, config: DataConfig) -> Source:
    """Images in one folder per class, pre-split or split here (see module docstring)."""
    folder = folder_splits(path, config)
    train = folder.splits["train"]
    return Source(
        class_names=folder.class_names,
        train=_split(train, folder.infos),
        val=_split(folder.splits.get("val"), folder.infos),
        test=_split(folder.splits.get("test"), folder.infos),
        native_size=None,
        typical_size=_median_size(train[0], folder.infos),
        num_skipped=len(folder.bad),
    )
