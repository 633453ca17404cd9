"""ResNet-18/34/50/101/152 and their pre-activation twins, trained from scratch.

References: He et al. 2015, "Deep Residual Learning for Image Recognition"
(post-activation, conv-BN-ReLU) and He et al. 2016, "Identity Mappings in Deep
Residual Networks" (pre-activation, BN-ReLU-conv, final BN-ReLU before pooling).

Both orderings, every depth, and the CIFAR ResNets in `resnet_cifar.py` are
built by the same few helpers below: a block is described as a list of convs
(`basic` or `bottleneck`) and `residual_block` wires it up in either ordering
with one of three shortcut kinds. The bottleneck puts its stride on the 3x3
conv (the "v1.5" placement used by torchvision and most modern recipes).

Only standard `keras.layers` (Conv2D, BatchNormalization, ReLU, Add, pooling,
Dense), channels_last, no Lambda layers: the graphs stay fused-friendly, the
same code runs on any Keras backend, and models save as `.keras` files.
The Keras-Applications ImageNet ResNets are registered elsewhere under
`keras_resnet50`, ...; the names here are the from-scratch architectures.
"""
from __future__ import annotations

import numbers
import os
import sys
from typing import Sequence

import keras

from pipeline.models.layers import (FusedBatchNormalization, Normalize, ZeroPadShortcut, drop_path_rates,
                                    drop_path as drop_path_branch)
from pipeline.models.registry import register_model
from pipeline.models.stages import numbered, table

# PyTorch's BatchNorm2d defaults (its momentum=0.1 is Keras momentum=0.9), so
# recipes and reference numbers from PyTorch papers transfer unchanged.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Shortcut kinds for `residual_block`. Identity is used whenever the shape is
# unchanged; these say what to do when it changes (or whether to add at all).
SHORTCUT_ZERO_PAD = "A"      # parameter-free subsample + zero channels
SHORTCUT_PROJECTION = "B"    # 1x1 conv (+ BN in post-activation nets)
SHORTCUT_NONE = "none"       # plain network: no addition at all

STEMS = ("auto", "cifar", "imagenet")
POOLINGS = ("avg", "max")
# `stem="auto"` picks the CIFAR stem up to this input size: a 7x7/2 conv plus a
# max-pool would shrink a 32 px image to 8 px before the first block.
AUTO_STEM_MAX_CIFAR_SIZE = 64


# ---------------------------------------------------------------------------
# Argument checks shared by every builder.

def check_choice(value, choices: Sequence, what: str):
    """`value` if it is one of `choices`, else a ValueError naming them."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def scaled_filters(base: int, width_multiplier: float) -> int:
    """`base` channels times `width_multiplier`, rounded, at least 1."""
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, numbers.Real) \
            or width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be a positive number, got {width_multiplier!r}.")
    return max(1, int(round(base * width_multiplier)))


# ---------------------------------------------------------------------------
# Model input and output: the contract every family shares.

def normalized_input(input_shape, normalization):
    """The float32 [0, 1] RGB model input and its normalized tensor.

    Args:
      input_shape: `(height, width, channels)`.
      normalization: None (defaults of `Normalize`) or a `(mean, std)` pair of
        per-channel sequences, so the model owns its normalization.

    Returns:
      `(inputs, x)`: the `keras.Input` and the output of its `Normalize` layer.
    """
    if normalization is None:
        mean = std = None
    else:
        try:
            mean, std = normalization
        except (TypeError, ValueError) as err:
            raise ValueError("normalization must be None or a (mean, std) pair of "
                             f"per-channel tuples, got {normalization!r}.") from err
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    return inputs, Normalize(mean, std, name="normalize")(inputs)


def classifier_head(x, num_classes: int, pooling: str = "avg"):
    """Global pooling (layer "pool") and a float32 Dense layer (layer "logits").

    The Dense layer is float32 even under a mixed-precision policy so losses
    and softmax see full-precision logits; there is no softmax in the model.
    """
    check_choice(pooling, POOLINGS, "pooling")
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    else:
        x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    return keras.layers.Dense(int(num_classes), dtype="float32", name="logits")(x)


def load_weights_file(model: keras.Model, weights) -> keras.Model:
    """Load a `.weights.h5` file into `model` (None leaves the random init).

    Raises:
      ValueError: `weights` is neither None nor a path ending in `.weights.h5`.
      FileNotFoundError: the `.weights.h5` path does not exist.
    """
    if weights is None:
        return model
    path = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else None
    if path is None or not path.endswith(".weights.h5"):
        raise ValueError(f"Model {model.name!r} takes weights=None (random init) or a path "
                         f"to a '.weights.h5' file, got {weights!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file {path!r} for model {model.name!r} does not exist.")
    model.load_weights(path)
    return model


def ensure_recursion_limit(graph_depth: int) -> None:
    """Raise Python's recursion limit so Keras can map a `graph_depth`-layer graph.

    Why: Keras walks a functional graph recursively, about one Python frame
    per layer on the longest path, when it builds, clones or reloads a model.
    ResNet-1202 is ~4200 layers deep, past Python's default limit of 1000.
    The limit is only ever raised, and stays raised so the model can later be
    cloned or reloaded in this process (a fresh process reloading such a model
    should call this first).
    """
    needed = 2 * graph_depth + 1000
    if sys.getrecursionlimit() < needed:
        sys.setrecursionlimit(needed)


def finish_model(inputs, features, *, name: str, num_classes: int, pooling: str = "avg",
                 weights=None) -> keras.Model:
    """Add the classifier head to `features`, build the model, load weights."""
    logits = classifier_head(features, num_classes, pooling)
    return load_weights_file(keras.Model(inputs, logits, name=name), weights)


# ---------------------------------------------------------------------------
# Layer helpers.

def conv(x, filters: int, kernel_size: int, strides: int = 1, *, name: str):
    """He-normal conv, "same" padding, no bias (a BatchNorm always follows)."""
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                               use_bias=False, kernel_initializer="he_normal", name=name)(x)


def batch_norm(x, *, name: str):
    """BatchNormalization with PyTorch-equivalent momentum and epsilon.

    `FusedBatchNormalization` is `keras.layers.BatchNormalization` with the same
    results that trains with TensorFlow's fused kernel on that backend
    (see `pipeline.models.layers` and BENCHMARKS.md).
    """
    return FusedBatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)


def bn_relu(x, *, name: str):
    """BN then ReLU, named `<name>_bn` and `<name>_relu`."""
    return keras.layers.ReLU(name=f"{name}_relu")(batch_norm(x, name=f"{name}_bn"))


def conv_bn_relu(x, filters: int, kernel_size: int, strides: int = 1, *, name: str):
    """Post-activation stem unit: conv, BN, ReLU."""
    return bn_relu(conv(x, filters, kernel_size, strides, name=f"{name}_conv"), name=name)


# ---------------------------------------------------------------------------
# Blocks. A block is a list of (kernel_size, filters, strides) convs.

def basic(filters: int, strides: int) -> list[tuple[int, int, int]]:
    """Two 3x3 convs; the first one carries the stride. Output: `filters`."""
    return [(3, filters, strides), (3, filters, 1)]


def bottleneck(filters: int, strides: int, expansion: int = 4) -> list[tuple[int, int, int]]:
    """1x1 reduce, 3x3 (with the stride), 1x1 expand to `expansion * filters`."""
    return [(1, filters, 1), (3, filters, strides), (1, expansion * filters, 1)]


def _shortcut(x, filters: int, strides: int, kind: str, *, batchnorm: bool, name: str):
    """The block's shortcut branch from `x` to `filters` channels at `strides`."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    if kind == SHORTCUT_ZERO_PAD:
        return ZeroPadShortcut(filters, strides, name=f"{name}_shortcut_pad")(x)
    x = conv(x, filters, 1, strides, name=f"{name}_shortcut_conv")
    return batch_norm(x, name=f"{name}_shortcut_bn") if batchnorm else x


def residual_block(x, convs: list[tuple[int, int, int]], *, shortcut: str = SHORTCUT_PROJECTION,
                   preact: bool = False, drop_rate: float = 0.0, name: str):
    """One residual (or plain) block in post- or pre-activation ordering.

    Post-activation (He et al. 2015): conv-BN-ReLU ... conv-BN, add the
    shortcut, then ReLU. Pre-activation (He et al. 2016): BN-ReLU-conv for
    every conv and a bare addition, so the identity path stays clean; a
    projection shortcut then reads the pre-activated input and has no BN,
    as in the paper's reference implementation.

    Args:
      x: block input.
      convs: `(kernel_size, filters, strides)` per conv, from `basic`/`bottleneck`.
      shortcut: `SHORTCUT_ZERO_PAD`, `SHORTCUT_PROJECTION` or `SHORTCUT_NONE`;
        identity is used whenever the shape does not change.
      preact: pre-activation ordering.
      drop_rate: stochastic depth: the residual branch is dropped per example
        with this probability in training (layer `<name>_drop_path`; none at 0).
      name: prefix of the block's layer names.

    Returns:
      The block output tensor.
    """
    strides = max(s for _, _, s in convs)
    out_filters = convs[-1][1]
    y = bn_relu(x, name=f"{name}_preact") if preact else x
    shortcut_input = y if preact else x
    for i, (kernel_size, filters, conv_strides) in enumerate(convs, start=1):
        if preact and i > 1:
            y = bn_relu(y, name=f"{name}_{i - 1}")
        y = conv(y, filters, kernel_size, conv_strides, name=f"{name}_{i}_conv")
        if not preact:
            y = batch_norm(y, name=f"{name}_{i}_bn")
            if i < len(convs):
                y = keras.layers.ReLU(name=f"{name}_{i}_relu")(y)
    if shortcut != SHORTCUT_NONE:
        if preact and strides == 1 and x.shape[-1] == out_filters:
            shortcut_input = x  # identity: skip the pre-activation entirely
        s = _shortcut(shortcut_input, out_filters, strides, shortcut,
                      batchnorm=not preact, name=name)
        y = drop_path_branch(y, drop_rate, name=name)
        y = keras.layers.Add(name=f"{name}_add")([y, s])
    return y if preact else keras.layers.ReLU(name=f"{name}_out")(y)


def residual_stages(x, block_fn, stage_filters: Sequence[int], stage_blocks: Sequence[int],
                    stage_strides: Sequence[int], *, shortcut: str, preact: bool,
                    drop_path: float = 0.0):
    """Stack stages of blocks; the first block of each stage carries the stride.

    Layers are named `stage<i>_block<j>_...` (1-based). `drop_path` is the
    stochastic-depth rate of the last block, the first block's is 0 and the
    rates in between are linear (`layers.drop_path_rates`).
    """
    rates = iter(drop_path_rates(sum(stage_blocks), drop_path))
    for stage, (filters, blocks, strides) in enumerate(
            zip(stage_filters, stage_blocks, stage_strides), start=1):
        for block in range(1, blocks + 1):
            x = residual_block(x, block_fn(filters, strides if block == 1 else 1),
                               shortcut=shortcut, preact=preact, drop_rate=next(rates),
                               name=f"stage{stage}_block{block}")
    return x


# ---------------------------------------------------------------------------
# ImageNet-style ResNets.

_BLOCKS = {18: (basic, (2, 2, 2, 2)), 34: (basic, (3, 4, 6, 3)), 50: (bottleneck, (3, 4, 6, 3)),
           101: (bottleneck, (3, 4, 23, 3)), 152: (bottleneck, (3, 8, 36, 3))}
_STAGE_FILTERS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)


def resolve_stem(stem: str, input_shape) -> str:
    """"cifar" or "imagenet"; "auto" is "cifar" up to 64 px, else "imagenet".

    An unknown (None) height or width resolves to "imagenet".
    """
    check_choice(stem, STEMS, "stem")
    if stem != "auto":
        return stem
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None:
        return "imagenet"
    return "cifar" if max(height, width) <= AUTO_STEM_MAX_CIFAR_SIZE else "imagenet"


def _stem(x, filters: int, stem: str, *, preact: bool):
    """CIFAR stem (3x3/1 conv) or ImageNet stem (7x7/2 conv + 3x3/2 max-pool).

    Post-activation stems end in BN-ReLU. Pre-activation stems are a bare conv
    (plus max-pool): the first block's BN-ReLU activates them.
    """
    kernel_size, strides = (3, 1) if stem == "cifar" else (7, 2)
    if preact:
        x = conv(x, filters, kernel_size, strides, name="stem_conv")
    else:
        x = conv_bn_relu(x, filters, kernel_size, strides, name="stem")
    if stem == "imagenet":
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    return x


def _resnet(name: str, depth: int, *, preact: bool, num_classes, input_shape, weights,
            normalization, stem, pooling, width_multiplier, drop_path) -> keras.Model:
    """Build ResNet-`depth` (post- or pre-activation) with projection shortcuts."""
    block_fn, stage_blocks = _BLOCKS[depth]
    check_choice(pooling, POOLINGS, "pooling")
    stem = resolve_stem(stem, input_shape)
    filters = [scaled_filters(f, width_multiplier) for f in _STAGE_FILTERS]
    inputs, x = normalized_input(input_shape, normalization)
    x = _stem(x, filters[0], stem, preact=preact)
    x = residual_stages(x, block_fn, filters, stage_blocks, _STAGE_STRIDES,
                        shortcut=SHORTCUT_PROJECTION, preact=preact, drop_path=drop_path)
    if preact:
        x = bn_relu(x, name="final")
    return finish_model(inputs, x, name=name, num_classes=num_classes, pooling=pooling,
                        weights=weights)



def _make_builder(depth: int, *, preact: bool):
    name = f"{'preact_' if preact else ''}resnet{depth}"

    def builder(*, num_classes, input_shape, weights=None, normalization=None,
                stem="auto", pooling="avg", width_multiplier=1.0, drop_path=0.0):
        return _resnet(name, depth, preact=preact, num_classes=num_classes, input_shape=input_shape,
                       weights=weights, normalization=normalization, stem=stem, pooling=pooling,
                       width_multiplier=width_multiplier, drop_path=drop_path)

    block_fn, stage_blocks = _BLOCKS[depth]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"{'Pre-activation ' if preact else ''}ResNet-{depth}: {block_fn.__name__} blocks "
                       f"{stage_blocks}.\n\n`stem` \"auto\" | \"cifar\" | \"imagenet\", `pooling` \"avg\" | "
                       "\"max\", `width_multiplier` scales every stage's channels, `drop_path` is the last block's "
                       "stochastic-depth rate (linear from 0 at the first block).")
    return name, builder


# Stages for --layer_decay (`pipeline.models.stages`): the stem, the four stages by their
# layer names, the pre-activation nets' final BN-ReLU with the last stage.
STAGES = table(("stem", "stem"), *numbered("stage", 1, 3), ("stage4", ("stage4", "final")))

# One registered builder per depth and variant, made from `_BLOCKS` (like bit.py's table).
for _preact, _family in ((False, "resnet"), (True, "preact_resnet")):
    for _depth in _BLOCKS:
        _name, _builder = _make_builder(_depth, preact=_preact)
        register_model(_name, family=_family, default_image_size=224, depth=_depth,
                       depths=_BLOCKS[_depth][1], stages=(STAGES,))(_builder)
        globals()[_name] = _builder
del _preact, _family, _depth, _name, _builder
