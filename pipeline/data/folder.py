"""The `folder:<path>` source: images in one subfolder per class.

The folder is pre-split (`train/`, `val/` or `validation/`, optional `test/`)
or split here by `val_fraction` / `test_fraction` with `seed` (stratified,
exact sizes). Extensions .jpg/.jpeg/.png/.bmp/.gif in any case (GIF: first
frame); hidden files are ignored. Every file is checked before training:
unreadable or non-image files are skipped with one warning naming them, or a
`DataError` with `strict_images`.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Dict, List, Optional, Sequence, Tuple

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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF"})  # what tf.io.decode_image reads
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


# -- corrupt-file checks


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


def _bad_files(split_files: _SplitFiles, root: str, config: DataConfig) -> List[Tuple[str, str]]:
    """Checks every file once, before anything trains: warns about bad ones, or raises (strict)."""
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
    return bad


def _median_size(paths: Sequence[str], sample: int = 64) -> Optional[Tuple[int, int]]:
    """Median (height, width) of up to `sample` images (PIL reads only their headers)."""
    from PIL import Image

    sizes = []
    for path in list(paths)[:sample]:
        with Image.open(path) as im:
            sizes.append((im.height, im.width))
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


def _split(arrays: Optional[_Arrays]) -> Optional[Split]:
    if arrays is None or len(arrays[0]) == 0:
        return None
    paths, labels = arrays
    return Split(tf.data.Dataset.from_tensor_slices((paths, labels)), len(paths), decode=_decode)


@register_source("folder")
def _folder_source(path: str, config: DataConfig) -> Source:
    """Images in one folder per class, pre-split or split here (see module docstring)."""
    if not path:
        raise DataError("dataset 'folder:' needs a path, e.g. 'folder:/data/flowers'.")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"Image folder {root} does not exist (from --dataset=folder:{path}).")
    presplit, split_files, class_names = _list_splits(root)
    bad = _bad_files(split_files, root, config)
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
    return Source(
        class_names=class_names,
        train=_split(train),
        val=_split(val),
        test=_split(test),
        native_size=None,
        typical_size=_median_size(train[0]),
        num_skipped=len(bad),
    )
