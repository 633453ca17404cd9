"""Training-loop recipes: weight EMA, gradient clipping and accumulation, class weights, best metric.

In process on tiny 8-16 px models (default strategy), then one subprocess with
two logical CPUs for `--strategy=mirrored` (numerics, and the CLI with every
recipe flag on).
"""
import collections
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score

from pipeline import config as cfg
from pipeline import data, rundir, training
from pipeline.models import load_model
from pipeline.training import class_weights, ema, loop
from tests.helpers import REPO, last_line, make_image_folder

SIZE, CLASSES = 8, 3


def bn_model(seed=0, size=SIZE, classes=CLASSES):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(classes, name="logits")(x))


def gn_model(seed=0):
    """GroupNorm (as BiT): every example's loss is independent of the others in its batch."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.GroupNormalization(groups=2, name="gn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="logits")(x))


def batches(n=32, batch=32, seed=0, labels=None):
    rng = np.random.default_rng(seed)
    x = rng.random((n, SIZE, SIZE, 3), dtype=np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, n) if labels is None else labels]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch), x, y


def make_loop(model, optimizer, **options):
    strategy = tf.distribute.get_strategy()
    runner = loop.Loop(model, strategy, **options)
    model.compile(optimizer, keras.losses.CategoricalCrossentropy(from_logits=True))
    runner.set_optimizer(model.optimizer)
    return runner


def train_one_epoch(runner, ds, steps, callbacks=(), validation=None):
    cbl = loop.callback_list(list(callbacks), model=runner.model, epochs=1, steps=steps, verbose=0)
    cbl.on_train_begin()
    return runner.train_epoch(0, runner.distribute(ds), callbacks=cbl, steps_per_epoch=steps,
                              validation=None if validation is None else runner.distribute(validation))


# --------------------------------------------------------------------------- EMA


def test_ema_equals_a_hand_computed_average_of_every_weight():
    """Warm-up decays min(0.9, (1+n)/(10+n)); BatchNorm's moving statistics are averaged too."""
    model = bn_model()
    average = ema.WeightAverage(model, tf.distribute.get_strategy(), decay=0.9, warmup=True)
    runner = make_loop(model, keras.optimizers.SGD(0.5, momentum=0.9), ema=average)
    start = [w.numpy().copy() for w in average.weights]
    after_steps, at_epoch_end = [], []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: after_steps.append([w.numpy().copy() for w in average.weights]),
        on_epoch_end=lambda e, logs: at_epoch_end.append(([w.numpy().copy() for w in average.weights],
                                                          dict(logs))))
    ds, _, _ = batches(n=48, batch=16)
    train_one_epoch(runner, ds, steps=3, callbacks=[record], validation=ds)
    expected = start
    for n, weights in enumerate(after_steps, start=1):
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    assert len(after_steps) == 3 and int(average.count.numpy()) == 3
    names = [w.path for w in average.weights]
    assert any("moving_mean" in n for n in names) and any("moving_variance" in n for n in names)
    for got, want in zip(average.averages, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    # on_epoch_end (the checkpoint) saw the average; afterwards the model trains on from its raw weights.
    for seen, want in zip(at_epoch_end[0][0], expected):
        np.testing.assert_allclose(seen, want, rtol=1e-6, atol=1e-6)
    for now, raw in zip(average.weights, after_steps[-1]):
        np.testing.assert_array_equal(now.numpy(), raw)
    logs = at_epoch_end[0][1]
    assert {"val_accuracy", "val_accuracy_raw", "val_loss_raw", "val_macro_f1"} <= set(logs)
    assert logs["val_loss"] != logs["val_loss_raw"]
    assert ema.effective_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema.effective_decay(0.9999, 5, warmup=False) == 0.9999


def _run(root, name, **train):
    base = dict(epochs=2, schedule="cosine", optimizer=cfg.OptimizerConfig("sgd", 0.1), precision="float32",
                strategy="default", tensorboard=False, verbose=0, ema_decay=0.8)
    return cfg.RunConfig(model_dir=str(root / name), data=cfg.DataConfig(
        dataset="digits", batch_size=64, augment="none", image_size=SIZE), train=cfg.TrainConfig(**{**base, **train}))


def test_ema_resume_restores_it_exactly_and_best_checkpoint_and_export_hold_it(tmp_path):
    """2 epochs straight vs 1 (stopped) + resume: the same average, raw weights and count; the export is the average."""
    straight = _run(tmp_path, "straight", best_metric="val_macro_f1")
    datasets = data.load_dataset(straight.data)
    training.train(straight, datasets=datasets, model=bn_model(classes=10))
    first = _run(tmp_path, "resumed", best_metric="val_macro_f1")  # stopped after epoch 1, as if killed
    stop = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: setattr(stop.model, "stop_training", True))
    training.train(first, datasets=datasets, model=bn_model(classes=10), extra_callbacks=[stop])
    resumed = dataclasses.replace(_run(tmp_path, "resumed", best_metric="val_macro_f1"), resume=True)
    training.train(resumed, datasets=datasets, model=bn_model(seed=5, classes=10))

    def last(run):
        name = rundir.committed_checkpoint(run.model_dir, "last")
        with np.load(ema.raw_weights_file(name)) as raw:
            return load_model(name).get_weights(), dict(raw)
    (avg_a, raw_a), (avg_b, raw_b) = last(straight), last(resumed)
    for a, b in zip(avg_a, avg_b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(raw_a["count"]) == int(raw_b["count"]) == 2 * -(-datasets.num_train // 64)  # optimizer steps
    for key in raw_a:
        np.testing.assert_allclose(raw_a[key], raw_b[key], rtol=1e-6, atol=1e-7)
    assert not all(np.allclose(a, raw_a[f"w{i}"]) for i, a in enumerate(avg_a))  # the average is not the raw

    rows = rundir.read_metrics(straight.model_dir)
    assert all(r["val_accuracy_raw"] is not None and r["val_macro_f1"] is not None for r in rows)
    state = rundir.read_json(rundir.path(straight.model_dir, "checkpoints", "state.json"))
    best_row = max(rows, key=lambda r: (r["val_macro_f1"], r["epoch"]))
    assert state["best_epoch"] == best_row["epoch"]
    summary = rundir.read_json(rundir.path(straight.model_dir, "summary.json"))  # names what chose the best
    assert (summary["best_metric"], summary["best_epoch"]) == ("val_macro_f1", best_row["epoch"])
    assert summary["best_value"] == pytest.approx(best_row["val_macro_f1"])
    assert summary["best_val_accuracy"] == pytest.approx(best_row["val_accuracy"])  # that epoch's accuracy

    from pipeline.serving import export as export_lib
    exported = tf.saved_model.load(export_lib.export_run(straight.model_dir, export_root=str(tmp_path / "sm")))
    best = load_model(rundir.committed_checkpoint(straight.model_dir, "best"))  # holds the average
    images = np.random.default_rng(0).random((4, SIZE, SIZE, 3), dtype=np.float32)
    out = exported.signatures["serving_default"](images=tf.constant(images))
    probabilities = [v for v in out.values() if v.dtype == tf.float32 and v.shape == (4, 10)][0]
    np.testing.assert_allclose(probabilities.numpy(), keras.ops.softmax(best(images)).numpy(), atol=1e-5)


# --------------------------------------------------------------------------- accumulation and clipping


def test_accumulation_4x8_equals_one_batch_of_32_on_a_groupnorm_model():
    ds, _, _ = batches(n=32, batch=32)
    plain, accumulated = gn_model(), gn_model()
    accumulated.set_weights(plain.get_weights())
    a = make_loop(plain, keras.optimizers.SGD(0.5, momentum=0.9))
    b = make_loop(accumulated, keras.optimizers.SGD(0.5, momentum=0.9), accumulation_steps=4)
    logs_a, logs_b = train_one_epoch(a, ds, 1), train_one_epoch(b, ds, 1)
    for wa, wb in zip(plain.get_weights(), accumulated.get_weights()):
        np.testing.assert_allclose(wa, wb, atol=1e-5)
    assert not np.allclose(plain.get_weights()[0], gn_model().get_weights()[0])  # it did train
    assert int(b.optimizer.iterations.numpy()) == 1  # one optimizer step: the schedule sees one
    assert logs_b["loss"] == pytest.approx(logs_a["loss"], rel=1e-5)
    assert logs_b["accuracy"] == pytest.approx(logs_a["accuracy"])


def _update_norm(clip_norm):
    model = gn_model()
    before = [w.numpy().copy() for w in model.trainable_weights]
    runner = make_loop(model, keras.optimizers.SGD(1.0), clip_norm=clip_norm)
    train_one_epoch(runner, batches(n=16, batch=16)[0], 1)
    return float(np.sqrt(sum(np.sum((w.numpy() - b) ** 2) for w, b in zip(model.trainable_weights, before))))


def test_clip_norm_bounds_the_update():
    free = _update_norm(0.0)
    assert free > 0.05
    assert _update_norm(0.05) == pytest.approx(0.05, rel=1e-4)  # SGD lr 1: the update is the gradient
    assert _update_norm(10 * free) == pytest.approx(free, rel=1e-5)  # below the threshold: untouched


# --------------------------------------------------------------------------- class weights, macro F1


def test_balanced_class_weights_are_correct_and_change_the_loss(tmp_path):
    root = tmp_path / "imbalanced"
    make_image_folder(root, classes=("red",), per_class=20, size=SIZE)
    make_image_folder(root, classes=("green", "blue"), per_class=4, size=SIZE, seed=1)
    datasets = data.load_dataset(cfg.DataConfig(dataset=f"folder:{root}", val_fraction=0.0,
                                                test_fraction=0.0, image_size=SIZE, batch_size=8))
    counts = class_weights.label_counts(datasets)
    by_name = dict(zip(datasets.class_names, counts))
    assert by_name == {"red": 20, "green": 4, "blue": 4}
    weights = class_weights.class_weights("balanced", datasets)
    np.testing.assert_allclose(weights, counts.sum() / (3 * counts), rtol=1e-6)  # n / (classes x count)
    spec = tmp_path / "w.json"
    spec.write_text(json.dumps({"red": 1.0, "green": 2.0, "blue": 3.0}))
    np.testing.assert_array_equal(class_weights.class_weights(str(spec), datasets),
                                  [dict(red=1.0, green=2.0, blue=3.0)[n] for n in datasets.class_names])

    # In the loop: mixed labels weigh by the label-weighted sum; label smoothing is taken into account.
    rng = np.random.default_rng(0)
    x = rng.random((6, SIZE, SIZE, 3), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 0, 0, 0, 1, 2]]
    y[0] = [0.7, 0.3, 0.0]
    losses = {}
    for name, w in (("none", None), ("balanced", weights)):
        model = bn_model()
        expected_ce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction=None)(
            y, model(x, training=True)).numpy()
        runner = make_loop(bn_model(), keras.optimizers.SGD(0.0), label_smoothing=0.1, class_weights=w)
        losses[name] = train_one_epoch(runner, tf.data.Dataset.from_tensor_slices((x, y)).batch(6), 1)["loss"]
        smoothed = y * 0.9 + 0.1 / 3
        per_example = 1.0 if w is None else smoothed @ w
        assert losses[name] == pytest.approx(float(np.mean(expected_ce * per_example)), rel=1e-5)
    assert losses["balanced"] > losses["none"] * 1.05


def test_validation_macro_f1_matches_sklearn():
    labels = np.array([0, 1, 2] * 10)
    ds, x, y = batches(n=30, batch=8, labels=labels)
    model = bn_model()
    runner = make_loop(model, keras.optimizers.SGD(0.1))
    result = runner.evaluate(runner.distribute(ds))
    predicted = model.predict(x, verbose=0).argmax(-1)
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-5)


def test_metric_modes_and_flag_checks():
    assert rundir.improves(0.5, 0.4, "val_macro_f1") and not rundir.improves(0.5, 0.4, "val_loss")
    from pipeline import validation
    with pytest.raises(ValueError, match="--accumulation_steps=3"):
        validation.check_recipes(cfg.TrainConfig(accumulation_steps=3), 32)
    with pytest.raises(ValueError, match="--ema_decay=1"):
        validation.check_recipes(cfg.TrainConfig(ema_decay=1.0), 32)
    with pytest.raises(ValueError, match="--class_weight=weights.txt"):
        validation.check_recipes(cfg.TrainConfig(class_weight="weights.txt"), 32)


# --------------------------------------------------------------------------- off = nothing traced


def _plain_step(runner):
    """The training step as it was before the recipes (the oracle for 'off adds nothing')."""
    model, optimizer = runner.model, runner.optimizer
    ce = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)

    def step(x, y):
        examples = tf.cast(tf.shape(y)[0], tf.float32)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = ce(y, tf.cast(logits, tf.float32))
            loss = tf.reduce_sum(per_example) / tf.maximum(examples, 1.0)
            scaled = optimizer.scale_loss(loss)
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(scaled, variables), variables)
        runner.train_metrics[0].update_state(per_example)
        runner.train_metrics[1].update_state(y, logits)
    return tf.function(step).get_concrete_function(*SPECS)


SPECS = (tf.TensorSpec([16, SIZE, SIZE, 3], tf.float32), tf.TensorSpec([16, CLASSES], tf.float32))


def _graph(concrete):
    ops = collections.Counter(op.type for op in concrete.graph.get_operations())
    return ops, sorted(v.name for v in concrete.variables)


def test_recipe_features_that_are_off_add_no_operations_or_variables():
    model = bn_model()
    variables_before = len(model.weights)
    off = make_loop(model, keras.optimizers.SGD(0.1), ema=None, clip_norm=0.0, accumulation_steps=1,
                    class_weights=None)
    assert _graph(off.trace_train_step(*SPECS)) == _graph(_plain_step(off))
    assert len(model.weights) == variables_before
    plain = _graph(off.trace_train_step(*SPECS))
    average = ema.WeightAverage(model, tf.distribute.get_strategy(), decay=0.9, warmup=True)
    for options in ({"ema": average}, {"clip_norm": 1.0}, {"accumulation_steps": 2},
                    {"class_weights": np.ones(CLASSES, np.float32)}):
        on = make_loop(model, keras.optimizers.SGD(0.1), **options)
        ops, variables = _graph(on.trace_train_step(*SPECS))
        assert ops != plain[0], options  # each feature, on, does show in the traced step


# --------------------------------------------------------------------------- mirrored, subprocess

MIRRORED_SCRIPT = """
import json, keras, numpy as np, tensorflow as tf
from pipeline.training import distribute, ema, loop
from tests import test_recipes_loop as t
strategy, _ = distribute.resolve_strategy("mirrored")
assert strategy.num_replicas_in_sync == 2
def build(fn, optimizer, **options):
    with strategy.scope():
        model = fn()
        average = ema.WeightAverage(model, strategy, decay=0.9, warmup=True) if options.pop("ema", False) else None
        runner = loop.Loop(model, strategy, ema=average, **options)
        model.compile(optimizer(), keras.losses.CategoricalCrossentropy(from_logits=True))
    runner.set_optimizer(model.optimizer)
    return model, runner, average
out = {}
ds = t.batches(n=32, batch=32)[0]
plain, a, _ = build(t.gn_model, lambda: keras.optimizers.SGD(0.5, momentum=0.9))
acc, b, _ = build(t.gn_model, lambda: keras.optimizers.SGD(0.5, momentum=0.9), accumulation_steps=4)
t.train_one_epoch(a, ds, 1); t.train_one_epoch(b, ds, 1)
out["accumulation_diff"] = max(float(np.abs(x - y).max()) for x, y in zip(plain.get_weights(), acc.get_weights()))
model, runner, _ = build(t.gn_model, lambda: keras.optimizers.SGD(1.0), clip_norm=0.05)
before = [w.numpy().copy() for w in model.trainable_weights]
t.train_one_epoch(runner, t.batches(n=16, batch=16)[0], 1)
out["clipped_update"] = float(np.sqrt(sum(np.sum((w.numpy() - b) ** 2) for w, b in zip(model.trainable_weights, before))))
model, runner, average = build(t.gn_model, lambda: keras.optimizers.SGD(0.5), ema=True)
start = [w.numpy().copy() for w in average.weights]
t.train_one_epoch(runner, t.batches(n=16, batch=16)[0], 1)
d = min(0.9, 2 / 11)
out["ema_diff"] = max(float(np.abs(a.numpy() - (d * s + (1 - d) * w.numpy())).max())
                      for a, s, w in zip(average.averages, start, average.weights))
x = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
y = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
w = np.array([1.0, 2.0, 4.0], np.float32)
model, runner, _ = build(t.gn_model, lambda: keras.optimizers.SGD(0.0), class_weights=w)
ce = keras.losses.categorical_crossentropy(y, model(x), from_logits=True).numpy()
logs = t.train_one_epoch(runner, tf.data.Dataset.from_tensor_slices((x, y)).batch(4), 1)
out["weighted_loss"], out["expected_loss"] = logs["loss"], float(np.mean(ce * (y @ w)))
print(json.dumps(out))
"""


def test_recipes_under_mirrored_over_two_logical_cpus(mirrored_recipe_run):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PIPELINE_LOGICAL_CPUS": "2"}
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(last_line(proc.stdout))
    assert out["accumulation_diff"] < 1e-5
    assert out["clipped_update"] == pytest.approx(0.05, rel=1e-4)  # the summed gradient's norm, not per replica
    assert out["ema_diff"] < 1e-6
    assert out["weighted_loss"] == pytest.approx(out["expected_loss"], rel=1e-5)

    # The CLI with every recipe flag on (and an augmentation policy with mixing: test_augment_policies).
    model_dir = pathlib.Path(mirrored_recipe_run)
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["replicas"] == 2
    rows = rundir.read_metrics(str(model_dir))
    state = rundir.read_json(str(model_dir / "checkpoints" / "state.json"))
    assert state["best_epoch"] == min(rows, key=lambda r: (r["val_loss"], -r["epoch"]))["epoch"]
    config = json.loads((model_dir / "config.json").read_text())["train"]
    assert (config["ema_decay"], config["ema_warmup"], config["accumulation_steps"]) == (0.9, False, 4)
    flags_cfg = (model_dir / "flags.cfg").read_text()
    assert "--accumulation_steps=4" in flags_cfg and "--best_metric=val_loss" in flags_cfg


def test_recipe_hyperparameters_are_searchable_with_the_flag_values_as_defaults():
    from pipeline.tuning import overrides, space
    base = cfg.RunConfig(model_dir="x", train=cfg.TrainConfig(ema_decay=0.999, accumulation_steps=2))
    params = {p.name: p for p in space.make_search_space(
        base, tune=["ema_decay", "clip_norm", "accumulation_steps"]).params}
    assert (params["ema_decay"].default, params["clip_norm"].default, params["accumulation_steps"].default) == (
        0.999, 0.0, 2)
    assert params["clip_norm"].low > 0 and params["clip_norm"].log  # 0 (off) stays the default
    assert "ema_decay" not in space.make_search_space(base).names  # opt-in: the default search is unchanged
    tuned = overrides.apply_overrides(base, {"ema_decay": 0.99, "clip_norm": 1.0, "accumulation_steps": 4})
    assert (tuned.train.ema_decay, tuned.train.clip_norm, tuned.train.accumulation_steps) == (0.99, 1.0, 4)
