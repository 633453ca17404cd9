"""`python -m pipeline.finetune`: HyperRule defaults, hub modules, freezing, --init_from."""
import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from pipeline import config as cfg
from pipeline.training import init_from, optimizers
from pipeline.models import create_model
from tests.helpers import make_image_folder, run_cli
from tests.test_pretrained import _save_feature_module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("photos") / "colors")


def read_rows(model_dir):
    import csv
    with open(os.path.join(model_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_finetune_bit_end_to_end_on_an_image_folder(folder, tmp_path):
    model_dir = str(tmp_path / "bit")
    proc = run_cli("finetune", "--noexport", "--noreport", f"--dataset=folder:{folder}", "--model=bit_m_r50x1", "--weights=none",
                   "--image_size=32", "--batch_size=8", "--total_steps=6", "--verbose=2",
                   f"--model_dir={model_dir}", "--val_fraction=0.25", "--test_fraction=0.25")
    assert f"run directory: {model_dir}" in proc.stdout
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["status"] == "completed" and summary["model"] == "bit_m_r50x1"
    run = json.load(open(os.path.join(model_dir, "config.json")))
    assert run["train"]["schedule"] == "hyperrule"
    assert run["train"]["optimizer"]["name"] == "sgd" and run["train"]["optimizer"]["momentum"] == 0.9
    rows = read_rows(model_dir)
    assert len(rows) == summary["epochs_done"] >= 1
    # 18 training images at batch 8 -> 3 steps per epoch; 6 steps -> 2 epochs.
    assert summary["epochs_done"] == 2
    # HyperRule lr 0.003 * 8 / 512; a 6-step budget decays /10 at steps 1, 3 and 5 (30/60/90%),
    # so epoch 2 (steps 3-5) starts two decays down.
    peak = 0.003 * 8 / 512
    assert float(rows[0]["lr"]) == pytest.approx(peak, rel=1e-4)
    assert float(rows[1]["lr"]) == pytest.approx(peak * 0.01, rel=1e-4)


def test_finetune_hyperrule_picks_resolution_from_image_size(folder, tmp_path):
    from pipeline import data
    ds = data.load_dataset(cfg.DataConfig(dataset=f"folder:{folder}", augment="bit", batch_size=4,
                                          resolution_rule="hyperrule"))
    assert ds.image_size == 128  # 32x32 images are small: resize 160, crop 128
    x, _ = next(iter(ds.train))
    assert x.shape[1:] == (128, 128, 3)


def test_finetune_hub_module_with_frozen_epochs(folder, tmp_path):
    module = _save_feature_module(tmp_path / "module")
    model_dir = str(tmp_path / "hub")
    run_cli("finetune", "--noexport", "--noreport", f"--dataset=folder:{folder}", f"--model=hub:{module}", "--schedule=constant",
            "--learning_rate=0.5", "--epochs=2", "--freeze_epochs=1", "--backbone_lr_multiplier=0.1",
            "--batch_size=8", "--augment=none", "--verbose=2", f"--model_dir={model_dir}")
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["status"] == "completed" and summary["epochs_done"] == 2


def test_finetune_unreachable_weights_is_one_clear_line(folder, tmp_path):
    proc = run_cli("finetune", "--noexport", "--noreport", f"--dataset=folder:{folder}", "--weights=/nonexistent/bit.npz",
                   "--image_size=32", f"--model_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent/bit.npz" in errors[0]
    assert "Traceback" not in proc.stderr


def _tiny_model(classes=3):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x))


def _one_step(model, optimizer):
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.RandomState(0).uniform(size=(4, 8, 8, 3)).astype("f4")
    before = {w.path: w.numpy().copy() for w in model.weights}
    model.train_on_batch(x, np.array([0, 1, 2, 0]))
    return {w.path: np.abs(w.numpy() - before[w.path]).max() for w in model.weights}


def test_backbone_lr_multiplier_scales_only_the_backbone():
    keras.utils.set_random_seed(0)
    plain, scaled = _tiny_model(), _tiny_model()
    scaled.set_weights(plain.get_weights())
    opt = cfg.OptimizerConfig("sgd", 0.1, momentum=0.0)
    d_plain = _one_step(plain, optimizers.make_optimizer(opt, 0.1))
    d_scaled = _one_step(scaled, optimizers.make_optimizer(
        opt, 0.1, backbone_lr_multiplier=0.1, head_variable_paths=optimizers.head_variable_paths(scaled)))
    conv = [p for p in d_plain if "conv" in p and "kernel" in p][0]
    head = [p for p in d_plain if "logits" in p and "kernel" in p][0]
    assert d_scaled[conv.replace(plain.name, scaled.name)] == pytest.approx(d_plain[conv] * 0.1, rel=1e-3)
    assert d_scaled[head.replace(plain.name, scaled.name)] == pytest.approx(d_plain[head], rel=1e-5)


def test_init_from_copies_all_but_the_head(digits_run, folder):
    target = create_model("resnet20", num_classes=3, image_size=32)
    copied = init_from.load_backbone(target, digits_run["model_dir"])
    source = keras.saving.load_model(os.path.join(digits_run["model_dir"], "checkpoints", "best.keras"),
                                     compile=False)
    assert "logits" not in copied and len(copied) > 10
    for name in copied:
        for mine, theirs in zip(target.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    assert target.get_layer("logits").get_weights()[0].shape[-1] == 3


def test_init_from_cli_on_a_new_task(digits_run, folder, tmp_path):
    proc = run_cli("train", "--noexport", "--noreport", f"--dataset=folder:{folder}", "--model=resnet20",
                   "--epochs=1", "--image_size=32",  # a folder trains at 224 unless told: 49x the pixels
                   "--batch_size=8", "--augment=none", "--verbose=2", f"--init_from={digits_run['model_dir']}",
                   f"--model_dir={tmp_path / 'adapted'}")
    assert "init_from: copied" in proc.stdout


def test_init_from_rejects_unrelated_sources(tmp_path):
    with pytest.raises(init_from.InitFromError, match="not a run directory"):
        init_from.find_checkpoint(str(tmp_path))


def test_variable_key_adapter_matches_keras_and_backend_variables():
    """`optimizers.variable_key` wraps Keras's private `Optimizer._var_key`: fail loudly if it changes.

    The backbone multiplier relies on a Keras variable (what `build` sees) and its
    backend variable (what `update_step` sees) mapping to one key.
    """
    optimizer = keras.optimizers.SGD(0.1)
    assert callable(getattr(optimizer, "_var_key", None)), "Keras removed Optimizer._var_key"
    a, b = keras.Variable(np.zeros(2), name="a"), keras.Variable(np.zeros(2), name="b")
    key = optimizers.variable_key(optimizer, a)
    assert optimizers.variable_key(optimizer, a.value) == key
    assert optimizers.variable_key(optimizer, b) != key


def test_backbone_lr_optimizer_is_a_real_subclass_built_up_front():
    opt = cfg.OptimizerConfig("adam", 0.1)
    optimizer = optimizers.make_optimizer(opt, 0.1, backbone_lr_multiplier=0.5, head_variable_paths={"x"})
    assert isinstance(optimizer, keras.optimizers.Adam) and type(optimizer).__name__ == "BackboneLRAdam"
    assert type(optimizer) is type(optimizers.make_optimizer(opt, 0.1, backbone_lr_multiplier=0.2))
    assert optimizer.backbone_lr_multiplier == 0.5 and optimizer.head_variable_paths == {"x"}


def test_finetune_defaults_come_from_the_model_spec():
    from pipeline.training import finetuning
    base = cfg.RunConfig(model_dir="", data=cfg.DataConfig(), model=cfg.ModelConfig("keras_resnet50"),
                         train=cfg.TrainConfig(schedule="cosine"))
    run = finetuning.finetune_run(base)
    assert run.model.weights == "imagenet" and run.data.image_size == 224
    assert finetuning.finetune_run(dataclasses.replace(
        base, model=cfg.ModelConfig("keras_resnet50", weights="none"))).model.weights is None
    bit = finetuning.finetune_run(dataclasses.replace(
        base, model=cfg.ModelConfig("bit_m_r50x1"), train=cfg.TrainConfig(schedule="hyperrule")))
    assert bit.model.weights == "https://tfhub.dev/google/bit/m-r50x1/1"
    assert bit.data.resolution_rule == "hyperrule" and bit.data.image_size is None
    scratch = finetuning.finetune_run(dataclasses.replace(base, model=cfg.ModelConfig("resnet20")))
    assert scratch.model.weights is None and scratch.data.image_size is None
