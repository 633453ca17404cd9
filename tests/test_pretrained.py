"""`hub:` TF-Hub modules, Keras Applications backbones (`keras_apps`), and the backbone convention."""
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.models import bit, create_model, get_spec, keras_apps, list_models, pretrained
from pipeline.models.hub_io import WeightsError

OFFLINE = "--weights=<path to a SavedModel dir or .npz>"


def _save_feature_module(path):
    """A tiny TF-Hub-style image feature-vector module: [0, 1] images -> 6 features."""
    rng = np.random.RandomState(0)
    kernel = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 8)).astype("f4"), name="module/conv/kernel")
    dense = tf.Variable(rng.normal(0, 0.3, (8, 6)).astype("f4"), name="module/dense/kernel")
    obj = tf.train.Checkpoint()
    obj.variables = [kernel, dense]
    obj.trainable_variables = [kernel, dense]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def call(images):
        x = tf.nn.relu(tf.nn.conv2d(images, kernel, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(x, axis=[1, 2]), dense)

    obj.__call__ = call
    tf.saved_model.save(obj, str(path))
    return str(path)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    return _save_feature_module(tmp_path_factory.mktemp("hub") / "features")


def _batch(n=8, size=32, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(0, 1, (n, size, size, 3)).astype("f4"), rng.randint(0, classes, n)


def _compile(model, lr=0.5, run_eagerly=False):
    model.compile(optimizer=keras.optimizers.SGD(lr), run_eagerly=run_eagerly,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# --------------------------------------------------------------------------- hub:

def test_hub_prefix_module_fine_tunes(module_dir, caplog):
    assert get_spec(f"hub:{module_dir}").family == "hub"
    with caplog.at_level(logging.INFO, logger="absl"):
        model = create_model(f"hub:{module_dir}", num_classes=3, image_size=32)
    assert any("computes in float32" in r.getMessage() for r in caplog.records)
    assert [layer.name for layer in model.layers] == ["image", "backbone", "pool", "logits"]
    backbone = model.get_layer("backbone")
    assert pretrained.backbone_layers(model) == [backbone]
    assert len(backbone.trainable_weights) == 2
    images, labels = _batch()
    before_weights = [np.array(w) for w in backbone.weights]
    before_features = np.asarray(backbone(images))
    _compile(model)
    for _ in range(3):  # the zero head passes no gradient on step 1; later steps do
        loss = model.train_on_batch(images, labels)
    assert np.isfinite(loss)
    after_weights = [np.array(w) for w in backbone.weights]
    assert all(not np.allclose(b, a) for b, a in zip(before_weights, after_weights))
    # The trained variables are the ones the module's function computes with.
    assert not np.allclose(before_features, np.asarray(backbone(images)))


def test_hub_module_can_be_frozen_and_stays_float32_under_mixed_precision(module_dir):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = create_model(f"hub:{module_dir}", num_classes=3, image_size=32, trainable=False)
    finally:
        keras.config.set_dtype_policy(previous)
    backbone = model.get_layer("backbone")
    assert backbone.compute_dtype == "float32" and model.output.dtype == "float32"
    assert backbone.trainable_weights == [] and len(model.trainable_weights) == 2  # head only
    images, labels = _batch()
    before = [np.array(w) for w in backbone.weights]
    _compile(model)
    model.train_on_batch(images, labels)
    model.train_on_batch(images, labels)
    assert all(np.array_equal(b, np.array(a)) for b, a in zip(before, backbone.weights))
    assert not np.all(np.asarray(model.get_layer("logits").kernel) == 0.0)


def test_hub_errors(tmp_path, module_dir):
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(WeightsError) as err:
        create_model(f"hub:{missing}", num_classes=2, image_size=32)
    assert missing in str(err.value) and "TFHUB_CACHE_DIR" in str(err.value)
    assert OFFLINE in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no saved_model.pb"):
        create_model(f"hub:{tmp_path / 'empty'}", num_classes=2, image_size=32)
    with pytest.raises(WeightsError, match="takes its weights from the handle"):
        create_model(f"hub:{module_dir}", num_classes=2, image_size=32, weights="imagenet")


# --------------------------------------------------------------------------- Keras Applications

# Built in test_keras_app_builds_matches_keras_and_fails_offline_in_one_line (at their smallest
# input): the cheap ones, at least one per keras.applications module but NASNet
# and InceptionResNetV2 (5-9 s each). Every other name is checked without building below and
# in tests/test_contract.py.
BUILT = {"keras_vgg16": 32, "keras_vgg19": 32, "keras_xception": 71, "keras_inceptionv3": 75,
         "keras_mobilenet": 32, "keras_mobilenetv2": 32, "keras_mobilenetv3small": 32,
         "keras_densenet121": 32, "keras_efficientnetb0": 32, "keras_efficientnetv2b0": 32,
         "keras_convnext_tiny": 32}
# One per preprocessing style: these also go through a .keras save and load.
SAVED = {"keras_vgg16", "keras_mobilenet", "keras_densenet121", "keras_mobilenetv3small"}
# The offline `imagenet` message is checked on these (one build more each): one per style, and the
# applications whose constructors derive weight files (or blocks) from their own name.
OFFLINE_CHECKED = {"keras_vgg16", "keras_mobilenetv2", "keras_densenet121", "keras_mobilenetv3small",
                   "keras_efficientnetb0", "keras_efficientnetv2b0", "keras_convnext_tiny"}


def _offline(monkeypatch):
    from keras.src.utils import file_utils

    def offline(fname, origin=None, *args, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service "
                        f"not known")

    monkeypatch.setattr(file_utils, "get_file", offline)


def _assert_one_line_weights_error(err, name):
    text = str(err.value)
    assert name in text and "--weights=<path to a weights file>" in text
    assert text.count(". ") == 0 and "\n" not in text and err.value.__cause__ is None
    assert err.value.__suppress_context__


def test_every_keras_image_classification_application_is_registered():
    constructors = {n for n in dir(keras.applications) if n[:1].isupper()}
    table = keras_apps.KERAS_APPS
    assert {app.constructor for app in table.values()} == constructors
    assert set(list_models("keras_apps")) == set(table)
    assert {"keras_resnet50", "keras_resnet101", "keras_resnet152", "keras_resnet50v2",
            "keras_resnet101v2", "keras_resnet152v2", "keras_efficientnetv2s", "keras_convnext_xlarge",
            "keras_mobilenetv3large", "keras_densenet201", "keras_efficientnetb7"} <= set(table)
    for name, app in table.items():
        spec = get_spec(name)
        assert (spec.default_image_size, spec.depth, spec.pretrained, spec.default_weights) == \
            (app.image_size, app.depth, True, "imagenet")
    assert table["keras_resnet101v2"] == ("ResNet101V2", "resnet_v2", "tf", 224, 101)


def test_default_image_sizes_are_the_applications_own(monkeypatch):
    """Keras passes each application's default size to `imagenet_utils.obtain_input_shape`:
    intercept that call (no model is built) and compare with the table."""
    from keras.src.applications import imagenet_utils

    class Seen(Exception):
        pass

    def record(input_shape, default_size, *args, **kwargs):
        raise Seen(default_size)

    monkeypatch.setattr(imagenet_utils, "obtain_input_shape", record)
    unchecked = set()
    for name, app in keras_apps.KERAS_APPS.items():
        try:
            getattr(keras.applications, app.constructor)(include_top=False, weights=None,
                                                         input_shape=(64, 64, 3))
            unchecked.add(name)
        except Seen as seen:
            assert seen.args[0] == app.image_size, name
    # MobileNetV3 takes any size; its ImageNet weights are the "224" files of its docs.
    assert unchecked == {"keras_mobilenetv3small", "keras_mobilenetv3large"}
    assert all(keras_apps.KERAS_APPS[n].image_size == 224 for n in unchecked)


def test_every_preprocessing_style_is_the_applications_own_preprocess_input():
    """For every table row: our layer on x in [0, 1] == `keras.applications.<module>.preprocess_input(255 x)`
    (for "builtin" rows that function is the identity and the layer only scales by 255)."""
    images, _ = _batch(2)
    for name, app in keras_apps.KERAS_APPS.items():
        expected = getattr(keras.applications, app.module).preprocess_input(images * 255.0)
        ours = np.asarray(keras_apps.preprocessing_layer(app.style)(images))
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4, err_msg=name)
        if app.style == "builtin":
            np.testing.assert_allclose(expected, images * 255.0, rtol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="preprocessing style"):
        keras_apps.preprocessing_layer("inception")


@pytest.mark.parametrize("name", sorted(BUILT))
def test_keras_app_builds_matches_keras_and_fails_offline_in_one_line(name, monkeypatch, tmp_path):
    """Our model's pooled features on x in [0, 1] equal the application's own
    `preprocess_input(255 x)` followed by the same backbone (Keras as the oracle)."""
    size, app = BUILT[name], keras_apps.KERAS_APPS[name]
    if name in OFFLINE_CHECKED:
        with monkeypatch.context() as patch:
            _offline(patch)
            with pytest.raises(WeightsError) as err:
                create_model(name, num_classes=3, image_size=size, weights="imagenet")
        _assert_one_line_weights_error(err, name)

    model = create_model(name, num_classes=3, image_size=size)
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "backbone", "pool",
                                                      "logits"]
    assert pretrained.backbone_layers(model) == [model.get_layer("backbone")]
    images = _batch(2, size=size)[0]
    features = np.asarray(keras.Model(model.input, model.get_layer("pool").output)(images))
    keras_input = getattr(keras.applications, app.module).preprocess_input(images * 255.0)
    expected = np.mean(np.asarray(model.get_layer("backbone")(keras_input)), axis=(1, 2))
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    logits = np.asarray(model(images))
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    if name in SAVED:
        path = str(tmp_path / "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, compile=False)
        np.testing.assert_allclose(np.asarray(loaded(images)), logits, rtol=1e-5, atol=1e-6)


def test_keras_resnet50_builds_and_trains_with_its_own_preprocessing():
    model = create_model("keras_resnet50", num_classes=3, image_size=32)
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "backbone", "pool",
                                                      "logits"]
    assert pretrained.backbone_layers(model) == [model.get_layer("backbone")]
    images, labels = _batch(4)
    expected = keras.applications.resnet.preprocess_input(images * 255.0)
    np.testing.assert_allclose(np.asarray(model.get_layer("preprocess")(images)), expected,
                               rtol=1e-5, atol=1e-4)
    # Eager: tracing ResNet-50's train step costs ~4x the step itself on 2 cores.
    loss = _compile(model, lr=0.01, run_eagerly=True).train_on_batch(images, labels)
    assert np.isfinite(loss) and model.output.dtype == "float32"
    assert not np.all(np.asarray(model.get_layer("logits").kernel) == 0.0)


def test_imagenet_download_failure_is_a_weights_error(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(WeightsError) as err:
        create_model("keras_resnet50", num_classes=2, image_size=32, weights="imagenet")
    _assert_one_line_weights_error(err, "keras_resnet50")


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    source = create_model("keras_resnet50", num_classes=2, image_size=32)
    conv = source.get_layer("backbone").get_layer("conv1_conv")
    conv.kernel.assign(conv.kernel * 3.0 + 0.01)  # differ from any fresh initialization
    path = str(tmp_path / "resnet50_backbone.weights.h5")
    source.get_layer("backbone").save_weights(path)
    loaded = create_model("keras_resnet50", num_classes=2, image_size=32, weights=path)
    for a, b in zip(source.get_layer("backbone").weights, loaded.get_layer("backbone").weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(WeightsError, match="existing weights file"):
        create_model("keras_resnet50", num_classes=2, image_size=32,
                     weights=str(tmp_path / "missing.weights.h5"))
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not an h5 file")
    with pytest.raises(WeightsError, match="Cannot load"):
        create_model("keras_resnet50", num_classes=2, image_size=32, weights=str(garbage))


# --------------------------------------------------------------------------- convention for BiT

def test_bit_backbone_is_everything_but_the_head():
    model = bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=2, input_shape=(32, 32, 3))
    layers = pretrained.backbone_layers(model)
    assert model.get_layer("logits") not in layers
    assert model.get_layer("root_block_conv") in layers and model.get_layer("pre_head_gn") in layers
    backbone_params = sum(int(np.prod(v.shape)) for layer in layers for v in layer.trainable_weights)
    assert backbone_params == bit.bit_param_count((1, 1, 1, 1), 0.5)
    pretrained.set_backbone_trainable(model, False)
    assert [w.name for w in model.trainable_weights] == ["kernel", "bias"]
    assert pretrained.head_layers(model) == [model.get_layer("logits")]
    pretrained.set_backbone_trainable(model, True)
    assert len(model.trainable_weights) == len(model.weights)


def test_hub_module_layer_adapter_tracks_every_module_variable_under_a_valid_name(module_dir):
    """`HubModuleLayer` overrides TFSMLayer's private `_add_existing_weight`: fail loudly if that changes."""
    assert callable(getattr(keras.layers.TFSMLayer, "_add_existing_weight", None)), \
        "Keras's TFSMLayer no longer tracks module variables through _add_existing_weight"
    layer = pretrained.HubModuleLayer(module_dir, call_endpoint="__call__", trainable=True)
    module = tf.saved_model.load(module_dir)
    assert len(layer.weights) == len(module.variables) > 0
    assert all(":" not in w.name and "/" not in w.name for w in layer.weights)
    # The tracked variables are the ones the module computes with: changing one changes the output.
    images = _batch(2)[0]
    before = np.asarray(layer(images))
    layer.weights[0].assign(layer.weights[0] * 2.0)
    assert not np.allclose(np.asarray(layer(images)), before)
