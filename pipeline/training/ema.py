"""`--ema_decay`: an exponential moving average of the weights, owned by the run, not the optimizer.

Why not Keras's `use_ema=True` / `ema_momentum` (and `keras.callbacks.SwapEMAWeights`):
the average lives in the optimizer, and our run builds a new optimizer at every
phase (unfreezing, `--switch_optimizer_epoch`), so it would restart there; it
averages only the variables that optimizer was built with (the head while the
backbone is frozen) and not BatchNorm's moving statistics; it has no warm-up
(its momentum is 0 at step 0, then `ema_momentum`); and `SwapEMAWeights` needs
`model.optimizer` to own the average. So the average is one object per run,
updated by the loop once per optimizer step (after the update, so it is once per
`--accumulation_steps` micro-batches).

What is averaged: every floating-point weight of the model, trainable or not,
so BatchNorm's moving mean and variance are averaged too (as timm's `ModelEma`
averages the whole state dict); frozen weights stay exactly what they are.

The rule, after the optimizer step that makes `n` steps in all (n = 1, 2, ...):
`decay_n = min(decay, (1 + n) / (10 + n))` with `--ema_warmup` (TF's
`ExponentialMovingAverage(num_updates=n)` rule), else `decay`;
`average = decay_n * average + (1 - decay_n) * weight`, starting from the weights
the run starts with.

In the run directory: validation, the best checkpoint, `evaluate`, export and
reports use the average, so an epoch's `.keras` checkpoint holds the *averaged*
weights (and the optimizer state); the raw weights the training continues from
and the step count sit beside it in `<checkpoint>.raw.npz`, written before the
epoch is committed. A resume loads the checkpoint (the average), then the raw
weights and the count: the average continues exactly.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from pipeline import rundir

RAW_SUFFIX = rundir.RAW_WEIGHTS_SUFFIX


def raw_weights_file(checkpoint: str) -> str:
    """Where the raw (non-averaged) weights of an EMA run's epoch checkpoint are kept."""
    return checkpoint + RAW_SUFFIX


def effective_decay(decay: float, steps: int, *, warmup: bool) -> float:
    """The decay applied by the update that brings the optimizer step count to `steps` (pure rule)."""
    return min(decay, (1.0 + steps) / (10.0 + steps)) if warmup else decay


class WeightAverage:
    """The moving average of `model`'s floating-point weights under `strategy`.

    Args:
      model: the built model (its weights are the average's starting point).
      strategy: the run's tf.distribute strategy (the average is mirrored).
      decay: `--ema_decay`, in (0, 1).
      warmup: `--ema_warmup`.
    """

    def __init__(self, model, strategy, *, decay: float, warmup: bool):
        self.model, self.decay, self.warmup = model, float(decay), bool(warmup)
        self.weights = [w for w in model.weights if keras.backend.is_float_dtype(w.dtype)]
        self._raw: Optional[list] = None
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA  # every replica holds the same weights
        with strategy.scope():
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_count", aggregation=first)
            self.averages = [tf.Variable(tf.convert_to_tensor(w.value), trainable=False, aggregation=first,
                                         name=f"ema/{w.path}".replace(":", "_")) for w in self.weights]

    # ------------------------------------------------------------------ in the train step

    def update(self):
        """One optimizer step's update (inside the replica function; returns the assign ops)."""
        n = self.count.assign_add(1)
        steps = tf.cast(n, tf.float32)
        decay = tf.constant(self.decay, tf.float32)
        if self.warmup:
            decay = tf.minimum(decay, (1.0 + steps) / (10.0 + steps))
        ops = []
        for average, weight in zip(self.averages, self.weights):
            d = tf.cast(decay, average.dtype)
            ops.append(average.assign(d * average + (1.0 - d) * tf.cast(weight.value, average.dtype)))
        return ops

    # ------------------------------------------------------------------ around validation and saving

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the average inside the block (validation, checkpoint), the raw weights after."""
        self._raw = [np.asarray(w.numpy()) for w in self.weights]
        try:
            for weight, average in zip(self.weights, self.averages):
                weight.assign(average.numpy())
            yield
        finally:
            for weight, raw in zip(self.weights, self._raw):
                weight.assign(raw)
            self._raw = None

    def write_raw(self, checkpoint: str) -> None:
        """Write the raw weights and the step count beside `checkpoint` (inside `swapped_in`)."""
        if self._raw is None:
            raise RuntimeError("write_raw needs the average swapped in (the raw weights are set aside there).")
        arrays = {f"w{i}": value for i, value in enumerate(self._raw)}

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, count=np.int64(self.count.numpy()), **arrays)
        rundir.replace_atomic(raw_weights_file(checkpoint), write)

    def resume(self, checkpoint: str) -> None:
        """After the model loaded `checkpoint` (the average): take it as the average, restore raw and count."""
        filename = raw_weights_file(checkpoint)
        if not os.path.exists(filename):
            raise rundir.RunDirError(f"Cannot resume with --ema_decay: {filename} is missing (the run was "
                                     "trained without EMA); resume without --ema_decay or start a new run.")
        with np.load(filename) as saved:
            raw = [saved[f"w{i}"] for i in range(len(self.weights))]
            count = int(saved["count"])
        for weight, average, value in zip(self.weights, self.averages, raw):
            average.assign(weight.numpy())
            weight.assign(value)
        self.count.assign(count)
