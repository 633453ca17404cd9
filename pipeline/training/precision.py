"""`--precision` resolution: pick the fastest numerically safe policy for this machine.

`auto` must never be slower than float32 where it runs, so it chooses mixed
precision only where the hardware computes that dtype natively:
mixed_float16 on NVIDIA GPUs of compute capability >= 7.0 (tensor cores),
mixed_bfloat16 on CPUs with AVX512-BF16 or AMX (measured here: 2x over float32
for ResNet-20), float32 everywhere else (bf16 emulated in software is slower).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import keras

POLICIES = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What `/proc/cpuinfo` says about the first processor.

    Attributes:
      model: its `model name` (None when unknown, e.g. not Linux).
      flags: its feature flags (empty when unknown).
    """

    model: Optional[str]
    flags: frozenset


def read_cpuinfo(cpuinfo_path: str = "/proc/cpuinfo") -> CpuInfo:
    """The model name and feature flags of the first processor listed in `cpuinfo_path`.

    The one reader of the CPU's features: the precision rule (native bf16), the
    run summary's device and the benchmark's machine line all use it.
    """
    model, flags = None, None
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if model is None and key.strip() == "model name":
                    model = value.strip()
                elif flags is None and key.strip() == "flags":
                    flags = frozenset(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return CpuInfo(model, flags or frozenset())


@functools.lru_cache(maxsize=None)
def cpu_info() -> CpuInfo:
    """`read_cpuinfo()` of this machine, read once per process."""
    return read_cpuinfo()


def cpu_has_bf16(flags: frozenset | None = None) -> bool:
    """Whether the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX)."""
    flags = cpu_info().flags if flags is None else flags
    return any(f in flags for f in _BF16_CPU_FLAGS)


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of the visible GPUs (empty on CPU-only machines)."""
    import tensorflow as tf

    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        caps.append(tuple(details.get("compute_capability", (0, 0))))
    return caps


def choose_precision(requested: str, *, gpu_caps: list[tuple[int, int]],
                     has_bf16_cpu: bool) -> str:
    """Pure decision rule behind `--precision` (tested without hardware).

    Args:
      requested: one of POLICIES.
      gpu_caps: compute capabilities of visible GPUs.
      has_bf16_cpu: whether the CPU computes bf16 natively.
    Returns:
      A Keras dtype policy name.
    """
    if requested not in POLICIES:
        raise ValueError(f"Unknown precision {requested!r}; choose from {', '.join(POLICIES)}.")
    if requested != "auto":
        return requested
    if gpu_caps:
        return "mixed_float16" if min(gpu_caps) >= (7, 0) else "float32"
    return "mixed_bfloat16" if has_bf16_cpu else "float32"


def resolve_precision(requested: str) -> str:
    """`choose_precision` for this machine."""
    return choose_precision(requested, gpu_caps=gpu_compute_capabilities(),
                            has_bf16_cpu=cpu_has_bf16())


def apply_precision(requested: str) -> str:
    """Resolve and set the global Keras dtype policy; returns the policy name."""
    policy = resolve_precision(requested)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def device_description() -> str:
    """A human-readable name of the device that trains (GPU name or CPU model)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in gpus]
        return f"{len(gpus)} x {names[0]}"
    model = cpu_info().model
    return "CPU" if model is None else f"CPU {model} ({os.cpu_count()} cores)"
