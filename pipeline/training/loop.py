"""One training loop for every tf.distribute strategy, driving Keras callbacks the way `fit` does.

Why not `model.fit`: under MultiWorkerMirroredStrategy Keras 3's `fit` fails
("Attempt to convert a value (PerReplica...)", keras-team/keras#20585), while a
`strategy.run` step with the same Keras model, optimizer and metrics works on
every strategy (default, mirrored, multi-worker, TPU). So this is the only path:

* The input is `strategy.experimental_distribute_dataset(ds)` (global batches,
  split over replicas; sharded per worker by the dataset's auto-shard policy).
* `train_function(iterator, n)` is one `tf.function` that runs up to `n` steps
  (`model.steps_per_execution`, 1 unless compile sets more) in a graph loop;
  each step is `strategy.run(train_step)`. It stops early when the iterator is
  exhausted (`get_next_as_optional`, which multi-worker strategies agree on
  across workers) and returns how many steps ran plus the running metrics.
* `train_step` (per replica): logits, per-example cross-entropy from logits
  with label smoothing (`reduction=None`), summed and divided by the *global*
  number of examples in this step (an all-reduce when there are several
  replicas, so a short last batch is a mean over what it holds, as in `fit`),
  plus `model.losses` / replicas; `optimizer.scale_loss` (a
  LossScaleOptimizer under mixed_float16), gradients, `optimizer.apply`
  (Keras sums gradients over replicas there), then `Mean` loss and
  `CategoricalAccuracy` metrics (sync-on-read: reading them sums all replicas).
* Callbacks get exactly fit's calls: `on_epoch_begin`, `on_train_batch_begin/
  end` once per execution (begin/end step indices), `on_test_begin/
  on_test_batch_*/on_test_end` for validation, `on_epoch_end` with `loss`,
  `accuracy`, `val_loss`, `val_accuracy`; `model.stop_training` is honoured
  after every execution and every epoch. `on_train_begin/end` are the caller's
  (`training.train` calls them once per run, across its phases).
"""
from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf


def steps_of(dataset: Optional[tf.data.Dataset]) -> Optional[int]:
    """Batches in a finite dataset of known cardinality, else None."""
    if dataset is None:
        return None
    n = int(dataset.cardinality())
    return n if n >= 0 else None


def callback_list(callbacks, *, model, epochs: int, steps: int, verbose: int) -> keras.callbacks.CallbackList:
    """A CallbackList configured like fit's (History, and a progress bar unless verbose=0)."""
    return keras.callbacks.CallbackList(list(callbacks), add_history=True, add_progbar=verbose != 0,
                                        verbose=verbose, epochs=epochs, steps=steps, model=model)


class Loop:
    """Trains and evaluates `model` under `strategy` (build both inside `strategy.scope()`).

    Args:
      model: a built Keras model whose variables belong to `strategy`.
      strategy: any tf.distribute strategy.
      label_smoothing: of the categorical cross-entropy (labels are one-hot).
    """

    def __init__(self, model: keras.Model, strategy, *, label_smoothing: float = 0.0):
        self.model, self.strategy = model, strategy
        self.optimizer = None
        self._replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            self._loss = keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=label_smoothing, reduction=None)
            self.train_metrics = [keras.metrics.Mean(name="loss"),
                                  keras.metrics.CategoricalAccuracy(name="accuracy")]
            self.eval_metrics = [keras.metrics.Mean(name="loss"),
                                 keras.metrics.CategoricalAccuracy(name="accuracy")]
        self._train_function = None
        self._eval_function = None
        self._iterator = None  # kept across epochs for repeated (steps_per_epoch) data
        self.steps_per_execution = 1

    # ------------------------------------------------------------------ setup

    def distribute(self, dataset: Optional[tf.data.Dataset]):
        """The distributed form of a batched dataset (None stays None)."""
        if dataset is None:
            return None
        return self.strategy.experimental_distribute_dataset(dataset)

    def set_optimizer(self, optimizer) -> None:
        """Use `optimizer` from now on (a phase start: new optimizer or trainable set).

        Builds the optimizer's variables in the strategy scope and retraces the
        train function on the next step.
        """
        with self.strategy.scope():
            if not optimizer.built:
                optimizer.build(self.model.trainable_variables)
        self.optimizer = optimizer
        self.steps_per_execution = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        self._train_function = None
        self._eval_function = None

    # ------------------------------------------------------------------ per replica

    def _per_example_loss(self, y, logits):
        return self._loss(y, tf.cast(logits, tf.float32))

    def _regularization(self):
        losses = self.model.losses
        return tf.add_n([tf.cast(v, tf.float32) for v in losses]) if losses else None

    def _update(self, metrics, y, logits, per_example, regularization):
        loss_metric, accuracy = metrics
        loss_metric.update_state(per_example if regularization is None else per_example + regularization)
        accuracy.update_state(y, logits)

    def _train_step(self, x, y):
        model, optimizer = self.model, self.optimizer
        examples = tf.cast(tf.shape(y)[0], tf.float32)
        if self._replicas > 1:
            examples = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, examples)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = self._per_example_loss(y, logits)
            loss = tf.reduce_sum(per_example) / tf.maximum(examples, 1.0)
            regularization = self._regularization()
            if regularization is not None:
                loss += tf.nn.scale_regularization_loss(regularization)
            scaled = optimizer.scale_loss(loss)
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(scaled, variables), variables)
        self._update(self.train_metrics, y, logits, per_example, regularization)

    def _eval_step(self, x, y):
        logits = self.model(x, training=False)
        self._update(self.eval_metrics, y, logits, self._per_example_loss(y, logits),
                     self._regularization())

    # ------------------------------------------------------------------ compiled functions

    def _make_function(self, step, metrics):
        step = tf.autograph.experimental.do_not_convert(step)
        strategy = self.strategy

        def run_steps(iterator, steps):
            done = tf.constant(0)
            for _ in tf.range(steps):
                batch = iterator.get_next_as_optional()
                if not batch.has_value():
                    break
                strategy.run(step, args=batch.get_value())
                done += 1
            return done, {m.name: m.result() for m in metrics}

        return tf.function(run_steps, reduce_retracing=True)

    def _run(self, function, iterator, steps: int):
        done, logs = function(iterator, tf.constant(steps, tf.int32))
        return int(done), logs

    # ------------------------------------------------------------------ epochs

    def train_epoch(self, epoch: int, dataset, *, callbacks, steps_per_epoch: int, validation=None,
                    validation_steps: Optional[int] = None, repeat: bool = False) -> dict:
        """One epoch of `steps_per_epoch` steps (fewer if the data ends), then validation.

        Args:
          epoch: 0-based epoch index (what callbacks see).
          dataset: a distributed dataset from `distribute`.
          callbacks: a CallbackList (see `callback_list`).
          steps_per_epoch: steps to run.
          validation: a distributed validation dataset, or None.
          validation_steps: its number of batches when known (`steps_of`).
          repeat: `dataset` is infinite: keep one iterator across epochs.

        Returns:
          The epoch logs after `on_epoch_end` (callbacks may have added keys).
        """
        if self._train_function is None:
            self._train_function = self._make_function(self._train_step, self.train_metrics)
        for m in self.train_metrics:
            m.reset_state()
        callbacks.on_epoch_begin(epoch)
        if repeat:
            if self._iterator is None:
                self._iterator = iter(dataset)
            iterator = self._iterator
        else:
            iterator = iter(dataset)
        step = 0
        while step < steps_per_epoch:
            want = min(self.steps_per_execution, steps_per_epoch - step)
            callbacks.on_train_batch_begin(step)
            done, logs = self._run(self._train_function, iterator, want)
            if done == 0:
                if step == 0:
                    raise ValueError("The training data produced no batch in this epoch.")
                break
            step += done
            callbacks.on_train_batch_end(step - 1, logs)
            if done < want or self.model.stop_training:
                break
        logs = {m.name: float(m.result()) for m in self.train_metrics}
        if validation is not None:
            val = self.evaluate(validation, steps=validation_steps, callbacks=callbacks)
            logs.update({f"val_{k}": v for k, v in val.items()})
        callbacks.on_epoch_end(epoch, logs)
        return logs

    def evaluate(self, dataset, *, steps: Optional[int] = None, callbacks=None) -> dict:
        """`{"loss", "accuracy"}` over a whole distributed dataset (test callbacks if given).

        `steps`, its number of batches when known, saves a last call that only
        finds the data exhausted (and an unmatched `on_test_batch_begin`).
        """
        if self._eval_function is None:
            self._eval_function = self._make_function(self._eval_step, self.eval_metrics)
        for m in self.eval_metrics:
            m.reset_state()
        if callbacks is not None:
            callbacks.on_test_begin()
        iterator = iter(dataset)
        step = 0
        while steps is None or step < steps:
            want = self.steps_per_execution if steps is None else min(self.steps_per_execution, steps - step)
            if callbacks is not None:
                callbacks.on_test_batch_begin(step)
            done, logs = self._run(self._eval_function, iterator, want)
            if done and callbacks is not None:
                callbacks.on_test_batch_end(step + done - 1, logs)
            step += done
            if done < want:
                break
        logs = {m.name: float(m.result()) for m in self.eval_metrics}
        if callbacks is not None:
            callbacks.on_test_end(logs)
        return logs
