"""Tests of the from-scratch ResNet families (cifar_resnet, resnet, preact_resnet).

Registry-driven: every model of these families is built and trained for one
step, so a newly registered variant is tested the day it is registered. Other
families (BiT, Keras Applications, hub) are tested in their own files.
Models train eagerly here: for one tiny step, tracing a graph costs far more
than it saves.
"""
from __future__ import annotations

import functools
import pathlib
import re

import keras
import numpy as np
import pytest

from pipeline.models import create_model, list_models, registry
from pipeline.models.layers import (DEFAULT_MEAN, DEFAULT_STD, FusedBatchNormalization,
                                    GroupNormalization, Normalize, ZeroPadShortcut)

FAMILIES = ("cifar_resnet", "resnet", "preact_resnet")
MODEL_NAMES = [n for n in list_models() if registry.get_spec(n).family in FAMILIES]

# He et al. 2016, Table 6: parameters of the option-A CIFAR ResNets, in millions.
PAPER_PARAMS_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                  "resnet110": 1.7}


# Small CIFAR models are built once and shared by the tests that only inspect
# them (training one step changes weights, never structure or counts).
SHARED_MODELS = {*PAPER_PARAMS_M, *(n.replace("resnet", "plain") for n in PAPER_PARAMS_M)}


@functools.lru_cache(maxsize=None)
def _shared_model(name: str) -> keras.Model:
    return create_model(name, num_classes=10, image_size=32)


def _trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _round_sig(value: float, digits: int = 2) -> float:
    return float(f"{value:.{digits - 1}e}")


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, size, size, 3), dtype=np.float32)


def _conv_layers(model: keras.Model) -> list[keras.layers.Conv2D]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


@pytest.fixture
def mixed_bfloat16():
    """Global mixed_bfloat16 policy for one test, float32 restored afterwards."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_families_register_expected_models():
    # The parametrized tests below are only as good as this list is complete.
    assert set(list_models("cifar_resnet")) == {
        *(f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)),
        *(f"plain{d}" for d in (20, 32, 44, 56, 110))}
    assert set(list_models("resnet")) == {f"resnet{d}" for d in (18, 34, 50, 101, 152)}
    assert set(list_models("preact_resnet")) == {
        f"preact_resnet{d}" for d in (18, 34, 50, 101, 152)}
    assert registry.get_spec("resnet20").default_image_size == 32
    assert registry.get_spec("resnet50").default_image_size == 224
    assert registry.get_spec("resnet20").options() == {"shortcut", "width_multiplier", "drop_path"}
    assert registry.get_spec("resnet18").options() == {"stem", "pooling", "width_multiplier", "drop_path"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_builds_and_trains_one_step(name):
    model = _shared_model(name) if name in SHARED_MODELS else create_model(
        name, num_classes=10, image_size=32)

    assert model.name == name
    assert model.input_shape == (None, 32, 32, 3)
    assert isinstance(model.layers[1], Normalize)
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalAveragePooling2D)
    logits_layer = model.get_layer("logits")
    assert logits_layer.activation is keras.activations.linear  # logits, not probabilities
    assert tuple(model.output.shape) == (None, 10) and model.output.dtype == "float32"

    stem_kernel = model.get_layer("stem_conv").kernel
    before = [np.array(stem_kernel), np.array(logits_layer.kernel)]
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    loss = model.train_on_batch(_images(), np.array([3, 7]))

    assert np.isfinite(loss)
    # Both ends moved: gradients flowed from the loss through the whole body.
    assert not np.allclose(before[0], np.array(stem_kernel))
    assert not np.allclose(before[1], np.array(logits_layer.kernel))


@pytest.mark.parametrize("name, millions", sorted(PAPER_PARAMS_M.items()))
def test_cifar_resnet_param_counts_match_paper(name, millions):
    resnet = _shared_model(name)
    plain = _shared_model(name.replace("resnet", "plain"))

    assert _round_sig(_trainable_params(resnet) / 1e6) == millions
    # Option A shortcuts are parameter-free: the plain twin has exactly as many.
    assert plain.count_params() == resnet.count_params()


def test_shortcut_option_a_zero_pads_and_option_b_projects():
    a = _shared_model("resnet20")  # shortcut="A" is the default
    b = create_model("resnet20", num_classes=10, shortcut="B")

    pads = [layer for layer in a.layers if isinstance(layer, ZeroPadShortcut)]
    assert [(p.filters, p.stride) for p in pads] == [(32, 2), (64, 2)]  # one per stage change
    assert not any("shortcut_conv" in layer.name for layer in a.layers)

    projections = [layer for layer in _conv_layers(b) if "shortcut" in layer.name]
    assert [(p.kernel_size, p.strides, p.filters) for p in projections] == [
        ((1, 1), (2, 2), 32), ((1, 1), (2, 2), 64)]
    assert not any(isinstance(layer, ZeroPadShortcut) for layer in b.layers)
    assert b.count_params() > a.count_params()


def test_cifar_architecture_follows_paper():
    model = _shared_model("resnet20")
    convs = _conv_layers(model)

    assert len(convs) + 1 == 20  # 6n+2 weighted layers: 19 convs and the Dense head
    assert convs[0].kernel_size == (3, 3) and convs[0].filters == 16
    assert sorted({c.filters for c in convs}) == [16, 32, 64]
    assert all(not c.use_bias for c in convs)
    assert all(c.kernel_regularizer is None for c in convs)  # weight decay is the optimizer's
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == len(convs)
    assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    assert model.get_layer("stage3_block3_out").output.shape[1:] == (8, 8, 64)


@pytest.mark.parametrize("size, stem, expected", [
    (224, "auto", "imagenet"), (65, "auto", "imagenet"), (64, "auto", "cifar"),
    (32, "auto", "cifar"), (224, "cifar", "cifar"), (32, "imagenet", "imagenet")])
def test_stem_selection(size, stem, expected):
    # Narrow models: the stem does not depend on width and they build fast.
    model = create_model("resnet18", num_classes=10, image_size=size, stem=stem,
                         width_multiplier=0.125)
    conv = model.get_layer("stem_conv")

    if expected == "imagenet":
        assert conv.kernel_size == (7, 7) and conv.strides == (2, 2)
        assert isinstance(model.get_layer("stem_pool"), keras.layers.MaxPooling2D)
    else:
        assert conv.kernel_size == (3, 3) and conv.strides == (1, 1)
        assert "stem_pool" not in [layer.name for layer in model.layers]
    reduction = 32 if expected == "imagenet" else 8
    assert model.get_layer("pool").input.shape[1] == -(-size // reduction)


def test_preact_ordering_and_final_activation():
    model = create_model("preact_resnet18", num_classes=10, width_multiplier=0.125, image_size=32)
    names = [layer.name for layer in model.layers]

    assert "stem_bn" not in names  # the first block's BN-ReLU activates the stem
    assert names.index("stage1_block1_preact_bn") < names.index("stage1_block1_1_conv")
    # A projection shortcut reads the pre-activated input and has no BN of its own.
    projection = model.get_layer("stage2_block1_shortcut_conv")
    assert projection.input is model.get_layer("stage2_block1_preact_relu").output
    assert "stage2_block1_shortcut_bn" not in names
    assert model.get_layer("pool").input is model.get_layer("final_relu").output


def test_bottleneck_projection_shortcuts():
    model = create_model("resnet50", num_classes=10, width_multiplier=0.125, image_size=32)
    projections = [c for c in _conv_layers(model) if c.name.endswith("shortcut_conv")]

    # One per stage: stage 1 changes channels (8 -> 32), stages 2-4 also halve.
    assert [(c.filters, c.strides) for c in projections] == [
        (32, (1, 1)), (64, (2, 2)), (128, (2, 2)), (256, (2, 2))]
    assert model.get_layer("stage4_block3_3_conv").filters == 4 * 64


def test_pooling_max():
    model = create_model("resnet18", num_classes=10, pooling="max", width_multiplier=0.125,
                         image_size=32)
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalMaxPooling2D)


def test_width_multiplier_quadruples_resnet20_params():
    base = _shared_model("resnet20")
    wide = create_model("resnet20", num_classes=10, width_multiplier=2)

    assert 3.7 < wide.count_params() / base.count_params() < 4.1
    assert wide.get_layer("stem_conv").filters == 32


def test_mixed_bfloat16_convs_compute_in_bfloat16_and_logits_stay_float32(mixed_bfloat16):
    model = create_model("resnet20", num_classes=10)

    convs = _conv_layers(model)
    assert convs and all(c.compute_dtype == "bfloat16" for c in convs)
    assert all(c.variable_dtype == "float32" for c in convs)
    assert model.get_layer("logits").compute_dtype == "float32"
    logits = model.predict_on_batch(_images())
    assert logits.dtype == np.float32 and logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    # One compiled (graph-mode) step: the path `fit` takes with this policy.
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert np.isfinite(model.train_on_batch(_images(), np.array([3, 7])))


def test_keras_file_round_trip_keeps_predictions(tmp_path):
    normalization = ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    model = create_model("resnet20", num_classes=10, normalization=normalization)
    path = tmp_path / "resnet20.keras"
    model.save(path)

    restored = keras.saving.load_model(path)

    images = _images()
    np.testing.assert_allclose(restored.predict_on_batch(images), model.predict_on_batch(images),
                               rtol=1e-5, atol=1e-5)
    normalize = restored.get_layer("normalize")
    assert normalize.mean == normalization[0] and normalize.std == normalization[1]
    assert sum(isinstance(layer, ZeroPadShortcut) for layer in restored.layers) == 2


def test_weights_file_is_loaded_and_other_weights_rejected(tmp_path):
    model = create_model("resnet20", num_classes=10)
    path = tmp_path / "resnet20.weights.h5"
    model.save_weights(path)

    loaded = create_model("resnet20", num_classes=10, weights=str(path))

    images = _images()
    np.testing.assert_allclose(loaded.predict_on_batch(images), model.predict_on_batch(images),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        create_model("resnet20", num_classes=10, weights="imagenet")
    with pytest.raises(FileNotFoundError):
        create_model("resnet20", num_classes=10, weights=str(tmp_path / "missing.weights.h5"))


def test_misspelled_model_name_suggests_the_right_one():
    with pytest.raises(ValueError, match="resnet20"):
        create_model("resnet2O", num_classes=10)


@pytest.mark.parametrize("name, options", [
    ("resnet20", {"stem": "cifar"}),           # option of another family
    ("plain20", {"shortcut": "A"}),            # plain nets have no shortcut
    ("resnet20", {"shortcut": "C"}),
    ("resnet18", {"stem": "tiny"}),
    ("resnet18", {"pooling": "sum"}),
    ("resnet20", {"width_multiplier": 0}),
])
def test_bad_options_raise_value_error(name, options):
    with pytest.raises(ValueError):
        create_model(name, num_classes=10, **options)


def test_normalize_layer_defaults_and_values():
    layer = Normalize()
    assert layer.mean == DEFAULT_MEAN and layer.std == DEFAULT_STD

    out = keras.ops.convert_to_numpy(
        Normalize((0.0, 0.5, 1.0), (1.0, 0.5, 0.25))(np.ones((1, 2, 2, 3), np.float32)))
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 1.0, 0.0])
    assert Normalize.from_config(layer.get_config()).std == DEFAULT_STD
    with pytest.raises(ValueError):
        Normalize(std=(0.0, 1.0, 1.0))


def test_zero_pad_shortcut_subsamples_and_pads_channels():
    x = np.arange(1 * 4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2)
    layer = ZeroPadShortcut(filters=5, stride=2)

    out = keras.ops.convert_to_numpy(layer(x))

    assert out.shape == (1, 2, 2, 5) == layer.compute_output_shape(x.shape)
    np.testing.assert_array_equal(out[..., :2], x[:, ::2, ::2, :])
    assert not out[..., 2:].any()
    assert ZeroPadShortcut.from_config(layer.get_config()).filters == 5


def _outputs_and_gradients(layer, x, **call_kwargs):
    """Outputs and the gradients of a non-trivial loss w.r.t. input and trainable weights."""
    import tensorflow as tf
    x = tf.convert_to_tensor(x)
    weight = tf.random.stateless_normal(x.shape, seed=[1, 2])  # any loss whose gradient varies
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weight)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return [np.asarray(t, dtype=np.float32) for t in (y, *grads)]


@pytest.mark.parametrize("ours, keras_layer, options", [
    (GroupNormalization, keras.layers.GroupNormalization, dict(groups=4, epsilon=1e-5)),
    (GroupNormalization, keras.layers.GroupNormalization,
     dict(groups=2, center=False, scale=False)),
    (FusedBatchNormalization, keras.layers.BatchNormalization, dict(epsilon=1e-3)),
])
def test_fast_normalization_layers_match_keras(ours, keras_layer, options):
    # Activations with a group mean 3 standard deviations from zero (the single-pass
    # variance of GroupNormalization must still agree) and random affine weights.
    x = 3.0 + np.random.default_rng(0).standard_normal((3, 5, 6, 16)).astype(np.float32)
    fast, reference = ours(**options), keras_layer(**options)
    fast.build(x.shape), reference.build(x.shape)
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal(w.shape).astype(np.float32) for w in reference.weights]
    if keras_layer is keras.layers.BatchNormalization:  # moving variance must stay positive
        weights[-1] = np.abs(weights[-1]) + 0.5
    fast.set_weights(weights), reference.set_weights(weights)

    for got, want in zip(_outputs_and_gradients(fast, x), _outputs_and_gradients(reference, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(fast.get_weights(), reference.get_weights()):  # BN moving statistics
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert type(fast).from_config(fast.get_config()).get_config() == fast.get_config()


def test_group_normalization_under_mixed_bfloat16_keeps_float32_statistics(mixed_bfloat16):
    x = 3.0 + np.random.default_rng(0).standard_normal((2, 4, 4, 8)).astype(np.float32)
    layer = GroupNormalization(groups=2)
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    want = keras.layers.GroupNormalization(groups=2, dtype="float32")(x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), atol=0.05)


def _without_backend_dispatch(source):
    """Drop the one documented backend kernel (layers._tf_fused_batch_norm_training)."""
    start = source.find("def _tf_fused_batch_norm_training(")
    if start < 0:
        return source
    end = source.find("\n@", start)
    return source[:start] + source[end:]


def test_model_code_uses_keras_only():
    # Contract: the same architectures must run on any Keras backend; the only TensorFlow call is the
    # fused batch-norm kernel, reached only when keras.backend.backend() == "tensorflow".
    models_dir = pathlib.Path(registry.__file__).parent
    for module in ("layers.py", "resnet.py", "resnet_cifar.py"):
        source = _without_backend_dispatch((models_dir / module).read_text())
        assert not re.search(r"^\s*(import|from)\s+tensorflow", source, re.M), module
        assert not re.search(r"\btf\.[A-Za-z_]", source), module
        assert "layers.Lambda" not in source, module
