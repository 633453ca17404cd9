"""Registry-wide contract: every model family honours the builder contract the pipeline relies on.

The smallest registered member of every family (chosen by its ModelSpec
metadata, not its name) is built at a small input with batch 2 and must give
the right output shape, take one training step, survive a `.keras` save and
load with equal outputs, and export a SavedModel that predicts what the Keras
model predicts (in TensorFlow's own loader). Every other registered name has
its spec resolved and checked without building (BiT-R152x4 alone would need
~11 GB for one step). A model registered tomorrow is tested the day it lands.
"""
import inspect
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.models import create_model, get_spec, list_models, registry
from pipeline.serving import export

CONTRACT = {"num_classes", "input_shape", "weights", "normalization"}
# The input each family is tried at: small, but what its stem and stages accept.
SIZES = {"cifar_resnet": 16, "resnet": 32, "preact_resnet": 32, "bit": 64, "keras_apps": 32, "hub": 32,
         "keras_hub": 32}
PREFIXED = ("hub", "keras_hub")  # families selected by `<prefix>:<argument>`: tried on artifacts made here
CLASSES = 3


def _families():
    return sorted({spec.family for spec in registry.list_specs()})


def _smallest(family):
    # Named depths first (the shallowest is the smallest); within Keras Applications that is VGG-16.
    return min(registry.list_specs(family), key=lambda s: (s.depth is None, s.depth or 0, s.width, s.name)).name


@pytest.fixture(scope="module")
def hub_module(tmp_path_factory):
    """A tiny TF-Hub-layout feature-vector module: float32 [0, 1] images -> 8 features."""
    path = str(tmp_path_factory.mktemp("hub") / "module")
    obj = tf.Module()
    obj.kernel = tf.Variable(tf.random.stateless_normal((3, 3, 3, 8), seed=(1, 2)) * 0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def call(images):
        return tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(images, obj.kernel, 1, "SAME")), axis=[1, 2])

    obj.__call__ = call
    tf.saved_model.save(obj, path)
    return path


@pytest.fixture(scope="module")
def keras_hub_preset(tmp_path_factory):
    from tests.test_keras_hub import save_tiny_preset
    return save_tiny_preset(str(tmp_path_factory.mktemp("keras_hub") / "preset"))


def test_every_family_has_a_smallest_member_and_sizes_cover_them():
    prefixed = {get_spec(f"{p}x").family for p in registry.list_prefixes()}
    assert prefixed == set(PREFIXED)
    assert set(_families()) | prefixed == set(SIZES), "a new family needs its contract input size"
    assert {"cifar_resnet", "resnet", "preact_resnet", "bit", "keras_apps"} <= set(_families())


@pytest.mark.parametrize("family", sorted(set(SIZES)))
def test_smallest_member_builds_trains_saves_and_exports(family, request, tmp_path):
    if family in PREFIXED:
        artifact = request.getfixturevalue({"hub": "hub_module", "keras_hub": "keras_hub_preset"}[family])
        name = f"{family}:{artifact}"
    else:
        name = _smallest(family)
    size = SIZES[family]
    keras.utils.set_random_seed(0)
    model = create_model(name, num_classes=CLASSES, image_size=size)
    rng = np.random.default_rng(0)
    x = rng.random((2, size, size, 3), dtype=np.float32)
    y = keras.ops.one_hot(np.array([0, 2]), CLASSES)
    logits = np.asarray(model(x, training=False))
    assert logits.shape == (2, CLASSES) and logits.dtype == np.float32

    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    before = [np.array(w) for w in model.trainable_weights]
    loss = float(model.train_on_batch(x, y))
    assert math.isfinite(loss)
    assert any(not np.array_equal(b, np.array(w)) for b, w in zip(before, model.trainable_weights))

    expected = np.asarray(model(x, training=False))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=False)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, rtol=1e-5, atol=1e-5)

    export_dir = export.export_model(loaded, [f"c{i}" for i in range(CLASSES)], str(tmp_path / "exports"),
                                     "contract", image_size=size)
    served = tf.saved_model.load(export_dir).signatures[export.DEFAULT_SIGNATURE]
    probabilities = served(images=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(probabilities, tf.nn.softmax(expected).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_name_resolves_with_a_consistent_spec(name):
    spec = get_spec(name)
    assert spec.name == name and not spec.is_prefix
    params = inspect.signature(spec.builder).parameters
    assert CONTRACT <= set(params), f"{name} does not take the builder contract {sorted(CONTRACT)}"
    assert all(params[p].kind == inspect.Parameter.KEYWORD_ONLY for p in CONTRACT)
    assert spec.options() <= {p for p, v in params.items() if v.default is not inspect.Parameter.empty}
    assert spec.default_image_size >= 32 and spec.builder.__doc__
    assert (spec.depth is None or spec.depth > 0) and spec.width >= 1
    assert (spec.default_weights is not None) == spec.pretrained
    if spec.family == "cifar_resnet":  # 6n+2 layers
        assert len(spec.depths) == 3 and spec.depth == 6 * spec.depths[0] + 2
    elif spec.family in ("resnet", "preact_resnet"):  # basic blocks: 2 convs a unit; bottlenecks: 3
        per_unit = 2 if spec.depth < 50 else 3
        assert len(spec.depths) == 4 and spec.depth == per_unit * sum(spec.depths) + 2
    elif spec.family == "bit":  # ResNet-v2 bottlenecks
        assert len(spec.depths) == 4 and spec.depth == 3 * sum(spec.depths) + 2
    with pytest.raises(ValueError, match="does not take option"):
        create_model(name, num_classes=2, no_such_option=1)
