"""keras-tuner over the pipeline's own trainer: every trial is a normal run directory.

`PipelineHyperModel.build(hp)` is `trainer.build_model` for the trial's
RunConfig and its `fit` is `trainer.train` into `<tune_dir>/trials/<trial_id>`
(metrics.csv, flags.cfg, checkpoints, summary.json). `PipelineTuner` runs the
trials through keras-tuner's documented `Tuner.run_trial` override;
`make_tuner` picks the oracle (random, hyperband, bayesian, grid), resumable
from `<tune_dir>/keras_tuner` and distributable with keras-tuner's chief/worker
protocol (`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import os
import shutil
from typing import Any, Mapping, Optional

import keras
import keras_tuner as kt

import pipeline.models
from pipeline import config as cfg
from pipeline import data, rundir
from pipeline.training import distribute, precision, trainer
from pipeline.training.callbacks import TrainingDiverged
from pipeline.tuning import kt_adapter, layout
from pipeline.tuning.overrides import apply_overrides, override_flags_text
from pipeline.tuning.space import SearchSpace

TUNERS = layout.TUNERS
HYPERBAND_FACTOR = 3


def prepare_trial_dir(model_dir: str) -> str:
    """What to do with a trial's run directory: `new`, `resume` or `done`.

    A trial re-run after an interruption (the oracle retries trials that were
    running when the search stopped) finds its directory: a finished run is
    reported as it is, a run with a finished epoch resumes from it, and a run
    interrupted before its first epoch holds nothing worth keeping and is removed.
    """
    summary = rundir.read_json(rundir.path(model_dir, rundir.SUMMARY_FILE)) or {}
    if summary.get("status") in ("completed", "diverged"):
        return "done"
    if os.path.exists(rundir.path(model_dir, rundir.CHECKPOINT_DIR, rundir.STATE_FILE)):
        return "resume"
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    return "new"


def best_epoch_metrics(model_dir: str, objective: str) -> Optional[dict]:
    """Metrics of the epoch best by `objective` in metrics.csv (ties go to the later epoch), or None."""
    best = rundir.best_row(rundir.read_metrics(model_dir), objective)
    if best is None:
        return None
    out = {k: float(best[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1")
           if best.get(k) is not None}
    out["best_epoch"] = float(best["epoch"])
    return out


class PipelineHyperModel(kt.HyperModel):
    """keras-tuner HyperModel over `trainer.build_model` and `trainer.train`.

    Args:
      base: the untuned RunConfig (its `flags_text` is the base of every trial's flags.cfg).
      space: the SearchSpace (see `make_search_space`).
      tune_dir: the search directory; trial runs go to `<tune_dir>/trials/<trial_id>`.
      objective: `val_accuracy`, `val_loss` or `val_macro_f1` (`layout.OBJECTIVES`).
      max_epochs_per_trial: each trial's epochs (hyperband: the largest budget);
        None keeps `base.train.epochs`. `--lr_boundaries` scale with it.
      early_stopping_patience: > 0 stops a trial after this many epochs without
        improvement of the objective (keras.callbacks.EarlyStopping).
    """

    def __init__(self, base: cfg.RunConfig, space: SearchSpace, tune_dir: str, *,
                 objective: str = "val_accuracy", max_epochs_per_trial: Optional[int] = None,
                 early_stopping_patience: int = 0):
        super().__init__(name="pipeline", tunable=True)
        if objective not in layout.OBJECTIVES:
            raise ValueError(f"Unknown objective {objective!r}; choose from {', '.join(layout.OBJECTIVES)}.")
        self.base, self.space, self.tune_dir = base, space, tune_dir
        self.objective = objective
        self.max_epochs_per_trial = max_epochs_per_trial
        self.early_stopping_patience = early_stopping_patience
        self._loaded = None  # (DataConfig, Datasets) of the last build, for its fit

    # -- hp -> RunConfig

    def trial_overrides(self, values: Mapping[str, Any], *, epochs: Optional[int] = None,
                        execution: int = 0) -> dict:
        """Flag overrides of a trial: its hyperparameters, budget and execution seed."""
        base = self.base.train
        out = self.space.overrides(values)
        budget = int(epochs or self.max_epochs_per_trial or base.epochs)
        if budget != base.epochs:
            out["epochs"] = budget
            if base.lr_boundaries:
                out["lr_boundaries"] = [b * budget / base.epochs for b in base.lr_boundaries]
        if execution:
            out["seed"] = base.seed + execution
        if "learning_rate" in out and base.second_optimizer is not None:
            out["second_learning_rate"] = base.second_optimizer.learning_rate
        return out

    def trial_dir(self, trial_id: str, execution: int = 0) -> str:
        name = str(trial_id) if not execution else f"{trial_id}-exec{execution}"
        return os.path.join(self.tune_dir, layout.TRIALS_DIR, name)

    def trial_run_config(self, values: Mapping[str, Any], trial_id: str = "default", *,
                         epochs: Optional[int] = None, execution: int = 0) -> cfg.RunConfig:
        """The RunConfig (with its flags.cfg text) of a trial with hyperparameter `values`."""
        overrides = self.trial_overrides(values, epochs=epochs, execution=execution)
        return apply_overrides(self.base, overrides, model_dir=self.trial_dir(trial_id, execution),
                               resume=False, flags_text=override_flags_text(self.base.flags_text, overrides)
                               if self.base.flags_text else "")

    # -- keras-tuner protocol

    def build(self, hp, *, execution: int = 0):
        """The trial's model from the model registry (defaults: the untuned model).

        Seeds, precision, strategy scope and data are set up as `trainer.train`
        does, so a trial's initialization equals a plain run's.
        """
        values = self.space.declare(hp)
        run = self.trial_run_config(values, execution=execution)
        t = run.train
        trainer.seed_everything(t)
        precision.apply_precision(t.precision)
        strategy, name = distribute.resolve_strategy(t.strategy, tpu=t.tpu)  # cached: train uses the same
        try:
            datasets = data.load_dataset(run.data)
        except data.DataError as e:  # the same for every trial: stop the search
            raise kt.errors.FatalValueError(str(e)) from None
        if datasets.val is None:
            raise kt.errors.FatalValueError(
                f"Tuning on {self.objective} needs a validation split; {run.data.dataset!r} has none "
                "(set --val_split or --val_fraction).")
        # Several replicas make train load its data with drop_remainder: let it (same seed, same data).
        if strategy.num_replicas_in_sync == 1 and name != "tpu":
            self._loaded = (run.data, datasets)
        with strategy.scope():
            return trainer.build_model(run, datasets)

    def fit(self, hp, model, *, trial_id: str, tuner_id: str = "", execution: int = 0, callbacks=(),
            epochs: Optional[int] = None):
        """Train the trial as a normal run; returns its metrics at the objective's best epoch.

        Args:
          hp: the trial's hyperparameters.
          model: `build(hp, execution=execution)`.
          trial_id, tuner_id: keras-tuner's names of the trial and of the tuner running it.
          execution: which of the trial's executions (seeds --seed + execution).
          callbacks: extra Keras callbacks for the training.
          epochs: the trial's budget (hyperband's `tuner/epochs`); every trial
            trains from scratch.
        """
        values = self.space.declare(hp)
        run = self.trial_run_config(values, trial_id, epochs=epochs, execution=execution)
        state = prepare_trial_dir(run.model_dir)
        if state != "done":
            extra = list(callbacks)
            if self.early_stopping_patience > 0:
                extra.append(keras.callbacks.EarlyStopping(
                    monitor=self.objective, mode=layout.OBJECTIVES[self.objective],
                    patience=self.early_stopping_patience))
            datasets = self._loaded[1] if self._loaded and self._loaded[0] == run.data else None
            try:
                trainer.train(dataclasses.replace(run, resume=state == "resume"), datasets=datasets,
                              model=model, extra_callbacks=extra)
            except TrainingDiverged as e:
                print(f"trial {trial_id}: {e}", flush=True)
            finally:
                self._loaded = None
        rundir.write_json_atomic(rundir.path(run.model_dir, layout.TRIAL_INFO_FILE), {
            "trial_id": trial_id, "tuner_id": tuner_id, "execution": execution,
            "hyperparameters": values, "tune_dir": self.tune_dir})
        metrics = best_epoch_metrics(run.model_dir, self.objective)
        if metrics is None:
            raise kt.errors.FailedTrialError(f"trial {trial_id} finished no epoch with {self.objective}.")
        return metrics


class PipelineTuner(kt.Tuner):
    """keras-tuner Tuner whose trials are pipeline runs.

    Differences from `kt.Tuner`: `run_trial` builds and trains through
    `PipelineHyperModel` (the best checkpoint lives in the trial's run
    directory, not in a second copy in the tuner project); hyperband's
    `tuner/epochs` is the trial's budget, and each trial trains from scratch.
    The space has no conditional hyperparameters, so the oracle gets it whole
    and keras-tuner is not handed the hypermodel to build for discovering them
    (it takes none when `run_trial` is overridden); it is attached afterwards.
    """

    def __init__(self, oracle, hypermodel: PipelineHyperModel, **kwargs):
        super().__init__(oracle, None, **kwargs)
        self.hypermodel = hypermodel

    def run_trial(self, trial, *args, callbacks=(), **kwargs):
        """Every execution of `trial` as a pipeline run; keras-tuner averages their metrics."""
        del args, kwargs  # `search` passes nothing else
        hp = trial.hyperparameters
        results = []
        for execution in range(self.executions_per_trial):
            keras.backend.clear_session()  # as keras-tuner does before each build
            gc.collect()
            model = self.hypermodel.build(hp, execution=execution)
            results.append(self.hypermodel.fit(
                hp, model, trial_id=str(trial.trial_id), tuner_id=str(self.tuner_id), execution=execution,
                callbacks=_fresh_copies(callbacks), epochs=hp.values.get("tuner/epochs")))
        return results

    def load_model(self, trial):
        path = rundir.checkpoint_file(self.hypermodel.trial_dir(trial.trial_id), "best")
        return pipeline.models.load_model(path)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        if trial.status in ("FAILED", "INVALID") and trial.message:
            last = [line for line in trial.message.strip().splitlines() if line.strip()]
            print(f"trial {trial.trial_id} failed: {last[-1] if last else '?'}", flush=True)


def _fresh_copies(callbacks) -> list:
    """Each execution gets its own copies: callbacks keep state (EarlyStopping's best, ...)."""
    try:
        return copy.deepcopy(list(callbacks))
    except Exception:
        raise kt.errors.FatalValueError(
            f"All callbacks used during a search should be deep-copyable (they are reused across "
            f"trials); copy.deepcopy({list(callbacks)}) failed.") from None


def distributed_role() -> str:
    """`standalone`, `chief` or `worker` from keras-tuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "standalone"
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(var):
            raise ValueError(f"KERASTUNER_ORACLE_IP is set but {var} is not: a distributed search needs "
                             "KERASTUNER_TUNER_ID (chief, tuner0, tuner1, ...), KERASTUNER_ORACLE_IP and "
                             "KERASTUNER_ORACLE_PORT.")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def make_tuner(kind: str, hypermodel: PipelineHyperModel, *, max_trials: int = 10,
               executions_per_trial: int = 1, overwrite: bool = False, seed: int = 0,
               initial_random_trials: Optional[int] = None) -> PipelineTuner:
    """A resumable tuner of `kind` over `hypermodel` in `<tune_dir>/keras_tuner`.

    `max_trials` bounds every kind (hyperband runs as many brackets as fit).
    `initial_random_trials`: bayesian only, random trials before the Gaussian
    process (keras-tuner's default: 3 per hyperparameter).
    """
    objective = kt.Objective(hypermodel.objective, layout.OBJECTIVES[hypermodel.objective])
    common = {"objective": objective, "seed": seed + 1,  # keras-tuner treats seed 0 as "random"
              "hyperparameters": hypermodel.space.hyperparameters()}
    if kind == "random":
        oracle = kt.oracles.RandomSearchOracle(max_trials=max_trials, **common)
    elif kind == "grid":
        oracle = kt.oracles.GridSearchOracle(max_trials=max_trials, **common)
    elif kind == "bayesian":
        oracle = kt.oracles.BayesianOptimizationOracle(max_trials=max_trials,
                                                       num_initial_points=initial_random_trials, **common)
    elif kind == "hyperband":
        budget = hypermodel.max_epochs_per_trial or hypermodel.base.train.epochs
        oracle = kt_adapter.hyperband_oracle(max_trials=max_trials, max_epochs=budget,
                                             factor=HYPERBAND_FACTOR, **common)
    else:
        raise ValueError(f"Unknown tuner {kind!r}; choose from {', '.join(TUNERS)}.")
    if distributed_role() == "worker":
        overwrite = False  # only the chief may clear the shared search
    return PipelineTuner(oracle, hypermodel, directory=hypermodel.tune_dir, project_name=layout.PROJECT_NAME,
                         overwrite=overwrite, executions_per_trial=executions_per_trial)
