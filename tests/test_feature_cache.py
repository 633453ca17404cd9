"""--cache_features: a frozen phase trained on cached pooled features is the uncached phase, faster.

The oracle is the pipeline's own uncached path: the same tiny BiT model
(GroupNorm, weight standardization, a "pool" layer and the "logits" head),
the same digits split, seed and schedule, trained once with the cache and once
without; the head's weights and every metrics.csv value must agree to 1e-5.
"""
import csv
import dataclasses
import json
import os
import re

import keras
import numpy as np
import pytest

from pipeline import config as cfg
from pipeline import data
from pipeline.models import bit
from pipeline.training import distribute, feature_cache, train
from tests.helpers import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return "folder:" + make_image_folder(tmp_path_factory.mktemp("images"), per_class=10, size=32)


def _run(tmp_path, name, folder, *, cache, epochs=2):
    return cfg.RunConfig(
        model_dir=str(tmp_path / name),
        data=cfg.DataConfig(dataset=folder, augment="none", batch_size=8, image_size=32, val_fraction=0.2,
                            test_fraction=0.1, data_checks=False),
        model=cfg.ModelConfig(name="bit_m_r50x1"),  # the name is only recorded: the tiny model is passed
        train=cfg.TrainConfig(epochs=epochs, freeze_epochs=epochs, schedule="cosine",
                              optimizer=cfg.OptimizerConfig(learning_rate=0.5), cache_features=cache,
                              tensorboard=False, verbose=0))


def _tiny_bit(seed=0):
    keras.utils.set_random_seed(seed)
    with distribute.resolve_strategy("auto")[0].scope():
        return bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=3, input_shape=(32, 32, 3),
                             include_top=True)


def _metrics(run):
    with open(os.path.join(run.model_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_cached_head_update_equals_the_uncached_one(tmp_path, folder, capsys):
    results = {}
    for cache in (True, False):
        run, model = _run(tmp_path, f"cache-{cache}", folder, cache=cache), _tiny_bit()
        train(run, model=model)
        printed = capsys.readouterr().out
        assert ("feature cache:" in printed) == cache, printed
        results[cache] = (model.get_layer("logits").get_weights(), _metrics(run))
        with open(os.path.join(run.model_dir, "summary.json")) as f:
            summary = json.load(f)
        assert summary["peak_rss_mb"] > 100  # the run's peak resident memory is recorded
        if cache:  # the training time includes the pass that computed the features
            took = float(re.search(r"feature cache: .* in ([0-9.]+) s", printed).group(1))
            assert summary["time"]["training_seconds"] >= took
    (w_cached, m_cached), (w_plain, m_plain) = results[True], results[False]
    assert np.abs(w_cached[0]).max() > 0  # the zero-initialized head learned
    for a, b in zip(w_cached, w_plain):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(m_cached) == len(m_plain) == 2
    for row_c, row_p in zip(m_cached, m_plain):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert abs(float(row_c[key]) - float(row_p[key])) < 1e-5, (key, row_c, row_p)


def test_a_backbone_that_drops_at_random_in_training_switches_the_cache_off(tmp_path, folder, capsys):
    """Dropout inside the frozen backbone (here drop-path in a BiT the run does not declare as BiT) acts in
    training mode: a model whose spec does not declare `frozen_is_inference` is checked by running it."""
    run = _run(tmp_path, "dropout", folder, cache=True, epochs=1)
    run = dataclasses.replace(run, model=cfg.ModelConfig(name="keras_efficientnetb0"))  # only recorded
    keras.utils.set_random_seed(0)
    with distribute.resolve_strategy("auto")[0].scope():
        model = bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=3, input_shape=(32, 32, 3),
                              drop_path_rate=0.5)
    train(run, model=model)
    printed = capsys.readouterr().out
    assert "feature cache off:" in printed and "training mode" in printed, printed
    assert "feature cache:" not in printed
    assert len(_metrics(run)) == 1  # the frozen phase trained, uncached
    assert feature_cache.training_mode_note(_tiny_bit(), 32) == ""  # the plain backbone keeps the cache


def test_changed_backbone_invalidates_the_stored_cache(tmp_path, folder, monkeypatch):
    datasets = data.load_dataset(cfg.DataConfig(dataset=folder, augment="none", batch_size=8, image_size=32,
                                                val_fraction=0.2, test_fraction=0.1))
    strategy = distribute.resolve_strategy("auto")[0]
    model = _tiny_bit()

    def features(m):
        return feature_cache.build_features(m, strategy, datasets.stream, datasets.val, views=1,
                                            settings={"precision": "float32"}, write_dir=str(tmp_path),
                                            in_memory_limit_bytes=0)

    first = features(model)
    assert first.where == os.path.join(str(tmp_path), "features")
    assert os.path.exists(os.path.join(first.where, "key.json"))
    values = np.stack([f for f, _ in first.train_views[0].as_numpy_iterator()])
    assert values.shape == (datasets.num_train, model.get_layer("pool").output.shape[-1])

    computed = []
    real = feature_cache.compute_features
    monkeypatch.setattr(feature_cache, "compute_features", lambda *a: computed.append(1) or real(*a))
    model.get_layer("logits").kernel.assign(np.ones(model.get_layer("logits").kernel.shape))
    again = features(model)  # only the head changed: the stored features are still right
    assert not computed
    np.testing.assert_array_equal(np.stack([f for f, _ in again.train_views[0].as_numpy_iterator()]), values)

    conv = next(layer for layer in feature_cache.backbone_layers(model) if layer.weights)
    kernel = conv.weights[0]  # noise, not a scale: weight standardization undoes affine changes
    kernel.assign(kernel + np.random.RandomState(1).normal(0, 0.2, kernel.shape).astype("f4"))
    changed = features(model)
    assert computed  # recomputed, not read from the stale cache
    new_values = np.stack([f for f, _ in changed.train_views[0].as_numpy_iterator()])
    assert np.abs(new_values - values).max() > 1e-3
    extractor = feature_cache.feature_extractor(model)
    fresh = real(feature_cache.feature_step(extractor, strategy), strategy,
                 feature_cache.view_batches(datasets.stream, 0), 8)
    np.testing.assert_allclose(new_values, fresh[0], atol=1e-6)
    # batches padded to one shape (21 images in batches of 8: 8, 8, 5+3) give the unpadded features
    direct = [extractor(x, training=False).numpy() for x, _ in feature_cache.view_batches(datasets.stream, 0)]
    assert [len(d) for d in direct] == [8, 8, 5]
    np.testing.assert_allclose(fresh[0], np.concatenate(direct), atol=1e-4)  # eager vs graph kernels: ~4e-5


@pytest.mark.parametrize("augment,mixup,views,expect_views,reason", [
    ("none", 0.0, 0, 1, ""),
    ("cifar", 0.0, 0, 0, "--feature_views"),
    ("cifar", 0.0, 3, 3, ""),
    ("none", 0.2, 0, 0, "MixUp"),
])
def test_the_cache_switches_itself_off_when_batches_are_not_functions_of_images(augment, mixup, views,
                                                                                 expect_views, reason):
    d = cfg.DataConfig(augment=augment)
    t = cfg.TrainConfig(freeze_epochs=2, feature_views=views, mixup_alpha=mixup)
    got, note = feature_cache.plan(d, t, mixup_alpha=mixup)
    assert got == expect_views
    assert (reason in note) if reason else note == ""
    assert feature_cache.plan(d, dataclasses.replace(t, cache_features=False), mixup_alpha=mixup)[0] == 0


@pytest.mark.parametrize("data,train,reason", [
    ({}, {"cutmix_alpha": 1.0}, "CutMix"),
    ({"random_erasing": 0.25}, {}, "--random_erasing=0.25"),
    ({"color_jitter": 0.4}, {}, "--color_jitter=0.4"),
])
def test_cutmix_erasing_and_jitter_switch_the_cache_off_too(data, train, reason):
    """Per-batch and per-image randomness beyond the crop: the cached features would be stale views."""
    d = cfg.DataConfig(augment="none", **data)
    t = cfg.TrainConfig(freeze_epochs=2, **train)
    views, note = feature_cache.plan(d, t, mixup_alpha=0.0)
    assert views == 0 and reason in note


def test_keras_applications_efficientnet_drop_connect_is_found_by_running_it():
    """EfficientNet's blocks hold Dropout layers (drop-connect) that act in training mode even when frozen."""
    from pipeline.models import create_model, get_spec
    from pipeline.models.pretrained import set_backbone_trainable
    assert not get_spec("keras_efficientnetb0").frozen_is_inference and get_spec("bit_m_r50x1").frozen_is_inference
    model = create_model("keras_efficientnetb0", num_classes=3, image_size=32)
    set_backbone_trainable(model, False)
    assert "training mode" in feature_cache.training_mode_note(model, 32)
