"""Run (or resume) a search in a tuning directory, from the untuned run it starts from.

`base_run_config` and `trial_verb` turn `pipeline.tune`'s untuned RunConfig
into what the trials repeat; `search` checks the directory (`prepare_tune_dir`:
a rerun resumes, other settings are refused), runs the tuner, and writes
trials.csv and best.cfg.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

from pipeline import config as cfg
from pipeline import rundir
from pipeline.tuning import layout
from pipeline.tuning.hypermodel import TUNERS, PipelineHyperModel, distributed_role, make_tuner
from pipeline.tuning.overrides import override_flags_text
from pipeline.tuning.results import SearchResult, write_results
from pipeline.tuning.space import FINETUNE_FLAGS, SearchSpace


def check_model_dir_unset(model_dir: Optional[str]) -> None:
    """A search has no `--model_dir` (each trial runs in its own directory): refuse one."""
    if model_dir:
        raise ValueError("--model_dir is not used by pipeline.tune: each trial runs in <tune_dir>/trials/<id>; "
                         "set --tune_dir.")


def base_run_config(run: cfg.RunConfig, verb: str = "train") -> cfg.RunConfig:
    """The untuned RunConfig with the flags text its trials repeat (what the default trial runs).

    Args:
      run: `cli.run_config_from_flags(flags, verb)`.
      verb: `train` or `finetune`, the command that repeats a trial.

    For `pipeline.train` the flags text leaves out the fine-tuning flags it does
    not define (they are at their defaults: TrainConfig's); for `pipeline.finetune`
    it states `--weights` (the trials train exactly these flags, without
    finetune's model-dependent defaults).
    """
    if verb == "train":
        pins = {name: None for name in FINETUNE_FLAGS}
    else:  # pipeline.finetune would pick pretrained weights for an unset --weights; the trials use none
        pins = {"weights": run.model.weights or "none"}
    pins["time_budget"] = None  # the search's budget, not a trial's (its flags repeat it without one)
    return dataclasses.replace(run, flags_text=override_flags_text(run.flags_text, pins))


def trial_verb(base: cfg.RunConfig, space: SearchSpace) -> str:
    """`finetune` if the trials freeze or scale the backbone (its flags name them), else `train`."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.TrainConfig)}
    finetune = any(getattr(base.train, name) != defaults[name] or name in space.names for name in FINETUNE_FLAGS)
    return "finetune" if finetune else "train"


def _budget_callbacks(oracle, seconds: Optional[float]) -> list:
    """--time_budget: no new trial once the rest of the budget is less than the last trial took."""
    if not seconds:
        return []
    from pipeline.training import budget, eta

    def stop(left, needed):
        oracle.max_trials = len(oracle.trials)  # the attribute Oracle.create_trial checks (kt_adapter)
        print(f"time budget: {budget.format_duration(left)} left, less than the last trial's "
              f"{budget.format_duration(needed)}: no more trials", flush=True)
    return [eta.SearchBudget(budget.process_start_time() + seconds, stop)]


def _search_record(hypermodel: PipelineHyperModel, kind: str, executions: int) -> dict:
    """What a resumed search must share with the search it resumes."""
    base = cfg.to_dict(hypermodel.base)
    base.pop("model_dir", None)
    base.pop("resume", None)
    for name in ("verbose", "tensorboard", "time_budget"):  # no effect on results (a budget: on their number)
        base["train"].pop(name, None)
    return {"tuner": kind, "objective": hypermodel.objective, "space": hypermodel.space.describe(),
            "max_epochs_per_trial": hypermodel.max_epochs_per_trial, "executions_per_trial": executions,
            "early_stopping_patience": hypermodel.early_stopping_patience, "base": base}


def _first_difference(old, new, where=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            diff = _first_difference(a, b, f"{where}[{i}]")
            if diff:
                return diff
        return None
    return None if old == new else f"{where}: {old!r} then, {new!r} now"


def prepare_tune_dir(tune_dir: str, record: dict, *, overwrite: bool, must_exist: bool = False) -> bool:
    """Clear (`overwrite`) or check a search directory; returns whether a search is being resumed.

    Raises:
      ValueError: resuming a search started with other settings, or `must_exist` without one.
    """
    search_file = os.path.join(tune_dir, layout.SEARCH_FILE)
    if overwrite:
        for name in (layout.TRIALS_DIR, layout.PROJECT_NAME):
            shutil.rmtree(os.path.join(tune_dir, name), ignore_errors=True)
        for name in (layout.TRIALS_CSV, layout.BEST_CFG, layout.SEARCH_FILE):
            if os.path.exists(os.path.join(tune_dir, name)):
                os.remove(os.path.join(tune_dir, name))
    old = rundir.read_json(search_file)
    if old is None:
        if must_exist:
            raise ValueError(f"--resume: {tune_dir!r} holds no search to resume.")
        rundir.write_json_atomic(search_file, record)
        return False
    diff = _first_difference(old, record)
    if diff:
        raise ValueError(f"{tune_dir!r} holds a search with other settings ({diff}); rerun it with its "
                         "original flags to resume it, pass --overwrite to start afresh, or choose another "
                         "--tune_dir.")
    return True


def search(base: cfg.RunConfig, space: SearchSpace, tune_dir: str, *, tuner: str = "random",
           max_trials: int = 10, objective: str = "val_accuracy", executions_per_trial: int = 1,
           max_epochs_per_trial: Optional[int] = None, early_stopping_patience: int = 0,
           overwrite: bool = False, resume: bool = False, initial_random_trials: Optional[int] = None,
           verb: str = "train", callbacks=()) -> SearchResult:
    """Run (or resume) a search; the chief or a standalone search writes trials.csv and best.cfg.

    Rerunning with the same arguments resumes: finished trials are kept, a trial
    interrupted mid-way resumes from its last finished epoch, and new trials run
    up to `max_trials`. `overwrite=True` starts afresh.

    In a distributed search (keras-tuner's environment variables) the chief
    serves the oracle until every trial is done, workers run trials; every
    process must see the same `tune_dir` (a shared filesystem) for trials.csv
    to name each trial's run directory and tuner.

    Returns:
      SearchResult (rows empty on workers).
    """
    if tuner not in TUNERS:
        raise ValueError(f"Unknown tuner {tuner!r}; choose from {', '.join(TUNERS)}.")
    if max_trials < 1 or executions_per_trial < 1:
        raise ValueError("--max_trials and --executions_per_trial must be at least 1.")
    t = base.train
    if (max_epochs_per_trial or tuner == "hyperband") and (t.total_steps or t.schedule == "hyperrule"):
        raise ValueError("--total_steps and --schedule=hyperrule set their own step budget; they cannot be "
                         "combined with --max_epochs_per_trial or --tuner=hyperband.")
    role = distributed_role()
    hypermodel = PipelineHyperModel(base, space, tune_dir, objective=objective,
                                    max_epochs_per_trial=max_epochs_per_trial,
                                    early_stopping_patience=early_stopping_patience)
    if role != "worker":
        resumed = prepare_tune_dir(tune_dir, _search_record(hypermodel, tuner, executions_per_trial),
                                   overwrite=overwrite, must_exist=resume)
        print(f"{'resuming the' if resumed else 'new'} search in {tune_dir} ({tuner}, {role}); "
              f"rerun with --tune_dir={tune_dir} to resume it", flush=True)
        for line in space.describe():
            print(f"  {line}", flush=True)
    kt_tuner = make_tuner(tuner, hypermodel, max_trials=max_trials, executions_per_trial=executions_per_trial,
                          overwrite=overwrite, seed=t.seed, initial_random_trials=initial_random_trials)
    kt_tuner.search(callbacks=list(callbacks) + _budget_callbacks(kt_tuner.oracle, t.time_budget))
    if t.time_budget and role != "worker":
        print(f"time budget: ran {len(kt_tuner.oracle.trials)} of --max_trials={max_trials} trials", flush=True)
    if role == "worker":
        return SearchResult(tune_dir, role, objective, [], None, None, None)
    return write_results(kt_tuner.oracle, hypermodel, role=role, verb=verb)
