"""The machine a measurement ran on, and the state it was in.

`machine_info()` is the first JSON line of `python -m pipeline.benchmark`;
`stamp()` adds the process's peak memory and the load average to every
measurement: on a shared machine a number taken under load is not a number
about the code.
"""
from __future__ import annotations

import os
import platform
import resource
from typing import Optional

from pipeline.training import precision

# The CPU features that decide which kernels and dtypes are fast here.
INTERESTING_CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                         "amx_bf16", "amx_tile", "avx_vnni")


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1024 * 1024 if platform.system() == "Darwin" else 1024
    return round(peak / scale, 1)


# Resident memory right after TensorFlow and the pipeline were imported, before anything was built
# (`record_rss_after_import`): peak_rss_mb minus it is what the measured work itself held.
_AFTER_IMPORT: dict = {}


def rss_mb() -> Optional[float]:
    """Current resident memory of this process in MiB (Linux `/proc/self/statm`; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def record_rss_after_import() -> Optional[float]:
    """Remember the resident memory now (call it once, before building anything); returns it."""
    _AFTER_IMPORT.setdefault("rss_after_import_mb", rss_mb())
    return _AFTER_IMPORT["rss_after_import_mb"]


def machine_info() -> dict:
    """CPU model, relevant ISA flags, cores and library versions (one JSON line per run)."""
    import keras
    import tensorflow as tf

    from pipeline.models.layers import tf_onednn_enabled
    cpu = precision.cpu_info()
    return {
        "cpu": cpu.model if cpu.model is not None else "unknown",
        "cpu_flags": [f for f in INTERESTING_CPU_FLAGS if f in cpu.flags],
        "cores": os.cpu_count(),
        "native_bf16": precision.cpu_has_bf16(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "onednn_enabled": tf_onednn_enabled(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "python": platform.python_version(),
    }


def stamp(result: dict) -> dict:
    """`result` plus the process's peak RSS (and its RSS after the imports, when recorded) and the load."""
    return {**result, **_AFTER_IMPORT, "peak_rss_mb": peak_rss_mb(), "load_1min": load_average()}
