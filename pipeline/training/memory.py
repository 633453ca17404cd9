"""Process memory: peak resident memory for summary.json, free memory, and a forecast from the first steps.

Why: a run that outgrows the machine's memory is killed by the OS without a
word (a seed report had to guess a smaller batch for ResNet-110). The first
training steps already allocate what every later step needs (activations kept
for the gradient, the optimizer's slots, tf.data's buffers), so after them
`MemoryForecast` compares the growth with what is still free and, when the run
would not fit, says so in one line with a `--batch_size`, `--remat` or
`--accumulation_steps` that does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import platform
import resource
from typing import Optional

import keras

MIB = 2**20
# Validation, checkpoint writes and allocator slack on top of the training steps' peak.
HEADROOM = 1.15


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if platform.system() == "Darwin" else 1024)


def rss_bytes() -> Optional[int]:
    """Current resident memory of this process (Linux `/proc/self/statm`; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def _glibc_malloc_trim():
    """glibc's `malloc_trim`, or None where the C library is not glibc (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - AttributeError where the C library is not glibc
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Give the free pages of malloc's heaps back to the OS (glibc `malloc_trim(0)`); False elsewhere.

    Why: with oneDNN on, TensorFlow serves tensors from its own pool (BFC
    regions it never returns), so memory that tracing and graph optimization
    freed into malloc's heaps (~85 MB for BiT-R50x1) cannot be reused by the
    pool and stays resident beside it until glibc trims it, which it rarely
    does on its own. The training loop calls this before each execution:
    -69 MB at the BiT step's peak (BENCHMARKS.md). It costs well under a millisecond once
    little is free.
    """
    trim = _glibc_malloc_trim()
    return bool(trim is not None and trim(0) in (0, 1))


def available_bytes() -> Optional[int]:
    """Memory the OS can still give without swapping (`MemAvailable`), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_peak_bytes() -> dict:
    """Peak memory of every GPU (`tf.config.experimental.get_memory_info`), {} without GPUs."""
    import tensorflow as tf
    peaks = {}
    for i, _ in enumerate(tf.config.list_logical_devices("GPU")):
        try:
            peaks[f"GPU:{i}"] = int(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"])
        except (ValueError, tf.errors.InvalidArgumentError):
            continue
    return peaks


def summary_fields() -> dict:
    """What summary.json records about memory: the process's peak RSS (and GPUs' peaks) in MiB."""
    fields = {"peak_rss_mb": round(peak_rss_bytes() / MIB, 1)}
    gpus = device_peak_bytes()
    if gpus:
        fields["peak_device_memory_mb"] = {k: round(v / MIB, 1) for k, v in gpus.items()}
    return fields


def fitting_batch(batch_size: int, *, base: int, step: int, free: int) -> int:
    """The largest power-of-two batch whose projected step memory fits `free` bytes (>= 1).

    Activation memory grows about linearly with the batch; `base` (weights,
    slots, runtime) does not.
    """
    per_example = max(step, 1) / batch_size
    fits = max(1, int((free / HEADROOM) // per_example))
    return max(1, 2 ** int(math.log2(min(fits, batch_size))))


def forecast(batch_size: int, *, before: int, after: int, free_before: int, remat: bool) -> Optional[str]:
    """One line when the run would not fit: `after - before` grew in the first steps, `free_before` was free.

    Returns None when it fits. Pure arithmetic, so tests give it numbers.
    """
    step = max(0, after - before)
    if step * HEADROOM <= free_before:
        return None
    batch = fitting_batch(batch_size, base=before, step=step, free=free_before)
    accumulation = math.ceil(batch_size / batch)
    remat_hint = "" if remat else ", or --remat (recomputes each block in the backward pass, keeping fewer activations)"
    return (f"warning: this run needs about {step * HEADROOM / MIB:.0f} MiB beyond what it held before "
            f"training but only {free_before / MIB:.0f} MiB were free: it may be killed by the OS. "
            f"--batch_size={batch} fits (--accumulation_steps={accumulation} keeps the batch of "
            f"{batch_size}){remat_hint}.")


class MemoryForecast(keras.callbacks.Callback):
    """After the first `steps` training steps, print `forecast`'s line if the run would not fit."""

    def __init__(self, batch_size: int, *, steps: int = 2, remat: bool = False):
        super().__init__()
        self.batch_size, self.steps, self.remat = batch_size, steps, remat
        self._before = self._free = None
        self.message: Optional[str] = None

    def on_train_begin(self, logs=None):
        self._before, self._free = rss_bytes(), available_bytes()

    def on_train_batch_end(self, batch, logs=None):
        if self._before is None or self._free is None or batch + 1 < self.steps:
            return
        self.message = forecast(self.batch_size, before=self._before, after=peak_rss_bytes(),
                                free_before=self._free, remat=self.remat)
        if self.message:
            print(self.message, flush=True)
        self._before = None  # once per run
