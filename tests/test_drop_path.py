"""`--drop_path=P`: stochastic depth for our ResNets and BiT.

What a user relies on: P=0 is exactly today's model (so old checkpoints and
the BiT weight mapping still load), inference ignores P, training drops whole
residual branches per example (kept ones scaled by 1/(1-p)), and the rate
rises linearly from 0 at the first block to P at the last.
"""
import keras
import numpy as np
import pytest

from pipeline import config as cfg
from pipeline import validation
from pipeline.models import bit, create_model
from pipeline.models.layers import drop_path, drop_path_rates

P = 0.3
# model -> its build kwargs (BiT: a small one built directly, see `_bit`)
CASES = {
    "resnet20": dict(image_size=16),
    "preact_resnet18": dict(image_size=16),
}


def _bit(**kwargs):
    return bit.build_bit(depths=(1, 2, 1, 1), width=0.5, num_classes=3, input_shape=(16, 16, 3), **kwargs)


def _build(name, **kwargs):
    if name == "bit":
        return _bit(drop_path_rate=kwargs.pop("drop_path", 0.0))
    return create_model(name, num_classes=3, **CASES[name], **kwargs)


def _drop_layers(model):
    return [layer for layer in model.layers if layer.name.endswith("_drop_path")]


def _blocks(model):
    """Residual blocks in order, by their addition layers."""
    return [layer.name[:-len("_add")] for layer in model.layers if layer.name.endswith("_add")]


def _images(n=8):
    return np.random.RandomState(0).uniform(0, 1, (n, 16, 16, 3)).astype("f4")


@pytest.mark.parametrize("name", [*CASES, "bit"])
def test_zero_is_todays_model_and_rates_are_linear(name):
    keras.utils.set_random_seed(0)
    default = _build(name)
    zero = _build(name, drop_path=0.0)
    assert [layer.name for layer in zero.layers] == [layer.name for layer in default.layers]
    assert [(v.path, v.shape) for v in zero.weights] == [(v.path, v.shape) for v in default.weights]
    assert not _drop_layers(default)

    dropped = _build(name, drop_path=P)
    blocks = _blocks(dropped)
    # Same variables as without stochastic depth: checkpoints and weight files load either way.
    assert [(v.path, v.shape) for v in dropped.weights] == [(v.path, v.shape) for v in default.weights]
    rates = {layer.name[:-len("_drop_path")]: layer.rate for layer in _drop_layers(dropped)}
    expected = np.linspace(0.0, P, len(blocks))
    assert blocks[0] not in rates  # the first block's rate is 0: no layer
    assert [rates[b] for b in blocks[1:]] == pytest.approx(list(expected[1:]))
    # Each drop acts on the branch, just before the block's addition.
    for block in blocks[1:]:
        add = dropped.get_layer(f"{block}_add")
        assert any(t is dropped.get_layer(f"{block}_drop_path").output for t in add.input)


@pytest.mark.parametrize("name", ["resnet20", "bit"])
def test_inference_ignores_p_and_training_varies(name):
    keras.utils.set_random_seed(0)
    plain = _build(name)
    dropped = _build(name, drop_path=P)
    dropped.set_weights(plain.get_weights())
    if name == "bit":  # a zero head would hide every difference
        for model in (plain, dropped):
            head = model.get_layer("logits").kernel
            head.assign(np.random.RandomState(1).normal(0, 1, head.shape))
    x = _images()
    np.testing.assert_allclose(dropped(x, training=False), plain(x, training=False), rtol=1e-6, atol=1e-6)
    if name == "resnet20":  # BatchNorm in training mode is deterministic too: the only noise is the drop
        np.testing.assert_allclose(plain(x, training=True), plain(x, training=True), rtol=1e-6, atol=1e-6)
    first, second = dropped(x, training=True), dropped(x, training=True)
    assert not np.allclose(first, second, atol=1e-4)


def test_drop_is_per_example_and_rescaled():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, drop_path(inputs, 0.5, name="branch"))
    x = np.ones((64, 4, 4, 2), "f4")
    y = np.asarray(model(x, training=True)).reshape(64, -1)
    per_example = y[:, 0]
    assert np.all(y == per_example[:, None])  # the whole branch of an example is kept or dropped
    assert set(np.unique(per_example)) == {0.0, 2.0}  # kept ones scaled by 1 / (1 - 0.5)
    np.testing.assert_array_equal(model(x, training=False), x)
    assert drop_path(inputs, 0.0, name="none") is inputs


def test_rates_options_and_ranges():
    assert drop_path_rates(5, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(1, 0.2) == [0.0]
    with pytest.raises(ValueError, match="drop_path"):
        drop_path_rates(3, 1.0)
    # Plain nets have no residual branch to drop: they do not take the option.
    with pytest.raises(ValueError, match="does not take option"):
        create_model("plain20", num_classes=3, image_size=16, drop_path=0.1)
    # The flag's 0 default is no option at all, so every model still builds from a default config.
    assert "drop_path" not in {k for k, v in cfg.ModelConfig(drop_path=0.0).options().items() if v is not None}
    assert cfg.ModelConfig(drop_path=0.2).options()["drop_path"] == 0.2
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"--drop_path=.* is out of range"):
            validation.check_model(cfg.ModelConfig(drop_path=bad))
