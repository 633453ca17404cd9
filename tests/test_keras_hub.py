"""`keras_hub:<preset>` backbones, with keras-hub itself as the oracle.

Offline and small: a tiny keras-hub ResNet saved with `save_to_preset`, and a
Hugging Face timm-layout directory (config.json + model.safetensors written
from numpy under the key names keras-hub's timm ResNet converter reads) stand
in for downloaded presets; the same directories, laid out as kagglehub's and
the Hugging Face hub's caches, prove that cached presets load with no network.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import keras
import keras_hub
import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf

from pipeline.models import create_model, get_spec, load_model, pretrained, weights_provenance
from pipeline.models import keras_hub as kh
from pipeline.models import keras_hub_source as source_lib
from pipeline.models.hub_io import WeightsError
from pipeline.serving import export
from tests.helpers import REPO, free_ports, run_cli

SIZE = 32
CLASSES = 3
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The key of the built-in preset the Kaggle-cache test stands in for.
KAGGLE_PARTS = ("keras", "resnetv1", "keras", "resnet_18_imagenet", "3")


def _images(n=4, seed=0, size=SIZE):
    return np.random.RandomState(seed).uniform(0, 1, (n, size, size, 3)).astype("f4")


def _randomize_batchnorm(model, seed=0):
    """Non-trivial BN statistics, so a model that ignored the preset's weights would differ."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])


def save_tiny_preset(directory: str) -> str:
    """A tiny keras-hub ResNetImageClassifier (backbone, converter, preprocessor) in its preset format."""
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    _randomize_batchnorm(backbone)
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(SIZE, SIZE), scale=[1 / 255 / s for s in STD],
        offset=[-m / s for m, s in zip(MEAN, STD)])
    preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter)
    keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=CLASSES,
                                           preprocessor=preprocessor).save_to_preset(directory)
    return directory


@pytest.fixture(scope="module")
def keras_preset(tmp_path_factory):
    return save_tiny_preset(str(tmp_path_factory.mktemp("keras_hub") / "tiny_resnet"))


def _timm_resnet18_state(seed=0, num_classes=5):
    """A timm `resnet18` state dict (PyTorch layouts) as float32 numpy arrays."""
    rng = np.random.RandomState(seed)
    state = {}

    def conv(key, out, inp, k):
        state[f"{key}.weight"] = rng.normal(0, (2 / (inp * k * k)) ** 0.5, (out, inp, k, k))

    def bn(key, n):
        state.update({f"{key}.weight": rng.uniform(0.5, 1.5, n), f"{key}.bias": rng.normal(0, .1, n),
                      f"{key}.running_mean": rng.normal(0, .1, n),
                      f"{key}.running_var": rng.uniform(0.5, 1.5, n)})

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inp = 64
    for stage, out in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            key = f"layer{stage}.{block}"
            conv(f"{key}.conv1", out, inp if block == 0 else out, 3)
            bn(f"{key}.bn1", out)
            conv(f"{key}.conv2", out, out, 3)
            bn(f"{key}.bn2", out)
            if block == 0 and stage > 1:
                conv(f"{key}.downsample.0", out, inp, 1)
                bn(f"{key}.downsample.1", out)
        inp = out
    state["fc.weight"] = rng.normal(0, 0.01, (num_classes, 512))
    state["fc.bias"] = np.zeros(num_classes)
    return {k: v.astype("float32") for k, v in state.items()}


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    """A Hugging Face timm-layout directory (what `hf://timm/resnet18.*` downloads), random weights."""
    directory = tmp_path_factory.mktemp("timm") / "resnet18"
    directory.mkdir()
    config = {"architecture": "resnet18", "num_classes": 5, "num_features": 512,
              "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": list(MEAN), "std": list(STD),
                                 "interpolation": "bicubic", "crop_pct": 0.95}}
    (directory / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file(_timm_resnet18_state(), str(directory / "model.safetensors"))
    return str(directory)


def _features(model, x):
    return np.asarray(keras.Model(model.input, model.get_layer("pool").output)(x))


def _compile(model):
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# --------------------------------------------------------------------------- keras-hub as the oracle

def test_keras_preset_equals_keras_hubs_own_classifier_on_255x(keras_preset):
    model = create_model(f"keras_hub:{keras_preset}", num_classes=CLASSES, image_size=SIZE,
                         weights=kh.PRESET_WEIGHTS)
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "backbone", "pool",
                                                      "logits"]
    assert pretrained.backbone_layers(model) == [model.get_layer("backbone")]
    head = model.get_layer("logits")
    assert head.dtype_policy.name == "float32" and not np.any(head.get_weights()[0])
    oracle = keras_hub.models.ImageClassifier.from_preset(keras_preset)  # keras-hub's own pipeline
    head.set_weights(oracle.output_dense.get_weights())
    x = _images()
    expected = oracle.predict(255.0 * x, verbose=0)  # its preprocessor converts 0..255 images
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-5)
    assert np.abs(expected).max() > 0.1


def test_timm_dir_equals_keras_hubs_own_backbone_and_converter(timm_dir):
    model = create_model(f"keras_hub:{timm_dir}", num_classes=CLASSES, image_size=SIZE,
                         weights=kh.PRESET_WEIGHTS)
    assert type(model.get_layer("backbone")).__name__ == "ResNetBackbone"
    backbone = keras_hub.models.Backbone.from_preset(timm_dir)
    converter = keras_hub.layers.ImageConverter.from_preset(timm_dir)
    x = _images()
    expected = np.asarray(backbone(converter(255.0 * x))).mean(axis=(1, 2))
    np.testing.assert_allclose(_features(model, x), expected, rtol=1e-4, atol=1e-4)
    assert kh.default_image_size(timm_dir) == SIZE


@pytest.mark.parametrize("which", ["keras_preset", "timm_dir"])
def test_preset_trains_saves_and_exports_what_keras_predicts(which, request, tmp_path):
    directory = request.getfixturevalue(which)
    model = _compile(create_model(f"keras_hub:{directory}", num_classes=CLASSES, image_size=SIZE,
                                  weights=kh.PRESET_WEIGHTS))
    x, y = _images(8), np.arange(8) % CLASSES
    for _ in range(2):  # the zero head passes no gradient to the backbone on step 1
        loss = model.train_on_batch(x, y)
    assert np.isfinite(loss) and np.abs(model.get_layer("logits").get_weights()[0]).max() > 0
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.testing.assert_allclose(np.asarray(load_model(path)(x)), np.asarray(model(x)), atol=1e-5)
    export_dir = export.export_model(model, ["a", "b", "c"], str(tmp_path / "saved_models"), "kh",
                                     image_size=SIZE)
    served = tf.saved_model.load(export_dir).signatures["serving_default"](images=tf.constant(x))
    expected = np.asarray(keras.ops.softmax(model(x)))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)


@pytest.fixture(scope="module")
def vit_preset(tmp_path_factory):
    """A tiny keras-hub ViT classifier preset: a fixed 32x32 input and class-token pooling."""
    directory = str(tmp_path_factory.mktemp("vit") / "tiny_vit")
    backbone = keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=8, num_layers=1,
                                            num_heads=2, hidden_dim=16, mlp_dim=32)
    converter = keras_hub.layers.ViTImageConverter(image_size=(SIZE, SIZE), scale=1 / 127.5,
                                                   offset=-1.0, interpolation="bilinear")
    preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(image_converter=converter)
    keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=CLASSES,
                                        preprocessor=preprocessor).save_to_preset(directory)
    return directory


@pytest.mark.parametrize("image_size", [SIZE, 24])
def test_vit_preset_pools_its_class_token_and_resizes_to_its_fixed_size(vit_preset, image_size):
    model = create_model(f"keras_hub:{vit_preset}", num_classes=CLASSES, image_size=image_size,
                         weights=kh.PRESET_WEIGHTS)
    assert isinstance(model.get_layer("pool"), kh.ClassToken)
    assert ("resize" in [layer.name for layer in model.layers]) == (image_size != SIZE)
    oracle = keras_hub.models.ImageClassifier.from_preset(vit_preset)
    assert oracle.pooling == "token"
    model.get_layer("logits").set_weights(oracle.output_dense.get_weights())
    x = _images(size=image_size)
    expected = oracle.predict(255.0 * x, verbose=0)  # its converter resizes to 32x32
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-4)


def test_mixed_precision_reaches_the_backbone_and_the_head_stays_float32(keras_preset):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = create_model(f"keras_hub:{keras_preset}", num_classes=CLASSES, image_size=SIZE,
                             weights=kh.PRESET_WEIGHTS)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("backbone").compute_dtype == "bfloat16"
    assert model.get_layer("preprocess").compute_dtype == "float32"
    assert model(_images()).dtype == "float32"


def test_frozen_backbone_keeps_its_features_while_the_head_learns(keras_preset):
    model = create_model(f"keras_hub:{keras_preset}", num_classes=CLASSES, image_size=SIZE,
                         weights=kh.PRESET_WEIGHTS)
    pretrained.set_backbone_trainable(model, False)
    assert not model.get_layer("backbone").trainable_weights
    assert model.get_layer("logits").trainable_weights
    x, y = _images(8), np.arange(8) % CLASSES
    before = _features(model, x)
    _compile(model)
    for _ in range(3):
        model.train_on_batch(x, y)
    np.testing.assert_array_equal(_features(model, x), before)  # BN statistics included
    assert np.abs(model.get_layer("logits").get_weights()[0]).max() > 0


def test_weights_none_is_the_same_architecture_with_random_weights(keras_preset):
    name = f"keras_hub:{keras_preset}"
    loaded = create_model(name, num_classes=CLASSES, image_size=SIZE, weights=kh.PRESET_WEIGHTS)
    random = create_model(name, num_classes=CLASSES, image_size=SIZE, weights=None)
    a, b = loaded.get_layer("backbone").get_weights(), random.get_layer("backbone").get_weights()
    assert [w.shape for w in a] == [w.shape for w in b]
    kernels = [(u, v) for u, v in zip(a, b) if u.ndim == 4]
    assert kernels and all(not np.allclose(u, v) for u, v in kernels)
    assert not np.allclose(_features(loaded, _images()), _features(random, _images()))
    assert get_spec(name).default_weights == kh.PRESET_WEIGHTS
    with pytest.raises(WeightsError, match="--weights=preset"):
        create_model(name, num_classes=CLASSES, image_size=SIZE, weights="imagenet")


def test_provenance_records_the_preset_and_hashes_its_weight_files(keras_preset):
    name = f"keras_hub:{keras_preset}"
    assert weights_provenance(name, None) is None
    record = weights_provenance(name, kh.PRESET_WEIGHTS)
    with open(os.path.join(keras_preset, "model.weights.h5"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert record["kind"] == "local" and record["format"] == "keras_hub"
    assert record["sha256"] == {"model.weights.h5": digest}
    assert record["directory"] == keras_preset and record["keras_hub_version"]


# --------------------------------------------------------------------------- caches and offline

@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Kaggle and Hugging Face caches, and both hosts at a closed local port (no network either way)."""
    from huggingface_hub import constants
    port = free_ports(1)[0]
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # kagglesdk: http://localhost:7777
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return tmp_path


@pytest.mark.parametrize("preset, cache", [("resnet_18_imagenet", "KAGGLEHUB_CACHE"),
                                           ("hf://timm/resnet18.a1_in1k", "HF_HUB_CACHE")])
def test_uncached_preset_offline_is_one_line_within_seconds(preset, cache, empty_caches):
    start = time.monotonic()
    with pytest.raises(WeightsError) as caught:
        create_model(f"keras_hub:{preset}", num_classes=CLASSES, weights=kh.PRESET_WEIGHTS)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "\n" not in message and preset in message and "unreachable" in message
    for needed in (cache, str(empty_caches), "local preset directory", "--weights=none"):
        assert needed in message


def test_unknown_name_and_missing_directory_are_one_line(empty_caches):
    with pytest.raises(WeightsError, match="did you mean resnet_18_imagenet") as caught:
        create_model("keras_hub:resnet_18_imagenett", num_classes=CLASSES)
    assert "\n" not in str(caught.value)
    with pytest.raises(WeightsError, match="no such local preset directory"):
        create_model(f"keras_hub:{empty_caches}/nowhere", num_classes=CLASSES)


def test_cached_kaggle_preset_loads_offline_with_its_version(keras_preset, empty_caches):
    cached = os.path.join(os.environ["KAGGLEHUB_CACHE"], "models", *KAGGLE_PARTS)
    shutil.copytree(keras_preset, cached)  # what kagglehub leaves after a download
    model = create_model("keras_hub:resnet_18_imagenet", num_classes=CLASSES, image_size=SIZE,
                         weights=kh.PRESET_WEIGHTS)
    local = create_model(f"keras_hub:{keras_preset}", num_classes=CLASSES, image_size=SIZE,
                         weights=kh.PRESET_WEIGHTS)
    np.testing.assert_allclose(_features(model, _images()), _features(local, _images()), atol=1e-6)
    record = weights_provenance("keras_hub:resnet_18_imagenet", kh.PRESET_WEIGHTS)
    assert (record["kind"], record["kaggle_version"]) == ("kaggle", "3")
    assert record["handle"] == "kaggle://" + "/".join(KAGGLE_PARTS)
    assert set(record["sha256"]) == {"model.weights.h5"}


def test_cached_hugging_face_preset_loads_offline_with_its_revision(timm_dir, empty_caches):
    from huggingface_hub import constants
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(constants.HF_HUB_CACHE, "models--timm--resnet18.a1_in1k")
    shutil.copytree(timm_dir, os.path.join(repo, "snapshots", revision))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    source = source_lib.resolve("hf://timm/resnet18.a1_in1k")
    assert (source.kind, source.version) == ("hf", revision) and source.location == source.directory
    model = create_model("keras_hub:hf://timm/resnet18.a1_in1k", num_classes=CLASSES,
                         image_size=SIZE, weights=kh.PRESET_WEIGHTS)
    assert _features(model, _images()).shape == (4, 512)
    record = weights_provenance("keras_hub:hf://timm/resnet18.a1_in1k", kh.PRESET_WEIGHTS)
    assert record["hf_revision"] == revision and record["format"] == "timm"
    assert set(record["sha256"]) == {"model.safetensors"}


def test_keras_hub_is_imported_only_when_a_keras_hub_model_is_used(keras_preset, tmp_path):
    """Importing pipeline.models leaves keras_hub alone; loading a saved model imports it by itself."""
    path = str(tmp_path / "model.keras")
    model = create_model(f"keras_hub:{keras_preset}", num_classes=CLASSES, image_size=SIZE,
                         weights=kh.PRESET_WEIGHTS)
    model.save(path)
    np.save(tmp_path / "x.npy", _images())
    np.save(tmp_path / "y.npy", np.asarray(model(_images())))
    code = ("import sys, numpy as np, pipeline.models as m; m.get_spec('keras_hub:x'); "
            "assert 'keras_hub' not in sys.modules, 'imported by pipeline.models'; "
            f"out = m.load_model({path!r})(np.load({str(tmp_path / 'x.npy')!r})); "
            f"np.testing.assert_allclose(np.asarray(out), np.load({str(tmp_path / 'y.npy')!r}), "
            "atol=1e-5); assert 'keras_hub' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def finetuned(keras_preset, tmp_path_factory):
    """One `python -m pipeline.finetune` on the local preset, a run like any other: two replicas
    (logical CPUs), a frozen epoch then a backbone multiplier, exported and reported at the end."""
    root = tmp_path_factory.mktemp("finetuned")
    model_dir, export_root = root / "run", root / "saved_models"
    run_cli("finetune", f"--model=keras_hub:{keras_preset}", "--dataset=digits", "--epochs=2",
            "--freeze_epochs=1", "--backbone_lr_multiplier=0.1", "--strategy=mirrored",
            "--batch_size=16", "--steps_per_epoch=2", f"--image_size={SIZE}", "--augment=none",
            "--schedule=cosine", "--learning_rate=0.01",  # hyperrule would set a 500-step budget
            f"--model_dir={model_dir}", f"--export_dir={export_root}", env={"PIPELINE_LOGICAL_CPUS": "2"})
    return model_dir, export_root


def test_finetune_end_to_end_on_a_local_preset(finetuned, keras_preset):
    model_dir, export_root = finetuned
    assert (model_dir / "metrics.csv").is_file()
    assert (model_dir / "checkpoints" / "best.keras").is_file()
    assert (model_dir / "report.html").is_file()
    exports = [p for p in export_root.rglob("saved_model.pb")]
    assert exports, "no SavedModel export"
    weights = json.loads((model_dir / "summary.json").read_text())["weights"]
    assert (weights["preset"], weights["kind"], weights["format"]) == (keras_preset, "local",
                                                                       "keras_hub")
    assert set(weights["sha256"]) == {"model.weights.h5"}
    card = json.loads((exports[0].parent / "assets" / "model_card.json").read_text())
    assert card["weights"] == weights  # the export says where its weights came from, too


def test_frozen_then_scaled_backbone_under_mirrored_then_visualized(finetuned):
    """A keras_hub run like any other: two replicas, a frozen epoch, a backbone multiplier, the plots."""
    model_dir, _ = finetuned
    summary = json.loads((model_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs_done"], summary["replicas"]) == ("completed", 2, 2)
    assert (summary["strategy"], summary["per_replica_batch"]) == ("mirrored", 8)
    proc = run_cli("visualize", f"--model_dir={model_dir}", "--what=feature_maps,gradcam", "--image=test:0")
    written = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert any("gradcam" in p for p in written) and any("feature_maps_backbone" in p for p in written)
    assert all(os.path.getsize(p) > 1000 for p in written)
