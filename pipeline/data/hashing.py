"""Image fingerprints for the data checks: a content hash and a 64-bit difference hash (pure numpy).

Why two: the content hash (BLAKE2b of the file's bytes) finds exact copies,
the same photo saved twice; the difference hash (dHash: the grayscale image
averaged down to 8 rows x 9 columns, one bit per "is this cell brighter than
its left neighbour") survives resizing and re-encoding, so a thumbnail of a
training photo in the test split is still found. Two dHashes within a few bits
of each other (Hamming distance) are near duplicates.
"""
from __future__ import annotations

import hashlib
from typing import List, Tuple

import numpy as np

HASH_ROWS, HASH_COLS = 8, 9  # 8 x 8 horizontal comparisons = 64 bits
_PAIR_BLOCK = 1 << 22  # XORs per block of the pair search (32 MiB of uint64)


def content_hash(data: bytes) -> str:
    """Hex BLAKE2b-128 of `data` (hashlib releases the GIL, so a thread pool scans in parallel)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def to_gray(image: np.ndarray) -> np.ndarray:
    """float32 [H, W] luma (ITU-R 601 weights, PIL's "L") of an [H, W], [H, W, 1] or [H, W, >=3] image."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        return x
    if x.shape[-1] < 3:
        return x[..., 0]
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _area_mean(gray: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of each cell of a rows x cols grid over `gray` (small images are repeated up first)."""
    h, w = gray.shape
    if h < rows or w < cols:  # every cell needs at least one pixel
        gray = np.repeat(np.repeat(gray, -(-rows // h), axis=0), -(-cols // w), axis=1)
        h, w = gray.shape
    r_edges = np.round(np.linspace(0, h, rows + 1)).astype(int)
    c_edges = np.round(np.linspace(0, w, cols + 1)).astype(int)
    sums = np.add.reduceat(np.add.reduceat(gray.astype(np.float64), r_edges[:-1], axis=0),
                           c_edges[:-1], axis=1)
    return sums / np.outer(np.diff(r_edges), np.diff(c_edges))


def difference_hash(image: np.ndarray) -> int:
    """The 64-bit dHash of an image array (any size, gray or RGB, any numeric range), as an int."""
    cells = _area_mean(to_gray(image), HASH_ROWS, HASH_COLS)
    bits = (cells[:, 1:] > cells[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming_pairs(a: np.ndarray, b: np.ndarray, max_bits: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every a[i], b[j] (uint64 hashes) at Hamming distance <= max_bits.

    A blocked all-pairs XOR + popcount: 10k x 80k hashes are 8e8 popcounts,
    seconds in numpy, and exact (no index that could miss a pair).
    """
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    out_i: List[np.ndarray] = []
    out_j: List[np.ndarray] = []
    out_d: List[np.ndarray] = []
    if len(a) and len(b):
        step = max(1, _PAIR_BLOCK // len(b))
        for start in range(0, len(a), step):
            dist = np.bitwise_count(a[start:start + step, None] ^ b[None, :])
            i, j = np.nonzero(dist <= max_bits)
            out_i.append(i + start)
            out_j.append(j)
            out_d.append(dist[i, j].astype(np.int64))
    if not out_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
