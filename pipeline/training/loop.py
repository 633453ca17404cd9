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

Training recipes (each off by default, and then not in the traced step at all:
`tests/test_recipes_loop.py` compares the default step's graph to the plain one):

* `accumulation_steps=K`: each optimizer step's batch (`--batch_size`, the
  effective batch) is cut into K micro-batches per replica, run one after the
  other in a `tf.while_loop` (`parallel_iterations=1`, so only one
  micro-batch's activations are alive), gradients summed; the loss is still
  divided by the step's global number of examples, so the summed gradient is
  the full batch's (exact for GroupNorm models; BatchNorm normalizes and
  updates its statistics per micro-batch). The optimizer, its schedule,
  warm-up, EMA and metrics see one step. Why not Keras's
  `gradient_accumulation_steps`: it steps the learning-rate schedule with its
  micro-step counter (`_learning_rate(self._iterations)`), and expects K calls
  of `apply` with K input batches of `batch/K`.
* `clip_norm`: the gradient is clipped to this global norm *after* the
  cross-replica sum: the norm of the summed gradient (one extra all-reduce
  when there are several replicas), then every replica's gradient times the
  same factor (`tf.clip_by_global_norm(..., use_norm=)`), so `apply`'s sum is the
  clipped sum. Keras's `clipnorm`/`global_clipnorm` clip each replica's
  gradient before the all-reduce. Under mixed_float16 the threshold is scaled
  with the loss scale (the gradients are still scaled here).
* `class_weights`: per-class weights of the training loss
  (`pipeline.training.class_weights.example_weights`).
* `ema`: a `pipeline.training.ema.WeightAverage`, updated once per optimizer
  step; validation and `on_epoch_end` (the checkpoint) run with the average
  swapped in, and the raw weights' validation is logged as `val_*_raw`.

Validation also reports `macro_f1` (`keras.metrics.F1Score(average="macro")`
over the argmax), so `--best_metric=val_macro_f1` can choose the best epoch.
"""
from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from pipeline.training import class_weights as class_weights_lib
from pipeline.training import ema as ema_lib
from pipeline.training import memory
from pipeline.training.class_weights import example_weights


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


def recipe_options(t, model, strategy, datasets) -> dict:
    """The Loop's recipe arguments for a run's TrainConfig `t` (EMA, clipping, accumulation, class weights).

    The EMA starts from `model`'s weights now (build it after any pretrained
    or --init_from weights are loaded); one object serves every phase.
    """
    average = (ema_lib.WeightAverage(model, strategy, decay=t.ema_decay, warmup=t.ema_warmup)
               if t.ema_decay else None)
    return {"ema": average, "clip_norm": t.clip_norm, "accumulation_steps": t.accumulation_steps,
            "class_weights": class_weights_lib.class_weights(t.class_weight, datasets)}


class Loop:
    """Trains and evaluates `model` under `strategy` (build both inside `strategy.scope()`).

    Args:
      model: a built Keras model whose variables belong to `strategy`.
      strategy: any tf.distribute strategy.
      label_smoothing: of the categorical cross-entropy (labels are one-hot).
      ema: a `ema.WeightAverage` of the model, or None.
      clip_norm: clip the summed gradient to this global norm (0: off).
      accumulation_steps: micro-batches per optimizer step (1: off).
      class_weights: per-class training-loss weights [classes], or None.
    """

    def __init__(self, model: keras.Model, strategy, *, label_smoothing: float = 0.0, ema=None,
                 clip_norm: float = 0.0, accumulation_steps: int = 1, class_weights=None):
        self.model, self.strategy = model, strategy
        self.optimizer = None
        self._replicas = strategy.num_replicas_in_sync
        self.label_smoothing = label_smoothing
        self.ema, self.clip_norm, self.accumulation_steps = ema, float(clip_norm or 0.0), int(accumulation_steps)
        self.class_weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
        with strategy.scope():
            self._loss = keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=label_smoothing, reduction=None)
            self.train_metrics = [keras.metrics.Mean(name="loss"),
                                  keras.metrics.CategoricalAccuracy(name="accuracy")]
            self.eval_metrics = [keras.metrics.Mean(name="loss"),
                                 keras.metrics.CategoricalAccuracy(name="accuracy"),
                                 keras.metrics.F1Score(average="macro", name="macro_f1")]
        self._train_function = None
        self._eval_function = None
        self._iterator = None  # kept across epochs for repeated (steps_per_epoch) data
        self.steps_per_execution = 1

    # ------------------------------------------------------------------ setup

    @property
    def recipes(self) -> dict:
        """This loop's recipe options, for a second Loop that trains part of the same run (a head on features)."""
        weights = None if self.class_weights is None else self.class_weights.numpy()
        return {"ema": self.ema, "clip_norm": self.clip_norm, "accumulation_steps": self.accumulation_steps,
                "class_weights": weights}

    def distribute(self, dataset: Optional[tf.data.Dataset]):
        """The distributed form of a batched dataset (None stays None)."""
        if dataset is None:
            return None
        return self.strategy.experimental_distribute_dataset(dataset)

    def epoch_variables(self):
        """Every variable an epoch of this phase changes, when known to be few; None here (all may change).

        What `callbacks.RunCheckpoint.defer_commits` keeps in memory between
        commits (`feature_cache.CachedFeatureRunner` knows its head's).
        """
        return None

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
        loss_metric, accuracy, *more = metrics
        loss_metric.update_state(per_example if regularization is None else per_example + regularization)
        accuracy.update_state(y, logits)
        for metric in more:  # macro F1 (validation)
            metric.update_state(y, tf.cast(logits, tf.float32))

    def _train_step(self, x, y):
        optimizer = self.optimizer
        examples = tf.cast(tf.shape(y)[0], tf.float32)
        if self._replicas > 1:
            examples = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, examples)
        variables = self.model.trainable_variables
        if self.accumulation_steps > 1:
            gradients = self._accumulated_gradients(x, y, examples, variables)
        else:
            gradients = self._gradients(x, y, examples, variables)
        if self.clip_norm:
            gradients = self._clipped(gradients)
        optimizer.apply(gradients, variables)
        if self.ema is not None:
            self.ema.update()

    def _gradients(self, x, y, examples, variables, regularization_share=None):
        """Gradients of this (micro-)batch's share of the step's loss; updates the training metrics."""
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            per_example = self._per_example_loss(y, logits)
            if self.class_weights is not None:
                per_example *= example_weights(y, self.class_weights, label_smoothing=self.label_smoothing)
            loss = tf.reduce_sum(per_example) / tf.maximum(examples, 1.0)
            regularization = self._regularization()
            if regularization is not None:
                share = tf.nn.scale_regularization_loss(regularization)
                loss += share if regularization_share is None else share * regularization_share
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, variables)
        self._update(self.train_metrics, y, logits, per_example, regularization)
        return gradients

    def _accumulated_gradients(self, x, y, examples, variables):
        """The summed gradients of `accumulation_steps` consecutive micro-batches of this replica's batch.

        A batch with fewer rows than micro-batches (a short last batch) is cut
        into one-row micro-batches: no micro-batch is empty (BatchNorm of an
        empty batch is NaN).
        """
        rows = tf.shape(y)[0]
        parts = tf.minimum(tf.constant(self.accumulation_steps), rows)
        share = 1.0 / tf.cast(tf.maximum(parts, 1), tf.float32)

        def body(i, total):
            lo, hi = i * rows // parts, (i + 1) * rows // parts
            gradients = self._gradients(x[lo:hi], y[lo:hi], examples, variables, regularization_share=share)
            return i + 1, [t + (tf.zeros_like(t) if g is None else tf.cast(tf.convert_to_tensor(g), t.dtype))
                           for t, g in zip(total, gradients)]

        zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
        _, total = tf.while_loop(lambda i, _: i < parts, body, (tf.constant(0), zeros), parallel_iterations=1)
        return total

    def _clipped(self, gradients):
        """Every replica's gradients x one factor that brings the *summed* gradient's norm to <= clip_norm."""
        present = [g for g in gradients if g is not None]
        summed = present
        if self._replicas > 1:
            summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, present)
        threshold = tf.constant(self.clip_norm, tf.float32)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            threshold *= tf.cast(self.optimizer.dynamic_scale, tf.float32)
        clipped, _ = tf.clip_by_global_norm(present, threshold, use_norm=tf.linalg.global_norm(summed))
        clipped = iter(clipped)
        return [None if g is None else next(clipped) for g in gradients]

    def _eval_step(self, x, y):
        logits = self.model(x, training=False)
        self._update(self.eval_metrics, y, logits, self._per_example_loss(y, logits),
                     self._regularization())

    # ------------------------------------------------------------------ compiled functions

    def trace_train_step(self, x_spec: tf.TensorSpec, y_spec: tf.TensorSpec):
        """The concrete function of one `strategy.run(train_step)` for these specs (to inspect its graph).

        What the recipe options add to a training step shows here: off, they add nothing.
        """
        step = tf.autograph.experimental.do_not_convert(self._train_step)
        return tf.function(lambda x, y: self.strategy.run(step, args=(x, y))).get_concrete_function(x_spec, y_spec)

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
        memory.release_free_heap()  # what Python and tracing freed goes back before TF's pool grows
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
        if self.ema is None:
            return self._end_epoch(epoch, logs, callbacks, validation, validation_steps)
        if validation is not None:  # the raw weights first, then (what counts) their average
            raw = self.evaluate(validation, steps=validation_steps)
            logs.update({f"val_{k}_raw": v for k, v in raw.items()})
        with self.ema.swapped_in():  # the checkpoint (on_epoch_end) holds the average too
            return self._end_epoch(epoch, logs, callbacks, validation, validation_steps)

    def _end_epoch(self, epoch, logs, callbacks, validation, validation_steps):
        if validation is not None:
            val = self.evaluate(validation, steps=validation_steps, callbacks=callbacks)
            logs.update({f"val_{k}": v for k, v in val.items()})
        callbacks.on_epoch_end(epoch, logs)
        return logs

    def evaluate(self, dataset, *, steps: Optional[int] = None, callbacks=None) -> dict:
        """`{"loss", "accuracy", "macro_f1"}` over a whole distributed dataset (test callbacks if given).

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
