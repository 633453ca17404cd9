"""An inference-only copy of a model: weight-derived constants computed once instead of at every call.

Why: BiT's `StandardizedConv2D` standardizes its kernel at every call, which
the gradient needs in training; at inference the weights are frozen, so it is
the same constant each time. For BiT-R50x1 that recomputation is ~63 ms per
call on this 2-core CPU whatever the batch: at batch 1 (serving) the model
answers in less than half the time without it, and the feature cache's pass
(batch 64, 64 px) runs at 146 instead of 112 images/s (BENCHMARKS.md).
Exports (the SavedModel, and ONNX and LiteRT made from it) and the feature
cache's pass use this copy.

The constants are computed in one compiled function, not eagerly: TensorFlow's
eager moments round differently from a compiled graph's in the last bit
(2.4e-7 in a standardized kernel), and that bit, carried through the network,
moved a cached head by 1.2e-5 after two epochs. Computed in a graph, the
copy's compiled features equal the model's compiled features bit for bit
(`tests/test_inference.py`), so the cached head equals the uncached one.

Protocol: a layer offering `plain_layer()` (an unbuilt layer of the same name
computing the same function from other weights) and `inference_weights()`
(those weights, as tensors computed from its own) is replaced; every other
layer is cloned with its weights. The copy shares nothing with the model:
training the model later does not change it. Variables are made in the
current distribution strategy's scope, as any model's.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def _replaceable(layer) -> bool:
    return callable(getattr(layer, "plain_layer", None)) and callable(getattr(layer, "inference_weights", None))


def inference_model(model: keras.Model) -> keras.Model:
    """`model` itself when none of its layers is replaceable, else a functional copy with them replaced."""
    if not any(_replaceable(layer) for layer in model.layers):
        return model

    def clone(layer):
        return layer.plain_layer() if _replaceable(layer) else layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    replaced = [layer for layer in model.layers if _replaceable(layer)]
    derived = tf.function(lambda: [layer.inference_weights() for layer in replaced])()  # see the docstring
    derived = {layer.name: [np.asarray(w) for w in weights] for layer, weights in zip(replaced, derived)}
    for layer in model.layers:
        copy.get_layer(layer.name).set_weights(derived[layer.name] if layer.name in derived else layer.get_weights())
    return copy
