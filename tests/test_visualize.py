"""Insight callback (TensorBoard) and the plots of `pipeline.visualize`.

Costs: reuses the session `digits_run`; trains only tiny models in-process
(a synthetic bright-square task for Grad-CAM, two 2-step epochs through
`training.train`), plus one subprocess with two logical CPUs for the
MirroredStrategy + mixed precision check.
"""
import json
import os
import subprocess
import sys
import textwrap

import keras
import matplotlib.image
import numpy as np
import pytest

from pipeline import config as cfg
from pipeline.training import tensorboard as insight
from pipeline.reporting import network, plots, settings, views, visualization
from pipeline import rundir
from pipeline.training import trainer as training
from pipeline import data
from tests.helpers import REPO, last_line, run_cli


# --------------------------------------------------------------------------- helpers

def read_png(path):
    assert os.path.isfile(path), f"{path} was not written"
    image = matplotlib.image.imread(path)
    return image


def assert_picture(path, size=None, tolerance=2):
    """A PNG of `size` (width, height) that is not a blank/constant image."""
    image = read_png(path)
    height, width = image.shape[:2]
    if size is not None:
        assert abs(width - size[0]) <= tolerance and abs(height - size[1]) <= tolerance, \
            f"{os.path.basename(path)} is {width}x{height}, expected {size[0]}x{size[1]}"
    rgb = image[..., :3]
    assert rgb.std() > 0.02, f"{path} is (nearly) constant"
    non_white = (rgb.min(axis=-1) < 0.9).mean()
    assert non_white > 0.02, f"{path} is almost blank ({non_white:.1%} non-white pixels)"
    return image


def tiny_model(num_classes=10, size=32, name="tiny"):
    inp = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inp, out, name=name)


def fake_second_run(digits_dir, tmp_path, optimizer="adam"):
    """A copy of the digits run's config and metrics with another optimizer (for compare)."""
    other = tmp_path / "digits_adam"
    other.mkdir()
    config = json.loads((open(os.path.join(digits_dir, "config.json"))).read())
    config["train"]["optimizer"]["name"] = optimizer
    config["model_dir"] = str(other)
    (other / "config.json").write_text(json.dumps(config))
    rows = rundir.read_metrics(digits_dir)
    lines = [",".join(rundir.METRIC_COLUMNS)]
    for r in rows:
        r = dict(r, val_accuracy=max(0.0, r["val_accuracy"] - 0.05), val_loss=r["val_loss"] * 1.3)
        lines.append(",".join("" if r[c] is None else str(r[c]) for c in rundir.METRIC_COLUMNS))
    (other / "metrics.csv").write_text("\n".join(lines) + "\n")
    return str(other)


# --------------------------------------------------------------------------- TensorBoard insight

def test_insight_callback_in_training_writes_lr_weights_gradients_and_images(tmp_path):
    model_dir = str(tmp_path / "run")
    run = cfg.RunConfig(
        model_dir=model_dir,
        data=cfg.DataConfig(dataset="digits", batch_size=32, augment="cifar"),
        train=cfg.TrainConfig(epochs=2, steps_per_epoch=2, schedule="step", lr_boundaries=(1.0,),
                              lr_decay=0.1, optimizer=cfg.OptimizerConfig("sgd", 0.05),
                              precision="float32", strategy="default", tensorboard=False,
                              verbose=0))
    datasets = data.load_dataset(run.data)
    callback = insight.callback_for_run(model_dir, datasets, histogram_freq=1, max_examples=8)
    model = tiny_model(len(datasets.class_names))
    training.train(run, datasets=datasets, model=model, extra_callbacks=[callback])

    events = insight.read_insight_events(os.path.join(model_dir, "tensorboard", "insight"))
    # Learning rate: one per epoch, equal to metrics.csv's lr (step decay after epoch 1).
    lr = [float(v) for _, v in events[insight.LR_TAG]]
    csv_lr = [r["lr"] for r in rundir.read_metrics(model_dir)]
    assert [s for s, _ in events[insight.LR_TAG]] == [0, 1]
    assert lr == pytest.approx(csv_lr, rel=1e-5) and lr == pytest.approx([0.05, 0.005], rel=1e-5)
    # Weight and gradient histograms of every trainable variable, at both epochs.
    for var in model.trainable_variables:
        for prefix in (insight.WEIGHTS_PREFIX, insight.GRADIENTS_PREFIX):
            tag = prefix + var.path
            assert [s for s, _ in events[tag]] == [0, 1], tag
            buckets = events[tag][0][1]  # [buckets, 3]: left, right, count
            assert buckets.ndim == 2 and buckets.shape[1] == 3 and buckets[:, 2].sum() == np.prod(var.shape)
            assert np.isfinite(buckets).all()
    assert insight.WEIGHTS_PREFIX + "bn1/moving_mean" in events  # non-trainable weights too
    grad = events[insight.GRADIENTS_PREFIX + "logits/kernel"][0][1]
    assert np.abs(grad[:, :2]).max() > 0, "logits gradients are all zero"
    assert float(events[insight.GRADIENT_NORM_TAG][0][1]) > 0
    # Images once: [width, height, png...] strings.
    (step, images), = events[insight.IMAGES_TAG]
    assert step == 0 and len(images) == 2 + 8 and images[2][:4] == b"\x89PNG"


def test_gradients_match_a_training_step_and_leave_the_model_unchanged():
    import tensorflow as tf

    model = tiny_model(3, size=16)
    rng = np.random.default_rng(0)
    x = rng.random((8, 16, 16, 3), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    callback = insight.InsightCallback("/unused", 1, sample_batch=(x, y))
    callback.set_model(model)
    before = [w.copy() for w in model.get_weights()]
    variables, grads = callback.gradients()
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)  # BN moving statistics not updated by inspection
    assert [v.path for v in variables] == [v.path for v in model.trainable_variables]
    # The same gradients as a training-mode step on that batch (which does update BN).
    with tf.GradientTape() as tape:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)(y, model(x, training=True))
    expected = tape.gradient(loss, model.trainable_variables)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(model.get_layer("bn1").moving_mean.numpy(),
                           before[[v.path for v in model.weights].index("bn1/moving_mean")])


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from pipeline.training import tensorboard as insight
    from tests.test_visualize import tiny_model
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    rng = np.random.default_rng(0)
    x = rng.random((64, 16, 16, 3), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 64)]
    with strategy.scope():
        model = tiny_model(3, size=16)
        model.compile(keras.optimizers.SGD(0.1), keras.losses.CategoricalCrossentropy(from_logits=True))
    callback = insight.InsightCallback(sys.argv[1], 1, sample_batch=(x[:16], y[:16]))
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    events = insight.read_insight_events(sys.argv[1])
    grads = {t: v for t, v in events.items() if t.startswith(insight.GRADIENTS_PREFIX)}
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "compute_dtype": model.get_layer("conv1").compute_dtype,
        "gradient_tags": sorted(grads),
        "steps": sorted({s for v in grads.values() for s, _ in v}),
        "finite": all(bool(np.isfinite(a).all()) for v in grads.values() for _, a in v),
        "nonzero": all(float(np.abs(a[:, :2]).max()) > 0 for v in grads.values() for _, a in v),
        "lr": [float(a) for _, a in events[insight.LR_TAG]],
    }))
""")


def test_insight_under_mirrored_strategy_and_mixed_precision(tmp_path):
    log_dir = str(tmp_path / "tb")
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, log_dir], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(last_line(proc.stdout))
    assert result["replicas"] == 2 and result["compute_dtype"] == "bfloat16"
    expected = {insight.GRADIENTS_PREFIX + p for p in
                ("conv1/kernel", "conv1/bias", "bn1/gamma", "bn1/beta", "conv2/kernel", "conv2/bias",
                 "logits/kernel", "logits/bias")}
    assert set(result["gradient_tags"]) == expected
    assert result["steps"] == [0, 1] and result["finite"] and result["nonzero"]
    assert result["lr"] == pytest.approx([0.1, 0.1])


# --------------------------------------------------------------------------- plots of a run (CLI)

# Figure sizes in pixels for the digits resnet20 run (10 classes, 16 stem filters).
EXPECTED_SIZES = {
    "curves.png": (1100, 420),
    "lr.png": (700, 420),
    "confusion_test.png": (820, 700),
    "filters.png": (440, 490),
    "feature_maps_stem_conv_digit.png": (715, 670),            # input + 16 channels: 5 x 4
    "feature_maps_stage3_block3_out_digit.png": (850, 960),    # input + 32 of 64: 6 x 6
    "activation_max_stage3_block3_2_conv.png": (475, 570),     # 8 filters: 3 x 3
    "gradcam_digit.png": (1000, 390),
    "compare.png": (1200, 480),
}


@pytest.fixture(scope="module")
def digit_png(digits_run, tmp_path_factory):
    """Test image 0 of the digits run, written as a PNG file as a user would have it."""
    image, label = views.dataset_image(digits_run["model_dir"], "test", 0)
    path = str(tmp_path_factory.mktemp("images") / "digit.png")
    matplotlib.image.imsave(path, image)
    return path, label


def test_visualize_all_writes_every_plot(digits_run, digit_png, tmp_path):
    other = fake_second_run(digits_run["model_dir"], tmp_path)
    out = str(tmp_path / "plots")
    proc = run_cli("visualize", f"--model_dir={digits_run['model_dir']}", "--what=all",
                   f"--image={digit_png[0]}", f"--out={out}", "--filters=8", "--steps=40", other)
    written = sorted(os.listdir(out))
    assert written == sorted(EXPECTED_SIZES), (written, proc.stdout)
    for name, size in EXPECTED_SIZES.items():
        assert_picture(os.path.join(out, name), size)
        assert f"wrote {os.path.join(out, name)}" in proc.stdout
    # The Grad-CAM heat map over the image is not flat: the overlay panel varies.
    gradcam = read_png(os.path.join(out, "gradcam_digit.png"))
    assert gradcam[60:360, 680:980, :3].std() > 0.05


def test_visualize_all_without_image_skips_with_a_note(digits_run, tmp_path):
    out = str(tmp_path / "plots")
    proc = run_cli("visualize", f"--model_dir={digits_run['model_dir']}", "--what=all",
                   f"--out={out}", "--filters=4", "--steps=5")
    assert "note: skipped feature_maps: it needs --image" in proc.stdout
    assert "note: skipped gradcam: it needs --image" in proc.stdout
    assert "note: skipped compare" in proc.stdout
    assert {"curves.png", "lr.png", "confusion_test.png", "filters.png"} <= set(os.listdir(out))


@pytest.mark.parametrize("args,needle", [
    (["--model_dir={missing}", "--what=curves"], "does not exist"),
    (["--model_dir={run}", "--what=feature_maps", "--image={image}", "--layer=stage3_blok3_out"],
     "close names: stage3_block3_out"),
])
def test_visualize_errors_are_one_clear_line(args, needle, digits_run, digit_png, tmp_path):
    args = [a.format(missing=str(tmp_path / "nope"), run=digits_run["model_dir"], image=digit_png[0])
            for a in args]
    proc = run_cli("visualize", *args, check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith("error: ") and needle in last_line(proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- plots in-process

def test_what_values_are_checked():
    assert visualization.parse_kinds(["all"]) == list(visualization.KINDS)
    assert visualization.parse_kinds(["lr", "curves", "lr"]) == ["lr", "curves"]
    with pytest.raises(ValueError, match="did you mean 'curves'"):
        visualization.parse_kinds(["curvs"])


@pytest.fixture(scope="module")
def digits_model(digits_run):
    return network.load_run_model(digits_run["model_dir"])


def test_list_layers_and_layer_lookup(digits_model):
    text = network.format_layers(digits_model)
    assert "stem_conv" in text and "(None, 32, 32, 16)" in text and "pool" in text
    assert network.resolve_layer(digits_model, 2)[1] == "stem_conv"
    assert network.gradcam_layer_name(digits_model) == "stage3_block3_out"
    assert network.default_feature_layers(digits_model) == ["stem_conv", "stage3_block3_out"]
    with pytest.raises(ValueError, match="close names: stem_conv"):
        network.resolve_layer(digits_model, "stem_cnv")


def test_feature_maps_of_the_image_match_the_model(digits_model, digit_png):
    image = views.load_image(digit_png[0], network.input_size(digits_model))
    assert image.shape == (32, 32, 3) and 0 <= image.min() and image.max() <= 1
    (name, act), = views.feature_maps(digits_model, image, ["stage3_block3_out"])
    assert act.shape == (8, 8, 64) and act.std() > 0
    # The last feature map, averaged, is what "pool" gives the head.
    pool = keras.Model(digits_model.inputs[0], digits_model.get_layer("pool").output)(image[None])
    np.testing.assert_allclose(act.mean(axis=(0, 1)), np.asarray(pool)[0], rtol=1e-3, atol=1e-4)


def test_activation_maximization_raises_the_target_activation(digits_model):
    result = views.maximize_activation(digits_model, "stage2_block3_2_conv", [0, 1, 2, 3], steps=40)
    assert result.images.shape == (4, 32, 32, 3)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert (result.end > result.start + 0.1).all(), (result.start, result.end)
    # Regularized: neighbouring pixels are correlated, the patterns are not white noise.
    img = result.images - result.images.mean(axis=(1, 2), keepdims=True)
    corr = (img[:, 1:] * img[:, :-1]).mean() / (img ** 2).mean()
    assert corr > 0.5


def test_nested_backbone_layers_are_reachable():
    inner_in = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inner_in)
    y = keras.layers.Conv2D(6, 3, padding="same", name="c2")(y)
    backbone = keras.Model(inner_in, y, name="backbone")
    inp = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="preprocess")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(x))
    model = keras.Model(inp, keras.layers.Dense(2, name="logits")(x))
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    (name, act), = views.feature_maps(model, image, ["backbone/c1"])
    expected = backbone.get_layer("c1")(image[None] * 2 - 1)
    np.testing.assert_allclose(act, np.asarray(expected)[0], rtol=1e-5, atol=1e-5)
    assert network.first_conv(model)[1] == "backbone/c1"
    assert network.gradcam_layer_name(model) == "backbone"
    assert "backbone/c2" in network.format_layers(model)


def test_graph_tensor_gives_a_nested_models_outer_tensors():
    """The one Keras internal the views rely on (`network.graph_tensor`): if this fails, Keras changed."""
    inner_in = keras.Input((8, 8, 3))
    backbone = keras.Model(inner_in, keras.layers.Conv2D(4, 3, name="c")(inner_in), name="backbone")
    inp = keras.Input((8, 8, 3), name="image")
    pre = keras.layers.Rescaling(2.0, name="preprocess")
    x = pre(inp)
    y = backbone(x)
    keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="pool")(y))
    # A nested Model's own properties give its inner graph; graph_tensor the tensors of the outer one.
    assert backbone.input is inner_in and backbone.input is not x
    assert network.graph_tensor(backbone, "input") is x
    assert network.graph_tensor(backbone, "output") is y
    assert network.graph_tensor(pre, "output") is pre.output is x   # plain layers: the same as .output


def test_model_plots_work_under_mixed_precision(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_model(3, size=16)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    cam = views.grad_cam(model, image)
    assert cam.heatmap.dtype == np.float32 and cam.layer == "conv2" and np.isfinite(cam.heatmap).all()
    (_, act), = views.feature_maps(model, image, ["relu1"])
    assert act.dtype == np.float32 and act.shape == (16, 16, 8)
    result = views.maximize_activation(model, "conv2", 2, steps=10)
    assert (result.end > result.start).all()
    assert_picture(views.plot_filters(model, str(tmp_path)), (400, 390))


class GatedCoordinates(keras.layers.Layer):
    """Appends y and x coordinates times the pixel brightness (position only where it is bright)."""

    def call(self, inputs):
        shape = keras.ops.shape(inputs)
        ys = keras.ops.linspace(-1.0, 1.0, shape[1])
        xs = keras.ops.linspace(-1.0, 1.0, shape[2])
        yy = keras.ops.broadcast_to(ys[None, :, None, None], (shape[0], shape[1], shape[2], 1))
        xx = keras.ops.broadcast_to(xs[None, None, :, None], (shape[0], shape[1], shape[2], 1))
        gray = keras.ops.mean(inputs, axis=-1, keepdims=True)
        return keras.ops.concatenate([inputs, gray * yy, gray * xx], axis=-1)


def squares(n, rng, size=32, side=10):
    """Dim noise with one bright square; the class is its quadrant (0 TL, 1 TR, 2 BL, 3 BR)."""
    x = rng.uniform(0, 0.3, (n, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 4, n)
    corners = []
    half = size // 2
    for i, q in enumerate(y):
        r = (q // 2) * half + rng.integers(0, half - side + 1)
        c = (q % 2) * half + rng.integers(0, half - side + 1)
        x[i, r:r + side, c:c + side] = 1.0
        corners.append((r, c))
    return x, y, corners


def test_gradcam_peaks_on_the_bright_square(tmp_path):
    keras.utils.set_random_seed(0)
    x, y, _ = squares(512, np.random.default_rng(0))
    inp = keras.Input((32, 32, 3), name="image")
    h = GatedCoordinates(name="coords")(inp)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(inp, keras.layers.Dense(4, name="logits")(h))
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=6, verbose=0)  # 96 steps
    assert history.history["accuracy"][-1] > 0.9

    xt, yt, corners = squares(8, np.random.default_rng(1))
    for image, label, (r, c) in zip(xt, yt, corners):
        cam = views.grad_cam(model, image)
        assert cam.layer == "conv2" and cam.heatmap.shape == (32, 32)
        assert cam.class_index == label
        pr, pc = np.unravel_index(np.argmax(cam.heatmap), cam.heatmap.shape)
        assert (pr // 16) * 2 + pc // 16 == label, f"peak at {(pr, pc)}, square in quadrant {label}"
        assert r - 2 <= pr < r + 12 and c - 2 <= pc < c + 12, "peak is not on the square"
    path = views.plot_gradcam(model, xt[0], str(tmp_path), class_names=["TL", "TR", "BL", "BR"],
                              tag="square")
    assert_picture(path, EXPECTED_SIZES["gradcam_digit.png"])


def test_compare_legend_names_the_differing_flag(digits_run, tmp_path):
    other = fake_second_run(digits_run["model_dir"], tmp_path, optimizer="adam")
    fig = plots.compare_figure([digits_run["model_dir"], other])
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert texts == ["optimizer=sgd", "optimizer=adam"]
    path = plots.plot_compare([digits_run["model_dir"], other], str(tmp_path / "plots"))
    assert_picture(path, EXPECTED_SIZES["compare.png"])


def test_compare_labels_use_flag_names():
    base = {"model": {"name": "resnet20"}, "data": {"dataset": "digits", "batch_size": 64},
            "train": {"optimizer": {"name": "sgd", "learning_rate": 0.1}, "second_optimizer": None,
                      "epochs": 5, "verbose": 2}, "model_dir": "a"}
    other = json.loads(json.dumps(base))
    other["model"]["name"] = "plain20"
    other["model_dir"] = "b"
    other["train"]["verbose"] = 0  # not a difference worth a legend
    labels, common = settings.compare_labels([base, other], ["a", "b"])
    assert labels == ["model=resnet20", "model=plain20"]
    assert common["optimizer"] == "sgd" and common["learning_rate"] == 0.1
    labels, _ = settings.compare_labels([base, json.loads(json.dumps(base))], ["a", "b"])
    assert labels == ["a", "b"]  # identical settings: the run names
