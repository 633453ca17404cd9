"""An inference-only copy of a model: weight-derived constants computed once instead of at every call.

Why: BiT's `StandardizedConv2D` standardizes its kernel at every call, which
the gradient needs in training; at inference the weights are frozen, so it is
the same constant each time. For BiT-R50x1 that recomputation is ~63 ms per
call on this 2-core CPU whatever the batch: at batch 1 (serving) the model
answers in less than half the time without it (BENCHMARKS.md). Exports (the
SavedModel, and ONNX and LiteRT made from it) use this copy. The feature
cache's pass does not: plain convolutions of a constant kernel round
differently in the last bits (~1e-5 in the head after two epochs), and its
head must equal the uncached phase's.

Protocol: a layer offering `plain_layer()` (an unbuilt layer of the same name
computing the same function from other weights) and `inference_weights()`
(those weights) is replaced; every other layer is cloned with its weights.
The copy shares nothing with the model: training the model later does not
change it.
"""
from __future__ import annotations

import keras


def _replaceable(layer) -> bool:
    return callable(getattr(layer, "plain_layer", None)) and callable(getattr(layer, "inference_weights", None))


def inference_model(model: keras.Model) -> keras.Model:
    """`model` itself when none of its layers is replaceable, else a functional copy with them replaced."""
    if not any(_replaceable(layer) for layer in model.layers):
        return model

    def clone(layer):
        return layer.plain_layer() if _replaceable(layer) else layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        weights = layer.inference_weights() if _replaceable(layer) else layer.get_weights()
        copy.get_layer(layer.name).set_weights(weights)
    return copy
