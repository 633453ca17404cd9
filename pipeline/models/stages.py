"""A model's stages (stem, stage 1..n, head) from its family's declared table, for layer-wise LR decay.

Why tables: layer-wise learning-rate decay (`--layer_decay=D`: the head at the
full rate, the last stage at D, the one before at D**2, ..., the stem at
D**(n+1)) needs to know which variables belong to which stage. Every family
declares that in its `ModelSpec.stages` (`register_model(..., stages=...)`):
a `StageTable` per backbone kind, listing for each stage, stem first, the
*name roots* of its layers. A layer belongs to a stage when its name is one of
the stage's roots or continues one with `_` or `/` (root `conv2` takes
`conv2_block1_1_conv`, root `conv_dw_1` takes `conv_dw_1_bn` but not
`conv_dw_10`). The head is always the layer "logits"
(`pipeline.models.pretrained.HEAD`). Nothing is inferred from names beyond the
declared roots (the longest root a name continues wins: `conv_1` over
`conv` for `conv_1_bn`): a trained layer no root claims is an error naming it, so an
incomplete table can never give a variable a silently wrong rate (the
contract tests build one model per family and stage every variable).

A model nests its backbone (Keras Applications, keras-hub: ONE layer
"backbone") or is flat (our ResNets, BiT); nested models are walked through
their public `layers`. Stages without any variable (a 2-stage keras-hub
ResNet against a 4-stage table) are dropped before the rates are counted.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

from pipeline.models.pretrained import BACKBONE, HEAD
from pipeline.models.registry import get_spec

_SEPARATORS = ("_", "/")


@dataclasses.dataclass(frozen=True)
class StageTable:
    """The stages of one backbone kind, stem first (the head "logits" is implied).

    Attributes:
      stages: `(stage name, layer-name roots)` per stage, stem first.
      backbone_class: for families whose backbone class varies by argument
        (keras-hub presets), the class name of the "backbone" layer this
        table is for; None for a family with one table.
    """

    stages: tuple
    backbone_class: Optional[str] = None

    @property
    def names(self) -> tuple:
        return tuple(name for name, _ in self.stages)


def table(*stages: tuple, backbone_class: Optional[str] = None) -> StageTable:
    """A `StageTable` from `(name, roots)` pairs; a single root may be given as a string."""
    return StageTable(tuple((name, (roots,) if isinstance(roots, str) else tuple(roots))
                            for name, roots in stages), backbone_class)


def numbered(prefix: str, first: int, last: int, *, name: str = "stage") -> tuple:
    """`(f"{name}{i}", f"{prefix}{i}")` for i in first..last: the usual numbered stages."""
    return tuple((f"{name}{i - first + 1}", f"{prefix}{i}") for i in range(first, last + 1))


def _claiming_stage(stage_table: "StageTable", layer_name: str) -> Optional[int]:
    """The index of the stage with the longest root that `layer_name` is or continues; None if none."""
    best, best_length = None, -1
    for index, (_, roots) in enumerate(stage_table.stages):
        for root in roots:
            if (layer_name == root or layer_name.startswith(tuple(root + s for s in _SEPARATORS))) \
                    and len(root) > best_length:
                best, best_length = index, len(root)
    return best


class StageError(ValueError):
    """The model declares no stages, or a trained layer is in none of them."""


def _pick_table(model, tables: Sequence[StageTable], model_name: str) -> StageTable:
    names = {layer.name for layer in model.layers}
    backbone_class = type(model.get_layer(BACKBONE)).__name__ if BACKBONE in names else None
    for candidate in tables:
        if candidate.backbone_class in (None, backbone_class):
            return candidate
    declared = ", ".join(t.backbone_class or "?" for t in tables) or "none"
    raise StageError(f"--layer_decay: --model={model_name} declares no stages"
                     f"{' for a ' + backbone_class if backbone_class else ''} (declared: {declared}), so "
                     "its layers cannot be ordered; drop --layer_decay or use a model whose registry entry "
                     "lists its stages (`pipeline.list_models` families cifar_resnet, resnet, preact_resnet, "
                     "bit, most keras_apps, keras_hub ResNets).")


def _collect(layer, stage_table: StageTable, groups: list, model_name: str) -> None:
    """Put `layer`'s variables in the stage that claims it; walk into nested models none claims."""
    index = _claiming_stage(stage_table, layer.name)
    if index is not None:
        groups[index].extend(layer.weights)
        return
    inner = getattr(layer, "layers", None)
    if inner is not None:
        for sub in inner:
            _collect(sub, stage_table, groups, model_name)
    elif layer.trainable_weights:
        raise StageError(f"--layer_decay: layer {layer.name!r} of --model={model_name} is in none of the "
                         f"stages its registry entry declares ({', '.join(stage_table.names)}); the "
                         "family's stage table is incomplete.")


def variable_stages(model, model_name: str) -> list[tuple[str, list]]:
    """`(stage name, variables)` from the stem to the head ("head": the "logits" layer), empty stages dropped.

    Args:
      model: a model built by `create_model(model_name, ...)`.
      model_name: its registry name (selects the family's `ModelSpec.stages`).

    Raises:
      StageError: the family declares no stages, or a trained layer is in none.
    """
    stage_table = _pick_table(model, get_spec(model_name).stages, model_name)
    groups: list = [[] for _ in stage_table.stages]
    head = []
    for layer in model.layers:
        if layer.name == HEAD:
            head.extend(layer.weights)
        elif layer.weights:
            _collect(layer, stage_table, groups, model_name)
    staged = [(name, variables) for name, variables in zip(stage_table.names, groups) if variables]
    return staged + [("head", head)]


def layer_decay_rates(num_stages: int, decay: float) -> list[float]:
    """Learning-rate multipliers of `num_stages` stages, stem first, the last (the head) 1: `decay**depth`."""
    return [float(decay) ** (num_stages - 1 - i) for i in range(num_stages)]


def layer_decay_multipliers(model, model_name: str, decay: float) -> Mapping[str, float]:
    """Variable path -> learning-rate multiplier for `--layer_decay=decay` (1.0 for the head).

    Only multipliers different from 1 are listed (none for `decay == 1`).
    """
    if decay == 1.0:
        return {}
    staged = variable_stages(model, model_name)
    rates = layer_decay_rates(len(staged), decay)
    return {v.path: rate for (_, variables), rate in zip(staged, rates) if rate != 1.0 for v in variables}
