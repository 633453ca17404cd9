"""--remat: the residual blocks run under tf.recompute_grad, and a step computes the same gradients.

The oracle is the plain model: same weights, same batch, gradients through
`RematModel` (every block checkpointed) must equal the model's own, for a
BatchNorm ResNet and a GroupNorm/weight-standardized BiT; and a whole
`train()` run with --remat must end with the weights of the run without it.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as cfg
from pipeline.models import bit, create_model
from pipeline.training import distribute, memory, remat, train
from tests.helpers import make_image_folder


def _tiny_bit(seed=0):
    keras.utils.set_random_seed(seed)
    with distribute.resolve_strategy("auto")[0].scope():
        return bit.build_bit(depths=(2, 1, 1, 1), width=0.5, num_classes=3, input_shape=(32, 32, 3),
                             include_top=True)


def _gradients(model, x, y):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, logits, from_logits=True))
        return loss, tape.gradient(loss, model.trainable_variables)
    return step()


@pytest.mark.parametrize("family", ["cifar_resnet", "bit"])
def test_remat_gives_the_same_loss_and_gradients(family):
    keras.utils.set_random_seed(0)
    model = create_model("resnet20", num_classes=3, image_size=16) if family == "cifar_resnet" else _tiny_bit()
    size = model.inputs[0].shape[1]
    x = np.random.RandomState(0).uniform(0, 1, (4, size, size, 3)).astype("f4")
    y = tf.one_hot([0, 1, 2, 0], 3)
    wrapped = remat.RematModel(model)
    assert len(wrapped.pieces) > 3  # cut at the residual units, not one piece
    assert [v.path for v in wrapped.trainable_variables] == [v.path for v in model.trainable_variables]
    state = [v.numpy() for v in model.non_trainable_variables]
    loss, grads = _gradients(model, x, y)
    for v, value in zip(model.non_trainable_variables, state):  # BatchNorm's moving averages as before
        v.assign(value)
    loss_r, grads_r = _gradients(wrapped, x, y)
    assert abs(float(loss) - float(loss_r)) < 1e-6
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_allclose(g.numpy(), g_r.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(wrapped(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-6)


def test_a_remat_run_trains_to_the_same_weights(tmp_path):
    folder = "folder:" + make_image_folder(tmp_path / "images", per_class=6, size=32)
    weights = {}
    for on in (False, True):
        run = cfg.RunConfig(
            model_dir=str(tmp_path / f"remat-{on}"),
            data=cfg.DataConfig(dataset=folder, augment="none", batch_size=8, image_size=32, data_checks=False),
            model=cfg.ModelConfig(name="bit_m_r50x1"),  # only recorded: the tiny model is passed
            train=cfg.TrainConfig(epochs=1, steps_per_epoch=2, schedule="constant", remat=on,
                                  optimizer=cfg.OptimizerConfig(learning_rate=0.1), tensorboard=False, verbose=0))
        model = _tiny_bit()
        model.get_layer("logits").kernel.assign(np.full(model.get_layer("logits").kernel.shape, 0.01))
        train(run, model=model)
        weights[on] = [w.numpy() for w in model.trainable_variables]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(weights[False], [w.numpy() for w in _tiny_bit().trainable_variables]))
    for a, b in zip(weights[False], weights[True]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_memory_forecast_names_a_batch_that_fits():
    mib = 2**20
    assert memory.forecast(128, before=500 * mib, after=900 * mib, free_before=4000 * mib, remat=False) is None
    line = memory.forecast(128, before=500 * mib, after=4500 * mib, free_before=1000 * mib, remat=False)
    assert "--batch_size=16 fits" in line and "--accumulation_steps=8" in line and "--remat" in line
    # 16 images need 4000/128*16 = 500 MiB (+15%), inside the 1000 MiB that were free; 32 would not fit
    assert 4000 / 128 * 16 * memory.HEADROOM < 1000 < 4000 / 128 * 32 * memory.HEADROOM


def test_release_free_heap_gives_freed_heap_memory_back():
    """What the training loop calls before each execution: freed malloc memory leaves the process (glibc)."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.fail("this machine's C library is not glibc: the test's premise is gone")
    chunks = [np.ones(1000) for _ in range(30000)]  # ~240 MB of 8 KB blocks in malloc's heap
    keep = np.ones(1000)  # allocated above them: glibc cannot shrink the heap top by itself
    del chunks
    before = memory.rss_bytes()
    assert memory.release_free_heap() is True
    assert before - memory.rss_bytes() > 100 * memory.MIB
    del keep
