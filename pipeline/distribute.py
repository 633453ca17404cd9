"""`--strategy` resolution over tf.distribute (never a home-made distribution).

`--batch_size` is always the global batch: tf.distribute splits it evenly
over `strategy.num_replicas_in_sync` replicas.
"""
from __future__ import annotations

import tensorflow as tf


def _default():
    return tf.distribute.get_strategy()


def _mirrored():
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


STRATEGIES = {"default": _default, "mirrored": _mirrored}


def choose_strategy(requested: str, *, num_gpus: int) -> str:
    """Pure rule behind `--strategy=auto`: mirrored over several GPUs, else default."""
    if requested == "auto":
        return "mirrored" if num_gpus > 1 else "default"
    if requested not in STRATEGIES:
        raise ValueError(f"Unknown strategy {requested!r}; choose from auto, {', '.join(STRATEGIES)}.")
    return requested


def resolve_strategy(requested: str):
    """(strategy object, its name) for this machine."""
    name = choose_strategy(requested, num_gpus=len(tf.config.list_physical_devices("GPU")))
    return STRATEGIES[name](), name
