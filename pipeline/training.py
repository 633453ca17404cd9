"""Compile and fit a model from a RunConfig, writing the run directory as it goes.

One entry, `train(run)`, used by `pipeline.train`, `pipeline.finetune` and the
tuner. A run is a list of *phases* (frozen-backbone epochs, then the first
optimizer, then an optional second optimizer); each phase is one `fit` call
continuing the global epoch count and the global learning-rate schedule, so a
mid-run optimizer switch or an unfreeze is a recompile, not a second loop.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import callbacks as cbs
from pipeline import config as cfg
from pipeline import data as data_lib
from pipeline import distribute, precision, rundir, schedules
from pipeline.augment import mixup
from pipeline.models import create_model
from pipeline.models.pretrained import head_layers, set_backbone_trainable

TrainingDiverged = cbs.TrainingDiverged


def _sgd(o: cfg.OptimizerConfig, lr):
    return keras.optimizers.SGD(lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay or None)


def _adam(o, lr):
    return keras.optimizers.Adam(lr, weight_decay=o.weight_decay or None)


def _nadam(o, lr):
    return keras.optimizers.Nadam(lr, weight_decay=o.weight_decay or None)


def _adamw(o, lr):
    return keras.optimizers.AdamW(lr, weight_decay=o.weight_decay or 0.004)


def _rmsprop(o, lr):
    return keras.optimizers.RMSprop(lr, momentum=o.momentum, weight_decay=o.weight_decay or None)


# Weight decay is Keras's decoupled form for every optimizer (for SGD without
# momentum it equals an L2 term of weight_decay/2 * |w|^2 in the loss).
OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "nadam": _nadam, "adamw": _adamw, "rmsprop": _rmsprop}


class _BackboneLRMixin:
    """Scales the learning rate of every variable outside the head by a factor.

    Keras 3 optimizers apply each variable's update in `update_step(gradient,
    variable, learning_rate)`, so one override gives every optimizer a
    per-group learning rate without a second optimizer or a custom train step.
    (Decoupled weight decay still uses the base rate.)
    """

    backbone_lr_multiplier = 1.0
    head_variable_paths = frozenset()

    def build(self, variables):
        # update_step sees backend variables without `.path`: map keys once here.
        self._head_keys = {self._var_key(v) for v in variables if v.path in self.head_variable_paths}
        super().build(variables)

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) not in self._head_keys:
            learning_rate = learning_rate * self.backbone_lr_multiplier
        return super().update_step(gradient, variable, learning_rate)


def make_optimizer(o: cfg.OptimizerConfig, learning_rate, *, backbone_lr_multiplier: float = 1.0,
                   head_variable_paths=()):
    """A Keras optimizer from its config and a float or schedule learning rate.

    With `backbone_lr_multiplier != 1`, variables whose `.path` is not in
    `head_variable_paths` learn at `multiplier x` the scheduled rate.
    """
    if o.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {o.name!r}; choose from {', '.join(OPTIMIZERS)}.")
    optimizer = OPTIMIZERS[o.name](o, learning_rate)
    if backbone_lr_multiplier != 1.0:
        cls = type(optimizer)
        optimizer.__class__ = type(f"BackboneLR{cls.__name__}", (_BackboneLRMixin, cls), {})
        optimizer.backbone_lr_multiplier = float(backbone_lr_multiplier)
        optimizer.head_variable_paths = frozenset(head_variable_paths)
    return optimizer


def head_variable_paths(model: keras.Model) -> set:
    """Paths of the `logits` head's variables (what a backbone multiplier spares)."""
    return {v.path for layer in head_layers(model) for v in layer.variables}


@dataclasses.dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained with one optimizer and one trainability setting."""

    start: int
    end: int
    optimizer: cfg.OptimizerConfig
    freeze_backbone: bool


def plan_phases(t: cfg.TrainConfig, epochs: int) -> list[Phase]:
    """Split the run at the unfreeze epoch and the optimizer-switch epoch."""
    cuts = sorted({0, epochs} | {e for e in (t.freeze_epochs, t.switch_optimizer_epoch) if 0 < e < epochs})
    if t.switch_optimizer_epoch and t.second_optimizer is None:
        raise ValueError("--switch_optimizer_epoch needs --second_optimizer.")
    phases = []
    for start, end in zip(cuts, cuts[1:]):
        switched = t.switch_optimizer_epoch and start >= t.switch_optimizer_epoch
        phases.append(Phase(start, end, t.second_optimizer if switched else t.optimizer,
                            freeze_backbone=start < t.freeze_epochs))
    return phases


def schedule_for(t: cfg.TrainConfig, opt: cfg.OptimizerConfig, *, epochs: int,
                 steps_per_epoch: int, start_epoch: int, hyperrule=None):
    """The learning-rate schedule of one phase's optimizer, in global steps.

    For `hyperrule`, an explicit optimizer learning rate replaces the rule's
    batch-scaled 0.003; None keeps the rule's.
    """
    if t.schedule == "hyperrule":
        spec = dataclasses.replace(hyperrule, step_offset=start_epoch * steps_per_epoch)
        if opt.learning_rate is not None:
            spec = dataclasses.replace(spec, base_lr=opt.learning_rate)
        return schedules.StepSchedule(spec)
    if opt.learning_rate is None:
        raise ValueError("--learning_rate is required unless --schedule=hyperrule.")
    if t.schedule == "constant" and not t.warmup_epochs:
        return opt.learning_rate
    spec = schedules.from_epochs(
        t.schedule, base_lr=opt.learning_rate, epochs=epochs, steps_per_epoch=steps_per_epoch,
        warmup_epochs=t.warmup_epochs, boundaries_epochs=t.lr_boundaries, decay=t.lr_decay,
        step_offset_epochs=start_epoch)
    return schedules.StepSchedule(spec)


def compile_model(model, optimizer, t: cfg.TrainConfig):
    """Compile with one-hot cross-entropy from logits (label smoothing and MixUp need one-hot)."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=t.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=False)


def _one_hot(ds, num_classes, *, mixup_alpha=0.0, seed=0):
    if ds is None:
        return None
    ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    if mixup_alpha > 0:
        counter = tf.data.Dataset.counter()
        ds = tf.data.Dataset.zip((ds, counter)).map(
            lambda xy, i: mixup(xy[0], xy[1], mixup_alpha, tf.stack([tf.cast(seed, tf.int64), i])),
            num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run reports; also written to summary.json."""

    model_dir: str
    status: str
    epochs_done: int
    best_epoch: Optional[int]
    best_value: Optional[float]
    monitor: str
    test_loss: Optional[float]
    test_accuracy: Optional[float]
    precision: str
    summary: dict


def _seed_everything(t: cfg.TrainConfig):
    keras.utils.set_random_seed(t.seed)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()


def build_model(run: cfg.RunConfig, datasets) -> keras.Model:
    """The run's model for the loaded data (classes, image size, normalization)."""
    model = create_model(run.model.name, num_classes=len(datasets.class_names),
                         image_size=datasets.image_size, weights=run.model.weights,
                         normalization=(datasets.mean, datasets.std), **run.model.options())
    if run.model.init_from:
        from pipeline import init_from
        init_from.load_backbone(model, run.model.init_from)
    return model


def train(run: cfg.RunConfig, *, datasets=None, model=None, extra_callbacks=()) -> TrainResult:
    """Train `run` end to end: data, model, phases, checkpoints, test evaluation.

    Args:
      run: the resolved configuration; `run.model_dir` is created (or resumed).
      datasets: already loaded `pipeline.data.Datasets` (tests, tuner); loaded
        from `run.data` when None.
      model: an already built (uncompiled) model, e.g. from a keras-tuner
        HyperModel; built from `run.model` inside the strategy scope when None.
      extra_callbacks: more Keras callbacks (tuner reporting, histograms); they
        run after the run directory's own callbacks.

    Returns:
      TrainResult.

    Raises:
      TrainingDiverged: the loss became NaN; the best checkpoint is kept.
      rundir.RunDirError, data.DataError, ValueError: bad input, before training.
    """
    t = run.train
    wall_start = time.time()
    rundir.prepare(run.model_dir, resume=run.resume)
    _seed_everything(t)
    policy = precision.apply_precision(t.precision)
    strategy, strategy_name = distribute.resolve_strategy(t.strategy)
    logging.info("precision: %s; strategy: %s (%d replicas)", policy, strategy_name,
                 strategy.num_replicas_in_sync)
    print(f"precision: {policy}; strategy: {strategy_name}", flush=True)

    datasets = datasets or data_lib.load_dataset(run.data)
    num_classes = len(datasets.class_names)
    batch = run.data.batch_size
    steps_per_epoch = t.steps_per_epoch or max(1, math.ceil(datasets.num_train / batch))
    hyperrule = None
    epochs = t.epochs
    if t.schedule == "hyperrule":
        hyperrule = schedules.hyperrule_schedule(datasets.num_train, batch)
        total = t.total_steps or hyperrule.total_steps
        if t.total_steps:
            hyperrule = dataclasses.replace(
                hyperrule, total_steps=total,
                warmup_steps=min(hyperrule.warmup_steps, max(total // 5, 1)),
                boundaries=tuple(int(total * f) for f in (0.3, 0.6, 0.9)))
        epochs = max(1, math.ceil(total / steps_per_epoch))
    elif t.total_steps:
        epochs = max(1, math.ceil(t.total_steps / steps_per_epoch))
    phases = plan_phases(t, epochs)

    _write_run_files(run, datasets)
    train_ds = datasets.train.repeat() if t.steps_per_epoch else datasets.train
    mixup_alpha = t.mixup_alpha
    if mixup_alpha is None:
        mixup_alpha = schedules.hyperrule_mixup(datasets.num_train) if hyperrule else 0.0
    train_ds = _one_hot(train_ds, num_classes, mixup_alpha=mixup_alpha, seed=t.seed)
    val_ds = _one_hot(datasets.val, num_classes)
    monitor = "val_accuracy" if val_ds is not None else "accuracy"

    state = {"epochs_done": 0, "best_value": None, "best_epoch": None}
    ckpt_dir = rundir.path(run.model_dir, rundir.CHECKPOINT_DIR)
    if run.resume:
        state = rundir.read_json(os.path.join(ckpt_dir, rundir.STATE_FILE))
        cbs.MetricsLog(rundir.path(run.model_dir, rundir.METRICS_FILE)).truncate(state["epochs_done"])
        print(f"resuming {run.model_dir} after epoch {state['epochs_done']}", flush=True)

    if model is None:
        with strategy.scope():
            model = build_model(run, datasets)
    checkpoint = cbs.RunCheckpoint(run.model_dir, monitor=monitor, state=state)
    callbacks = [cbs.EpochStats(steps_per_epoch * batch if t.steps_per_epoch else datasets.num_train),
                 checkpoint]
    if t.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(rundir.path(run.model_dir, rundir.TENSORBOARD_DIR),
                                                     write_graph=False))
    callbacks += list(extra_callbacks)
    verbose = t.verbose if t.verbose is not None else (1 if sys.stdout.isatty() else 2)
    summary = _summary(run, datasets, policy, strategy_name, model, status="running",
                       state=state, wall=0.0)
    rundir.write_json_atomic(rundir.path(run.model_dir, rundir.SUMMARY_FILE), summary)

    loaded = not run.resume
    for phase in phases:
        if phase.end <= state["epochs_done"]:
            continue
        with strategy.scope():
            set_backbone_trainable(model, not phase.freeze_backbone)
            lr = schedule_for(t, phase.optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch,
                              start_epoch=phase.start, hyperrule=hyperrule)
            multiplier = 1.0 if phase.freeze_backbone else t.backbone_lr_multiplier
            optimizer = make_optimizer(phase.optimizer, lr, backbone_lr_multiplier=multiplier,
                                       head_variable_paths=head_variable_paths(model))
            compile_model(model, optimizer, t)
            if not loaded:
                model.optimizer.build(model.trainable_variables)
                model.load_weights(os.path.join(ckpt_dir, rundir.LAST_CHECKPOINT))
                loaded = True
        model.fit(train_ds, validation_data=val_ds, epochs=phase.end,
                  initial_epoch=max(phase.start, state["epochs_done"]),
                  steps_per_epoch=t.steps_per_epoch, callbacks=callbacks, verbose=verbose)
        state = checkpoint.state
        if checkpoint.diverged_at:
            break

    status = "diverged" if checkpoint.diverged_at else "completed"
    test_loss = test_acc = None
    best_path = os.path.join(ckpt_dir, rundir.BEST_CHECKPOINT)
    if datasets.test is not None and os.path.exists(best_path):
        _load_model_weights(model, best_path)
        compile_model(model, keras.optimizers.SGD(), t)
        test_loss, test_acc = (float(v) for v in model.evaluate(_one_hot(datasets.test, num_classes), verbose=0))
    summary = _summary(run, datasets, policy, strategy_name, model, status=status, state=state,
                       wall=time.time() - wall_start, test=(test_loss, test_acc))
    rundir.write_json_atomic(rundir.path(run.model_dir, rundir.SUMMARY_FILE), summary)
    if checkpoint.diverged_at:
        raise TrainingDiverged(
            f"Loss became NaN or infinite in epoch {checkpoint.diverged_at}; training stopped. "
            f"The best checkpoint (epoch {state['best_epoch']}) is kept in {ckpt_dir}. "
            "Lower --learning_rate or add --warmup_epochs.")
    print(f"run directory: {run.model_dir}", flush=True)
    return TrainResult(run.model_dir, status, state["epochs_done"], state["best_epoch"],
                       state["best_value"], monitor, test_loss, test_acc, policy, summary)


def _load_model_weights(model, filename):
    """Load model weights only from a `.keras` checkpoint (its optimizer may differ)."""
    saved = keras.saving.load_model(filename, compile=False, safe_mode=False)
    model.set_weights(saved.get_weights())


def _write_run_files(run: cfg.RunConfig, datasets):
    if run.resume:
        return
    if run.flags_text:
        rundir.write_text_atomic(rundir.path(run.model_dir, rundir.FLAGS_FILE), run.flags_text)
    rundir.write_json_atomic(rundir.path(run.model_dir, rundir.CONFIG_FILE), cfg.to_dict(run))
    rundir.write_text_atomic(rundir.path(run.model_dir, rundir.LABELS_FILE),
                             "\n".join(datasets.class_names) + "\n")


def _summary(run, datasets, policy, strategy_name, model, *, status, state, wall, test=(None, None)):
    return {
        "status": status,
        "model": run.model.name,
        "parameters": int(model.count_params()),
        "dataset": datasets.name,
        "num_classes": len(datasets.class_names),
        "image_size": datasets.image_size,
        "split_sizes": {"train": datasets.num_train, "val": datasets.num_val, "test": datasets.num_test},
        "epochs_done": state["epochs_done"],
        "best_epoch": state["best_epoch"],
        "best_val_accuracy": state["best_value"],
        "test_loss": test[0],
        "test_accuracy": test[1],
        "wall_seconds": round(wall, 2),
        "precision": policy,
        "strategy": strategy_name,
        "device": precision.device_description(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def evaluate_checkpoint(model_dir: str, *, split: str = "test", checkpoint: str = "best"):
    """Loss, accuracy, per-class accuracy and confusion matrix of a run's checkpoint.

    Returns a dict with `loss`, `accuracy`, `per_class` (name -> accuracy),
    `confusion` (numpy [classes, classes], rows = true labels), `class_names`.
    """
    run = cfg.from_dict(_require(rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE)), model_dir))
    datasets = data_lib.load_dataset(run.data)
    ds = {"test": datasets.test, "val": datasets.val, "train": None}.get(split)
    if ds is None:
        raise rundir.RunDirError(f"The dataset of {model_dir!r} has no {split!r} split to evaluate.")
    name = rundir.BEST_CHECKPOINT if checkpoint == "best" else rundir.LAST_CHECKPOINT
    filename = rundir.path(model_dir, rundir.CHECKPOINT_DIR, name)
    if not os.path.exists(filename):
        raise rundir.RunDirError(f"{filename} is missing: the run finished no epoch.")
    import pipeline.models  # noqa: F401  (registers custom layers for loading)
    model = keras.saving.load_model(filename, compile=False, safe_mode=False)
    labels, logits = [], []
    for x, y in ds:
        logits.append(model(x, training=False).numpy().astype(np.float32))
        labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    n = len(datasets.class_names)
    loss = float(keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)).mean())
    preds = logits.argmax(-1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_class = {name: float(confusion[i, i] / max(confusion[i].sum(), 1))
                 for i, name in enumerate(datasets.class_names)}
    return {"loss": loss, "accuracy": float((preds == labels).mean()), "per_class": per_class,
            "confusion": confusion, "class_names": list(datasets.class_names), "examples": int(len(labels))}


def _require(value, model_dir):
    if value is None:
        raise rundir.RunDirError(f"{model_dir!r} is not a run directory (no {rundir.CONFIG_FILE}).")
    return value
