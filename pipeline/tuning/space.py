"""What can be searched, and the validated search space of one tuning run.

Every hyperparameter's default is the base (untuned) value, so the default
trial is the untuned run: built-in ranges and choices widen to include it, and
a user's narrowing that leaves it out is an error naming the flag.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from pipeline import config as cfg
from pipeline.tuning.overrides import format_value

if TYPE_CHECKING:
    import keras_tuner as kt


# keras-tuner, the model registry and the optimizers import TensorFlow; the table
# below does not, so `pipeline.tune` defines its flags (and answers --help or a
# typo) before that import. These load them on first use.
def _kt():
    import keras_tuner
    return keras_tuner


def _registry():
    from pipeline.models import registry
    return registry


def _optimizers():
    from pipeline.training import optimizers
    return optimizers


def _schedules():
    from pipeline.training import schedules
    return schedules

CIFAR_FAMILY = "cifar_resnet"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Domain:
    """Where a hyperparameter's values lie.

    kind: `choice` (among `values`), `float` or `int` (in [low, high], on a log
    scale if `log`).
    """

    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperparameterSpec(Domain):
    """One searchable hyperparameter: its built-in domain, help text and where it applies.

    A `choice` is searched over flag `--<name>_choices`, a range over `--<name>_range`.
    applies_to: None (every run), `cifar_resnet`, `width` or `finetune`.
    """

    name: str
    help: str
    applies_to: Optional[str] = None

    @property
    def flag(self) -> str:
        return f"{self.name}_choices" if self.kind == "choice" else f"{self.name}_range"


def _specs(*specs):
    return {s.name: s for s in specs}


HYPERPARAMETERS = _specs(
    HyperparameterSpec(name="optimizer", kind="choice", help="optimizer", values=("sgd", "adam", "nadam", "adamw")),
    HyperparameterSpec(name="learning_rate", kind="float", help="peak learning rate", low=1e-4, high=1.0, log=True),
    HyperparameterSpec(name="weight_decay", kind="float", help="decoupled weight decay (a flag value of 0 stays the "
                       "default: off)", low=1e-6, high=1e-2, log=True),
    HyperparameterSpec(name="schedule", kind="choice", help="learning-rate schedule (`step` uses --lr_boundaries, "
                       "scaled to the trial's epochs)", values=("step", "exponential", "cosine")),
    HyperparameterSpec(name="warmup_epochs", kind="float", help="linear warm-up epochs", low=0.0, high=5.0),
    HyperparameterSpec(name="label_smoothing", kind="float", help="label smoothing", low=0.0, high=0.2),
    HyperparameterSpec(name="mixup_alpha", kind="float", help="MixUp alpha", low=0.0, high=0.4),
    HyperparameterSpec(name="batch_size", kind="choice", help="global batch size", values=(32, 64, 128, 256)),
    HyperparameterSpec(name="depth", kind="choice", help="CIFAR ResNet depth: --model becomes resnet<d> or plain<d>",
                       values=(20, 32, 44, 56), applies_to=CIFAR_FAMILY),
    HyperparameterSpec(name="width_multiplier", kind="choice", help="filter width multiplier",
                       values=(0.5, 1.0, 1.5, 2.0), applies_to="width"),
    HyperparameterSpec(name="freeze_epochs", kind="int", help="fine-tuning: epochs on a frozen backbone",
                       low=0, high=5, applies_to="finetune"),
    HyperparameterSpec(name="backbone_lr_multiplier", kind="float", help="fine-tuning: backbone learning-rate "
                       "multiplier", low=0.01, high=1.0, log=True, applies_to="finetune"),
    # issue 16: layer-wise learning-rate decay and stochastic depth
    HyperparameterSpec(name="layer_decay", kind="float", help="layer-wise learning-rate decay", low=0.5,
                       high=1.0, applies_to="stages"),
    HyperparameterSpec(name="drop_path", kind="float", help="stochastic depth (last block's drop rate)",
                       low=0.0, high=0.3, applies_to="drop_path"),
    # issue 16: augmentation policies and batch mixing (pipeline.data.policies, pipeline.data.mixing)
    HyperparameterSpec(name="randaugment_ops", kind="int", help="RandAugment operations per image", low=1,
                       high=3, applies_to="randaugment"),
    HyperparameterSpec(name="randaugment_magnitude", kind="float", help="RandAugment magnitude (0-10)", low=5.0,
                       high=10.0, applies_to="randaugment"),
    HyperparameterSpec(name="random_erasing", kind="float", help="random erasing probability", low=0.0, high=0.5),
    HyperparameterSpec(name="color_jitter", kind="float", help="colour jitter strength", low=0.0, high=0.4),
    HyperparameterSpec(name="cutmix_alpha", kind="float", help="CutMix alpha", low=0.0, high=1.0),
    HyperparameterSpec(name="mix_switch_prob", kind="float", help="per-batch CutMix (vs MixUp) probability",
                       low=0.0, high=1.0),
    HyperparameterSpec(name="mix_off_epoch", kind="int", help="no mixing from this epoch (0 = never off)",
                       low=0, high=5),
    # issue 16: training-loop recipes (pipeline.training.ema, pipeline.training.loop); a base of 0 stays off
    HyperparameterSpec(name="ema_decay", kind="float", help="weight EMA decay (a flag value of 0 stays the "
                       "default: off)", low=0.99, high=0.9999, log=True),
    HyperparameterSpec(name="clip_norm", kind="float", help="gradient clipping global norm (a flag value of 0 "
                       "stays the default: off)", low=0.1, high=10.0, log=True),
    HyperparameterSpec(name="accumulation_steps", kind="choice", help="micro-batches per optimizer step "
                       "(must divide the trial's batch size)", values=(1, 2, 4)),
)
# Searched only when --tune names them, so the default search (all that apply) stays as it was.
OPT_IN = ("layer_decay", "drop_path")
OPT_IN += ("randaugment_ops", "randaugment_magnitude", "random_erasing", "color_jitter", "cutmix_alpha",
           "mix_switch_prob", "mix_off_epoch")  # issue 16: augmentation policies and mixing
OPT_IN += ("ema_decay", "clip_norm", "accumulation_steps")  # issue 16: training-loop recipes
# Of those, the ones that are DataConfig fields (the rest are TrainConfig's).
DATA_HYPERPARAMETERS = ("randaugment_ops", "randaugment_magnitude", "random_erasing", "color_jitter")

# Hyperparameters that are pipeline.finetune flags (cli.define_finetune_flags), not pipeline.train ones.
FINETUNE_FLAGS = ("freeze_epochs", "backbone_lr_multiplier", "cache_features", "feature_views")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Param(Domain):
    """A hyperparameter of one search: its domain (narrowed by flags) and its default (the flag value)."""

    name: str
    default: Any

    def declare(self, hp: "kt.HyperParameters"):
        """Register on `hp` and return the trial's value (the default outside a trial)."""
        if self.kind == "choice":
            return hp.Choice(self.name, list(self.values), default=self.default)
        if self.kind == "int":
            return int(hp.Int(self.name, int(self.low), int(self.high), default=int(self.default)))
        return float(hp.Float(self.name, self.low, self.high, sampling="log" if self.log else "linear",
                              default=float(self.default)))

    def describe(self) -> str:
        if self.kind == "choice":
            what = "one of " + ", ".join(format_value(v) for v in self.values)
        else:
            what = (f"{self.kind} in [{format_value(self.low)}, {format_value(self.high)}]"
                    f"{' (log)' if self.log else ''}")
        return f"{self.name}: {what}; default {format_value(self.default)}"


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

    def declare(self, hp: "kt.HyperParameters") -> dict:
        """Declare every hyperparameter on `hp`; returns name -> value."""
        return {p.name: p.declare(hp) for p in self.params}

    def hyperparameters(self) -> "kt.HyperParameters":
        """The whole space as keras-tuner HyperParameters (for an oracle; values at their defaults)."""
        hp = _kt().HyperParameters()
        self.declare(hp)
        return hp

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


def _cifar_twins(model_name: str) -> Optional[dict]:
    """depth -> registered CIFAR ResNet with the same `residual` as `model_name`, or None if it is none."""
    try:
        spec = _registry().get_spec(model_name)
    except ValueError:
        return None
    if spec.family != CIFAR_FAMILY or spec.depth is None:
        return None
    return {s.depth: s.name for s in _registry().list_specs(CIFAR_FAMILY)
            if s.residual == spec.residual and s.depth is not None}


def _builder_default(model_name: str, option: str):
    spec = _registry().get_spec(model_name)
    param = inspect.signature(spec.builder).parameters.get(option)
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def _policy_of(augment_name: str) -> Optional[str]:
    from pipeline.data.augment import AUGMENT_PARTS  # imports TensorFlow: only when a search is built
    return AUGMENT_PARTS.get(augment_name, (None, None))[1]


def _applicable(spec: HyperparameterSpec, base: cfg.RunConfig) -> Optional[str]:
    """None if `spec` can be searched for `base`, else why not (one sentence)."""
    model = base.model.name
    if spec.applies_to == CIFAR_FAMILY and _cifar_twins(model) is None:
        names = _registry().list_models(CIFAR_FAMILY)
        return (f"depth applies to the CIFAR ResNets ({', '.join(names)}), not --model={model}.")
    if spec.applies_to == "width" and "width_multiplier" not in _registry().get_spec(model).options():
        return f"--model={model} takes no width_multiplier."
    if spec.applies_to == "randaugment" and _policy_of(base.data.augment) != "randaugment":
        return f"{spec.name} applies to --augment=randaugment or <crop>+randaugment, not {base.data.augment}."
    if spec.applies_to == "stages" and not _registry().get_spec(model).stages:
        return f"--model={model} declares no stages for layer-wise decay."
    if spec.applies_to == "drop_path" and "drop_path" not in _registry().get_spec(model).options():
        return f"--model={model} has no stochastic depth (drop_path)."
    if spec.applies_to == "finetune":
        pretrained = _registry().get_spec(model).pretrained or base.model.weights or base.model.init_from
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
        return _registry().get_spec(base.model.name).depth
    if name == "width_multiplier":
        value = base.model.width_multiplier
        return float(value if value is not None else _builder_default(base.model.name, "width_multiplier"))
    if name == "drop_path":
        return float(base.model.drop_path or 0.0)
    if name in DATA_HYPERPARAMETERS:
        return getattr(base.data, name)
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
        known = sorted(_optimizers().OPTIMIZERS)
    elif spec.name == "schedule":
        values = tuple(str(r).strip() for r in raw)
        known = list(_schedules().SCHEDULES)
    else:
        integer = spec.name in ("batch_size", "depth", "accumulation_steps")
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
        raise ValueError(f"--{flag}: values must be positive, got {format_value(values)}.")
    return tuple(dict.fromkeys(values))  # drop repeats, keep order


def _range_values(spec: HyperparameterSpec, raw: Sequence) -> tuple:
    flag = spec.flag
    raw = [r for r in raw if str(r).strip() != ""]
    if len(raw) != 2:
        raise ValueError(f"--{flag} needs two numbers lo,hi; got {','.join(map(str, raw)) or 'nothing'}.")
    lo, hi = (_parse_number(r, spec.kind == "int", flag) for r in raw)
    given = f"--{flag}={format_value(lo)},{format_value(hi)}"
    if lo >= hi:
        raise ValueError(f"{given}: lo must be below hi.")
    if spec.log and lo <= 0:
        raise ValueError(f"{given}: {spec.name} is searched on a log scale, so both ends must be positive.")
    if lo < 0:
        raise ValueError(f"{given}: {spec.name} cannot be negative.")
    return lo, hi


def _searched_names(base: cfg.RunConfig, tune: Optional[Sequence[str]], ranges: Mapping,
                    choices: Mapping) -> list[str]:
    """The names `--tune` asks for (all that apply to `base` when None), checked with the range flags."""
    valid = ", ".join(HYPERPARAMETERS)
    if tune is None:
        names = [n for n, s in HYPERPARAMETERS.items() if n not in OPT_IN and _applicable(s, base) is None]
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
    return names


def _choice_param(spec: HyperparameterSpec, default, given: Optional[Sequence], base: cfg.RunConfig,
                  twins: dict) -> Param:
    name = spec.name
    values = _choice_values(spec, given, base, twins) if given is not None else spec.values
    if default not in values:
        if given is not None:
            raise ValueError(f"--{name}={format_value(default)} is not among --{spec.flag}="
                             f"{format_value(list(values))}: add it, or change --{name} (the default trial "
                             "is the untuned run).")
        values = (default, *values)
    if name == "depth":
        values = tuple(v for v in values if v in twins)
    return Param(name=name, kind="choice", default=default, values=tuple(values))


def _range_param(spec: HyperparameterSpec, default, given: Optional[Sequence]) -> Param:
    name = spec.name
    if given is not None:
        lo, hi = _range_values(spec, given)
        if not lo <= default <= hi and not (spec.log and default == 0):
            raise ValueError(f"--{name}={format_value(default)} lies outside --{spec.flag}="
                             f"{format_value(lo)},{format_value(hi)}: widen the range, or change --{name} "
                             "(the default trial is the untuned run).")
    else:
        lo, hi = spec.low, spec.high
        if default > 0 or not spec.log:
            lo, hi = min(lo, default), max(hi, default)
    return Param(name=name, kind=spec.kind, default=default, low=lo, high=hi, log=spec.log)


def make_search_space(base: cfg.RunConfig, *, tune: Optional[Sequence[str]] = None,
                      ranges: Optional[Mapping[str, Sequence]] = None,
                      choices: Optional[Mapping[str, Sequence]] = None) -> SearchSpace:
    """Validate the user's narrowing and build the search space around `base`.

    Args:
      base: the untuned run; every hyperparameter's default is its value here.
      tune: names to search (the rest stay at their base values); None searches
        every hyperparameter that applies to `base` (depth only for CIFAR
        ResNets, width_multiplier only for models that take it, freeze_epochs and
        backbone_lr_multiplier only for fine-tuning; `OPT_IN` ones only when named).
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
    names = _searched_names(base, tune, ranges, choices)
    twins = _cifar_twins(base.model.name) or {}
    params = []
    for name in (n for n in HYPERPARAMETERS if n in names):  # declaration order is the table's
        spec = HYPERPARAMETERS[name]
        default = base_value(name, base)
        if default is None:
            raise ValueError(f"--{name} is unset: give it a value to search {name} around.")
        if spec.kind == "choice":
            params.append(_choice_param(spec, default, choices.get(name), base, twins))
        else:
            params.append(_range_param(spec, default, ranges.get(name)))
    return SearchSpace(tuple(params), tuple(sorted(twins.items())))


def space_from_flag_values(base: cfg.RunConfig, *, tune: Optional[Sequence[str]],
                           values: Mapping[str, Optional[Sequence]]) -> SearchSpace:
    """`make_search_space` from `pipeline.tune`'s flag values.

    Args:
      base: the untuned run.
      tune: the `--tune` list (None: every hyperparameter that applies).
      values: flag name (`HyperparameterSpec.flag`: `<name>_range` or
        `<name>_choices`) -> its list value, None where the flag is unset.
    """
    ranges, choices = {}, {}
    for spec in HYPERPARAMETERS.values():
        value = values.get(spec.flag)
        if value is not None:
            (choices if spec.kind == "choice" else ranges)[spec.name] = value
    return make_search_space(base, tune=tune, ranges=ranges, choices=choices)
