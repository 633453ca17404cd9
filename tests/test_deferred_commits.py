"""Deferred commits: a head trained on cached features commits once a minute, and loses nothing it finished.

`RunCheckpoint.defer_commits` keeps the last and the best deferred epoch's
variables in memory; `flush` (a phase's end, a stop, Ctrl-C) writes them as
those epochs' own checkpoints. The oracle for "nothing lost" is the run
without deferral: the same best and last epochs, the same weights in
best.keras and last.keras, and after a kill the resumed run repeats the lost
epochs exactly.
"""
import os
import signal

import keras
import numpy as np
import pytest

from pipeline import config as cfg
from pipeline import errors, rundir
from pipeline.training import callbacks as cbs
from pipeline.training import distribute, train
from tests.helpers import make_image_folder, run_cli, tiny_model


def _head_weights(filename):
    return keras.saving.load_model(filename).get_layer("logits").get_weights()


def _deferring(tmp_path, every_seconds):
    """(run directory, a one-layer model with an SGD optimizer, its RunCheckpoint deferring its commits)."""
    model_dir = str(tmp_path / "run")
    rundir.prepare(model_dir, resume=False).release()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="logits")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    checkpoint = cbs.RunCheckpoint(model_dir)
    checkpoint.set_model(model)
    checkpoint.defer_commits(model.trainable_variables + model.optimizer.variables, every_seconds=every_seconds)
    return model_dir, model, checkpoint


def _state(model_dir):
    return rundir.read_json(rundir.path(model_dir, rundir.CHECKPOINT_DIR, rundir.STATE_FILE))


def test_flush_writes_the_best_and_the_last_deferred_epoch_and_leaves_the_model_as_it_was(tmp_path):
    model_dir, model, checkpoint = _deferring(tmp_path, every_seconds=3600)
    kernel = model.get_layer("logits").kernel
    checkpoint.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.1, "val_accuracy": 0.1})  # a run's 1st: committed
    first = _state(model_dir)
    assert first["epochs_done"] == 1 and first["last_checkpoint"] == "epoch-0001.keras"
    seen = {}
    for epoch, accuracy in enumerate((0.5, 0.9, 0.7), start=1):  # the best epoch (3) is not the last (4)
        kernel.assign(np.full(kernel.shape, float(epoch + 1), "f4"))
        model.optimizer.iterations.assign(10 * (epoch + 1))
        checkpoint.on_epoch_end(epoch, {"loss": 1.0, "accuracy": accuracy, "val_accuracy": accuracy})
        seen[epoch + 1] = model.get_layer("logits").get_weights()
    assert _state(model_dir) == first  # deferred: nothing written but the metrics rows
    assert [r["epoch"] for r in rundir.read_metrics(model_dir)] == [1, 2, 3, 4]
    kernel.assign(np.full(kernel.shape, -7.0, "f4"))  # a Ctrl-C in epoch 5, halfway
    checkpoint.flush()
    state = _state(model_dir)
    assert (state["epochs_done"], state["best_epoch"], state["best_value"]) == (4, 3, 0.9)
    assert (state["last_checkpoint"], state["best_checkpoint"]) == ("epoch-0004.keras", "epoch-0003.keras")
    for which, epoch in (("best", 3), ("last", 4)):
        for saved, expected in zip(_head_weights(rundir.checkpoint_file(model_dir, which)), seen[epoch]):
            np.testing.assert_array_equal(saved, expected)
    last = keras.saving.load_model(rundir.checkpoint_file(model_dir, "last"))
    assert int(last.optimizer.iterations) == 40
    assert float(np.asarray(kernel).max()) == -7.0  # the model goes on from where it was
    checkpoint.flush()  # nothing pending: no second write
    assert _state(model_dir) == state


def test_an_elapsed_interval_commits_the_epoch_itself(tmp_path):
    model_dir, _, checkpoint = _deferring(tmp_path, every_seconds=0)
    for epoch in range(2):  # the first is committed as a run's first; the second because the interval passed
        checkpoint.on_epoch_end(epoch, {"loss": 1.0, "val_accuracy": 0.5})
        state = _state(model_dir)
        assert state["epochs_done"] == epoch + 1
        assert state["last_checkpoint"] == f"epoch-{epoch + 1:04d}.keras"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return "folder:" + make_image_folder(tmp_path_factory.mktemp("images"), per_class=10, size=32)


def _probe(model_dir, folder, *, epochs=4, resume=False):
    return cfg.RunConfig(
        model_dir=str(model_dir), resume=resume,
        data=cfg.DataConfig(dataset=folder, augment="none", batch_size=8, image_size=32, val_fraction=0.2,
                            test_fraction=0.1, data_checks=False),
        model=cfg.ModelConfig(name="resnet20"),  # only recorded: the tiny model is passed
        train=cfg.TrainConfig(epochs=epochs, freeze_epochs=epochs, schedule="cosine",
                              optimizer=cfg.OptimizerConfig(learning_rate=0.5), tensorboard=False, verbose=0))


def _tiny():
    keras.utils.set_random_seed(0)
    with distribute.resolve_strategy("auto")[0].scope():
        return tiny_model(3, 32)


class _InterruptAfter(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == 3:
            raise KeyboardInterrupt


def test_a_linear_probe_on_features_writes_one_checkpoint_and_keeps_ctrl_c_s_epochs(tmp_path, folder,
                                                                                    monkeypatch):
    saves = []
    save = rundir.save_model_atomic
    monkeypatch.setattr(rundir, "save_model_atomic", lambda model, f: (saves.append(f), save(model, f)))
    whole = tmp_path / "whole"
    model = _tiny()
    train(_probe(whole, folder), model=model)
    saved = sorted(os.path.basename(f) for f in saves)  # the 1st, the last, and the best if it is neither
    assert saved[0] == "epoch-0001.keras" and saved[-1] == "epoch-0004.keras" and len(saved) <= 3  # was 4
    for saved, trained in zip(_head_weights(rundir.checkpoint_file(whole, "last")),
                              model.get_layer("logits").get_weights()):
        np.testing.assert_array_equal(saved, trained)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(errors.RunInterrupted, match="interrupted after epoch 3;"):
        train(_probe(interrupted, folder), model=_tiny(), extra_callbacks=[_InterruptAfter()])
    state = rundir.read_json(rundir.path(interrupted, rundir.CHECKPOINT_DIR, rundir.STATE_FILE))
    assert state["epochs_done"] == 3  # committed by the interrupt, not lost
    train(_probe(interrupted, folder, resume=True), model=_tiny())
    assert [r["epoch"] for r in rundir.read_metrics(interrupted)] == [1, 2, 3, 4]
    for a, b in zip(_head_weights(rundir.checkpoint_file(interrupted, "last")),
                    _head_weights(rundir.checkpoint_file(whole, "last"))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _curves(model_dir):
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
            for row in rundir.read_metrics(model_dir)]


def test_a_kill_between_deferred_commits_repeats_the_lost_epochs_exactly(tmp_path, folder):
    """Killed after the 2nd deferred epoch of 3 frozen ones: only epoch 1 was committed; the resume repeats 2-3."""
    def finetune(model_dir, *args, fault=None):
        return run_cli("finetune", f"--dataset={folder}", "--image_size=32", "--batch_size=8", "--augment=none",
                       "--epochs=4", "--freeze_epochs=3", "--schedule=cosine", "--learning_rate=0.5",
                       "--nodata_checks", "--notensorboard", "--deterministic", "--noexport", "--noreport",
                       f"--model_dir={model_dir}", *args, tiny=True, check=fault is None,
                       env={rundir.FAULT_ENV: fault} if fault else None)
    killed = str(tmp_path / "killed")
    proc = finetune(killed, fault="deferred_epoch:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert rundir.read_json(rundir.path(killed, rundir.CHECKPOINT_DIR, rundir.STATE_FILE))["epochs_done"] == 1
    assert len(rundir.read_metrics(killed)) == 3  # and the two deferred epochs' rows, dropped on resume
    finetune(killed, "--resume")
    whole = str(tmp_path / "whole")
    finetune(whole)
    assert [r["epoch"] for r in rundir.read_metrics(killed)] == [1, 2, 3, 4]
    assert _curves(killed) == _curves(whole)
    last = keras.saving.load_model(rundir.checkpoint_file(killed, "last"))
    steps = int(keras.saving.load_model(rundir.checkpoint_file(whole, "last")).optimizer.iterations)
    assert int(last.optimizer.iterations) == steps > 0


def test_a_commit_after_a_deferred_best_writes_that_best_too(tmp_path, monkeypatch):
    """The interval ends in a worse epoch: the best deferred epoch before it gets its own file, named best."""
    clock = [0.0]
    monkeypatch.setattr(cbs.time, "monotonic", lambda: clock[0])
    model_dir, model, checkpoint = _deferring(tmp_path, every_seconds=60)
    kernel = model.get_layer("logits").kernel
    seen = {}
    for epoch, (accuracy, now) in enumerate(((0.1, 1), (0.9, 2), (0.5, 100))):  # 1st; deferred best; interval
        clock[0] = float(now)
        kernel.assign(np.full(kernel.shape, float(epoch + 1), "f4"))
        checkpoint.on_epoch_end(epoch, {"loss": 1.0, "val_accuracy": accuracy})
        seen[epoch + 1] = model.get_layer("logits").get_weights()
    state = _state(model_dir)
    assert (state["epochs_done"], state["best_epoch"]) == (3, 2)
    assert (state["last_checkpoint"], state["best_checkpoint"]) == ("epoch-0003.keras", "epoch-0002.keras")
    for which, epoch in (("best", 2), ("last", 3)):
        for saved, expected in zip(_head_weights(rundir.checkpoint_file(model_dir, which)), seen[epoch]):
            np.testing.assert_array_equal(saved, expected)
