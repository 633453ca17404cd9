"""Train a model from a RunConfig under any tf.distribute strategy, writing the run directory.

One entry, `train(run)`, used by `pipeline.train`, `pipeline.finetune` and the
tuner, and one loop for every strategy (`pipeline.training.loop`: a compiled
`strategy.run` step driving the Keras callbacks like `fit`; Keras 3's `fit`
itself fails under MultiWorkerMirroredStrategy). `_train` reads as the recipe:
the data, the step budget, the inputs, the model, the callbacks, the phases
(`pipeline.training.phases`), then the test evaluation and the summary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import keras
import tensorflow as tf
from absl import logging

from pipeline import config as cfg
from pipeline import data, errors, rundir, validation
from pipeline.data import inspection
from pipeline.models import create_model, weights_provenance
from pipeline.models.pretrained import set_backbone_trainable
from pipeline.models.stages import layer_decay_multipliers
from pipeline.training import callbacks as cbs
from pipeline.training import distribute, inputs, phases, precision, tensorboard
from pipeline.training import feature_cache, memory, remat
from pipeline.training import loop as loop_lib
from pipeline.training import budget as time_budget, eta  # the run's clock and --hyperrule_steps (issue 20)
from pipeline.training.evaluation import load_model_weights
from pipeline.training.optimizers import head_variable_paths, make_optimizer

TrainingDiverged = cbs.TrainingDiverged


def compile_model(model, optimizer, t: cfg.TrainConfig):
    """Compile with one-hot cross-entropy from logits (label smoothing and MixUp need one-hot)."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=t.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=False)


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

    Every strategy takes the same path (`pipeline.training.loop.Loop`: a
    compiled `strategy.run` step over a distributed dataset, driving the Keras
    callbacks like `fit`). The strategy is resolved first, before TensorFlow
    runs any op (a multi-worker strategy and logical devices require that). In
    a multi-worker job only the chief writes `run.model_dir`; the other tasks
    run the same saves (they may be collective) into a temporary directory
    that is removed at the end, and on `run.resume` every task restores from
    the chief's `checkpoints/` (so the run directory must be on storage every
    task can read).

    Args:
      run: the resolved configuration; `run.model_dir` is created (or resumed).
      datasets: already loaded `pipeline.data` Datasets (tests, tuner); loaded
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
      rundir.RunDirError, DataError, ValueError: bad input, before training
        (also: the run directory is locked by another process, or its last
        checkpoint is unreadable or of another model).
      errors.RunInterrupted: Ctrl-C; summary.json says "interrupted".
      errors.TransientError: the disk filled up while writing the run.
    """
    wall_start = time.time()
    t = run.train
    strategy, strategy_name = distribute.resolve_strategy(t.strategy, tpu=t.tpu)
    role = distribute.worker_role(strategy)
    distribute.per_replica_batch(run.data.batch_size, strategy.num_replicas_in_sync)
    lock = None
    if role.is_chief or run.resume:  # non-chiefs only check (resume), and take no lock
        lock = rundir.prepare(run.model_dir, resume=run.resume, config=cfg.to_dict(run), lock=role.is_chief)
    job = _Job(run, strategy, strategy_name, role, run.model_dir, wall_start)
    if role.is_chief:
        try:
            return _train(job, datasets=datasets, model=model, extra_callbacks=extra_callbacks)
        finally:
            lock.release()
    job.write_dir = tempfile.mkdtemp(prefix=f"pipeline-{role.task_type}{role.task_id}-")
    print(f"{role.task_type} {role.task_id} of {role.num_workers} tasks: the chief writes "
          f"{run.model_dir}; this task's copies go to {job.write_dir} (removed at the end)", flush=True)
    try:
        if run.resume:  # start from the chief's best too, so every task evaluates the same weights
            best = rundir.committed_checkpoint(run.model_dir, "best")
            if os.path.exists(best):
                os.makedirs(rundir.path(job.write_dir, rundir.CHECKPOINT_DIR), exist_ok=True)
                shutil.copyfile(best, rundir.checkpoint_file(job.write_dir, "best"))
        return _train(job, datasets=datasets, model=model, extra_callbacks=extra_callbacks)
    finally:
        shutil.rmtree(job.write_dir, ignore_errors=True)


@dataclasses.dataclass
class _Job:
    """Where and how this task trains: the run, its strategy, this task's role and output dir."""

    run: cfg.RunConfig
    strategy: tf.distribute.Strategy
    strategy_name: str
    role: distribute.WorkerRole
    write_dir: str
    wall_start: float
    policy: str = ""
    dist: dict = dataclasses.field(default_factory=dict)
    weights: Optional[dict] = None  # where the model's pretrained weights came from
    clock: Optional[eta.RunClock] = None  # the run's estimate, ETA and time budget


def _train(job: _Job, *, datasets, model, extra_callbacks) -> TrainResult:
    """`train` after the strategy and the directory this task writes are known."""
    run, t = job.run, job.run.train
    seed_everything(t)
    job.policy = precision.apply_precision(t.precision)
    job.dist = _distribution(job)
    datasets, drop_remainder = _datasets(job, datasets)
    budget = time_budget.step_budget(t, num_train=datasets.num_train, batch_size=run.data.batch_size,
                                     drop_remainder=drop_remainder)
    validation.check_against_data(run, datasets.num_train, budget.epochs)  # before any build or write
    inspection.check_before_training(run.data, job.write_dir, resume=run.resume)  # folders: <run>/data_report/
    _write_run_files(run, datasets, job.write_dir)
    num_classes = len(datasets.class_names)
    val_ds = inputs.one_hot(datasets.val, num_classes)
    monitor = t.best_metric if val_ds is not None else "accuracy"
    state = _resume_state(job)
    model = _model_in_scope(job, datasets, model)
    job.weights = weights_provenance(run.model.name, run.model.weights)
    recipes = loop_lib.recipe_options(t, model, job.strategy, datasets)  # EMA, clipping, accumulation, weights
    checkpoint = cbs.RunCheckpoint(job.write_dir, monitor=monitor, state=state, ema=recipes["ema"])
    callbacks = _callbacks(job, datasets, budget, checkpoint, extra_callbacks)
    runner = loop_lib.Loop(remat.for_training(model, t.remat), job.strategy, label_smoothing=t.label_smoothing,
                           **recipes)  # --remat: the loop runs the model as checkpointed blocks
    runner = feature_cache.cached_runner(run, runner, model, datasets, write_dir=job.write_dir, policy=job.policy,
                                         mixup_alpha=phases.mixup_alpha(t, budget, datasets.num_train))
    train_data = inputs.epoch_data(t, runner, datasets, budget)

    begun = []

    def started():  # after a resume loaded its checkpoint: only now does the run directory change
        begun.append(True)
        if job.role.is_chief and run.resume:
            cbs.MetricsLog(rundir.path(run.model_dir, rundir.METRICS_FILE)).truncate(state["epochs_done"])
        _write_summary(job, datasets, model, status="running", state=state)
    with _one_line_faults(job, checkpoint, lambda: begun and _write_summary(
            job, datasets, model, status="interrupted", state=checkpoint.state)):
        _run_phases(job, runner, model, budget, callbacks, checkpoint, (train_data, val_ds), started)
    state = checkpoint.state
    test = _test_evaluation(job, runner, model, datasets, state)
    status = "diverged" if checkpoint.diverged_at else job.clock.status("completed")
    summary = _write_summary(job, datasets, model, status=status, state=state, test=test)
    if checkpoint.diverged_at:
        kept = (f"The best checkpoint (epoch {state['best_epoch']}) is kept in "
                f"{rundir.path(run.model_dir, rundir.CHECKPOINT_DIR)}." if state["best_epoch"] is not None
                else "No epoch finished with finite weights, so no checkpoint is kept.")
        raise TrainingDiverged(
            f"Loss became NaN or infinite in epoch {checkpoint.diverged_at}; training stopped. {kept} "
            "Lower --learning_rate or add --warmup_epochs.")
    if job.role.is_chief:
        print(f"run directory: {run.model_dir}", flush=True)
    return TrainResult(run.model_dir, status, state["epochs_done"], state["best_epoch"],
                       state["best_value"], monitor, test[0], test[1], job.policy, summary,
                       is_chief=job.role.is_chief)


@contextlib.contextmanager
def _one_line_faults(job: _Job, checkpoint, record_interrupted):
    """Ctrl-C and a full disk during training as one line naming the command that continues.

    Ctrl-C records "interrupted" in summary.json (`record_interrupted`) and
    raises errors.RunInterrupted; ENOSPC raises errors.TransientError. The
    last committed epoch is kept either way.
    """
    resume = rundir.resume_command(job.run.model_dir, job.run.flags_text)
    try:
        yield
    except errors.RunInterrupted:
        raise
    except KeyboardInterrupt:
        checkpoint.flush()  # the epochs finished since the last commit (deferred commits) are kept
        record_interrupted()
        raise errors.RunInterrupted(f"interrupted after epoch {checkpoint.state['epochs_done']}; "
                                    f"resume with: {resume}") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise errors.TransientError(f"disk full while writing {e.filename}; free space and resume with: "
                                    f"{resume}") from None


def _distribution(job: _Job) -> dict:
    """The distribution facts of the summary (strategy, replicas, per-replica batch, lr scale), announced."""
    t, role = job.run.train, job.role
    replicas = job.strategy.num_replicas_in_sync
    dist = {"strategy": job.strategy_name, "replicas": replicas, "workers": role.num_workers,
            "per_replica_batch": distribute.per_replica_batch(job.run.data.batch_size, replicas),
            "lr_scaling": t.lr_scaling, "lr_scale": distribute.lr_scale(t.lr_scaling, replicas)}
    logging.info("precision: %s; distribution: %s", job.policy, dist)
    workers = f", {role.num_workers} workers" if role.num_workers > 1 else ""
    print(f"precision: {job.policy}; strategy: {job.strategy_name} ({replicas} replicas{workers}, "
          f"per-replica batch {dist['per_replica_batch']})", flush=True)
    return dist


def _datasets(job: _Job, datasets):
    """The run's data (loaded unless given) and whether its training batches are all full.

    Several replicas split every training batch: a short last batch could leave
    a replica without examples (BatchNorm on an empty batch is NaN), so drop it.
    """
    config = job.run.data
    drop_remainder = datasets is None and (job.dist["replicas"] > 1 or job.strategy_name == "tpu")
    datasets = datasets or data.load_dataset(
        dataclasses.replace(config, drop_remainder=config.drop_remainder or drop_remainder))
    return datasets, drop_remainder or config.drop_remainder


def _resume_state(job: _Job) -> dict:
    """Epochs done and the best epoch so far: fresh, or (resume) the chief's checkpoint state."""
    run = job.run
    if not run.resume:
        return {"epochs_done": 0, "best_value": None, "best_epoch": None}
    state = rundir.read_json(rundir.path(run.model_dir, rundir.CHECKPOINT_DIR, rundir.STATE_FILE))
    print(f"resuming {run.model_dir} after epoch {state['epochs_done']}", flush=True)
    return state


def _model_in_scope(job: _Job, datasets, model):
    """The run's model, built in the strategy's scope, or the given one checked to be built there."""
    if model is None:
        with job.strategy.scope():
            return build_model(job.run, datasets)
    if model.weights and not job.strategy.extended.variable_created_in_scope(model.weights[0].value):
        raise ValueError(f"The model passed to train() was built outside the {job.strategy_name!r} "
                         "strategy's scope: build it in `distribute.resolve_strategy(...)[0].scope()` "
                         "or let train() build it.")
    return model


def _callbacks(job: _Job, datasets, budget: phases.StepBudget, checkpoint, extra_callbacks) -> list:
    """Epoch statistics, the run checkpoint, TensorBoard (scalars, insight), then the caller's."""
    t = job.run.train
    images = budget.steps_per_epoch * job.run.data.batch_size if budget.full_batches else datasets.num_train
    job.clock = eta.clock_for_run(job.run, budget, datasets, wall_start=job.wall_start)
    callbacks = [cbs.EpochStats(images), job.clock, checkpoint,
                 memory.MemoryForecast(job.run.data.batch_size, remat=t.remat)]
    if t.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(rundir.path(job.write_dir, rundir.TENSORBOARD_DIR),
                                                     write_graph=False))
        callbacks.append(tensorboard.callback_for_run(job.write_dir, datasets, histogram_freq=t.histogram_freq,
                                                      label_smoothing=t.label_smoothing))
    return callbacks + list(extra_callbacks)


def _compile_phase(job: _Job, model, phase: phases.Phase, budget: phases.StepBudget, *, restore: bool):
    """Set the phase's trainability and optimizer (a recompile); on resume, restore the last checkpoint."""
    t = job.run.train
    with job.strategy.scope():
        set_backbone_trainable(model, not phase.freeze_backbone)
        lr = phases.schedule_for(t, phase.optimizer, epochs=budget.epochs,
                                 steps_per_epoch=budget.steps_per_epoch, start_epoch=phase.start,
                                 hyperrule=budget.hyperrule, lr_scale=job.dist["lr_scale"])
        multiplier = 1.0 if phase.freeze_backbone else t.backbone_lr_multiplier
        optimizer = make_optimizer(phase.optimizer, lr, backbone_lr_multiplier=multiplier,
                                   head_variable_paths=head_variable_paths(model),
                                   variable_lr_multipliers=layer_decay_multipliers(  # issue 16
                                       model, job.run.model.name, t.layer_decay))
        if job.policy == "mixed_float16":  # dynamic loss scaling (compile would add it too)
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # The loop trains; compile attaches the optimizer (saved in checkpoints, read by
        # callbacks) and any steps_per_execution the loop should honour.
        compile_model(model, optimizer, t)
        if restore:
            model.optimizer.build(model.trainable_variables)
            _restore(model, job.run.model_dir)


def _restore(model, model_dir: str) -> None:
    """Load the committed last checkpoint (weights and optimizer); one line if it cannot be read."""
    filename = rundir.committed_checkpoint(model_dir, "last")
    try:
        model.load_weights(filename)
    except Exception as e:  # a truncated zip, another architecture: Keras's messages run to 200 lines
        raise rundir.RunDirError(f"Cannot resume {model_dir!r}: its last checkpoint {filename} does not load "
                                 f"({errors.short_reason(e, 160)}); start a new run in another --model_dir."
                                 ) from None


def _run_phases(job: _Job, runner, model, budget: phases.StepBudget, callbacks, checkpoint, datasets,
                started):
    """Train every phase not finished yet, epoch by epoch, until done, stopped or diverged.

    `started()` is called once, after the first phase is compiled (and, on resume, restored).
    """
    t = job.run.train
    train_data, val_ds = datasets
    val_dist = runner.distribute(val_ds)
    verbose = t.verbose if t.verbose is not None else (1 if sys.stdout.isatty() else 2)
    callback_list = loop_lib.callback_list(callbacks, model=model, epochs=budget.epochs,
                                           steps=budget.steps_per_epoch, verbose=verbose)
    model.stop_training = False
    restore, begun, logs = job.run.resume, False, None
    if job.clock is not None:
        job.clock.begin()  # training time includes the first phase's compile and a feature cache's pass
    try:
        for phase in phases.plan_phases(t, budget.epochs):
            if phase.end <= checkpoint.state["epochs_done"]:
                continue
            _compile_phase(job, model, phase, budget, restore=restore)
            if restore and checkpoint.ema is not None:  # the checkpoint holds the average: raw weights, count
                checkpoint.ema.resume(rundir.committed_checkpoint(job.run.model_dir, "last"))
            restore = False
            runner.set_optimizer(model.optimizer)
            # A head on cached features: commit once a minute (and at the phase's end), not every 0.2 s epoch.
            checkpoint.defer_commits(runner.epoch_variables() if job.role.num_workers == 1 else None)
            if not begun:
                started()
                callback_list.on_train_begin()
                begun = True
            for epoch in range(max(phase.start, checkpoint.state["epochs_done"]), phase.end):
                logs = runner.train_epoch(epoch, train_data(epoch), callbacks=callback_list,
                                          steps_per_epoch=budget.steps_per_epoch, validation=val_dist,
                                          validation_steps=loop_lib.steps_of(val_ds))
                if model.stop_training:
                    break
            checkpoint.flush()  # the phase's deferred epochs, before the next phase changes the optimizer
            model.optimizer.finalize_variable_values(model.trainable_variables)
            if checkpoint.diverged_at or model.stop_training:
                break
        if begun:
            callback_list.on_train_end(logs)
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError):
        workers = job.role.num_workers
        if workers > 1:
            print(f"error: a task of the {workers}-worker cluster failed; restart every task "
                  f"with --resume to continue after epoch {checkpoint.state['epochs_done']}.",
                  file=sys.stderr, flush=True)
        raise


def _test_evaluation(job: _Job, runner, model, datasets, state) -> tuple:
    """(test loss, test accuracy) of the best checkpoint, or (None, None) without a test split or best."""
    best_path = rundir.checkpoint_file(job.write_dir, "best")
    if datasets.test is None or state["best_epoch"] is None or not os.path.exists(best_path):
        return None, None
    load_model_weights(model, best_path)
    test_ds = inputs.one_hot(datasets.test, len(datasets.class_names))
    test = runner.evaluate(runner.distribute(test_ds), steps=loop_lib.steps_of(test_ds))
    return test["loss"], test["accuracy"]


def _write_run_files(run: cfg.RunConfig, datasets, write_dir: str):
    if run.resume:
        return
    if run.flags_text:
        rundir.write_text_atomic(rundir.path(write_dir, rundir.FLAGS_FILE), run.flags_text)
    rundir.write_json_atomic(rundir.path(write_dir, rundir.CONFIG_FILE), cfg.to_dict(run))
    rundir.write_text_atomic(rundir.path(write_dir, rundir.LABELS_FILE),
                             "\n".join(datasets.class_names) + "\n")


def _best_fields(write_dir: str, state: dict) -> dict:
    """The best epoch, the `--best_metric` that chose it and its value, and that epoch's val_accuracy."""
    metric = state.get("best_metric", "val_accuracy")
    val_accuracy = state["best_value"] if metric == "val_accuracy" else None
    if val_accuracy is None and state["best_epoch"] is not None:  # chosen by val_macro_f1 or val_loss
        rows = [r for r in rundir.read_metrics(write_dir) if r["epoch"] == state["best_epoch"]]
        val_accuracy = rows[0].get("val_accuracy") if rows else None
    return {"best_epoch": state["best_epoch"], "best_metric": metric, "best_value": state["best_value"],
            "best_val_accuracy": val_accuracy}


def _write_summary(job: _Job, datasets, model, *, status, state, test=(None, None)) -> dict:
    """Write summary.json (while running, and at the end); returns it."""
    run = job.run
    wall = time.time() - job.wall_start if status != "running" else 0.0
    summary = {
        "status": status,
        "model": run.model.name,
        "parameters": int(model.count_params()),
        "dataset": datasets.name,
        "num_classes": len(datasets.class_names),
        "image_size": datasets.image_size,
        "split_sizes": {"train": datasets.num_train, "val": datasets.num_val, "test": datasets.num_test},
        "epochs_done": state["epochs_done"],
        **_best_fields(job.write_dir, state),
        "test_loss": test[0],
        "test_accuracy": test[1],
        "wall_seconds": round(wall, 2),
        "time": job.clock.summary() if job.clock else None,  # estimate, step time, budget (eta.RunClock)
        "weights": job.weights,
        "precision": job.policy,
        **job.dist,
        "device": precision.device_description(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        **memory.summary_fields(),  # peak resident memory (and GPUs' peaks) so far
    }
    rundir.write_json_atomic(rundir.path(job.write_dir, rundir.SUMMARY_FILE), summary)
    return summary
