"""He et al. 2016 CIFAR ResNets (6n+2 layers) and their plain (no-shortcut) twins.

Architecture (paper section 4.2): a 3x3 conv with 16 filters, three stages of
n basic blocks with 16, 32 and 64 filters (the first block of stages 2 and 3
halves the resolution), global average pooling and a Dense head: 6n + 2
weighted layers. With the paper's parameter-free "option A" shortcuts the
parameter counts are 0.27M (ResNet-20), 0.46M (32), 0.66M (44), 0.85M (56),
1.7M (110) and 19.4M (1202), and a plain twin has exactly as many parameters
as its ResNet, which is what makes the paper's comparison fair.

Options of every builder:
  shortcut: "A" (zero-padding, paper default on CIFAR) or "B" (1x1 conv + BN
    projection where the shape changes, identity elsewhere). Plain nets have
    no shortcut and so no such option.
  width_multiplier: scales the 16/32/64 channels (2.0 is about 4x the params).
  drop_path (residual nets only): stochastic depth, the last block's drop
    rate (linear from 0 at the first block; 0 builds the paper's network).

No L2 regularizer in the model: weight decay (1e-4 in the paper) is the
optimizer's job, so it is applied consistently and is visible in one place.
"""
from __future__ import annotations

import keras

from pipeline.models.registry import register_model
from pipeline.models.resnet import (SHORTCUT_NONE, SHORTCUT_PROJECTION, SHORTCUT_ZERO_PAD,
                                    basic, check_choice, conv_bn_relu, ensure_recursion_limit,
                                    finish_model, normalized_input, residual_stages, scaled_filters)
from pipeline.models.stages import numbered, table

_STAGE_FILTERS = (16, 32, 64)
_STAGE_STRIDES = (1, 2, 2)
_SHORTCUTS = (SHORTCUT_ZERO_PAD, SHORTCUT_PROJECTION)
# Stages for --layer_decay (`pipeline.models.stages`): the stem conv, then the three stages.
STAGES = table(("stem", "stem"), *numbered("stage", 1, 3))


def blocks_per_stage(depth: int) -> int:
    """n for a 6n+2-layer network; ValueError for other depths."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, ...), got {depth}.")
    return (depth - 2) // 6


def _cifar_resnet(name: str, depth: int, *, shortcut: str, num_classes, input_shape, weights,
                  normalization, width_multiplier, drop_path=0.0) -> keras.Model:
    """Build a 6n+2-layer CIFAR network; `shortcut=SHORTCUT_NONE` gives the plain twin."""
    n = blocks_per_stage(depth)
    if shortcut != SHORTCUT_NONE:
        check_choice(shortcut, _SHORTCUTS, "shortcut")
    filters = [scaled_filters(f, width_multiplier) for f in _STAGE_FILTERS]
    inputs, x = normalized_input(input_shape, normalization)
    x = conv_bn_relu(x, filters[0], 3, name="stem")
    x = residual_stages(x, basic, filters, (n, n, n), _STAGE_STRIDES,
                        shortcut=shortcut, preact=False, drop_path=drop_path)
    ensure_recursion_limit(4 * depth)  # ~3.5 layers per weighted layer
    return finish_model(inputs, x, name=name, num_classes=num_classes, weights=weights)


# depth -> what the paper reports of the residual network (He et al. 2016, Table 6).
RESIDUAL_VARIANTS = {
    20: "0.27M params: 8.75% CIFAR-10 error in the paper",
    32: "0.46M params: 7.51% CIFAR-10 error in the paper",
    44: "0.66M params: 7.17% CIFAR-10 error in the paper",
    56: "0.85M params: 6.97% CIFAR-10 error in the paper",
    110: "1.7M params: 6.43% CIFAR-10 error in the paper",
    1202: "19.4M params: the paper's overfitting example (7.93%)",
}
# depth -> what the paper shows of the plain (shortcut-free) twin (Fig. 6).
PLAIN_VARIANTS = {
    20: "the paper's degradation baseline",
    32: "deeper, with higher training error",
    44: "deeper, with higher training error",
    56: "higher training error than plain-20",
    110: "fails to converge well in the paper",
}


def _make_residual(depth: int, note: str):
    def builder(*, num_classes, input_shape, weights=None, normalization=None,
                shortcut="A", width_multiplier=1.0, drop_path=0.0):
        return _cifar_resnet(f"resnet{depth}", depth, shortcut=shortcut, num_classes=num_classes,
                             input_shape=input_shape, weights=weights, normalization=normalization,
                             width_multiplier=width_multiplier, drop_path=drop_path)

    builder.__doc__ = f"ResNet-{depth} (n={blocks_per_stage(depth)}, {note})."
    return builder


def _make_plain(depth: int, note: str):
    def builder(*, num_classes, input_shape, weights=None, normalization=None, width_multiplier=1.0):
        return _cifar_resnet(f"plain{depth}", depth, shortcut=SHORTCUT_NONE, num_classes=num_classes,
                             input_shape=input_shape, weights=weights, normalization=normalization,
                             width_multiplier=width_multiplier)

    builder.__doc__ = f"Plain-{depth}: ResNet-{depth} without shortcuts ({note})."
    return builder


# One registered builder per variant, made from the tables (like bit.py's and pretrained.py's).
for _kind, _variants, _make in (("resnet", RESIDUAL_VARIANTS, _make_residual),
                                ("plain", PLAIN_VARIANTS, _make_plain)):
    for _depth, _note in _variants.items():
        _builder = _make(_depth, _note)
        _builder.__name__ = _builder.__qualname__ = f"{_kind}{_depth}"
        _n = blocks_per_stage(_depth)
        register_model(_builder.__name__, family="cifar_resnet", default_image_size=32, depth=_depth,
                       depths=(_n, _n, _n), residual=_kind == "resnet", stages=(STAGES,))(_builder)
        globals()[_builder.__name__] = _builder
del _kind, _variants, _make, _depth, _note, _builder, _n
