"""`--remat`: gradient checkpointing of a functional model's residual blocks, applied outside the model files.

Why segments and not `keras.RematScope`: Keras 3.15's TensorFlow `remat` is
`tf.custom_gradient` around each layer's `call`, which refuses keyword
arguments (`training=`) inside a `tf.function` ("supports keywords arguments
only when eager execution is enabled"), so the scope cannot train under our
compiled loop; and per-layer checkpoints keep every layer's input anyway.

What this does: the model's graph is cut at the outputs of its residual
`Add` layers (every path from the input to the logits runs through each of
them in a chain of residual units: BiT, our ResNets), the pieces between
cuts become functional sub-models sharing the model's layers and variables,
and `RematModel` runs them in sequence, each under `tf.recompute_grad` when
training. A step then keeps only the block boundaries for the backward pass
and recomputes each block's insides there (the GroupNorm and weight
standardization temporaries of BiT, BatchNorm's normalized copies): about one
more forward pass per step for the activation memory of one block instead of
all. The model itself is unchanged (checkpoints, exports, the feature cache
use it); only the training loop calls the wrapper.

Caveat: BatchNormalization updates its moving averages in its forward pass,
which the backward pass repeats, so under --remat each batch enters them
twice (momentum m acts as m**2). GroupNorm models (BiT) are unaffected.
"""
from __future__ import annotations

import keras
import tensorflow as tf


def _cut_tensors(model: keras.Model) -> list:
    """The model's input, the outputs of its `Add` layers (in graph order), its output."""
    adds = [layer.output for layer in model.layers if isinstance(layer, keras.layers.Add)]
    return [model.inputs[0], *adds, model.outputs[0]]


def segments(model: keras.Model) -> list[keras.Model]:
    """Functional sub-models between consecutive cut tensors, in order (sharing `model`'s layers).

    A cut that does not separate the graph (a sub-model would need another
    input) is skipped, merging its neighbours.
    """
    cuts, pieces, start = _cut_tensors(model), [], 0
    for end in range(1, len(cuts)):
        try:
            piece = keras.Model(cuts[start], cuts[end], name=f"segment_{len(pieces)}")
        except ValueError:  # "Graph disconnected": not a cut, extend the segment
            continue
        pieces.append(piece)
        start = end
    if start != len(cuts) - 1:
        raise ValueError(f"{model.name}: cannot split the graph into a chain of blocks for --remat.")
    return pieces


class RematModel(keras.Model):
    """Runs `model` as a chain of checkpointed segments in training (what `loop.Loop` calls with --remat).

    Its variables, losses and `stop_training` are the wrapped model's.
    """

    def __init__(self, model: keras.Model, **kwargs):
        super().__init__(name=f"{model.name}_remat", **kwargs)
        self.wrapped = model
        self.pieces = segments(model)

    def call(self, inputs, training=False):
        x = inputs
        for piece in self.pieces:
            if training:
                x = tf.recompute_grad(lambda t, piece=piece: piece(t, training=True))(x)
            else:
                x = piece(x, training=False)
        return x

    @property
    def stop_training(self):
        return self.wrapped.stop_training if hasattr(self, "wrapped") else False

    @stop_training.setter
    def stop_training(self, value):
        if hasattr(self, "wrapped"):
            self.wrapped.stop_training = value

    @property
    def steps_per_execution(self):
        return getattr(self.wrapped, "steps_per_execution", 1) if hasattr(self, "wrapped") else 1

    @steps_per_execution.setter
    def steps_per_execution(self, value):
        del value  # the wrapped model's compile decides


def for_training(model: keras.Model, enabled: bool) -> keras.Model:
    """`RematModel(model)` when `enabled`, else `model`: what the training loop runs."""
    return RematModel(model) if enabled else model
