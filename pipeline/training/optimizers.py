"""Optimizers by name, and per-variable learning rates: the backbone multiplier of a fine-tuned
model and layer-wise decay (`--layer_decay`), in one mechanism.

Weight decay is Keras's decoupled form for every optimizer (for SGD without
momentum it equals an L2 term of weight_decay/2 * |w|^2 in the loss).
"""
from __future__ import annotations

import functools

import keras

from pipeline import config as cfg
from pipeline.models.pretrained import head_layers


def _sgd(o: cfg.OptimizerConfig):
    return keras.optimizers.SGD, dict(momentum=o.momentum, nesterov=o.nesterov,
                                      weight_decay=o.weight_decay or None)


def _adam(o):
    return keras.optimizers.Adam, dict(weight_decay=o.weight_decay or None)


def _nadam(o):
    return keras.optimizers.Nadam, dict(weight_decay=o.weight_decay or None)


def _adamw(o):
    return keras.optimizers.AdamW, dict(weight_decay=o.weight_decay or 0.004)


def _rmsprop(o):
    return keras.optimizers.RMSprop, dict(momentum=o.momentum, weight_decay=o.weight_decay or None)


# name -> f(OptimizerConfig) -> (Keras optimizer class, its keyword arguments but the learning rate)
OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "nadam": _nadam, "adamw": _adamw, "rmsprop": _rmsprop}


def variable_key(optimizer: keras.optimizers.Optimizer, variable):
    """The key Keras's optimizer uses for `variable`, alike for a Keras variable and the backend one.

    Adapter for the one private API the pipeline needs: `update_step` receives
    backend variables (a `tf.Variable`, or one replica's component under
    tf.distribute) without `.path`, and only `Optimizer._var_key` maps them and
    the Keras variables `build` receives to the same key. Keras has no public
    way to do this (its own `MultiOptimizer` uses `_var_key` too).
    `tests/test_finetune.py` fails loudly if the method goes away or changes.
    """
    return optimizer._var_key(variable)


class _BackboneLR:
    """Per-variable learning rates: `backbone_lr_multiplier` for every variable outside the head,
    times `variable_lr_multipliers[path]` (layer-wise decay: `pipeline.models.stages`) where given.

    Keras 3 optimizers apply each variable's update in the public extension
    point `update_step(gradient, variable, learning_rate)`, so one override
    gives every optimizer a per-group learning rate without a second optimizer
    or a custom train step. Decoupled weight decay still uses the base rate
    (Keras applies it outside `update_step`), so `--layer_decay` leaves it as it is.
    """

    def __init__(self, *args, backbone_lr_multiplier: float = 1.0, head_variable_paths=(),
                 variable_lr_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_lr_multiplier = float(backbone_lr_multiplier)
        self.head_variable_paths = frozenset(head_variable_paths)
        self.variable_lr_multipliers = dict(variable_lr_multipliers or {})

    def lr_multiplier(self, path: str) -> float:
        """The factor on the scheduled learning rate of the variable at `path`."""
        backbone = 1.0 if path in self.head_variable_paths else self.backbone_lr_multiplier
        return backbone * self.variable_lr_multipliers.get(path, 1.0)

    def build(self, variables):
        self._multipliers = {variable_key(self, v): m for v in variables
                             if (m := self.lr_multiplier(v.path)) != 1.0}
        super().build(variables)

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._multipliers.get(variable_key(self, variable))
        if multiplier is not None:
            learning_rate = learning_rate * multiplier
        return super().update_step(gradient, variable, learning_rate)


@functools.cache
def backbone_lr_class(base: type) -> type:
    """`base` (a Keras optimizer class) with a per-variable backbone learning rate: `BackboneLR<Base>`."""
    return type(f"BackboneLR{base.__name__}", (_BackboneLR, base), {})


def make_optimizer(o: cfg.OptimizerConfig, learning_rate, *, backbone_lr_multiplier: float = 1.0,
                   head_variable_paths=(), variable_lr_multipliers=None):
    """A Keras optimizer from its config and a float or schedule learning rate.

    With `backbone_lr_multiplier != 1`, variables whose `.path` is not in
    `head_variable_paths` learn at `multiplier x` the scheduled rate; a
    variable listed in `variable_lr_multipliers` (path -> factor, e.g.
    `stages.layer_decay_multipliers`) learns at that factor x as well. With
    neither, the plain Keras class is returned (nothing added to the step).
    """
    if o.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {o.name!r}; choose from {', '.join(OPTIMIZERS)}.")
    cls, kwargs = OPTIMIZERS[o.name](o)
    if backbone_lr_multiplier == 1.0 and not variable_lr_multipliers:
        return cls(learning_rate, **kwargs)
    return backbone_lr_class(cls)(learning_rate, backbone_lr_multiplier=backbone_lr_multiplier,
                                  head_variable_paths=head_variable_paths,
                                  variable_lr_multipliers=variable_lr_multipliers, **kwargs)


def head_variable_paths(model: keras.Model) -> set:
    """Paths of the `logits` head's variables (what a backbone multiplier spares)."""
    return {v.path for layer in head_layers(model) for v in layer.variables}
