"""One pass over every image: readable?, format, size, channels, EXIF orientation, both hashes.

Why one pass: the folder source must open every file anyway to skip broken
ones before training, so the same read also gives what the data report needs
(`pipeline.data.inspection`), and nothing is read twice. Folders of 100k
files: the scan runs in a thread pool (PIL's decoders and hashlib release the
GIL), shows a progress bar on a terminal, and its results are cached per file
(keyed by path, size and modification time) in memory and, when a cache
directory is given, on disk, so the next training does not rescan.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.data import exif, hashing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF"})  # what tf.io.decode_image reads
CACHE_VERSION = 1
_DRAFT_SIZE = (64, 64)  # JPEG: decode at 1/2..1/8 scale for the hash (libjpeg still reads every block)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the scan learnt about one image; `problem` is None when TensorFlow can decode it."""

    problem: Optional[str] = None
    format: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""  # PIL's mode: L, RGB, RGBA, P (palette), CMYK...
    channels: int = 0
    orientation: int = 1  # EXIF orientation, 1 = as stored
    sha: str = ""  # content hash of the file's bytes (or of the decoded array)
    dhash: int = 0  # 64-bit difference hash of the upright image

    def to_list(self) -> list:
        return [self.problem, self.format, self.width, self.height, self.mode, self.channels,
                self.orientation, self.sha, f"{self.dhash:016x}"]

    @classmethod
    def from_list(cls, values: list) -> "ImageInfo":
        *rest, dhash = values
        return cls(*rest, dhash=int(dhash, 16))


def describe_bytes(data: bytes) -> ImageInfo:
    """Checks and fingerprints an encoded image (a file's bytes, or a TFDS example's)."""
    from PIL import Image

    sha = hashing.content_hash(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            im.verify()
        if fmt not in DECODABLE_FORMATS:
            return ImageInfo(problem=f"unsupported format {fmt}", format=fmt, sha=sha)
        with Image.open(io.BytesIO(data)) as im:  # verify() does not decode pixels; load() does
            width, height, mode = im.width, im.height, im.mode
            channels = len(im.getbands())
            orientation = exif.orientation_of(im.getexif().get(exif.ORIENTATION_TAG))
            im.draft("L", _DRAFT_SIZE)
            im.load()
            gray = np.asarray(im.convert("L"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return ImageInfo(problem=f"unreadable ({type(e).__name__})", sha=sha)
    return ImageInfo(None, fmt, width, height, mode, channels, orientation, sha,
                     hashing.difference_hash(exif.upright_array(gray, orientation)))


def describe_array(image: np.ndarray) -> ImageInfo:
    """Fingerprints an already decoded image (digits, TFDS arrays): float [0, 1] counts as 8-bit."""
    x = np.asarray(image)
    if x.dtype.kind == "f":
        x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    x = x if x.ndim == 3 else x[..., None]
    digest = hashlib.blake2b(repr(x.shape).encode() + x.tobytes(), digest_size=16).hexdigest()
    return ImageInfo(None, "array", int(x.shape[1]), int(x.shape[0]), str(image.dtype), int(x.shape[2]),
                     1, digest, hashing.difference_hash(x))


def describe_file(path: str) -> ImageInfo:
    """`describe_bytes` of a file, or why it is not an image TensorFlow can decode."""
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return ImageInfo(problem="not an image file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return ImageInfo(problem=f"unreadable ({type(e).__name__})")
    return describe_bytes(data)


# -- the cached, parallel scan

# abs path -> (size, mtime_ns, info): what this process has scanned (the trainer's check reuses it)
_MEMO: Dict[str, Tuple[int, int, ImageInfo]] = {}


def clear_memo() -> None:
    """Forget this process's scans (the disk cache stays): what a new process sees."""
    _MEMO.clear()


@dataclasses.dataclass
class ScanStats:
    files: int = 0
    scanned: int = 0  # read and decoded by this scan (the rest came from a cache)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> Optional[float]:
        return round(self.scanned / self.seconds, 1) if self.scanned and self.seconds > 0 else None


def cache_file(cache_dir: str, root: str) -> str:
    """The scan cache of the folder `root` inside `cache_dir` (one JSON file per folder)."""
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"scan-{os.path.basename(os.path.normpath(root)) or 'root'}-{key}.json")


def read_cache(filename: Optional[str]) -> dict:
    """The cache's content ({} when absent, unreadable or of another version: it is only a cache)."""
    if not filename or not os.path.exists(filename):
        return {}
    try:
        with open(filename, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return {}
    return content if content.get("version") == CACHE_VERSION else {}


def write_cache(filename: Optional[str], content: dict) -> None:
    """Atomic write (temp file, rename), so a killed scan never leaves half a cache."""
    if not filename:
        return
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    tmp = f"{filename}.tmp{os.getpid()}"
    text = json.dumps({**content, "version": CACHE_VERSION})  # dumps: the C encoder (dump's is Python)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, filename)


def relative(path: str, root: str) -> str:
    """`os.path.relpath` for paths listed under `root` (string slicing: 100k relpaths took seconds)."""
    prefix = os.path.join(root, "")
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def _progress(items: Iterable, total: int, desc: str, show: bool):
    if not show:
        return items
    from tqdm import tqdm  # a dependency of tensorflow-datasets

    return tqdm(items, total=total, desc=desc, unit="img", disable=None, mininterval=1.0)


def parallel_map(fn, items: Sequence, *, desc: str = "scanning", progress: bool = True) -> List:
    """`[fn(x) for x in items]` in a thread pool, in order, with a progress bar on a terminal."""
    workers = max(2, min(8, 2 * (os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(_progress(pool.map(fn, items, chunksize=1), len(items), desc, progress))


def scan_files(paths: Sequence[str], root: str, *, cache_dir: Optional[str] = None,
               progress: bool = True) -> Tuple[Dict[str, ImageInfo], ScanStats]:
    """`ImageInfo` of every path (files under `root`), from the caches where size and mtime match."""
    start = time.perf_counter()
    filename = cache_file(cache_dir, root) if cache_dir else None
    disk = read_cache(filename).get("files", {})
    infos: Dict[str, ImageInfo] = {}
    stamps, todo = {}, []
    for path in paths:
        try:
            st = os.stat(path)
            stamps[path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamps[path] = (-1, -1)
        rel = relative(path, root)
        memo, cached = _MEMO.get(path), disk.get(rel)
        if memo and memo[:2] == stamps[path]:
            infos[path] = memo[2]
        elif cached and tuple(cached[:2]) == stamps[path]:
            infos[path] = ImageInfo.from_list(cached[2])
        else:
            todo.append(path)
    for path, info in zip(todo, parallel_map(describe_file, todo, progress=progress)):
        infos[path] = info
    for path, info in infos.items():
        _MEMO[path] = (*stamps[path], info)
    if filename and (todo or len(disk) != len(paths)):
        entries = {relative(p, root): [*stamps[p], infos[p].to_list()] for p in paths}
        write_cache(filename, {**read_cache(filename), "root": os.path.abspath(root), "files": entries})
    return infos, ScanStats(len(paths), len(todo), time.perf_counter() - start)


def listing_digest(paths: Sequence[str]) -> str:
    """A key of the file list, sizes and modification times (from the scan's memo)."""
    h = hashlib.sha1()
    for p in paths:
        size, mtime, _ = _MEMO.get(p, (-1, -1, None))
        h.update(f"{p}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()
