"""Train a model from a RunConfig under any tf.distribute strategy, writing the run directory.

One entry, `train(run)`, used by `pipeline.train`, `pipeline.finetune` and the
tuner, and one loop for every strategy (`pipeline.loop`: a compiled
`strategy.run` step driving the Keras callbacks like `fit`; Keras 3's `fit`
itself fails under MultiWorkerMirroredStrategy). A run is a list of *phases*
(frozen-backbone epochs, then the first optimizer, then an optional second
optimizer); each phase continues the global epoch count and the global
learning-rate schedule, so a mid-run optimizer switch or an unfreeze is a
recompile, not a second loop.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pipeline.training import callbacks as cbs
from pipeline.training import tensorboard as insight
from pipeline import config as cfg
from pipeline.data import sources as data_lib
from pipeline.training import distribute
from pipeline.training import precision
from pipeline import rundir
from pipeline.training import schedules
from pipeline.training import loop as loop_lib
from pipeline.data.augment import mixup
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
                 steps_per_epoch: int, start_epoch: int, hyperrule=None, lr_scale: float = 1.0):
    """The learning-rate schedule of one phase's optimizer, in global steps.

    For `hyperrule`, an explicit optimizer learning rate replaces the rule's
    batch-scaled 0.003; None keeps the rule's. `lr_scale` multiplies the
    result (`--lr_scaling`, see `distribute.lr_scale`).
    """
    return scale_learning_rate(_schedule(t, opt, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                         start_epoch=start_epoch, hyperrule=hyperrule), lr_scale)


def scale_learning_rate(lr, factor: float):
    """A float learning rate or a `schedules.StepSchedule` times `factor`."""
    if factor == 1.0:
        return lr
    if isinstance(lr, schedules.StepSchedule):
        return schedules.StepSchedule(dataclasses.replace(lr.spec, base_lr=lr.spec.base_lr * factor))
    return lr * factor


def _schedule(t, opt, *, epochs, steps_per_epoch, start_epoch, hyperrule):
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
    """What a finished (or stopped) run reports; also written to summary.json.

    `model_dir` is the run directory (the chief's); `is_chief` is False in the
    other tasks of a multi-worker job, whose files went to a removed temp dir.
    """

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
    is_chief: bool = True


def seed_everything(t: cfg.TrainConfig):
    """Seed Keras/NumPy/Python (and op determinism); shared with the tuner's build(hp)."""
    keras.utils.set_random_seed(t.seed)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()


def build_model(run: cfg.RunConfig, datasets) -> keras.Model:
    """The run's model for the loaded data (classes, image size, normalization)."""
    model = create_model(run.model.name, num_classes=len(datasets.class_names),
                         image_size=datasets.image_size, weights=run.model.weights,
                         normalization=(datasets.mean, datasets.std), **run.model.options())
    if run.model.init_from:
        from pipeline.training import init_from
        init_from.load_backbone(model, run.model.init_from)
    return model


def train(run: cfg.RunConfig, *, datasets=None, model=None, extra_callbacks=()) -> TrainResult:
    """Train `run` end to end: data, model, phases, checkpoints, test evaluation.

    Every strategy takes the same path (`pipeline.loop.Loop`: a compiled
    `strategy.run` step over a distributed dataset, driving the Keras callbacks
    like `fit`). The strategy is resolved first, before TensorFlow runs any op
    (a multi-worker strategy and logical devices require that). In a
    multi-worker job only the chief writes `run.model_dir`; the other tasks
    run the same saves (they may be collective) into a temporary directory
    that is removed at the end, and on `run.resume` every task restores from
    the chief's `checkpoints/` (so the run directory must be on storage every
    task can read).

    Args:
      run: the resolved configuration; `run.model_dir` is created (or resumed).
      datasets: already loaded `pipeline.data.Datasets` (tests, tuner); loaded
        from `run.data` when None.
      model: an already built (uncompiled) model, e.g. from a keras-tuner
        HyperModel, whose variables were made in this run's strategy scope
        (`distribute.resolve_strategy(...)` returns the same cached strategy);
        built from `run.model` inside the strategy scope when None.
      extra_callbacks: more Keras callbacks (tuner reporting, histograms); they
        run after the run directory's own callbacks.

    Returns:
      TrainResult.

    Raises:
      TrainingDiverged: the loss became NaN; the best checkpoint is kept.
      rundir.RunDirError, data.DataError, ValueError: bad input, before training.
    """
    wall_start = time.time()
    t = run.train
    strategy, strategy_name = distribute.resolve_strategy(t.strategy, tpu=t.tpu)
    role = distribute.worker_role(strategy)
    distribute.per_replica_batch(run.data.batch_size, strategy.num_replicas_in_sync)
    if role.is_chief or run.resume:
        rundir.prepare(run.model_dir, resume=run.resume)  # non-chiefs only check (resume)
    if role.is_chief:
        return _train(run, strategy, strategy_name, role, run.model_dir, datasets=datasets, model=model,
                      extra_callbacks=extra_callbacks, wall_start=wall_start)
    write_dir = tempfile.mkdtemp(prefix=f"pipeline-{role.task_type}{role.task_id}-")
    print(f"{role.task_type} {role.task_id} of {role.num_workers} tasks: the chief writes "
          f"{run.model_dir}; this task's copies go to {write_dir} (removed at the end)", flush=True)
    try:
        if run.resume:  # start from the chief's best too, so every task evaluates the same weights
            best = rundir.path(run.model_dir, rundir.CHECKPOINT_DIR, rundir.BEST_CHECKPOINT)
            if os.path.exists(best):
                os.makedirs(rundir.path(write_dir, rundir.CHECKPOINT_DIR), exist_ok=True)
                shutil.copyfile(best, rundir.path(write_dir, rundir.CHECKPOINT_DIR, rundir.BEST_CHECKPOINT))
        return _train(run, strategy, strategy_name, role, write_dir, datasets=datasets, model=model,
                      extra_callbacks=extra_callbacks, wall_start=wall_start)
    finally:
        shutil.rmtree(write_dir, ignore_errors=True)


def _train(run, strategy, strategy_name, role, write_dir, *, datasets, model, extra_callbacks,
           wall_start) -> TrainResult:
    """`train` after the strategy and the directory this task writes are known."""
    t = run.train
    seed_everything(t)
    policy = precision.apply_precision(t.precision)
    replicas = strategy.num_replicas_in_sync
    batch = run.data.batch_size
    dist = {"strategy": strategy_name, "replicas": replicas, "workers": role.num_workers,
            "per_replica_batch": distribute.per_replica_batch(batch, replicas),
            "lr_scaling": t.lr_scaling, "lr_scale": distribute.lr_scale(t.lr_scaling, replicas)}
    logging.info("precision: %s; distribution: %s", policy, dist)
    workers = f", {role.num_workers} workers" if role.num_workers > 1 else ""
    print(f"precision: {policy}; strategy: {strategy_name} ({replicas} replicas{workers}, "
          f"per-replica batch {dist['per_replica_batch']})", flush=True)

    # Several replicas split every training batch: a short last batch could leave a
    # replica without examples (BatchNorm on an empty batch is NaN), so drop it.
    drop_remainder = datasets is None and (replicas > 1 or strategy_name == "tpu")
    datasets = datasets or data_lib.load_dataset(
        dataclasses.replace(run.data, drop_remainder=run.data.drop_remainder or drop_remainder))
    drop_remainder = drop_remainder or run.data.drop_remainder
    num_classes = len(datasets.class_names)
    if t.steps_per_epoch:
        steps_per_epoch = t.steps_per_epoch
    elif drop_remainder:
        steps_per_epoch = datasets.num_train // batch
        if not steps_per_epoch:
            raise ValueError(f"--batch_size={batch} is larger than the {datasets.num_train} training "
                             "examples: no full batch to split over the replicas.")
    else:
        steps_per_epoch = max(1, math.ceil(datasets.num_train / batch))
    full_batches = t.steps_per_epoch or drop_remainder
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

    _write_run_files(run, datasets, write_dir)
    train_ds = datasets.train.repeat() if t.steps_per_epoch else datasets.train
    mixup_alpha = t.mixup_alpha
    if mixup_alpha is None:
        mixup_alpha = schedules.hyperrule_mixup(datasets.num_train) if hyperrule else 0.0
    train_ds = _one_hot(train_ds, num_classes, mixup_alpha=mixup_alpha, seed=t.seed)
    val_ds = _one_hot(datasets.val, num_classes)
    monitor = "val_accuracy" if val_ds is not None else "accuracy"

    state = {"epochs_done": 0, "best_value": None, "best_epoch": None}
    ckpt_dir = rundir.path(run.model_dir, rundir.CHECKPOINT_DIR)  # what every task restores from
    if run.resume:
        state = rundir.read_json(os.path.join(ckpt_dir, rundir.STATE_FILE))
        if role.is_chief:
            cbs.MetricsLog(rundir.path(run.model_dir, rundir.METRICS_FILE)).truncate(state["epochs_done"])
        print(f"resuming {run.model_dir} after epoch {state['epochs_done']}", flush=True)

    if model is None:
        with strategy.scope():
            model = build_model(run, datasets)
    elif model.weights and not strategy.extended.variable_created_in_scope(model.weights[0].value):
        raise ValueError(f"The model passed to train() was built outside the {strategy_name!r} "
                         "strategy's scope: build it in `distribute.resolve_strategy(...)[0].scope()` "
                         "or let train() build it.")
    checkpoint = cbs.RunCheckpoint(write_dir, monitor=monitor, state=state)
    callbacks = [cbs.EpochStats(steps_per_epoch * batch if full_batches else datasets.num_train),
                 checkpoint]
    if t.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(rundir.path(write_dir, rundir.TENSORBOARD_DIR),
                                                     write_graph=False))
        callbacks.append(insight.callback_for_run(write_dir, datasets, histogram_freq=t.histogram_freq,
                                                  label_smoothing=t.label_smoothing))
    callbacks += list(extra_callbacks)
    verbose = t.verbose if t.verbose is not None else (1 if sys.stdout.isatty() else 2)
    summary = _summary(run, datasets, policy, dist, model, status="running", state=state, wall=0.0)
    rundir.write_json_atomic(rundir.path(write_dir, rundir.SUMMARY_FILE), summary)

    runner = loop_lib.Loop(model, strategy, label_smoothing=t.label_smoothing)
    train_dist, val_dist = runner.distribute(train_ds), runner.distribute(val_ds)
    callback_list = loop_lib.callback_list(callbacks, model=model, epochs=epochs, steps=steps_per_epoch,
                                           verbose=verbose)
    model.stop_training = False
    loaded = not run.resume
    logs = None
    started = False
    try:
        for phase in phases:
            if phase.end <= state["epochs_done"]:
                continue
            with strategy.scope():
                set_backbone_trainable(model, not phase.freeze_backbone)
                lr = schedule_for(t, phase.optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                  start_epoch=phase.start, hyperrule=hyperrule, lr_scale=dist["lr_scale"])
                multiplier = 1.0 if phase.freeze_backbone else t.backbone_lr_multiplier
                optimizer = make_optimizer(phase.optimizer, lr, backbone_lr_multiplier=multiplier,
                                           head_variable_paths=head_variable_paths(model))
                if policy == "mixed_float16":  # dynamic loss scaling (compile would add it too)
                    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
                # The loop trains; compile attaches the optimizer (saved in checkpoints, read by
                # callbacks) and any steps_per_execution the loop should honour.
                compile_model(model, optimizer, t)
                if not loaded:
                    model.optimizer.build(model.trainable_variables)
                    model.load_weights(os.path.join(ckpt_dir, rundir.LAST_CHECKPOINT))
                    loaded = True
            runner.set_optimizer(model.optimizer)
            if not started:
                callback_list.on_train_begin()
                started = True
            for epoch in range(max(phase.start, state["epochs_done"]), phase.end):
                logs = runner.train_epoch(epoch, train_dist, callbacks=callback_list,
                                          steps_per_epoch=steps_per_epoch, validation=val_dist,
                                          validation_steps=loop_lib.steps_of(val_ds),
                                          repeat=bool(t.steps_per_epoch))
                if model.stop_training:
                    break
            model.optimizer.finalize_variable_values(model.trainable_variables)
            state = checkpoint.state
            if checkpoint.diverged_at or model.stop_training:
                break
        if started:
            callback_list.on_train_end(logs)
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError):
        if role.num_workers > 1:
            print(f"error: a task of the {role.num_workers}-worker cluster failed; restart every task "
                  f"with --resume to continue after epoch {checkpoint.state['epochs_done']}.",
                  file=sys.stderr, flush=True)
        raise
    state = checkpoint.state

    status = "diverged" if checkpoint.diverged_at else "completed"
    test_loss = test_acc = None
    best_path = rundir.path(write_dir, rundir.CHECKPOINT_DIR, rundir.BEST_CHECKPOINT)
    if datasets.test is not None and state["best_epoch"] is not None and os.path.exists(best_path):
        _load_model_weights(model, best_path)
        test_ds = _one_hot(datasets.test, num_classes)
        test = runner.evaluate(runner.distribute(test_ds), steps=loop_lib.steps_of(test_ds))
        test_loss, test_acc = test["loss"], test["accuracy"]
    summary = _summary(run, datasets, policy, dist, model, status=status, state=state,
                       wall=time.time() - wall_start, test=(test_loss, test_acc))
    rundir.write_json_atomic(rundir.path(write_dir, rundir.SUMMARY_FILE), summary)
    if checkpoint.diverged_at:
        raise TrainingDiverged(
            f"Loss became NaN or infinite in epoch {checkpoint.diverged_at}; training stopped. "
            f"The best checkpoint (epoch {state['best_epoch']}) is kept in {ckpt_dir}. "
            "Lower --learning_rate or add --warmup_epochs.")
    if role.is_chief:
        print(f"run directory: {run.model_dir}", flush=True)
    return TrainResult(run.model_dir, status, state["epochs_done"], state["best_epoch"],
                       state["best_value"], monitor, test_loss, test_acc, policy, summary,
                       is_chief=role.is_chief)


def _load_model_weights(model, filename):
    """Load model weights only from a `.keras` checkpoint (its optimizer may differ)."""
    saved = keras.saving.load_model(filename, compile=False, safe_mode=False)
    model.set_weights(saved.get_weights())


def _write_run_files(run: cfg.RunConfig, datasets, write_dir: str):
    if run.resume:
        return
    if run.flags_text:
        rundir.write_text_atomic(rundir.path(write_dir, rundir.FLAGS_FILE), run.flags_text)
    rundir.write_json_atomic(rundir.path(write_dir, rundir.CONFIG_FILE), cfg.to_dict(run))
    rundir.write_text_atomic(rundir.path(write_dir, rundir.LABELS_FILE),
                             "\n".join(datasets.class_names) + "\n")


def _summary(run, datasets, policy, dist, model, *, status, state, wall, test=(None, None)):
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
        **dist,
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
