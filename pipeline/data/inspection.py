"""The data checks behind `pipeline.inspect_data` and the start of every training on a folder.

Why: what goes wrong for people with their own photos is rarely the network:
the same photo in train and test (the test accuracy then measures memory), a
class with ten images, portrait photos arriving sideways. `inspect_dataset`
measures, per split as training reads it, the images per class, their sizes,
aspect ratios, channels and formats, unreadable files, EXIF rotations, exact
duplicates (content hash) within and across splits, near duplicates across
splits (64-bit difference hash within `near_duplicate_bits`) and the class
imbalance, and writes `data_report.json` / `.md` / PNGs (`inspect_report`).

Any source works: a folder's files are scanned once (`inspect_scan`, cached);
digits and TFDS are iterated and their decoded images (or encoded bytes)
fingerprinted the same way. `check_before_training` is the trainer's hook: a
folder's report, cached by its file list, sizes and modification times plus
the settings, so the next training neither rescans nor recomputes it.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from absl import logging

from pipeline.config import DataConfig
from pipeline.data import hashing, inspect_scan
from pipeline.data.folder import folder_splits
from pipeline.data.inspect_scan import ImageInfo
from pipeline.data.registry import SOURCES, DataError, resolve

REPORT_VERSION = 2  # in the report cache key: a new layout never reuses an old report
IMBALANCE_WARNING_RATIO = 3.0
MAX_LISTED = 100  # duplicate groups / near-duplicate pairs listed in a report (all are counted)
MAX_NAMED = 5  # files named in a one-line warning
RUN_REPORT_DIR = "data_report"  # inside a run directory
_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_CACHED_REPORTS = 4
# Aspect ratio (width / height) bins of the report: portrait on the left, square in the middle.
ASPECT_BIN_EDGES = [0.0, 0.5, 0.7, 0.85, 0.95, 1.05, 1.2, 1.45, 2.05, float("inf")]
ASPECT_BIN_LABELS = ["<1:2", "1:2-2:3", "2:3-5:6", "5:6-1", "1:1", "1-5:4", "5:4-3:2", "3:2-2:1", ">2:1"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image of a split: how the report names it, its label, and the scan's findings."""

    name: str
    label: int
    info: ImageInfo


# -- per-split statistics


def _spread(values: Sequence[float], digits: int = 0) -> dict:
    if not len(values):
        return {"min": None, "median": None, "max": None}
    v = np.asarray(values, dtype=np.float64)
    return {k: round(float(f(v)), digits) if digits else int(round(float(f(v))))
            for k, f in (("min", np.min), ("median", np.median), ("max", np.max))}


def split_summary(entries: Sequence[Entry], class_names: Sequence[str]) -> dict:
    """Images per class, upright sizes and aspect ratios, channels, formats, modes, EXIF turns."""
    infos = [e.info for e in entries]
    counts = np.bincount([e.label for e in entries], minlength=len(class_names))
    width = [i.height if i.orientation in _TURNED else i.width for i in infos]
    height = [i.width if i.orientation in _TURNED else i.height for i in infos]
    aspect = [w / h for w, h in zip(width, height) if h]
    return {
        "images": len(entries),
        "class_counts": {name: int(n) for name, n in zip(class_names, counts)},
        "width": _spread(width), "height": _spread(height), "aspect_ratio": _spread(aspect, 3),
        "aspect_histogram": dict(zip(ASPECT_BIN_LABELS, np.histogram(aspect, ASPECT_BIN_EDGES)[0].tolist())),
        "channels": dict(collections.Counter(str(i.channels) for i in infos).most_common()),
        "modes": dict(collections.Counter(i.mode for i in infos).most_common()),
        "formats": dict(collections.Counter(i.format for i in infos).most_common()),
        "exif_rotated": sum(i.orientation != 1 for i in infos),
    }


def imbalance(counts: Dict[str, int]) -> Optional[dict]:
    """Largest / smallest class of a split (None when a class is empty or there is one class)."""
    if len(counts) < 2:
        return None
    largest = max(counts, key=counts.get)
    smallest = min(counts, key=counts.get)
    ratio = counts[largest] / counts[smallest] if counts[smallest] else float("inf")
    return {"largest": [largest, counts[largest]], "smallest": [smallest, counts[smallest]],
            "ratio": round(ratio, 2) if np.isfinite(ratio) else None}


# -- duplicates


def exact_duplicates(splits: Dict[str, Sequence[Entry]]) -> dict:
    """Groups of identical images (same content hash): within one split, and across splits (leakage)."""
    groups = collections.defaultdict(list)
    for split, entries in splits.items():
        for e in entries:
            groups[e.info.sha].append((split, e.name))
    within, across = collections.defaultdict(list), []
    for members in groups.values():
        if len(members) < 2:
            continue
        where = sorted({s for s, _ in members})
        if len(where) == 1:
            within[where[0]].append([n for _, n in members])
        else:
            across.append({"splits": where, "files": [f"{s}: {n}" for s, n in members]})
    return {"within": {s: {"groups": len(g), "extra_copies": sum(len(x) - 1 for x in g),
                           "listed": g[:MAX_LISTED]} for s, g in within.items()},
            "across": {"groups": len(across), "listed": across[:MAX_LISTED]}}


def near_duplicates(splits: Dict[str, Sequence[Entry]], max_bits: int) -> dict:
    """Pairs of images in different splits whose difference hashes differ in <= max_bits bits.

    Exact copies (equal content hashes) are left to `exact_duplicates`.
    """
    pairs, total = [], 0
    for (sa, ea), (sb, eb) in itertools.combinations(splits.items(), 2):
        ha = np.array([e.info.dhash for e in ea], dtype=np.uint64)
        hb = np.array([e.info.dhash for e in eb], dtype=np.uint64)
        i, j, d = hashing.hamming_pairs(ha, hb, max_bits)
        keep = [k for k in range(len(i)) if ea[i[k]].info.sha != eb[j[k]].info.sha]
        total += len(keep)
        for k in sorted(keep, key=lambda k: d[k])[:max(0, MAX_LISTED - len(pairs))]:
            pairs.append({"a": f"{sa}: {ea[i[k]].name}", "b": f"{sb}: {eb[j[k]].name}",
                          "distance": int(d[k])})
    return {"max_bits": max_bits, "pairs": total, "listed": pairs}


# -- the report


def _warnings(report: dict) -> List[str]:
    """One line per finding a person should act on before training."""
    out = []
    across = report["exact_duplicates"]["across"]
    if across["groups"]:
        named = "; ".join(" = ".join(g["files"]) for g in across["listed"][:MAX_NAMED])
        out.append(f"{across['groups']} image(s) appear in more than one split (leakage: the test measures "
                   f"memory): {named}" + (" ..." if across["groups"] > MAX_NAMED else ""))
    for split, within in report["exact_duplicates"]["within"].items():
        out.append(f"{within['extra_copies']} exact duplicate file(s) within {split}: "
                   + "; ".join(" = ".join(g) for g in within["listed"][:MAX_NAMED]))
    near = report["near_duplicates"]
    if near["pairs"]:
        named = "; ".join(f"{p['a']} ~ {p['b']} ({p['distance']} bits)" for p in near["listed"][:MAX_NAMED])
        out.append(f"{near['pairs']} near-duplicate pair(s) across splits (difference hash within "
                   f"{near['max_bits']} bits): {named}")
    ratio = (report.get("imbalance") or {}).get("ratio")
    if ratio is None and report.get("imbalance"):
        out.append("a class of the training split has no images")
    elif ratio is not None and ratio > IMBALANCE_WARNING_RATIO:
        big, small = report["imbalance"]["largest"], report["imbalance"]["smallest"]
        out.append(f"class imbalance {ratio:g}:1 in train ({big[0]!r} {big[1]} images, {small[0]!r} "
                   f"{small[1]}): consider --class_weight=balanced (or --balanced_sampling)")
    if report["unreadable"]:
        out.append(f"{len(report['unreadable'])} unreadable or non-image file(s) skipped: "
                   + ", ".join(f"{n} ({why})" for n, why in report["unreadable"][:MAX_NAMED]))
    return out


def build_report(dataset: str, class_names: Sequence[str], splits: Dict[str, Sequence[Entry]], *,
                 near_duplicate_bits: int, unreadable=(), scan: Optional[dict] = None) -> dict:
    """The data report (a JSON-ready dict) of the given splits; `warnings` lists what to act on."""
    per_split = {s: split_summary(e, class_names) for s, e in splits.items()}
    report = {
        "version": REPORT_VERSION, "dataset": dataset, "class_names": list(class_names),
        "splits": per_split,
        "imbalance": imbalance(per_split["train"]["class_counts"]) if "train" in per_split else None,
        "exif_rotated": sum(s["exif_rotated"] for s in per_split.values()),
        "unreadable": [list(x) for x in unreadable],
        "exact_duplicates": exact_duplicates(splits),
        "near_duplicates": near_duplicates(splits, near_duplicate_bits),
        "scan": scan or {},
    }
    report["warnings"] = _warnings(report)
    return report


# -- sources


def _folder_entries(spec: str, config: DataConfig, progress: bool):
    folder = folder_splits(spec, config, progress=progress)
    rel = inspect_scan.relative
    splits = {s: [Entry(rel(p, folder.root), int(y), folder.infos[p]) for p, y in zip(*arrays)]
              for s, arrays in folder.splits.items()}
    unreadable = [(os.path.relpath(p, folder.root), why) for p, why in folder.bad]
    scan = {"files": folder.scan.files, "scanned": folder.scan.scanned,
            "seconds": round(folder.scan.seconds, 3), "images_per_second": folder.scan.images_per_second}
    return folder, splits, unreadable, scan


def _source_entries(prefix: str, spec: str, config: DataConfig, progress: bool):
    """Every split of a non-folder source, fingerprinted from its raw items (bytes or arrays)."""
    source = SOURCES[prefix](spec, config)
    start, splits, unreadable = time.perf_counter(), {}, []
    for name in ("train", "val", "test"):
        split = getattr(source, name)
        if split is None:
            continue
        items = [(x, int(y)) for x, y, *_ in split.elements.as_numpy_iterator()]
        infos = inspect_scan.parallel_map(
            lambda item: (inspect_scan.describe_bytes(item[0]) if isinstance(item[0], bytes)
                          else inspect_scan.describe_array(item[0])), items, desc=f"hashing {name}",
            progress=progress)
        entries = [Entry(f"{name}[{i}]", y, info) for i, ((_, y), info) in enumerate(zip(items, infos))]
        unreadable += [(e.name, e.info.problem) for e in entries if e.info.problem]
        splits[name] = [e for e in entries if not e.info.problem]
    seconds = time.perf_counter() - start
    n = sum(len(e) for e in splits.values())
    scan = {"files": n, "scanned": n, "seconds": round(seconds, 3),
            "images_per_second": round(n / seconds, 1) if seconds > 0 else None}
    return source.class_names, splits, unreadable, scan


def _report_key(folder, config: DataConfig) -> str:
    """What a folder's report depends on: its files (list, sizes, mtimes), their split, the settings."""
    h = hashlib.sha1(f"{REPORT_VERSION}\0{config.near_duplicate_bits}\0{config.dataset}\n".encode())
    for split, (paths, labels) in sorted(folder.splits.items()):
        h.update(f"{split}\0{inspect_scan.listing_digest(list(paths))}\0{labels.tobytes().hex()}\n".encode())
    h.update(inspect_scan.listing_digest(sorted(folder.infos)).encode())
    return h.hexdigest()


def _folder_report(spec: str, config: DataConfig, progress: bool) -> dict:
    """A folder's report, reused from the scan cache when nothing it depends on changed."""
    folder, splits, unreadable, scan = _folder_entries(spec, config, progress)
    key = _report_key(folder, config)
    filename = inspect_scan.cache_file(config.data_cache_dir, folder.root) if config.data_cache_dir else None
    content = inspect_scan.read_cache(filename)
    cached = (content.get("reports") or {}).get(key) or _MEMO_REPORTS.get(key)
    if cached is not None:
        return {**cached, "scan": {**scan, "report_from_cache": True}}
    report = build_report(config.dataset, folder.class_names, splits,
                          near_duplicate_bits=config.near_duplicate_bits, unreadable=unreadable, scan=scan)
    _MEMO_REPORTS[key] = report
    if filename:
        reports = dict(list((content.get("reports") or {}).items())[-(_CACHED_REPORTS - 1):])
        inspect_scan.write_cache(filename, {**content, "reports": {**reports, key: report}})
    return report


_MEMO_REPORTS: Dict[str, dict] = {}  # report key -> report, for this process


def clear_memo() -> None:
    """Forget this process's scans and reports (the disk cache stays): what a new process sees."""
    _MEMO_REPORTS.clear()
    inspect_scan.clear_memo()


def inspect_dataset(config: DataConfig, output_dir: Optional[str] = None, *, progress: bool = True) -> dict:
    """The data report of `config.dataset` (any source), written to `output_dir` when given.

    Returns:
      The report dict (`data_report.json`); `report["files"]` lists what was written.

    Raises:
      DataError: the data is missing or empty, or (`config.strict_data`) an
        image appears in more than one split; the reports are written first.
    """
    prefix, spec = resolve(config.dataset)
    if prefix == "folder":
        report = _folder_report(spec, config, progress)
    else:
        class_names, splits, unreadable, scan = _source_entries(prefix, spec, config, progress)
        report = build_report(config.dataset, class_names, splits,
                              near_duplicate_bits=config.near_duplicate_bits, unreadable=unreadable, scan=scan)
    if output_dir:
        from pipeline.data import inspect_report  # matplotlib: only when writing

        report = {**report, "files": inspect_report.write_reports(report, output_dir)}
    leaks = report["exact_duplicates"]["across"]["groups"]
    if config.strict_data and leaks:
        where = f" (see {os.path.join(output_dir, inspect_report.REPORT_MD)})" if output_dir else ""
        raise DataError(f"--strict_data: {report['warnings'][0]}{where}.")
    return report


def check_before_training(config: DataConfig, run_dir: str, *, resume: bool = False) -> Optional[dict]:
    """The trainer's hook: a folder's data report into `<run_dir>/data_report/`, warnings logged.

    Only folders (the data people bring), only when `config.data_checks`, not
    on resume (the run's report is already there). Cheap after the folder
    source's own scan: the scan is reused from memory (or the disk cache) and
    the report from its cache.
    """
    if resume or not config.data_checks or resolve(config.dataset)[0] != "folder":
        return None
    out = os.path.join(run_dir, RUN_REPORT_DIR)
    report = inspect_dataset(config, out, progress=False)
    for line in report["warnings"]:
        logging.warning("data check: %s", line)
    print(f"data checks: {len(report['warnings'])} warning(s); report {os.path.join(out, 'data_report.md')}",
          flush=True)
    return report


def summary_text(report: dict) -> str:
    """A few lines for the terminal: sizes per split, duplicates, rotations, scan speed, then warnings."""
    lines = []
    for name, s in report["splits"].items():
        lines.append(f"{name}: {s['images']} images in {len(s['class_counts'])} classes, "
                     f"median {s['width']['median']}x{s['height']['median']}, formats "
                     + ", ".join(f"{f} {n}" for f, n in s["formats"].items()))
    imb = report.get("imbalance") or {}
    across = report["exact_duplicates"]["across"]["groups"]
    lines.append(f"imbalance (train, largest/smallest): {imb.get('ratio')}; exact copies across splits: "
                 f"{across}; near-duplicate pairs: {report['near_duplicates']['pairs']}; "
                 f"EXIF-rotated: {report['exif_rotated']}; unreadable: {len(report['unreadable'])}")
    scan = report.get("scan") or {}
    if scan:
        lines.append(f"scan: {scan.get('files')} images, {scan.get('scanned')} read in {scan.get('seconds')} s"
                     + (f" ({scan['images_per_second']} images/s)" if scan.get("images_per_second") else "")
                     + (", report from cache" if scan.get("report_from_cache") else ""))
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
