"""tf.distribute: strategy rules, the one training loop, MirroredStrategy, multi-worker, preemption.

Costs (quiet 2-core machine, about 3-4 minutes in all): pure rules and tiny
in-process models first; then subprocesses, because logical devices and
`TF_CONFIG` must be set before TensorFlow initializes: one process training
resnet20 under the default and the mirrored strategy over two logical CPUs,
and one localhost cluster of two workers (full-pass epochs, a killed worker, a restart).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as cfg
from pipeline import data
from pipeline import rundir, training
from pipeline.training import distribute, loop, phases, schedules
from tests.helpers import REPO, cli_command, free_ports, last_line

# --------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize("requested,gpus,workers,tpu,expected", [
    ("auto", 0, 1, None, "default"),
    ("auto", 1, 1, None, "default"),
    ("auto", 4, 1, None, "mirrored"),
    ("auto", 0, 2, None, "multi_worker"),
    ("auto", 8, 3, None, "multi_worker"),
    ("auto", 0, 1, "my-tpu", "tpu"),
    ("auto", 4, 2, "local", "tpu"),
    ("default", 4, 2, None, "default"),
    ("mirrored", 0, 1, None, "mirrored"),
    ("multi_worker", 0, 1, None, "multi_worker"),
    ("tpu", 0, 1, None, "tpu"),
])
def test_choose_strategy(requested, gpus, workers, tpu, expected):
    assert distribute.choose_strategy(requested, num_gpus=gpus, num_workers=workers, tpu=tpu) == expected


def test_choose_strategy_rejects_unknown_names():
    with pytest.raises(ValueError, match="mirored"):
        distribute.choose_strategy("mirored", num_gpus=0)


def test_tf_config_workers_and_chief():
    cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"], "ps": ["d:1"], "evaluator": ["e:1"]}
    env = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})}
    assert distribute.num_workers(distribute.tf_config(env)) == 3  # ps and evaluator don't train
    assert distribute.num_workers(distribute.tf_config({})) == 0
    assert distribute.is_chief("chief", 0, cluster)
    assert not distribute.is_chief("worker", 0, cluster)  # there is a chief
    workers_only = {"worker": ["b:1", "c:1"]}
    assert distribute.is_chief("worker", 0, workers_only)
    assert not distribute.is_chief("worker", 1, workers_only)
    assert distribute.is_chief(None, 0, {})
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.tf_config({"TF_CONFIG": "{not json"})


def test_global_batch_and_lr_scaling_rules():
    assert distribute.per_replica_batch(128, 4) == 32
    with pytest.raises(ValueError, match="multiple of the 3 replicas"):
        distribute.per_replica_batch(128, 3)
    assert distribute.lr_scale("none", 8) == 1.0
    assert distribute.lr_scale("linear", 8) == 8.0
    assert phases.scale_learning_rate(0.1, 4.0) == pytest.approx(0.4)
    spec = schedules.from_epochs("cosine", base_lr=0.1, epochs=2, steps_per_epoch=10)
    scaled = phases.scale_learning_rate(schedules.StepSchedule(spec), 2.0)
    assert float(scaled(0)) == pytest.approx(2 * float(schedules.StepSchedule(spec)(0)))
    t = cfg.TrainConfig(schedule="constant", optimizer=cfg.OptimizerConfig("sgd", 0.1))
    assert phases.schedule_for(t, t.optimizer, epochs=1, steps_per_epoch=1, start_epoch=0,
                                 lr_scale=2.0) == pytest.approx(0.2)


def test_strategy_flags_list_every_choice():
    from absl import flags

    import pipeline.train  # noqa: F401  (defines the train flags)
    assert set(flags.FLAGS["strategy"].parser.enum_values) == set(distribute.CHOICES)
    assert set(flags.FLAGS["lr_scaling"].parser.enum_values) == {"none", "linear"}
    assert "local" in flags.FLAGS["tpu"].help


# --------------------------------------------------------------------------- the loop, in process


def tiny_model(num_classes=10, size=32):
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inp, out)


def _tiny_data(n=40, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)  # 16, 16, 8: a short last batch


@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_loop_matches_keras_fit_on_the_default_strategy():
    """Same init, data, loss (label smoothing, short last batch) and optimizer: same weights as fit."""
    ds = _tiny_data()
    keras.utils.set_random_seed(1)
    reference = tiny_model()
    keras.utils.set_random_seed(1)
    ours = tiny_model()
    ours.set_weights(reference.get_weights())
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    reference.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss,
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    history = reference.fit(ds, epochs=2, verbose=0).history

    ours.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss)
    runner = loop.Loop(ours, tf.distribute.get_strategy(), label_smoothing=0.1)
    runner.set_optimizer(ours.optimizer)
    events = []
    recorder = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: events.append(("epoch_begin", e)),
        on_train_batch_end=lambda b, logs: events.append(("batch_end", b)),
        on_epoch_end=lambda e, logs: events.append(("epoch_end", e, dict(logs))))
    callbacks = loop.callback_list([recorder], model=ours, epochs=2, steps=3, verbose=0)
    callbacks.on_train_begin()
    logs = [runner.train_epoch(e, runner.distribute(ds), callbacks=callbacks, steps_per_epoch=3)
            for e in range(2)]
    callbacks.on_train_end(logs[-1])
    for a, b in zip(reference.get_weights(), ours.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert [l["loss"] for l in logs] == pytest.approx(history["loss"], rel=1e-4)
    assert [l["accuracy"] for l in logs] == pytest.approx(history["accuracy"], rel=1e-4)
    assert [e[:2] for e in events] == [
        ("epoch_begin", 0), ("batch_end", 0), ("batch_end", 1), ("batch_end", 2), ("epoch_end", 0),
        ("epoch_begin", 1), ("batch_end", 0), ("batch_end", 1), ("batch_end", 2), ("epoch_end", 1)]
    assert runner.evaluate(runner.distribute(ds))["loss"] == pytest.approx(
        reference.evaluate(ds, verbose=0, return_dict=True)["loss"], rel=1e-4)


def test_loop_scales_the_loss_under_mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny_model()
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
        model.compile(optimizer, keras.losses.CategoricalCrossentropy(from_logits=True))
        runner = loop.Loop(model, tf.distribute.get_strategy())
        runner.set_optimizer(model.optimizer)
        callbacks = loop.callback_list([], model=model, epochs=1, steps=3, verbose=0)
        callbacks.on_train_begin()
        logs = runner.train_epoch(0, runner.distribute(_tiny_data()), callbacks=callbacks, steps_per_epoch=3)
        assert model.get_layer("conv").compute_dtype == "float16"
        assert np.isfinite(logs["loss"]) and int(optimizer.iterations) == 3
        assert float(optimizer.dynamic_scale) > 1  # the loss was scaled, and steps were finite
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_train_drives_callbacks_like_fit_and_honours_stop_training(tmp_path):
    """Through training.train: hook order, epoch log names, extra callbacks, model.stop_training."""
    run = cfg.RunConfig(
        model_dir=str(tmp_path / "run"),
        data=cfg.DataConfig(dataset="digits", batch_size=64, augment="none"),
        train=cfg.TrainConfig(epochs=3, steps_per_epoch=2, schedule="constant",
                              optimizer=cfg.OptimizerConfig("sgd", 0.05), precision="float32",
                              strategy="default", tensorboard=False, verbose=0))
    datasets = data.load_dataset(run.data)
    calls, epoch_logs = [], []

    hooks = ["on_train_begin", "on_train_end", "on_epoch_begin", "on_train_batch_begin",
             "on_train_batch_end", "on_test_begin", "on_test_end", "on_test_batch_begin",
             "on_test_batch_end"]

    def record(name):
        return lambda self, *args, **kwargs: calls.append(name)

    def on_epoch_end(self, epoch, logs=None):
        calls.append("on_epoch_end")
        epoch_logs.append(dict(logs))
        if epoch == 1:
            self.model.stop_training = True

    recorder = type("Recorder", (keras.callbacks.Callback,),
                    {**{hook: record(hook) for hook in hooks}, "on_epoch_end": on_epoch_end})()
    result = training.train(run, datasets=datasets, model=tiny_model(), extra_callbacks=[recorder])
    assert result.status == "completed" and result.epochs_done == 2 and result.is_chief
    expected_epoch = (["on_epoch_begin", "on_train_batch_begin", "on_train_batch_end",
                       "on_train_batch_begin", "on_train_batch_end", "on_test_begin"]
                      + ["on_test_batch_begin", "on_test_batch_end"] * 3  # 180 val images at 64
                      + ["on_test_end", "on_epoch_end"])
    assert calls == ["on_train_begin"] + expected_epoch * 2 + ["on_train_end"]
    assert set(epoch_logs[0]) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr",
                                  "epoch_seconds", "images_per_second", "val_macro_f1"}
    rows = rundir.read_metrics(run.model_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == pytest.approx(epoch_logs[1]["loss"], rel=1e-5)
    summary = json.load(open(os.path.join(run.model_dir, "summary.json")))
    assert (summary["strategy"], summary["replicas"], summary["per_replica_batch"]) == ("default", 1, 64)
    assert summary["test_accuracy"] is not None


# --------------------------------------------------------------------------- mirrored, subprocess

MIRRORED_SCRIPT = """
import dataclasses, json, os, sys
from pipeline import config as cfg, rundir, training
root = sys.argv[1]
base = cfg.RunConfig(
    model_dir="", data=cfg.DataConfig(dataset="digits", augment="none", batch_size=64),
    model=cfg.ModelConfig(name="resnet20"),
    train=cfg.TrainConfig(epochs=2, steps_per_epoch=4, schedule="constant", precision="float32",
                          optimizer=cfg.OptimizerConfig("sgd", learning_rate=0.05, momentum=0.9),
                          tensorboard=False, verbose=0))
out = {}
for name in ("default", "mirrored"):
    run = dataclasses.replace(base, model_dir=os.path.join(root, name),
                              train=dataclasses.replace(base.train, strategy=name))
    result = training.train(run)
    out[name] = {"rows": rundir.read_metrics(run.model_dir), "summary": result.summary}

# Fine-tuning phases under the same strategy with mixed_float16, on a model built by the
# caller (as the tuner does) in the strategy's scope: frozen epoch, then a backbone multiplier.
import keras
from pipeline.training import distribute
from tests.test_distribute import tiny_model
keras.mixed_precision.set_global_policy("mixed_float16")
with distribute.resolve_strategy("mirrored")[0].scope():
    model = tiny_model()
run = dataclasses.replace(base, model_dir=os.path.join(root, "finetune"), train=dataclasses.replace(
    base.train, strategy="mirrored", precision="mixed_float16", steps_per_epoch=2, freeze_epochs=1,
    backbone_lr_multiplier=0.1))
result = training.train(run, model=model)
out["finetune"] = {"rows": rundir.read_metrics(run.model_dir), "summary": result.summary,
                   "optimizer": type(model.optimizer).__name__,
                   "inner": type(model.optimizer.inner_optimizer).__name__,
                   "compute_dtype": model.get_layer("conv").compute_dtype}
print(json.dumps(out))
"""


def test_mirrored_over_two_logical_cpus_reaches_the_default_strategy_loss(tmp_path):
    """Same global batch (64) and seed; MirroredStrategy splits every batch over 2 replicas.

    Tolerance: each replica's BatchNorm normalizes with the statistics of its
    own 32 examples (Keras BatchNorm is not synchronized), so the two runs
    compute slightly different steps; measured here the epoch losses differ by
    about 1%. 5% is allowed; a wrong gradient aggregation (e.g. a per-replica
    mean summed over replicas: twice the learning rate) moves epoch 2's loss
    by ~8%.
    """
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                               distribute.LOGICAL_CPUS_ENV: "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(last_line(proc.stdout))
    default, mirrored = out["default"], out["mirrored"]
    assert (mirrored["summary"]["strategy"], mirrored["summary"]["replicas"],
            mirrored["summary"]["per_replica_batch"]) == ("mirrored", 2, 32)
    assert (default["summary"]["strategy"], default["summary"]["replicas"]) == ("default", 1)
    d = [r["loss"] for r in default["rows"]]
    m = [r["loss"] for r in mirrored["rows"]]
    assert len(d) == len(m) == 2
    assert d[1] < d[0] - 0.2 and m[1] < m[0] - 0.2, (d, m)  # both learn
    for a, b in zip(d, m):
        assert b == pytest.approx(a, rel=0.05), (d, m)
    finetune = out["finetune"]
    assert finetune["summary"]["status"] == "completed" and finetune["summary"]["replicas"] == 2
    assert finetune["summary"]["precision"] == "mixed_float16" and finetune["compute_dtype"] == "float16"
    assert finetune["optimizer"] == "LossScaleOptimizer" and finetune["inner"] == "BackboneLRSGD"
    assert [r["epoch"] for r in finetune["rows"]] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in finetune["rows"])


# --------------------------------------------------------------------------- multi-worker, subprocesses

FAST_MW = ["--dataset=digits", "--model=resnet20", "--width_multiplier=0.25", "--augment=none", "--verbose=2",
           "--notensorboard", "--noreport"]


class Cluster:
    """Two `python -m pipeline.train` workers on 127.0.0.1 with TF_CONFIG; killed on exit.

    Their trainers build `tests.helpers.tiny_model` for the resnet20 the flags name
    (`cli_command(..., tiny=True)`): what is tested is the cluster (its batches, collectives,
    kills and restarts), and tracing resnet20's steps under the strategy was most of a task's time.
    """

    def __init__(self, tmp_path, tag):
        self.tmp_path, self.tag, self.procs, self.logs = tmp_path, tag, [], []
        self.worker_tmp = tmp_path / "worker_tmp"
        self.worker_tmp.mkdir(exist_ok=True)

    def start(self, *args, workers=2):
        cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}
        for i in range(workers):
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(self.worker_tmp),
                   "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
            log = self.tmp_path / f"{self.tag}-worker{i}.log"
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                cli_command("train", *args, tiny=True), cwd=REPO, env=env,
                stdout=open(log, "w"), stderr=subprocess.STDOUT))
        return self.procs[-workers:]

    def wait(self, procs, timeout):
        deadline = time.time() + timeout
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
        return [p.returncode for p in procs]

    def output(self, i):
        return self.logs[i].read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _epoch_losses(text):
    return re.findall(r"\d+/\d+ - .*? - loss: ([0-9.]+)", text)


@pytest.fixture(scope="module")
def restarted_cluster(tmp_path_factory):
    """Two workers train full passes together; one is killed, then every task restarts with --resume.

    One cluster run for both tests below: a global batch of 128 (few steps: a step's
    collectives between the processes, not its model, are its cost) with linear lr
    scaling, exported at the end; the worker is killed (preempted) once epoch 1
    is committed, the chief must stop, and the restarted tasks are given only
    the run directory and --resume (the run's flags.cfg holds the rest), and
    where to export.
    """
    tmp_path = tmp_path_factory.mktemp("cluster")
    model_dir, exports = tmp_path / "run", tmp_path / "exports"
    args = [*FAST_MW, "--batch_size=128", "--epochs=3", "--schedule=constant", "--learning_rate=0.05",
            "--lr_scaling=linear", f"--export_dir={exports}", "--export_name=digits", f"--model_dir={model_dir}"]
    state = model_dir / "checkpoints" / "state.json"
    with Cluster(tmp_path, "killed") as cluster:
        chief, worker = cluster.start(*args)
        deadline = time.time() + 300
        while time.time() < deadline:
            s = rundir.read_json(str(state)) if state.exists() else None
            if s and s["epochs_done"] >= 1:
                break
            assert chief.poll() is None and worker.poll() is None, cluster.output(0)[-3000:]
            time.sleep(0.05)
        worker.kill()  # preempted after epoch 1
        killed_after = rundir.read_json(str(state))["epochs_done"]
        # The chief notices (coordination-service heartbeats) and stops instead of hanging.
        stopped = cluster.wait([chief], timeout=120)
        stopped_output = cluster.output(0)
        # What killed processes leave in TMPDIR (their copies, autograph's files) is gone with their
        # machine; the restarted tasks start on an empty one, and must leave it empty.
        shutil.rmtree(cluster.worker_tmp)
        cluster.worker_tmp.mkdir()
        # The cluster manager restarts every task; they resume from the chief's last epoch.
        restart = cluster.start(f"--model_dir={model_dir}", "--resume", f"--export_dir={exports}",
                                "--export_name=digits", "--noreport")  # (what to do after training: not run flags)
        codes = cluster.wait(restart, timeout=480)
        chief_out, worker_out = cluster.output(2), cluster.output(3)
    return {"tmp_path": tmp_path, "model_dir": model_dir, "exports": exports, "worker_tmp": cluster.worker_tmp,
            "killed_after": killed_after, "stopped": stopped, "stopped_output": stopped_output,
            "codes": codes, "chief": chief_out, "worker": worker_out}


def test_two_workers_train_one_epoch_together(restarted_cluster):
    c = restarted_cluster
    model_dir, chief, worker = c["model_dir"], c["chief"], c["worker"]
    assert c["codes"] == [0, 0], chief[-3000:] + worker[-3000:]
    # One run directory (the chief's) and one export; the worker's temp copies are gone.
    assert sorted(p.name for p in c["tmp_path"].iterdir() if p.is_dir()) == ["exports", "run", "worker_tmp"]
    assert os.listdir(c["exports"] / "digits") == ["1"]
    assert os.listdir(c["worker_tmp"]) == []
    assert f"run directory: {model_dir}" in chief and "run directory" not in worker
    assert "worker 1 of 2 tasks" in worker
    summary = json.load(open(model_dir / "summary.json"))
    assert (summary["strategy"], summary["replicas"], summary["workers"], summary["per_replica_batch"]) == (
        "multi_worker", 2, 2, 64)
    rows = rundir.read_metrics(str(model_dir))
    assert summary["lr_scale"] == 2 and all(r["lr"] == pytest.approx(0.1) for r in rows)  # 0.05 x 2 replicas
    # 1257 digits at a global batch of 128: 9 full batches (the short one of 105 is dropped).
    assert "9/9 - " in chief and "10/10" not in chief
    # Both workers report the same global metrics.
    assert _epoch_losses(chief) == _epoch_losses(worker) != []


def test_killed_worker_restarts_and_finishes_with_each_epoch_once(restarted_cluster):
    c = restarted_cluster
    model_dir = c["model_dir"]
    assert c["stopped"] != [0] and "restart every task with --resume" in c["stopped_output"]
    assert c["codes"] == [0, 0], c["chief"][-3000:] + c["worker"][-3000:]
    assert c["killed_after"] in (1, 2)
    assert f"resuming {model_dir} after epoch {c['killed_after']}" in c["worker"]
    rows = rundir.read_metrics(str(model_dir))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = json.load(open(model_dir / "summary.json"))
    assert summary["status"] == "completed" and summary["epochs_done"] == 3
    assert summary["strategy"] == "multi_worker"
