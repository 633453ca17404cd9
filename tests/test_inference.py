"""The inference copy (`pipeline.models.inference`) computes what the model computes, bit for bit, compiled.

Exports and the feature cache's pass run the copy instead of the model; the
cached head must equal the uncached one to 1e-5 (`test_feature_cache.py`), so
the copy's compiled outputs must be the model's, not merely close.
"""
import keras
import numpy as np
import tensorflow as tf

from pipeline.models import bit
from pipeline.models.inference import inference_model
from pipeline.training import feature_cache


def _tiny_bit():
    keras.utils.set_random_seed(0)
    return bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=3, input_shape=(32, 32, 3), include_top=True)


def _compiled_features(model, images):
    extractor = feature_cache.feature_extractor(model)
    return np.asarray(tf.function(lambda x: extractor(x, training=False))(images))


def test_the_copy_s_compiled_features_are_the_model_s_bit_for_bit():
    model = _tiny_bit()
    copy = inference_model(model)
    assert not any(isinstance(layer, bit.StandardizedConv2D) for layer in copy.layers)
    images = tf.random.uniform((8, 32, 32, 3), seed=1)
    expected = _compiled_features(model, images)
    assert np.abs(expected).max() > 0.1  # features of real size, not a degenerate zero
    np.testing.assert_array_equal(_compiled_features(copy, images), expected)


def test_the_copy_owns_its_weights():
    model = _tiny_bit()
    copy = inference_model(model)
    images = tf.random.uniform((2, 32, 32, 3), seed=2)
    before = _compiled_features(copy, images)
    conv = model.get_layer("block1_unit01_b_conv")
    conv.kernel.assign(conv.kernel * 2.0 + 1.0)  # training the model later ...
    np.testing.assert_array_equal(_compiled_features(copy, images), before)  # ... leaves the copy as it was


def test_a_model_without_replaceable_layers_is_returned_as_is():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert inference_model(model) is model
