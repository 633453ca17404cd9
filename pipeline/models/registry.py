"""Model registry: every architecture is one decorated builder function.

Why a registry: entry points declare `--model` as an enum over `list_models()`,
tests are parametrized over it, and `create_model` gives one consistent call for
every family (CIFAR ResNets, ImageNet ResNets, BiT, Keras Applications, hub).

Builder contract (keras-applications style, keyword-only):
    builder(*, num_classes, input_shape, weights=None, normalization=None, **options)
      -> keras.Model taking float32 RGB images in [0, 1] and returning float32 logits.
`normalization` is a `(mean, std)` pair of per-channel tuples for models that
learn from scratch; pretrained models ignore it and apply their own.

The tables fill when the families register (importing `pipeline.models`, which
Python runs before any of its submodules, this one included): the registry
itself imports no family, so there is no import cycle.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Callable, Optional

_REGISTRY: dict[str, "ModelSpec"] = {}
# `--weights` values that mean "random initialization" for every model.
NO_WEIGHTS = ("none", "random")
_PREFIXES: dict[str, "ModelSpec"] = {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the pipeline knows about a registered model.

    Attributes:
      name: registry name (`resnet20`, `bit_m_r50x1`, or a prefix like `hub:`).
      builder: the builder function.
      family: grouping for docs and defaults (`cifar_resnet`, `resnet`, `bit`, ...).
      default_image_size: resolution the model is meant for when data does not say.
      pretrained: whether `weights` makes sense for it (fine-tuning backbones).
      is_prefix: the name is a prefix taking an argument (`hub:<handle>`).
      depth: the depth in the model's name as its paper counts it (20, 56, 50,
        152), None where it has none.
      depths: residual units per stage, () where not meaningful.
      width: the architecture's width multiplier (BiT's x1/x3/x4), 1 otherwise.
      residual: False for the plain (shortcut-free) CIFAR twins.
      default_weights: what `pipeline.finetune` loads when `--weights` is unset
        (a TF-Hub handle, `imagenet`), None where it trains from scratch.
      provenance: `f(*, argument, weights) -> dict` describing where loaded
        weights came from (handle, version or revision, checksum) for the run
        summary and the model card; None records `{"source": weights}`.
      image_size_for: for prefix models, `f(argument) -> int`, the default
        resolution of that argument (a keras-hub preset's own image size);
        None uses `default_image_size`.
      stages: `pipeline.models.stages.StageTable`s: which layers form the stem
        and stages 1..n (the head is "logits"), what `--layer_decay` scales;
        () where the family cannot say (opaque hub modules, applications whose
        layers have generated names).
      frozen_is_inference: a frozen backbone computes in training mode what it
        computes in inference mode (no dropout inside; options that add some
        are refused by `feature_cache.plan`), so `--cache_features` need not
        check it by running the model (`feature_cache.training_mode_note`).
    """

    name: str
    builder: Callable
    family: str
    default_image_size: int
    pretrained: bool = False
    is_prefix: bool = False
    depth: Optional[int] = None
    depths: tuple = ()
    width: float = 1.0
    residual: bool = True
    default_weights: Optional[str] = None
    provenance: Optional[Callable] = None
    image_size_for: Optional[Callable] = None
    stages: tuple = ()
    frozen_is_inference: bool = False

    def options(self) -> set[str]:
        """Keyword options the builder accepts beyond the common contract."""
        params = inspect.signature(self.builder).parameters
        common = {"num_classes", "input_shape", "weights", "normalization", "argument"}
        return {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in common}


def register_model(name: str | None = None, *, family: str, default_image_size: int = 32,
                   pretrained: bool = False, prefix: bool = False, **architecture):
    """Decorator registering a builder under `name` (defaults to its function name).

    With `prefix=True`, `name` ends with ':' and the model is selected by names
    like `hub:<handle>`; the builder then receives `argument=<handle>`.
    `architecture` sets the ModelSpec's metadata fields (`depth`, `depths`,
    `width`, `residual`, `default_weights`, `stages`, `frozen_is_inference`).
    """

    def decorate(fn):
        key = name or fn.__name__
        spec = ModelSpec(key, fn, family, default_image_size, pretrained, prefix, **architecture)
        table = _PREFIXES if prefix else _REGISTRY
        if key in table:
            raise ValueError(f"model {key!r} is registered twice")
        table[key] = spec
        return fn

    return decorate


def list_models(family: str | None = None) -> list[str]:
    """Sorted names of registered (non-prefix) models, optionally of one family."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def list_specs(family: str | None = None) -> list[ModelSpec]:
    """The specs of registered (non-prefix) models, sorted by name, optionally of one family."""
    return [_REGISTRY[n] for n in list_models(family)]


def list_prefixes() -> list[str]:
    return sorted(_PREFIXES)


def is_valid_model_name(name: str) -> bool:
    """True for registered names and `prefix:argument` forms (used by flag validators)."""
    return name in _REGISTRY or any(name.startswith(p) and len(name) > len(p) for p in _PREFIXES)


def get_spec(name: str) -> ModelSpec:
    """The spec for `name`; an unknown name raises ValueError listing close names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, spec in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return spec
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}; "
        f"prefixes: {', '.join(p + '<arg>' for p in sorted(_PREFIXES))}.")


def prefix_argument(spec: ModelSpec, name: str) -> Optional[str]:
    """What a prefix model's builder gets as `argument` (`hub:<this>`); None for other models."""
    return name[len(spec.name):] if spec.is_prefix else None


def default_image_size(name: str) -> int:
    """The resolution model `name` is meant for: its argument's own (a preset's) or its family's."""
    spec = get_spec(name)
    if spec.image_size_for is not None:
        return int(spec.image_size_for(prefix_argument(spec, name)))
    return spec.default_image_size


def weights_provenance(name: str, weights: Optional[str]) -> Optional[dict]:
    """Where the weights of model `name` came from (None for random initialization).

    The family's own `ModelSpec.provenance` says more (a preset's version, a
    checksum of its files); otherwise the weights argument itself is recorded.
    """
    spec = get_spec(name)
    if spec.provenance is not None:
        return spec.provenance(argument=prefix_argument(spec, name), weights=weights)
    return {"source": weights} if weights and weights.lower() not in NO_WEIGHTS else None


def create_model(name: str, *, num_classes: int, image_size: int | None = None,
                 weights: str | None = None, normalization=None, **options):
    """Build the registered model `name`.

    Args:
      name: a registered model name or a `prefix:argument` form.
      num_classes: size of the classification head.
      image_size: square input resolution; defaults to the model's own.
      weights: None (random init), or what the family loads (a TF-Hub handle,
        a SavedModel directory, an `.npz`/`.h5` file, `imagenet`).
      normalization: `(mean, std)` per-channel tuples for from-scratch models.
      **options: family options (`shortcut`, `stem`, `pooling`, `width_multiplier`,
        ...). Options given as None are dropped, so callers can pass unset flags.

    Returns:
      A keras.Model from float32 [0, 1] RGB images to float32 logits.

    Raises:
      ValueError: unknown model name, or an option the model does not take.
    """
    spec = get_spec(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - spec.options()
    if unknown:
        raise ValueError(
            f"Model {name!r} does not take option(s) {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(spec.options())) or 'none'}.")
    if isinstance(weights, str) and weights.lower() in NO_WEIGHTS:
        weights = None
    size = image_size or default_image_size(name)
    kwargs = dict(num_classes=num_classes, input_shape=(size, size, 3), weights=weights,
                  normalization=normalization, **options)
    if spec.is_prefix:
        kwargs["argument"] = prefix_argument(spec, name)
    return spec.builder(**kwargs)
