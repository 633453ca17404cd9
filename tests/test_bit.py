"""BiT ResNet-v2: architecture, the authors' weight layouts, the self-check, errors.

The weight-mapping tests do not re-save the native Keras model. They write
weights the way the BiT authors publish them, from an independent plain-TF
reference of the authors' forward pass (`pipeline.models.bit_reference`, written
from bit_tf2/models.py + normalization.py, sharing no code with `bit.py`: WS eps 1e-10, GN 32 groups eps 1e-5,
pad-then-VALID convs, projection on the pre-activated input):
  * a TF-Hub-style SavedModel (`tf.Module`-like object with `variables` named
    `resnet/...:0` and a `__call__` returning pooled features), and
  * an `.npz` with the authors' keys (`resnet/block1/unit01/a/group_norm/gamma`,
    `resnet/head/conv2d/kernel` [1, 1, C, K], ...).
so a wrong name, transposition, epsilon or padding shows up as a feature mismatch.
"""
import collections
import hashlib
import os
import shutil
import socket
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras

from pipeline.models import (bit, bit_mapping, bit_reference, create_model, get_spec, hub_io,
                             list_models)
from pipeline.models.hub_io import WeightsError

SMALL = (2, 2, 1, 1)  # every block projects once; blocks 1-2 also have identity units
WIDTH = 1
SIZE = 64
OFFLINE = "--weights=<path to a SavedModel dir or .npz>"


# --------------------------------------------------------------------------- reference

def _images(n=3, size=SIZE, seed=1):
    return np.random.RandomState(seed).uniform(0, 1, (n, size, size, 3)).astype("f4")


@pytest.fixture(scope="module")
def params():
    return bit_reference.random_weights(SMALL, WIDTH, seed=0, num_classes=7)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, params):
    backbone = {k: v for k, v in params.items() if "/head/" not in k}
    return bit_reference.save_hub_module(tmp_path_factory.mktemp("bit_hub") / "module", backbone,
                                         SMALL)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory, params):
    path = str(tmp_path_factory.mktemp("bit_npz") / "BiT-M-Small.npz")
    np.savez(path, **params)
    return path


def _reference_features(params, images):
    return bit_reference.features({k: tf.constant(v) for k, v in params.items()},
                                  tf.constant(images), SMALL).numpy()


# --------------------------------------------------------------------------- architecture

def test_every_registered_bit_variant_has_the_papers_table_entry():
    expected = {f"bit_{up}_{arch}" for up in ("s", "m")
                for arch in ("r50x1", "r50x3", "r101x1", "r101x3", "r152x4")}
    assert set(list_models("bit")) == expected
    depths = {"r50": (3, 4, 6, 3), "r101": (3, 4, 23, 3), "r152": (3, 8, 36, 3)}
    for name in expected:
        spec = get_spec(name)
        assert (spec.family, spec.default_image_size, spec.pretrained) == ("bit", 128, True)
        assert spec.options() == {"drop_path"}  # stochastic depth (issue 16), the only option
        arch = bit.BIT_ARCHS[name.split("_")[2]]
        assert arch.depths == depths[name.split("_")[2].split("x")[0]]
        assert arch.width == int(name.split("x")[-1])
        up = name.split("_")[1]
        assert arch.hub_handle(up) == f"https://tfhub.dev/google/bit/{up}-{name.split('_')[2]}/1"
        assert arch.npz_name(up) == f"BiT-{up.upper()}-{arch.label}.npz"
    # Published parameter counts (timm model cards of the authors' weights, in millions):
    # R50x1 with the 21843-class head 68.3, R101x1 (21843) 87.2, R152x4 (1000) 936.5.
    count = bit.bit_param_count
    assert round(count((3, 4, 6, 3), 1, 21843) / 1e6, 1) == 68.3
    assert round(count((3, 4, 23, 3), 1, 21843) / 1e6, 1) == 87.2
    assert round(count((3, 8, 36, 3), 4, 1000) / 1e6, 1) == 936.5


def test_full_r50x1_builds_with_the_expected_shape_and_parameter_count():
    model = create_model("bit_m_r50x1", num_classes=5, image_size=SIZE)
    assert model.output.shape == (None, 5) and model.output.dtype == "float32"
    assert model.count_params() == bit.bit_param_count((3, 4, 6, 3), 1, 5)
    backbone = model.count_params() - (2048 * 5 + 5)
    assert backbone == bit.bit_param_count((3, 4, 6, 3), 1) == 23_500_352
    names = {layer.name for layer in model.layers}
    assert {"block3_unit06_c_conv", "block4_unit01_a_proj", "pool", "logits"} <= names
    assert "block3_unit07_a_conv" not in names and "block1_unit02_a_proj" not in names
    assert model.get_layer("pool").output.shape == (None, 2048)
    # Zero-initialized head: logits are exactly zero before training.
    assert np.all(np.asarray(model(_images(1))) == 0.0)


def test_small_model_parameter_count_matches_the_analytic_formula():
    for depths, width in [(SMALL, 1), ((1, 1, 1, 1), 0.5)]:
        model = bit.build_bit(depths=depths, width=width, num_classes=3, input_shape=(32, 32, 3))
        assert model.count_params() == bit.bit_param_count(depths, width, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        bit.build_bit(depths=SMALL, width=0.25, num_classes=3, input_shape=(32, 32, 3))


# --------------------------------------------------------------------------- weights

def test_hub_savedmodel_dir_loads_and_matches_the_reference(hub_dir, params):
    assert hub.load(hub_dir) is not None  # a TF-Hub-loadable module
    names = [v.name for v in hub.load(hub_dir).variables]
    assert "resnet/block1/unit01/a/proj/standardized_conv2d/kernel:0" in names
    model = bit.build_bit(depths=SMALL, width=WIDTH, num_classes=4, input_shape=(SIZE, SIZE, 3),
                          weights=hub_dir)
    images = _images()
    features = np.asarray(bit.bit_features(model)(images))
    assert bit.relative_error(features, _reference_features(params, images)) < 1e-4
    kernel = model.get_layer("block2_unit01_b_conv").kernel
    np.testing.assert_array_equal(
        np.asarray(kernel), params["resnet/block2/unit01/b/standardized_conv2d/kernel"])
    assert np.all(np.asarray(model.get_layer("logits").kernel) == 0.0)  # feature module: no head


def test_npz_with_the_authors_keys_loads_features_and_matching_head(npz_path, params):
    images = _images()
    expected = _reference_features(params, images)
    head = bit.build_bit(depths=SMALL, width=WIDTH, num_classes=7, input_shape=(SIZE, SIZE, 3),
                         weights=npz_path)
    assert bit.relative_error(np.asarray(bit.bit_features(head)(images)), expected) < 1e-4
    kernel, bias = params["resnet/head/conv2d/kernel"], params["resnet/head/conv2d/bias"]
    logits = expected @ kernel[0, 0] + bias
    assert bit.relative_error(np.asarray(head(images)), logits) < 1e-4
    # Another class count: same backbone, head stays zero.
    other = bit.build_bit(depths=SMALL, width=WIDTH, num_classes=3, input_shape=(SIZE, SIZE, 3),
                          weights=npz_path)
    assert bit.relative_error(np.asarray(bit.bit_features(other)(images)), expected) < 1e-4
    assert np.all(np.asarray(other(images)) == 0.0)


def test_corrupted_module_is_refused_by_the_self_check(tmp_path, params):
    backbone = {k: v for k, v in params.items() if "/head/" not in k}
    # The module's forward uses b's GN scale where c's is named and vice versa:
    # names and shapes all match, only the computation reveals it.
    b, c = "resnet/block2/unit01/b/group_norm/gamma", "resnet/block2/unit01/c/group_norm/gamma"
    path = bit_reference.save_hub_module(tmp_path / "bad", backbone, SMALL, swap={b: c, c: b})
    with pytest.raises(WeightsError, match="Self-check failed") as info:
        bit.build_bit(depths=SMALL, width=WIDTH, num_classes=4, input_shape=(SIZE, SIZE, 3),
                      weights=path)
    assert "relative error" in str(info.value)


def test_missing_unmapped_and_misshaped_tensors_are_clear_errors(tmp_path, params):
    def attempt(arrays):
        path = str(tmp_path / f"w{len(os.listdir(tmp_path))}.npz")
        np.savez(path, **arrays)
        with pytest.raises(WeightsError) as info:
            bit.build_bit(depths=SMALL, width=WIDTH, num_classes=4, input_shape=(32, 32, 3),
                          weights=path)
        return str(info.value)

    gamma = "resnet/block1/unit02/b/group_norm/gamma"
    missing = attempt({k: v for k, v in params.items() if k != gamma})
    assert "1 missing" in missing and gamma in missing
    extra = attempt({**params, "resnet/block5/unit01/a/group_norm/gamma": np.ones(4, "f4")})
    assert "1 unmapped" in extra and "resnet/block5/unit01" in extra
    wrong = dict(params)
    wrong["resnet/root_block/standardized_conv2d/kernel"] = np.ones((3, 3, 3, 64), "f4")
    assert "wrong shape" in attempt(wrong)
    r50 = attempt(bit_reference.random_weights((1, 1, 1, 1), 0.5))
    assert "depths (1, 1, 1, 1)" in r50 and "32 root filters" in r50


def test_h5_is_refused_with_the_alternatives(tmp_path):
    path = tmp_path / "BiT-M-R50x1.h5"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"\.h5 files are not supported.*\.npz"):
        create_model("bit_m_r50x1", num_classes=2, image_size=32, weights=str(path))


def _assert_one_sentence(err, handle):
    text = str(err.value)
    assert handle in text and "TFHUB_CACHE_DIR" in text and OFFLINE in text
    assert text.endswith(".") and ". " not in text.replace(OFFLINE, "")
    # No chained traceback: no cause, and any context suppressed (`raise ... from None`).
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_nonexistent_handle_is_a_weights_error(tmp_path):
    handle = str(tmp_path / "no_such_module")
    with pytest.raises(WeightsError) as err:
        create_model("bit_s_r50x1", num_classes=2, image_size=32, weights=handle)
    _assert_one_sentence(err, handle)
    assert isinstance(err.value, ValueError)


def test_unreachable_url_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    handle = "https://tfhub.invalid/google/bit/m-r50x1/1"  # RFC 2606: never resolves
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        create_model("bit_m_r50x1", num_classes=2, image_size=32, weights=handle)
    _assert_one_sentence(err, handle)
    assert str(tmp_path / "cache") in str(err.value)
    # A black-holed network (connect never answers) is bounded by the connect timeout.
    monkeypatch.setattr(hub_io.socket, "create_connection",
                        lambda *a, **k: time.sleep(30))
    with pytest.raises(WeightsError, match="within 0.5s") as err:
        hub_io.resolve_handle("https://tfhub.dev/google/bit/m-r50x1/1", connect_timeout=0.5)
    assert time.monotonic() - start < 20


def test_cached_url_handle_resolves_offline_through_tensorflow_hub(tmp_path, monkeypatch,
                                                                   hub_dir, params):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    handle = ("https://www.kaggle.com/models/google/bit/frameworks/TensorFlow2/"
              "variations/m-r50x1/versions/1")
    # What tensorflow_hub leaves after a download: <cache>/<sha1(handle)>/saved_model.pb ...
    shutil.copytree(hub_dir, cache / hashlib.sha1(handle.encode()).hexdigest())
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: pytest.fail("network used for a cached handle"))
    assert hub_io.resolve_handle(handle) == hub.resolve(handle)
    model = bit.build_bit(depths=SMALL, width=WIDTH, num_classes=2, input_shape=(SIZE, SIZE, 3),
                          weights=handle)
    images = _images(2)
    assert bit.relative_error(np.asarray(bit.bit_features(model)(images)),
                              _reference_features(params, images)) < 1e-4


def test_variable_names_are_canonicalized_like_the_authors_files():
    canon = bit_mapping.canonical_weight_name
    gamma = "resnet/block1/unit01/a/group_norm/gamma"
    assert canon(f"{gamma}:0") == gamma
    assert canon("keras_layer/resnet/group_norm/beta:0") == "resnet/group_norm/beta"
    # Exported without the `resnet/` scope, or inside a wrapper's scope:
    assert canon("block1/unit01/a/group_norm/gamma:0") == gamma
    assert canon("keras_layer/block1/unit01/a/group_norm/gamma:0") == gamma
    assert canon("group_norm/beta:0") == "resnet/group_norm/beta"
    assert canon("root_block/standardized_conv2d/kernel") == (
        "resnet/root_block/standardized_conv2d/kernel")
    # bit_tf2's bare names stay bare (they are not unique; the structure decides).
    assert canon("unit01/a/standardized_conv2d/kernel:0") == "unit01/a/standardized_conv2d/kernel"
    assert (canon("resnet/block3/unit02/b/standardized_conv2d_4/kernel")
            == "resnet/block3/unit02/b/standardized_conv2d/kernel")
    table = dict(bit.bit_weight_table((3, 4, 6, 3)))
    proj = "resnet/block1/unit01/a/proj/standardized_conv2d/kernel"
    assert table["block1_unit01_a_proj"] == (proj,)
    assert table["pre_head_gn"] == ("resnet/group_norm/gamma", "resnet/group_norm/beta")
    assert len(table) == 1 + 3 * 2 * 16 + 4 + 1  # root, 16 units x (3 GN + 3 conv), 4 proj, GN


# --------------------------------------------------------------------------- precision

@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_loads_in_float32_and_trains(policy, npz_path, params):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = bit.build_bit(depths=SMALL, width=WIDTH, num_classes=7,
                              input_shape=(32, 32, 3), weights=npz_path)
        tiny = bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=4,
                             input_shape=(32, 32, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    conv = model.get_layer("block1_unit01_b_conv")
    assert conv.compute_dtype == policy.split("_")[1] and conv.kernel.dtype == "float32"
    assert model.get_layer("logits").compute_dtype == "float32"
    images = _images(4, size=32)
    features = np.asarray(bit.bit_features(model)(images), np.float32)
    # bfloat16 keeps ~3 significant digits: a few % drift over the units; a wrong
    # mapping would be ~100% off.
    tolerance = {"mixed_bfloat16": 0.15, "mixed_float16": 0.02}[policy]
    assert bit.relative_error(features, _reference_features(params, images)) < tolerance
    assert model.output.dtype == "float32" and np.asarray(model(images)).dtype == np.float32
    tiny.compile(optimizer=keras.optimizers.SGD(0.01),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = np.array(tiny.get_layer("block1_unit01_b_conv").kernel)
    losses = [tiny.train_on_batch(images, np.array([0, 1, 2, 3])) for _ in range(2)]
    assert np.all(np.isfinite(losses))
    assert not np.allclose(before, np.array(tiny.get_layer("block1_unit01_b_conv").kernel))


def test_model_round_trips_through_a_keras_file(tmp_path):
    model = bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=3, input_shape=(32, 32, 3))
    images = _images(2, size=32)
    model.get_layer("logits").set_weights([np.ones((1024, 3), "f4") * 0.01, np.zeros(3, "f4")])
    path = str(tmp_path / "bit.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.get_layer("root_block_conv"), bit.StandardizedConv2D)
    np.testing.assert_allclose(np.asarray(restored(images)), np.asarray(model(images)), rtol=1e-5)


# --------------------------------------------------------------------------- any module layout
# A replica of the BiT authors' TF2 model (google-research/big_transfer, bit_tf2/models.py and
# normalization.py) under tf_keras, written for these tests: the same layer nesting, layer names
# and build order, so its SavedModel names variables the way the authors' code does today
# (nested Sequentials build outside the parent's name scope: `group_norm/gamma:0` for every
# GroupNorm, `unit01/a/standardized_conv2d/kernel:0`, `unit01/a/proj/...`).

class _GroupNorm(tf_keras.layers.Layer):
    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, x):
        shape, channels = tf.shape(x), x.shape[-1]
        groups = [32, channels // 32]
        g = tf.reshape(x, tf.concat([shape[:-1], groups], 0))
        mean, var = tf.nn.moments(g, [1, 2, 4], keepdims=True)
        g = tf.nn.batch_normalization(g, mean, var, tf.reshape(self.beta, groups),
                                      tf.reshape(self.gamma, groups), 1e-5)
        return tf.reshape(g, shape)


class _StandardizedConv2D(tf_keras.layers.Conv2D):
    def call(self, x):
        mean, var = tf.nn.moments(self.kernel, [0, 1, 2], keepdims=True)
        return tf.nn.conv2d(x, (self.kernel - mean) / tf.sqrt(var + 1e-10), self.strides, "VALID")


class _Pad(tf_keras.layers.Layer):
    def __init__(self, pad, **kwargs):
        super().__init__(**kwargs)
        self.pad = pad

    def call(self, x):
        return tf.pad(x, [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]])


def _conv(filters, size, stride=1, name="standardized_conv2d"):
    return _StandardizedConv2D(filters, size, strides=stride, use_bias=False, name=name)


class _BottleneckV2Unit(tf_keras.layers.Layer):
    def __init__(self, filters, stride, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride, self.proj = filters, stride, None
        relu = tf_keras.layers.ReLU
        self.unit_a = tf_keras.Sequential([_GroupNorm(name="group_norm"), relu()], name="a")
        self.unit_a_conv = _conv(filters, 1, name="a/standardized_conv2d")
        self.unit_b = tf_keras.Sequential([_GroupNorm(name="group_norm"), relu(), _Pad(1),
                                           _conv(filters, 3, stride)], name="b")
        self.unit_c = tf_keras.Sequential([_GroupNorm(name="group_norm"), relu(),
                                           _conv(4 * filters, 1)], name="c")

    def build(self, input_shape):
        if self.stride > 1 or 4 * self.filters != input_shape[-1]:
            self.proj = _conv(4 * self.filters, 1, self.stride, name="a/proj/standardized_conv2d")
        self.built = True

    def call(self, x):
        shortcut = x
        x = self.unit_a(x)
        if self.proj is not None:
            shortcut = self.proj(x)
        return self.unit_c(self.unit_b(self.unit_a_conv(x))) + shortcut


class _ResnetV2(tf_keras.Model):
    def __init__(self, num_units, filters_factor, **kwargs):
        super().__init__(**kwargs)
        filters = [16 * filters_factor * 2 ** b for b in range(4)]
        self.root = tf_keras.Sequential([_Pad(3), _conv(filters[0], 7, 2), _Pad(1),
                                         tf_keras.layers.MaxPool2D(3, 2)], name="root_block")
        self.blocks = [tf_keras.Sequential(
            [_BottleneckV2Unit(f, s if i == 1 else 1, name=f"unit{i:02d}") for i in range(1, u + 1)],
            name=f"block{b}") for b, (f, u, s) in enumerate(zip(filters, num_units, (1, 2, 2, 2)), 1)]
        self.pre_head = [_GroupNorm(name="group_norm"), tf_keras.layers.ReLU(),
                         tf_keras.layers.GlobalAveragePooling2D()]

    def call(self, x):
        x = self.root(x)
        for layer in self.blocks + self.pre_head:
            x = layer(x)
        return x


TF2_DEPTHS, TF2_WIDTH, TF2_SIZE = (1, 1, 1, 1), 0.5, 32


def _bit_tf2_net(seed=0):
    """The replica at width 0.5, built like the authors' train.py, with random weights."""
    net = _ResnetV2(TF2_DEPTHS, filters_factor=int(4 * TF2_WIDTH), name="resnet")
    net.build((None, None, None, 3))
    rng = np.random.RandomState(seed)
    for var in net.variables:
        kind = var.name.split("/")[-1].split(":")[0]
        value = {"gamma": lambda s: rng.uniform(0.5, 1.5, s), "beta": lambda s: rng.normal(0, 0.2, s),
                 "kernel": lambda s: rng.normal(0.05, 0.3, s)}[kind](var.shape)
        var.assign(value.astype("f4"))
    return net


def _save_feature_module(path, net, listed=None):
    """A TF-Hub-style feature-vector module of `net`: `__call__` on [0, 1] images.

    `listed`: the module's `variables` list (the reusable-SavedModel convention);
    None saves none, so a loader has only the object graph.
    """
    obj = tf.Module()
    obj.model = net
    if listed is not None:
        obj = tf.train.Checkpoint(model=net)
        obj.variables = obj.trainable_variables = list(listed)
    obj.__call__ = tf.function(lambda images: net(images * 2.0 - 1.0),
                               input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    tf.saved_model.save(obj, str(path))
    return str(path)


@pytest.fixture(scope="module")
def bit_tf2(tmp_path_factory):
    net = _bit_tf2_net()
    root = tmp_path_factory.mktemp("bit_tf2")
    unit = net.blocks[1].layers[0]  # block2/unit01: its b and c GroupNorms both have 64 channels
    b, c = unit.unit_b.layers[0], unit.unit_c.layers[0]
    swapped = {id(b.gamma): c.gamma, id(b.beta): c.beta, id(c.gamma): b.gamma, id(c.beta): b.beta}
    # Two saves only (a tf_keras save traces every layer: ~10 s each): the good module with
    # the object graph alone, the swapped one with a `variables` list.
    return dict(net=net, module=_save_feature_module(root / "module", net),
                swapped=_save_feature_module(root / "swapped", net,
                                             [swapped.get(id(v), v) for v in net.variables]))


def test_the_authors_tf2_module_with_repeated_names_loads_by_structure(bit_tf2):
    path = bit_tf2["module"]
    module = tf.saved_model.load(path)
    tensors = hub_io.saved_model_variables(module)
    names = collections.Counter(t.name for t in tensors)
    # The naming of the issue: 4 units x 3 + the final norm, all one name; bare convs.
    assert names["group_norm/gamma:0"] == 13 and names["standardized_conv2d/kernel:0"] == 9
    assert len(tensors) == len(bit_tf2["net"].variables) == 43 and len(names) == 5
    assert not hasattr(module, "variables")  # the order comes from the object graph
    assert tensors[0].path == "model/variables/0"
    model = bit.build_bit(depths=TF2_DEPTHS, width=TF2_WIDTH, num_classes=3,
                          input_shape=(TF2_SIZE, TF2_SIZE, 3), weights=path)
    images = _images(3, size=TF2_SIZE)
    expected = module(tf.constant(images)).numpy()
    assert bit.relative_error(np.asarray(bit.bit_features(model)(images)), expected) < 1e-5
    # The projection of block1 has conv c's shape (1, 1, 32, 128): placed by creation order.
    unit = bit_tf2["net"].blocks[0].layers[0]
    np.testing.assert_array_equal(np.asarray(model.get_layer("block1_unit01_a_proj").kernel),
                                  unit.proj.kernel.numpy())
    np.testing.assert_array_equal(np.asarray(model.get_layer("block1_unit01_c_conv").kernel),
                                  unit.unit_c.layers[-1].kernel.numpy())


def test_swapped_same_shaped_groupnorms_are_refused_by_the_self_check(bit_tf2):
    with pytest.raises(WeightsError, match="Self-check failed") as info:
        bit.build_bit(depths=TF2_DEPTHS, width=TF2_WIDTH, num_classes=3,
                      input_shape=(TF2_SIZE, TF2_SIZE, 3), weights=bit_tf2["swapped"])
    text = str(info.value)
    assert "\n" not in text and bit_tf2["swapped"] in text and "relative error" in text


def test_a_module_of_another_size_says_where_its_structure_breaks(bit_tf2):
    with pytest.raises(WeightsError) as info:
        bit.build_bit(depths=(2, 1, 1, 1), width=TF2_WIDTH, num_classes=3,
                      input_shape=(TF2_SIZE, TF2_SIZE, 3), weights=bit_tf2["module"])
    text = str(info.value)
    assert "\n" not in text and "'group_norm/gamma' 13 times" in text
    assert "block1/unit02" in text and "in creation order" in text
    assert info.value.__cause__ is None and (info.value.__context__ is None
                                             or info.value.__suppress_context__)


@pytest.mark.parametrize("naming,how", [
    ("full", bit_mapping.BY_NAME),       # resnet/block1/unit01/a/group_norm/gamma:0
    ("no_prefix", bit_mapping.BY_NAME),  # block1/unit01/a/group_norm/gamma:0
    ("anonymous", bit_mapping.BY_STRUCTURE)])  # every variable named "w"
def test_reference_hub_module_loads_under_any_naming(tmp_path, params, naming, how):
    rename = {"full": None, "no_prefix": lambda k: k[len("resnet/"):], "anonymous": lambda k: "w"}
    backbone = {k: v for k, v in params.items() if "/head/" not in k}
    path = bit_reference.save_hub_module(tmp_path / naming, backbone, SMALL,
                                         rename=rename[naming])
    names = [t.name for t in hub_io.saved_model_variables(tf.saved_model.load(path))]
    assert names[-1] == {"full": "resnet/group_norm/beta:0", "no_prefix": "group_norm/beta:0",
                         "anonymous": "w:0"}[naming]
    model = bit.build_bit(depths=SMALL, width=WIDTH, num_classes=4, input_shape=(SIZE, SIZE, 3))
    assert bit.load_bit_weights(model, path, depths=SMALL) == how
    images = _images()
    assert bit.relative_error(np.asarray(bit.bit_features(model)(images)),
                              _reference_features(params, images)) < 1e-4


def _in_layout(params, layout):
    """The authors' tensors listed in another exporter's order, all named alike."""
    units, order = {}, []
    for key in params:
        unit = "/".join(key.split("/")[:3]) if "/unit" in key else key
        units.setdefault(unit, []).append(key)
    for keys in units.values():
        proj = [k for k in keys if "/proj/" in k]
        rest = [k for k in keys if k not in proj]
        if layout == "proj_last":  # bit_tf2's creation order
            keys = rest + proj
        elif layout == "proj_first":  # the order the unit calls its layers in
            keys = rest[:2] + proj + rest[2:]
        order.extend(keys)
    return [hub_io.ModuleVariable("kernel" if params[k].ndim == 4 else "norm", params[k])
            for k in order]


@pytest.mark.parametrize("layout", ["authors_files", "proj_last", "proj_first"])
def test_structure_maps_every_known_unit_order_without_names(params, layout):
    model = bit.build_bit(depths=SMALL, width=WIDTH, num_classes=7, input_shape=(32, 32, 3))
    arrays, how = bit_mapping.map_tensors(bit.expected_tensors(model, SMALL),
                                          _in_layout(params, layout), source="test")
    assert how == bit_mapping.BY_STRUCTURE
    assert sorted(arrays) == sorted(params)  # the head too: kernel and bias after the last norm
    for key, value in params.items():
        np.testing.assert_array_equal(arrays[key], value, err_msg=key)


def test_stride_one_units_convolve_same_which_equals_the_authors_pad_then_valid():
    """SAME at stride 1 is pad 1 + VALID (bit_tf2), without keeping a padded copy of the input;
    stride-2 units keep the explicit pad (SAME would pad 0 before and 1 after)."""
    model = bit.build_bit(depths=SMALL, width=0.5, num_classes=3, input_shape=(32, 32, 3))
    names = {layer.name for layer in model.layers}
    assert "block1_unit02_b_pad" not in names and "block2_unit01_b_pad" in names
    conv = model.get_layer("block1_unit02_b_conv")
    assert conv.strides == (1, 1) and conv.padding == "same"
    x = tf.random.stateless_uniform((2, 8, 8, conv.kernel.shape[2]), seed=(3, 4))
    kernel = conv.standardized_kernel()
    valid = tf.nn.conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), kernel, 1, "VALID")
    np.testing.assert_allclose(np.asarray(conv(x)), np.asarray(valid), rtol=1e-5, atol=1e-6)
