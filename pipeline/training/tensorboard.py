"""TensorBoard insight during training: learning rate, weight and gradient histograms, inputs.

`InsightCallback` writes, with its own `tf.summary` writer into `log_dir`
(by convention `<run>/tensorboard/insight`, shown as the run "insight" next to
Keras's own "train" and "validation"):

  * `learning_rate` (scalar, every epoch): the optimizer's learning rate at the
    start of the epoch (the value metrics.csv records as `lr`);
  * `weights/<variable path>` (histogram, every `histogram_freq` epochs): every
    floating-point weight of every layer, trainable or not, cast to float32;
  * `gradients/<variable path>` and `gradient_norm` (histograms, scalar, same
    epochs): gradients of the loss on one fixed batch, taken with
    `tf.GradientTape` at the end of the epoch;
  * `augmented_training_images` (images, once, when training begins).

Steps are 0-based epoch indices, like Keras's `epoch_*` scalars.

Gradients are for inspection, not for training: the model runs in training
mode (BatchNorm uses batch statistics, as in a training step) through
`model.stateless_call` on copies of its variables, so inspecting never changes
the model (no moving statistics or seed states are updated). The loss is categorical
cross-entropy computed in float32 from the float32 logits; under a mixed
precision policy no loss scaling is applied (the values are not used to
update weights). Under a `tf.distribute` strategy the batch is run once, on
the variables' primary copies read in cross-replica context (not through
`strategy.run`), which gives the same numbers as on one device.

Epoch-0 to epoch-N histograms make the seed reports' plots: gradients that
spread early and concentrate as training converges, and how a pretrained
backbone's gradients differ from a random one's.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from pipeline import rundir

INSIGHT_SUBDIR = "insight"
LR_TAG = "learning_rate"
WEIGHTS_PREFIX = "weights/"
GRADIENTS_PREFIX = "gradients/"
GRADIENT_NORM_TAG = "gradient_norm"
IMAGES_TAG = "augmented_training_images"


def _as_images(images) -> np.ndarray:
    """float32 [N, H, W, C] in [0, 1] from floats in [0, 1] or uint8."""
    array = np.asarray(keras.ops.convert_to_numpy(images))
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"augmented_images must be [N, H, W, C], got shape {array.shape}")
    return array


def _variable_names(variables) -> list[str]:
    """Unique TensorBoard-friendly names (`layer/kernel`) for variables."""
    names, seen = [], {}
    for var in variables:
        name = getattr(var, "path", None) or var.name
        name = name.replace(":", "_")
        count = seen.get(name, 0)
        seen[name] = count + 1
        names.append(name if count == 0 else f"{name}_{count}")
    return names


def _is_float(var) -> bool:
    try:
        return tf.as_dtype(var.dtype).is_floating
    except TypeError:
        return False


class InsightCallback(keras.callbacks.Callback):
    """Writes lr scalars, weight/gradient histograms and sample images to TensorBoard.

    Args:
      log_dir: the directory its event files go to (created if missing), e.g.
        `<run>/tensorboard/insight`.
      histogram_freq: write weight and gradient histograms every this many
        epochs (epochs 0, f, 2f, ... counted from 0); 0 turns them off, leaving
        only the learning rate and the images.
      sample_batch: `(images, one_hot_labels)`, the fixed batch the gradients
        are computed on; needed when `histogram_freq > 0` (without it only
        weights are written). Images float32 in [0, 1] (or uint8).
      augmented_images: images [N, H, W, 3] to show once; defaults to the
        images of `sample_batch`.
      max_images: how many of them to show.
      label_smoothing: the loss's label smoothing, so the gradients match training.
    """

    def __init__(self, log_dir: str, histogram_freq: int = 0, *, sample_batch=None,
                 augmented_images=None, max_images: int = 16, label_smoothing: float = 0.0):
        super().__init__()
        if histogram_freq < 0:
            raise ValueError(f"histogram_freq must be >= 0, got {histogram_freq}")
        self.log_dir = log_dir
        self.histogram_freq = int(histogram_freq)
        self.max_images = int(max_images)
        self._batch = None
        if sample_batch is not None:
            images, labels = sample_batch
            self._batch = (tf.constant(_as_images(images)),
                           tf.constant(np.asarray(keras.ops.convert_to_numpy(labels)), tf.float32))
        if augmented_images is None and sample_batch is not None:
            augmented_images = sample_batch[0]
        self._images = None if augmented_images is None else _as_images(augmented_images)
        self._loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                          label_smoothing=label_smoothing)
        self._writer = None
        self._images_written = False
        self._lr = None

    # ------------------------------------------------------------------ keras hooks

    def on_train_begin(self, logs=None):
        if self._writer is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = tf.summary.create_file_writer(self.log_dir)
        if self._images is not None and not self._images_written:
            with self._writer.as_default():
                tf.summary.image(IMAGES_TAG, self._images, step=0,
                                 max_outputs=self.max_images,
                                 description="A batch of training images after augmentation, "
                                             "as the model sees them.")
            self._images_written = True
            self._writer.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self._lr = current_learning_rate(self.model.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is None:
            self.on_train_begin()
        with self._writer.as_default():
            lr = self._lr if self._lr is not None else current_learning_rate(self.model.optimizer)
            if lr is not None:
                tf.summary.scalar(LR_TAG, lr, step=epoch,
                                  description="Learning rate at the start of the epoch.")
            if self.histogram_freq and epoch % self.histogram_freq == 0:
                self.write_histograms(epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    # ------------------------------------------------------------------ work

    def write_histograms(self, step: int) -> None:
        """Weight histograms and, with a sample batch, gradient histograms at `step`."""
        weights = [v for v in self.model.weights if _is_float(v)]
        for name, var in zip(_variable_names(weights), weights):
            tf.summary.histogram(WEIGHTS_PREFIX + name, _float32(var), step=step)
        if self._batch is None:
            return
        variables, grads = self.gradients()
        norms = []
        for name, grad in zip(_variable_names(variables), grads):
            if grad is None:
                continue
            grad = tf.cast(grad, tf.float32)
            norms.append(tf.reduce_sum(tf.square(grad)))
            tf.summary.histogram(GRADIENTS_PREFIX + name, grad, step=step)
        if norms:
            tf.summary.scalar(GRADIENT_NORM_TAG, tf.sqrt(tf.add_n(norms)), step=step,
                              description="Global L2 norm of the gradients on the fixed batch.")

    def gradients(self):
        """(trainable variables, their gradients) of the loss on the fixed batch.

        Uses `model.stateless_call` on copies of the variable values, in
        training mode: nothing is assigned, so BatchNorm statistics and seed
        states stay as they were, and distributed variables are only read
        (cross-replica reads of a MirroredVariable give its primary copy).
        """
        model = self.model
        trainable = list(model.trainable_variables)
        if not trainable:
            return [], []
        images, labels = self._batch
        values = [_value(v) for v in trainable]
        others = [_value(v) for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            logits, _ = model.stateless_call(values, others, images, training=True)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            loss = self._loss(labels, tf.cast(logits, tf.float32))
        return trainable, tape.gradient(loss, values)


def _value(var) -> tf.Tensor:
    """A tensor copy of a Keras variable's value (the primary copy of a distributed one)."""
    return tf.identity(var.value)


def _float32(var) -> tf.Tensor:
    return tf.cast(_value(var), tf.float32)


def current_learning_rate(optimizer) -> Optional[float]:
    """The optimizer's learning rate now (schedules evaluated at its iteration count)."""
    if optimizer is None:
        return None
    try:
        value = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sample_batch_from(dataset, num_classes: int, *, max_examples: int = 32):
    """`(images, one_hot_labels)` of at most `max_examples` from a `(image, int label)` dataset.

    Takes the first batch of `dataset` (for `pipeline.data.Datasets.train`:
    shuffled and augmented, as training sees it) as numpy arrays.
    """
    for images, labels in dataset.take(1):
        images = images.numpy()[:max_examples]
        labels = labels.numpy()[:max_examples]
        return images.astype(np.float32), np.eye(num_classes, dtype=np.float32)[labels]
    raise ValueError("the dataset is empty: no batch to inspect")


def callback_for_run(model_dir: str, datasets, *, histogram_freq: int = 0,
                     label_smoothing: float = 0.0, max_examples: int = 32) -> InsightCallback:
    """The InsightCallback of a run directory: `<model_dir>/tensorboard/insight`.

    Args:
      model_dir: the run directory.
      datasets: the run's `pipeline.data.Datasets`; one batch of its training
        pipeline becomes the fixed gradient batch and the images shown.
      histogram_freq: see `InsightCallback`; 0 = learning rate and images only.
      label_smoothing: the run's label smoothing.
      max_examples: size of the fixed batch.
    """
    batch = sample_batch_from(datasets.train, len(datasets.class_names), max_examples=max_examples)
    return InsightCallback(rundir.path(model_dir, rundir.TENSORBOARD_DIR, INSIGHT_SUBDIR),
                           histogram_freq, sample_batch=batch, label_smoothing=label_smoothing)


def read_insight_events(log_dir: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    """All tensors (scalars, histograms, images) in `log_dir`'s event files: tag -> [(step, value)].

    TF2 `tf.summary` stores every summary as a tensor; histograms are
    [buckets, 3] arrays of (left edge, right edge, count).
    """
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        log_dir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.HISTOGRAMS: 0,
                                event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("tensors", []):
        out[tag] = [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
    return out


__all__ = ("InsightCallback", "callback_for_run", "sample_batch_from", "current_learning_rate",
           "read_insight_events", "INSIGHT_SUBDIR")
