"""Hyperparameter search with keras-tuner over the pipeline's own training loop.

Library side of `python -m pipeline.tune` (no absl FLAGS here):

* `HYPERPARAMETERS` / `make_search_space(base, tune=..., ranges=..., choices=...)`:
  what can be searched and the validated search space. Every hyperparameter's
  default is the base (untuned) value, so the default trial is the untuned run.
* `PipelineHyperModel`: a keras-tuner HyperModel whose `build(hp)` is
  `training.build_model` for the trial's RunConfig and whose `fit` is
  `training.train` into `<tune_dir>/trials/<trial_id>`: every trial is a normal
  run directory (metrics.csv, flags.cfg, checkpoints, summary.json).
* `make_tuner(kind, hypermodel, ...)`: random, hyperband, bayesian or grid
  search, resumable from `<tune_dir>/keras_tuner` and distributable with
  keras-tuner's chief/worker protocol (`KERASTUNER_TUNER_ID`,
  `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`).
* `search(...)`: all of the above, then `<tune_dir>/trials.csv` (every trial,
  best first) and `<tune_dir>/best.cfg` (the best trial's resolved flags).

A trial's hyperparameters become *flag overrides* (`trial_overrides`), applied
both to the base RunConfig (`apply_overrides`, mirroring
`flags_common.run_config_from_flags`) and to the base flags text
(`override_flags_text`), so `--flagfile=<trial>/flags.cfg` repeats the trial.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import inspect
import io
import math
import os
import re
import shutil
from typing import Any, Mapping, Optional, Sequence

import keras
import keras_tuner as kt

from pipeline import config as cfg
from pipeline.data import sources as data_lib
from pipeline.training import distribute
from pipeline.training import precision
from pipeline import rundir
from pipeline.training import schedules
from pipeline.training import trainer as training
from pipeline.models import registry

TUNERS = ("random", "hyperband", "bayesian", "grid")
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min"}
TRIALS_DIR = "trials"
PROJECT_NAME = "keras_tuner"
TRIALS_CSV = "trials.csv"
BEST_CFG = "best.cfg"
SEARCH_FILE = "search.json"
TRIAL_INFO_FILE = "tuning.json"  # written into each trial's run directory
HYPERBAND_FACTOR = 3
CIFAR_FAMILY = "cifar_resnet"


@dataclasses.dataclass(frozen=True)
class HyperparameterSpec:
    """One searchable hyperparameter: its kind and built-in search range.

    kind: `choice` (flag `--<name>_choices`), `float` or `int` (flag `--<name>_range`).
    values: built-in choices; low/high/log: built-in range.
    applies_to: None (every run), `cifar_resnet`, `width` or `finetune`.
    """

    name: str
    kind: str
    help: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    applies_to: Optional[str] = None

    @property
    def flag(self) -> str:
        return f"{self.name}_choices" if self.kind == "choice" else f"{self.name}_range"


def _specs(*specs):
    return {s.name: s for s in specs}


HYPERPARAMETERS = _specs(
    HyperparameterSpec("optimizer", "choice", "optimizer", values=("sgd", "adam", "nadam", "adamw")),
    HyperparameterSpec("learning_rate", "float", "peak learning rate", low=1e-4, high=1.0, log=True),
    HyperparameterSpec("weight_decay", "float", "decoupled weight decay (a flag value of 0 stays the "
                       "default: off)", low=1e-6, high=1e-2, log=True),
    HyperparameterSpec("schedule", "choice", "learning-rate schedule (`step` uses --lr_boundaries, "
                       "scaled to the trial's epochs)", values=("step", "exponential", "cosine")),
    HyperparameterSpec("warmup_epochs", "float", "linear warm-up epochs", low=0.0, high=5.0),
    HyperparameterSpec("label_smoothing", "float", "label smoothing", low=0.0, high=0.2),
    HyperparameterSpec("mixup_alpha", "float", "MixUp alpha", low=0.0, high=0.4),
    HyperparameterSpec("batch_size", "choice", "global batch size", values=(32, 64, 128, 256)),
    HyperparameterSpec("depth", "choice", "CIFAR ResNet depth: --model becomes resnet<d> or plain<d>",
                       values=(20, 32, 44, 56), applies_to=CIFAR_FAMILY),
    HyperparameterSpec("width_multiplier", "choice", "filter width multiplier",
                       values=(0.5, 1.0, 1.5, 2.0), applies_to="width"),
    HyperparameterSpec("freeze_epochs", "int", "fine-tuning: epochs on a frozen backbone",
                       low=0, high=5, applies_to="finetune"),
    HyperparameterSpec("backbone_lr_multiplier", "float", "fine-tuning: backbone learning-rate "
                       "multiplier", low=0.01, high=1.0, log=True, applies_to="finetune"),
)

# Hyperparameters that are pipeline.finetune flags (flags_common.define_finetune_flags), not pipeline.train ones.
FINETUNE_FLAGS = ("freeze_epochs", "backbone_lr_multiplier")


# ----------------------------------------------------------------------------- search space


@dataclasses.dataclass(frozen=True)
class Param:
    """A hyperparameter of one search: kind, range or choices, and its default (the flag value)."""

    name: str
    kind: str
    default: Any
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False

    def declare(self, hp: kt.HyperParameters):
        """Register on `hp` and return the trial's value (the default outside a trial)."""
        if self.kind == "choice":
            return hp.Choice(self.name, list(self.values), default=self.default)
        if self.kind == "int":
            return int(hp.Int(self.name, int(self.low), int(self.high), default=int(self.default)))
        return float(hp.Float(self.name, self.low, self.high, sampling="log" if self.log else "linear",
                              default=float(self.default)))

    def describe(self) -> str:
        if self.kind == "choice":
            what = "one of " + ", ".join(_fmt(v) for v in self.values)
        else:
            what = f"{self.kind} in [{_fmt(self.low)}, {_fmt(self.high)}]{' (log)' if self.log else ''}"
        return f"{self.name}: {what}; default {_fmt(self.default)}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The searched hyperparameters of one tuning run, in declaration order.

    model_for_depth: `depth` value -> registered model name (the same family
      twin: resnet<d> or plain<d>).
    """

    params: tuple
    model_for_depth: tuple = ()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def declare(self, hp: kt.HyperParameters) -> dict:
        """Declare every hyperparameter on `hp`; returns name -> value."""
        return {p.name: p.declare(hp) for p in self.params}

    def overrides(self, values: Mapping[str, Any]) -> dict:
        """Flag overrides (flag name -> value) for hp values; defaults change nothing."""
        out = {}
        for p in self.params:
            if p.name not in values or values[p.name] == p.default:
                continue
            value = values[p.name]
            if p.name == "depth":
                out["model"] = dict(self.model_for_depth)[int(value)]
            else:
                out[p.name] = value
        return out

    def describe(self) -> list[str]:
        return [p.describe() for p in self.params]


def _fmt(value) -> str:
    """Flag-file text of one value (floats round-trip exactly)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _cifar_twins(model_name: str) -> Optional[dict]:
    """depth -> registered name of the same CIFAR family twin (`resnet<d>` / `plain<d>`), or None."""
    try:
        spec = registry.get_spec(model_name)
    except ValueError:
        return None
    match = re.fullmatch(r"([a-z_]+?)(\d+)", model_name)
    if spec.family != CIFAR_FAMILY or not match:
        return None
    stem = match.group(1)
    twins = {}
    for name in registry.list_models(CIFAR_FAMILY):
        m = re.fullmatch(re.escape(stem) + r"(\d+)", name)
        if m:
            twins[int(m.group(1))] = name
    return twins


def _builder_default(model_name: str, option: str):
    spec = registry.get_spec(model_name)
    param = inspect.signature(spec.builder).parameters.get(option)
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def _applicable(spec: HyperparameterSpec, base: cfg.RunConfig) -> Optional[str]:
    """None if `spec` can be searched for `base`, else why not (one sentence)."""
    model = base.model.name
    if spec.applies_to == CIFAR_FAMILY and _cifar_twins(model) is None:
        names = registry.list_models(CIFAR_FAMILY)
        return (f"depth applies to the CIFAR ResNets ({', '.join(names)}), not --model={model}.")
    if spec.applies_to == "width" and "width_multiplier" not in registry.get_spec(model).options():
        return f"--model={model} takes no width_multiplier."
    if spec.applies_to == "finetune":
        pretrained = registry.get_spec(model).pretrained or base.model.weights or base.model.init_from
        if not pretrained:
            return (f"{spec.name} applies to fine-tuning (a pretrained --model, --weights or --init_from), "
                    f"not to --model={model} from scratch.")
    return None


def base_value(name: str, base: cfg.RunConfig):
    """The untuned value of hyperparameter `name` in `base` (what its default must be)."""
    t = base.train
    if name == "optimizer":
        return t.optimizer.name
    if name in ("learning_rate", "weight_decay"):
        return getattr(t.optimizer, name)
    if name == "batch_size":
        return base.data.batch_size
    if name == "depth":
        twins = _cifar_twins(base.model.name)
        return next(d for d, n in twins.items() if n == base.model.name)
    if name == "width_multiplier":
        value = base.model.width_multiplier
        return float(value if value is not None else _builder_default(base.model.name, "width_multiplier"))
    return getattr(t, name)


def _parse_number(text, integer: bool, flag: str):
    try:
        number = float(str(text).strip())
    except ValueError:
        raise ValueError(f"--{flag}: {text!r} is not a number.") from None
    if integer:
        if number != int(number):
            raise ValueError(f"--{flag}: {text!r} is not a whole number.")
        return int(number)
    return number


def _choice_values(spec: HyperparameterSpec, raw: Sequence, base: cfg.RunConfig, twins) -> tuple:
    flag = spec.flag
    raw = [r for r in raw if str(r).strip() != ""]
    if not raw:
        raise ValueError(f"--{flag} needs at least one value.")
    if spec.name == "optimizer":
        values = tuple(str(r).strip() for r in raw)
        known = sorted(training.OPTIMIZERS)
    elif spec.name == "schedule":
        values = tuple(str(r).strip() for r in raw)
        known = list(schedules.SCHEDULES)
    else:
        integer = spec.name in ("batch_size", "depth")
        values = tuple(_parse_number(r, integer, flag) for r in raw)
        known = None
    if known is not None:
        bad = [v for v in values if v not in known]
        if bad:
            raise ValueError(f"--{flag}: unknown {spec.name} {bad[0]!r}; choose from {', '.join(known)}.")
    elif spec.name == "depth":
        bad = [v for v in values if v not in twins]
        if bad:
            raise ValueError(f"--{flag}: --model={base.model.name} has no depth-{bad[0]} twin; registered "
                             f"depths: {', '.join(str(d) for d in sorted(twins))}.")
    elif any(v <= 0 for v in values):
        raise ValueError(f"--{flag}: values must be positive, got {','.join(_fmt(v) for v in values)}.")
    return tuple(dict.fromkeys(values))  # drop repeats, keep order


def _range_values(spec: HyperparameterSpec, raw: Sequence) -> tuple:
    flag = spec.flag
    raw = [r for r in raw if str(r).strip() != ""]
    if len(raw) != 2:
        raise ValueError(f"--{flag} needs two numbers lo,hi; got {','.join(map(str, raw)) or 'nothing'}.")
    lo, hi = (_parse_number(r, spec.kind == "int", flag) for r in raw)
    if lo >= hi:
        raise ValueError(f"--{flag}={_fmt(lo)},{_fmt(hi)}: lo must be below hi.")
    if spec.log and lo <= 0:
        raise ValueError(f"--{flag}={_fmt(lo)},{_fmt(hi)}: {spec.name} is searched on a log scale, "
                         "so both ends must be positive.")
    if lo < 0:
        raise ValueError(f"--{flag}={_fmt(lo)},{_fmt(hi)}: {spec.name} cannot be negative.")
    return lo, hi


def make_search_space(base: cfg.RunConfig, *, tune: Optional[Sequence[str]] = None,
                      ranges: Optional[Mapping[str, Sequence]] = None,
                      choices: Optional[Mapping[str, Sequence]] = None) -> SearchSpace:
    """Validate the user's narrowing and build the search space around `base`.

    Args:
      base: the untuned run; every hyperparameter's default is its value here.
      tune: names to search (the rest stay at their base values); None searches
        every hyperparameter that applies to `base` (depth only for CIFAR
        ResNets, width_multiplier only for models that take it, freeze_epochs and
        backbone_lr_multiplier only for fine-tuning).
      ranges: name -> (lo, hi) numbers or strings for float/int hyperparameters.
      choices: name -> values (or strings) for choice hyperparameters.

    Built-in ranges and choices are widened to include the base value; user
    ranges and choices must include it (the default trial is the untuned run),
    except that a log-scaled hyperparameter whose base value is 0 (off) keeps 0
    as its default.

    Raises:
      ValueError: one sentence naming the offending flag: unknown or
        inapplicable names, bad ranges (lo >= hi, non-positive ends on a log
        scale), unknown choices, a base value outside a user range, or a range
        given for a hyperparameter that is not searched.
    """
    ranges, choices = dict(ranges or {}), dict(choices or {})
    valid = ", ".join(HYPERPARAMETERS)
    if tune is None:
        names = [n for n, s in HYPERPARAMETERS.items() if _applicable(s, base) is None]
    else:
        names = [str(n).strip() for n in tune if str(n).strip()]
        if not names:
            raise ValueError(f"--tune names no hyperparameter; valid names: {valid}.")
        for name in names:
            if name not in HYPERPARAMETERS:
                close = difflib.get_close_matches(name, list(HYPERPARAMETERS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"Unknown hyperparameter {name!r} in --tune{hint}; valid names: {valid}.")
            why_not = _applicable(HYPERPARAMETERS[name], base)
            if why_not:
                raise ValueError(f"--tune={name}: {why_not}")
        names = list(dict.fromkeys(names))
    for table, kind in ((ranges, "range"), (choices, "choices")):
        for name in table:
            spec = HYPERPARAMETERS.get(name)
            if spec is None or (spec.kind == "choice") != (kind == "choices"):
                raise ValueError(f"--{name}_{kind} is not a flag of pipeline.tune; valid names: {valid}.")
            if name not in names:
                raise ValueError(f"--{spec.flag} is set but {name} is not searched "
                                 f"(--tune={','.join(names)}).")

    twins = _cifar_twins(base.model.name) or {}
    params = []
    for name in (n for n in HYPERPARAMETERS if n in names):  # declaration order is the table's
        spec = HYPERPARAMETERS[name]
        default = base_value(name, base)
        if default is None:
            raise ValueError(f"--{name} is unset: give it a value to search {name} around.")
        if spec.kind == "choice":
            given = name in choices
            values = _choice_values(spec, choices[name], base, twins) if given else spec.values
            if default not in values:
                if given:
                    raise ValueError(f"--{name}={_fmt(default)} is not among --{spec.flag}="
                                     f"{_fmt(list(values))}: add it, or change --{name} (the default trial "
                                     "is the untuned run).")
                values = (default, *values)
            if name == "depth":
                values = tuple(v for v in values if v in twins)
            params.append(Param(name, "choice", default, values=tuple(values)))
            continue
        if name in ranges:
            lo, hi = _range_values(spec, ranges[name])
            if not lo <= default <= hi and not (spec.log and default == 0):
                raise ValueError(f"--{name}={_fmt(default)} lies outside --{spec.flag}={_fmt(lo)},{_fmt(hi)}: "
                                 f"widen the range, or change --{name} (the default trial is the untuned run).")
        else:
            lo, hi = spec.low, spec.high
            if default > 0 or not spec.log:
                lo, hi = min(lo, default), max(hi, default)
        params.append(Param(name, spec.kind, default, low=lo, high=hi, log=spec.log))
    return SearchSpace(tuple(params), tuple(sorted(twins.items())))


# ----------------------------------------------------------------------------- overrides


def apply_overrides(run: cfg.RunConfig, overrides: Mapping[str, Any], **replace) -> cfg.RunConfig:
    """`run` with flag overrides applied the way `flags_common.run_config_from_flags` reads flags.

    `--weight_decay` sets both optimizers', `--seed` the data's and the
    trainer's; `--learning_rate` the first optimizer's (`second_learning_rate`
    pins the second's). Extra keyword arguments replace RunConfig fields.
    """
    data, model, train = {}, {}, {}
    opt, second = run.train.optimizer, run.train.second_optimizer
    for name, value in overrides.items():
        if name == "optimizer":
            opt = dataclasses.replace(opt, name=value)
        elif name == "learning_rate":
            opt = dataclasses.replace(opt, learning_rate=float(value))
        elif name == "second_learning_rate":
            second = second and dataclasses.replace(second, learning_rate=float(value))
        elif name == "weight_decay":
            opt = dataclasses.replace(opt, weight_decay=float(value))
            second = second and dataclasses.replace(second, weight_decay=float(value))
        elif name == "batch_size":
            data["batch_size"] = int(value)
        elif name == "seed":
            data["seed"] = train["seed"] = int(value)
        elif name == "model":
            model["name"] = value
        elif name == "width_multiplier":
            model["width_multiplier"] = float(value)
        elif name == "lr_boundaries":
            train["lr_boundaries"] = tuple(float(b) for b in value)
        elif name in {f.name for f in dataclasses.fields(cfg.TrainConfig)}:
            train[name] = value
        else:
            raise ValueError(f"cannot apply override --{name}")
    train.update(optimizer=opt, second_optimizer=second)
    return dataclasses.replace(run, data=dataclasses.replace(run.data, **data),
                               model=dataclasses.replace(run.model, **model),
                               train=dataclasses.replace(run.train, **train), **replace)


def _flag_line_name(line: str, known: Mapping[str, Any] = None) -> Optional[str]:
    """The flag a flagfile line sets (`--name=...`, `--name`, or `--noname` of a known bool), or None."""
    line = line.strip()
    if not line.startswith("--"):
        return None
    name = line[2:].split("=", 1)[0]
    if known is not None and name not in known and name.startswith("no") and name[2:] in known:
        return name[2:]
    return name


def override_flags_text(text: str, overrides: Mapping[str, Any]) -> str:
    """A flagfile's text with `--name=value` lines replaced or appended (None removes the flag)."""
    lines, done = [], set()
    for line in text.splitlines():
        name = _flag_line_name(line, overrides)
        if name in overrides:
            if name not in done:
                lines.extend(_flag_lines(name, overrides[name]))
                done.add(name)
            continue
        lines.append(line)
    for name, value in overrides.items():
        if name not in done:
            lines.extend(_flag_lines(name, value))
    return "\n".join(lines) + "\n"


def _flag_lines(name, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no{name}"]
    return [f"--{name}={_fmt(value)}"]


# ----------------------------------------------------------------------------- the HyperModel


@dataclasses.dataclass
class _TrialContext:
    trial_id: Optional[str] = None
    tuner_id: str = ""
    execution: int = 0


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
    rows = [r for r in rundir.read_metrics(model_dir) if r.get(objective) is not None]
    if not rows:
        return None
    sign = 1.0 if OBJECTIVES[objective] == "max" else -1.0
    best = rows[0]
    for row in rows[1:]:
        if sign * row[objective] >= sign * best[objective]:
            best = row
    out = {k: float(best[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy") if best.get(k) is not None}
    out["best_epoch"] = float(best["epoch"])
    return out


class PipelineHyperModel(kt.HyperModel):
    """keras-tuner HyperModel over `training.build_model` and `training.train`.

    Args:
      base: the untuned RunConfig (its `flags_text` is the base of every trial's flags.cfg).
      space: the SearchSpace (see `make_search_space`).
      tune_dir: the search directory; trial runs go to `<tune_dir>/trials/<trial_id>`.
      objective: `val_accuracy` or `val_loss`.
      max_epochs_per_trial: each trial's epochs (hyperband: the largest budget);
        None keeps `base.train.epochs`. `--lr_boundaries` scale with it.
      early_stopping_patience: > 0 stops a trial after this many epochs without
        improvement of the objective (keras.callbacks.EarlyStopping).
    """

    def __init__(self, base: cfg.RunConfig, space: SearchSpace, tune_dir: str, *,
                 objective: str = "val_accuracy", max_epochs_per_trial: Optional[int] = None,
                 early_stopping_patience: int = 0):
        super().__init__(name="pipeline", tunable=True)
        if objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}.")
        self.base, self.space, self.tune_dir = base, space, tune_dir
        self.objective = objective
        self.max_epochs_per_trial = max_epochs_per_trial
        self.early_stopping_patience = early_stopping_patience
        self.context = _TrialContext()
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
        return os.path.join(self.tune_dir, TRIALS_DIR, name)

    def trial_run_config(self, values: Mapping[str, Any], trial_id: str = "default", *,
                         epochs: Optional[int] = None, execution: int = 0) -> cfg.RunConfig:
        """The RunConfig (with its flags.cfg text) of a trial with hyperparameter `values`."""
        overrides = self.trial_overrides(values, epochs=epochs, execution=execution)
        return apply_overrides(self.base, overrides, model_dir=self.trial_dir(trial_id, execution),
                               resume=False, flags_text=override_flags_text(self.base.flags_text, overrides)
                               if self.base.flags_text else "")

    # -- keras-tuner protocol

    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def build(self, hp):
        """The trial's model from the model registry (defaults: the untuned model).

        Seeds, precision, strategy scope and data are set up as `training.train`
        does, so a trial's initialization equals a plain run's.
        """
        values = self.space.declare(hp)
        run = self.trial_run_config(values, execution=self.context.execution)
        t = run.train
        training.seed_everything(t)
        precision.apply_precision(t.precision)
        strategy, name = distribute.resolve_strategy(t.strategy, tpu=t.tpu)  # cached: train uses the same
        try:
            datasets = data_lib.load_dataset(run.data)
        except data_lib.DataError as e:  # the same for every trial: stop the search
            raise kt.errors.FatalValueError(str(e)) from None
        if datasets.val is None:
            raise kt.errors.FatalValueError(
                f"Tuning on {self.objective} needs a validation split; {run.data.dataset!r} has none "
                "(set --val_split or --val_fraction).")
        # Several replicas make train load its data with drop_remainder: let it (same seed, same data).
        if strategy.num_replicas_in_sync == 1 and name != "tpu":
            self._loaded = (run.data, datasets)
        with strategy.scope():
            return training.build_model(run, datasets)

    def fit(self, hp, model, *args, callbacks=(), epochs=None, **kwargs):
        """Train the trial as a normal run; returns its metrics at the objective's best epoch.

        keras-tuner passes its own callbacks (trial reporting); hyperband passes
        `epochs` (the trial's budget; every trial trains from scratch, so
        `initial_epoch` is ignored).
        """
        del args, kwargs
        ctx = self.context
        trial_id = ctx.trial_id or _trial_id_from(callbacks)
        values = self.space.declare(hp)
        run = self.trial_run_config(values, trial_id, epochs=epochs, execution=ctx.execution)
        state = prepare_trial_dir(run.model_dir)
        if state != "done":
            extra = list(callbacks)
            if self.early_stopping_patience > 0:
                extra.append(keras.callbacks.EarlyStopping(
                    monitor=self.objective, mode=OBJECTIVES[self.objective],
                    patience=self.early_stopping_patience))
            datasets = self._loaded[1] if self._loaded and self._loaded[0] == run.data else None
            try:
                training.train(dataclasses.replace(run, resume=state == "resume"), datasets=datasets,
                               model=model, extra_callbacks=extra)
            except training.TrainingDiverged as e:
                print(f"trial {trial_id}: {e}", flush=True)
            finally:
                self._loaded = None
        rundir.write_json_atomic(rundir.path(run.model_dir, TRIAL_INFO_FILE), {
            "trial_id": trial_id, "tuner_id": ctx.tuner_id, "execution": ctx.execution,
            "hyperparameters": values, "tune_dir": self.tune_dir})
        metrics = best_epoch_metrics(run.model_dir, self.objective)
        if metrics is None:
            raise kt.errors.FailedTrialError(f"trial {trial_id} finished no epoch with {self.objective}.")
        return metrics


def _trial_id_from(callbacks) -> str:
    for c in callbacks:
        trial = getattr(c, "trial", None)
        if trial is not None and getattr(trial, "trial_id", None) is not None:
            return str(trial.trial_id)
    raise ValueError("PipelineHyperModel.fit needs the trial: run it from a keras-tuner Tuner.")


# ----------------------------------------------------------------------------- tuners


class PipelineTuner(kt.Tuner):
    """keras-tuner Tuner whose trials are pipeline runs.

    Differences from `kt.Tuner`: the best checkpoint lives in the trial's run
    directory (no second copy in the tuner project); hyperband's `tuner/epochs`
    is the trial's budget, and each trial trains from scratch; the space has no
    conditional hyperparameters, so it is declared without building a model.
    """

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        if "tuner/epochs" in hp.values:
            kwargs["epochs"] = hp.values["tuner/epochs"]
        self.hypermodel.context = _TrialContext(str(trial.trial_id), str(self.tuner_id), -1)
        return super().run_trial(trial, *args, **kwargs)

    def _build_and_fit_model(self, trial, *args, **kwargs):
        self.hypermodel.context.execution += 1
        kwargs["callbacks"] = [c for c in kwargs.get("callbacks", []) if type(c).__name__ != "SaveBestEpoch"]
        return super()._build_and_fit_model(trial, *args, **kwargs)

    def _activate_all_conditions(self):
        pass  # `declare_hyperparameters` declares the whole (unconditional) space

    def load_model(self, trial):
        import pipeline.models  # noqa: F401  (custom layers)
        path = rundir.path(self.hypermodel.trial_dir(trial.trial_id), rundir.CHECKPOINT_DIR,
                           rundir.BEST_CHECKPOINT)
        return keras.saving.load_model(path, compile=False, safe_mode=False)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        if trial.status in ("FAILED", "INVALID") and trial.message:
            last = [line for line in trial.message.strip().splitlines() if line.strip()]
            print(f"trial {trial.trial_id} failed: {last[-1] if last else '?'}", flush=True)


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
    objective = kt.Objective(hypermodel.objective, OBJECTIVES[hypermodel.objective])
    seed = seed + 1  # keras-tuner treats seed 0 as "random"
    if kind == "random":
        oracle = kt.oracles.RandomSearchOracle(objective=objective, max_trials=max_trials, seed=seed)
    elif kind == "grid":
        oracle = kt.oracles.GridSearchOracle(objective=objective, max_trials=max_trials, seed=seed)
    elif kind == "bayesian":
        oracle = kt.oracles.BayesianOptimizationOracle(objective=objective, max_trials=max_trials, seed=seed,
                                                       num_initial_points=initial_random_trials)
    elif kind == "hyperband":
        budget = hypermodel.max_epochs_per_trial or hypermodel.base.train.epochs
        oracle = kt.oracles.HyperbandOracle(objective=objective, max_epochs=budget, factor=HYPERBAND_FACTOR,
                                            hyperband_iterations=None, seed=seed)
        oracle.max_trials = max_trials  # HyperbandOracle takes no max_trials; Oracle.create_trial honours it
    else:
        raise ValueError(f"Unknown tuner {kind!r}; choose from {', '.join(TUNERS)}.")
    if distributed_role() == "worker":
        overwrite = False  # only the chief may clear the shared search
    return PipelineTuner(oracle, hypermodel, directory=hypermodel.tune_dir, project_name=PROJECT_NAME,
                         overwrite=overwrite, executions_per_trial=executions_per_trial)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class TrialRow:
    """One line of trials.csv."""

    trial_id: str
    status: str
    tuner: str
    values: dict
    epochs: int
    objective: Optional[float]
    best_epoch: Optional[float]
    run_dir: str
    flags_text: str


@dataclasses.dataclass
class SearchResult:
    tune_dir: str
    role: str
    objective: str
    rows: list
    best: Optional[TrialRow]
    trials_csv: Optional[str]
    best_cfg: Optional[str]


def collect_results(oracle, hypermodel: PipelineHyperModel) -> list[TrialRow]:
    """Every trial the oracle knows, best first (unfinished and failed trials last)."""
    objective = hypermodel.objective
    rows = []
    for trial in oracle.trials.values():
        values = dict(trial.hyperparameters.values)
        epochs = values.get("tuner/epochs")
        run = hypermodel.trial_run_config(values, trial.trial_id, epochs=epochs)
        status = str(trial.status).lower()
        summary = rundir.read_json(rundir.path(run.model_dir, rundir.SUMMARY_FILE)) or {}
        if status == "completed" and summary.get("status") == "diverged":
            status = "diverged"
        info = rundir.read_json(rundir.path(run.model_dir, TRIAL_INFO_FILE)) or {}
        completed = trial.status == "COMPLETED"
        value = trial.score if completed else None
        best_epoch = None
        if completed and trial.metrics.exists("best_epoch"):
            best_epoch = trial.metrics.get_last_value("best_epoch")
        rows.append(TrialRow(str(trial.trial_id), status, info.get("tuner_id", ""),
                             {n: values.get(n) for n in hypermodel.space.names}, run.train.epochs,
                             None if value is None else float(value), best_epoch, run.model_dir,
                             run.flags_text))
    sign = -1.0 if OBJECTIVES[objective] == "max" else 1.0
    done = sorted((r for r in rows if r.objective is not None and math.isfinite(r.objective)),
                  key=lambda r: (sign * r.objective, r.trial_id))
    return done + sorted((r for r in rows if r not in done), key=lambda r: r.trial_id)


def write_trials_csv(rows: Sequence[TrialRow], names: Sequence[str], objective: str, filename: str) -> None:
    header = ["trial_id", "status", "tuner", *names, "epochs", objective, "best_epoch", "run_dir"]
    lines = []
    for r in rows:
        best_epoch = "" if r.best_epoch is None else _fmt_number(r.best_epoch)
        lines.append([r.trial_id, r.status, r.tuner, *(_csv_value(r.values.get(n)) for n in names), r.epochs,
                      "" if r.objective is None else f"{r.objective:.6g}", best_epoch, r.run_dir])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    rundir.write_text_atomic(filename, buf.getvalue())


def _csv_value(value) -> str:
    return "" if value is None else (_fmt(value) if not isinstance(value, float) else f"{value:.6g}")


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def best_cfg_text(row: TrialRow, objective: str, verb: str, tune_dir: str) -> str:
    """best.cfg: the best trial's resolved flags with a header saying how to use them."""
    body = [line for line in row.flags_text.splitlines() if not line.startswith("#")]
    head = [f"# Best trial {row.trial_id} of the search in {tune_dir}: "
            f"{objective}={row.objective:.6g} (epoch {_fmt_number(row.best_epoch or 0)}); run: {row.run_dir}",
            "# Train the best model with:",
            f"#   python -m pipeline.{verb} --flagfile=<this file> [--model_dir=...]"]
    return "\n".join(head + body) + "\n"


def format_results(result: SearchResult, top: int = 5) -> str:
    """The top trials as text lines (for the console)."""
    rows = [r for r in result.rows if r.objective is not None][:top]
    if not rows:
        return f"no trial of {result.tune_dir} has finished yet."
    lines = [f"top {len(rows)} of {len(result.rows)} trials by {result.objective}:"]
    for r in rows:
        hps = " ".join(f"{k}={_csv_value(v)}" for k, v in r.values.items())
        lines.append(f"  trial {r.trial_id:>4}  {result.objective}={r.objective:.4f}  "
                     f"epoch {_fmt_number(r.best_epoch or 0)}/{r.epochs}  {hps}  [{r.status}] {r.run_dir}")
    lines.append(f"trials: {result.trials_csv}")
    if result.best_cfg:
        lines.append(f"best: {result.best_cfg}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the search


def _search_record(hypermodel: PipelineHyperModel, kind: str, executions: int) -> dict:
    """What a resumed search must share with the search it resumes."""
    base = cfg.to_dict(hypermodel.base)
    base.pop("model_dir", None)
    base.pop("resume", None)
    for name in ("verbose", "tensorboard"):  # no effect on results
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
    search_file = os.path.join(tune_dir, SEARCH_FILE)
    if overwrite:
        for name in (TRIALS_DIR, PROJECT_NAME):
            shutil.rmtree(os.path.join(tune_dir, name), ignore_errors=True)
        for name in (TRIALS_CSV, BEST_CFG, SEARCH_FILE):
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
    kt_tuner.search(callbacks=list(callbacks))
    if role == "worker":
        return SearchResult(tune_dir, role, objective, [], None, None, None)
    rows = collect_results(kt_tuner.oracle, hypermodel)
    trials_csv = os.path.join(tune_dir, TRIALS_CSV)
    write_trials_csv(rows, space.names, objective, trials_csv)
    best = rows[0] if rows and rows[0].objective is not None else None
    best_cfg = None
    if best is not None:
        best_cfg = os.path.join(tune_dir, BEST_CFG)
        rundir.write_text_atomic(best_cfg, best_cfg_text(best, objective, verb, tune_dir))
    return SearchResult(tune_dir, role, objective, rows, best, trials_csv, best_cfg)
