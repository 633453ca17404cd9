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

No L2 regularizer in the model: weight decay (1e-4 in the paper) is the
optimizer's job, so it is applied consistently and is visible in one place.
"""
from __future__ import annotations

import keras

from pipeline.models.registry import register_model
from pipeline.models.resnet import (SHORTCUT_NONE, SHORTCUT_PROJECTION, SHORTCUT_ZERO_PAD,
                                    basic, check_choice, conv_bn_relu, ensure_recursion_limit,
                                    finish_model, normalized_input, residual_stages, scaled_filters)

_STAGE_FILTERS = (16, 32, 64)
_STAGE_STRIDES = (1, 2, 2)
_SHORTCUTS = (SHORTCUT_ZERO_PAD, SHORTCUT_PROJECTION)


def blocks_per_stage(depth: int) -> int:
    """n for a 6n+2-layer network; ValueError for other depths."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, ...), got {depth}.")
    return (depth - 2) // 6


def _cifar_resnet(name: str, depth: int, *, shortcut: str, num_classes, input_shape, weights,
                  normalization, width_multiplier) -> keras.Model:
    """Build a 6n+2-layer CIFAR network; `shortcut=SHORTCUT_NONE` gives the plain twin."""
    n = blocks_per_stage(depth)
    if shortcut != SHORTCUT_NONE:
        check_choice(shortcut, _SHORTCUTS, "shortcut")
    filters = [scaled_filters(f, width_multiplier) for f in _STAGE_FILTERS]
    inputs, x = normalized_input(input_shape, normalization)
    x = conv_bn_relu(x, filters[0], 3, name="stem")
    x = residual_stages(x, basic, filters, (n, n, n), _STAGE_STRIDES,
                        shortcut=shortcut, preact=False)
    ensure_recursion_limit(4 * depth)  # ~3.5 layers per weighted layer
    return finish_model(inputs, x, name=name, num_classes=num_classes, weights=weights)


@register_model(family="cifar_resnet", default_image_size=32, depth=20, depths=(3, 3, 3),
                residual=True)
def resnet20(*, num_classes, input_shape, weights=None, normalization=None,
             shortcut="A", width_multiplier=1.0):
    """ResNet-20 (n=3, 0.27M params): 8.75% CIFAR-10 error in the paper."""
    return _cifar_resnet("resnet20", 20, shortcut=shortcut, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=32, depths=(5, 5, 5),
                residual=True)
def resnet32(*, num_classes, input_shape, weights=None, normalization=None,
             shortcut="A", width_multiplier=1.0):
    """ResNet-32 (n=5, 0.46M params): 7.51% CIFAR-10 error in the paper."""
    return _cifar_resnet("resnet32", 32, shortcut=shortcut, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=44, depths=(7, 7, 7),
                residual=True)
def resnet44(*, num_classes, input_shape, weights=None, normalization=None,
             shortcut="A", width_multiplier=1.0):
    """ResNet-44 (n=7, 0.66M params): 7.17% CIFAR-10 error in the paper."""
    return _cifar_resnet("resnet44", 44, shortcut=shortcut, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=56, depths=(9, 9, 9),
                residual=True)
def resnet56(*, num_classes, input_shape, weights=None, normalization=None,
             shortcut="A", width_multiplier=1.0):
    """ResNet-56 (n=9, 0.85M params): 6.97% CIFAR-10 error in the paper."""
    return _cifar_resnet("resnet56", 56, shortcut=shortcut, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=110, depths=(18, 18, 18),
                residual=True)
def resnet110(*, num_classes, input_shape, weights=None, normalization=None,
              shortcut="A", width_multiplier=1.0):
    """ResNet-110 (n=18, 1.7M params): 6.43% CIFAR-10 error in the paper."""
    return _cifar_resnet("resnet110", 110, shortcut=shortcut, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=1202, depths=(200, 200, 200),
                residual=True)
def resnet1202(*, num_classes, input_shape, weights=None, normalization=None,
               shortcut="A", width_multiplier=1.0):
    """ResNet-1202 (n=200, 19.4M params): the paper's overfitting example (7.93%)."""
    return _cifar_resnet("resnet1202", 1202, shortcut=shortcut, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=20, depths=(3, 3, 3),
                residual=False)
def plain20(*, num_classes, input_shape, weights=None, normalization=None, width_multiplier=1.0):
    """Plain-20: ResNet-20 without shortcuts (the paper's degradation baseline)."""
    return _cifar_resnet("plain20", 20, shortcut=SHORTCUT_NONE, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=32, depths=(5, 5, 5),
                residual=False)
def plain32(*, num_classes, input_shape, weights=None, normalization=None, width_multiplier=1.0):
    """Plain-32: ResNet-32 without shortcuts."""
    return _cifar_resnet("plain32", 32, shortcut=SHORTCUT_NONE, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=44, depths=(7, 7, 7),
                residual=False)
def plain44(*, num_classes, input_shape, weights=None, normalization=None, width_multiplier=1.0):
    """Plain-44: ResNet-44 without shortcuts."""
    return _cifar_resnet("plain44", 44, shortcut=SHORTCUT_NONE, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=56, depths=(9, 9, 9),
                residual=False)
def plain56(*, num_classes, input_shape, weights=None, normalization=None, width_multiplier=1.0):
    """Plain-56: ResNet-56 without shortcuts (higher training error than plain-20)."""
    return _cifar_resnet("plain56", 56, shortcut=SHORTCUT_NONE, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)


@register_model(family="cifar_resnet", default_image_size=32, depth=110, depths=(18, 18, 18),
                residual=False)
def plain110(*, num_classes, input_shape, weights=None, normalization=None, width_multiplier=1.0):
    """Plain-110: ResNet-110 without shortcuts (fails to converge well in the paper)."""
    return _cifar_resnet("plain110", 110, shortcut=SHORTCUT_NONE, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, normalization=normalization,
                         width_multiplier=width_multiplier)
