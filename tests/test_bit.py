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

from pipeline.models import bit, bit_reference, create_model, get_spec, hub_io, list_models
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
        assert spec.options() == set()
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
    canon = bit.canonical_weight_name
    gamma = "resnet/block1/unit01/a/group_norm/gamma"
    assert canon(f"{gamma}:0") == gamma
    assert canon("keras_layer/resnet/group_norm/beta:0") == "resnet/group_norm/beta"
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
