"""`python -m pipeline.list_models`: registered models and keras-hub's image presets, offline.

keras-hub's own preset tables are the oracle for names, families and
parameter counts; the machine has no network, so every test here also proves
the listing works offline.
"""
import os

import keras_hub
import pytest

from pipeline.models import catalog, list_models
from tests.helpers import last_line, run_cli


def _metadata(name):
    return keras_hub.models.ImageClassifier.presets[name]["metadata"]


def test_presets_are_grouped_by_keras_hub_family_with_their_parameter_counts():
    presets = catalog.keras_hub_presets()
    assert {"resnet", "efficientnet", "vit", "densenet", "mobilenet", "dinov2"} <= set(presets)
    every = {info.name: info for rows in presets.values() for info in rows}
    assert set(keras_hub.models.ImageClassifier.presets) <= set(every)
    assert set(keras_hub.models.DINOV2Backbone.presets) <= set(every)
    for family, rows in presets.items():
        assert all(info.family == family for info in rows)
        assert [info.params or 0 for info in rows] == sorted(info.params or 0 for info in rows)
    resnet = {info.name: info for info in catalog.keras_hub_presets("resnet")["resnet"]}
    assert set(catalog.keras_hub_presets("resnet")) == {"resnet"}
    r18 = resnet["resnet_18_imagenet"]
    assert r18.params == _metadata("resnet_18_imagenet")["params"] > 10_000_000
    assert r18.image_size == 224  # "... at a 224x224 resolution" in its metadata
    assert r18.handle.startswith("kaggle://")
    assert every["xception_41_imagenet"].image_size is None  # its metadata says no size
    assert catalog.keras_hub_presets("cifar_resnet") == {}


def test_a_cached_config_gives_the_image_size(tmp_path, monkeypatch):
    """keras-hub's own converter, saved as a preset file where kagglehub caches `resnet_18_imagenet`."""
    handle = keras_hub.models.ImageClassifier.presets["resnet_18_imagenet"]["kaggle_handle"]
    owner, model, framework, variation, version = handle[len("kaggle://"):].split("/")
    cached = tmp_path / "models" / owner / model / framework / variation / version
    converter = keras_hub.layers.ResNetImageConverter(image_size=(96, 96), scale=1 / 255.0)
    converter.save_to_preset(str(cached))
    assert os.path.isfile(cached / "image_converter.json")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    assert catalog.cached_preset_file(handle, "image_converter.json") == str(cached / "image_converter.json")
    resnet = {info.name: info for info in catalog.keras_hub_presets("resnet")["resnet"]}
    assert resnet["resnet_18_imagenet"].image_size == 96
    assert resnet["resnet_50_imagenet"].image_size == 224
    assert catalog.cached_preset_file("hf://timm/resnet18.a1_in1k", "config.json") is None


def test_catalog_text_filters_both_lists_by_family():
    text = catalog.model_catalog("resnet")
    assert "resnet_18_imagenet" in text and f"{_metadata('resnet_18_imagenet')['params']:,}" in text
    assert all(name in text for name in list_models("resnet"))
    assert "resnet20" not in text and "vit_base_patch16_224_imagenet" not in text
    full = catalog.model_catalog()
    assert all(name in full for name in list_models())
    assert "keras_convnext_tiny" in full and "dinov2_small" in full and "hub:<argument>" in full
    with pytest.raises(ValueError, match="Unknown model family 'resnets'. Did you mean: resnet"):
        catalog.model_catalog("resnets")


def test_list_models_verb():
    proc = run_cli("list_models", timeout=300)
    out = proc.stdout
    for name in ("resnet20", "bit_m_r50x1", "keras_efficientnetv2s", "keras_resnet50", "resnet_18_imagenet",
                 "efficientnet_b0_ra_imagenet", "vit_base_patch16_224_imagenet", "dinov2_small"):
        assert name in out, name
    line = next(row for row in out.splitlines() if row.split()[:1] == ["keras_efficientnetb3"])
    assert line.split()[1:] == ["keras_apps", "-", "300", "imagenet"]
    assert any(row.split()[:2] == ["resnet20", "cifar_resnet"] for row in out.splitlines())

    cifar = run_cli("list_models", "--family=cifar_resnet", timeout=300).stdout
    assert "resnet20" in cifar and "resnet110" in cifar
    assert "image presets (0;" in cifar and "resnet_18_imagenet" not in cifar and "keras_apps" not in cifar

    bad = run_cli("list_models", "--family=nope", check=False, timeout=300)
    assert bad.returncode == 2
    assert last_line(bad.stderr).startswith("error: Unknown model family 'nope'")
