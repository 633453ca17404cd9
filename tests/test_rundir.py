"""The run directory no failure can corrupt (issue 15): commits, the lock, refusals, faults.

Library calls in-process where the fault allows (digits, 1 step per epoch, on a one-conv
`tiny_model` whose config says resnet20); subprocesses where the fault is a process's (kills,
the CLI's retry): the CLI itself, its trainer building `tests.helpers.tiny_model` for the
resnet20 its flags name (`run_cli(..., tiny=True)`).
"""
import dataclasses
import errno
import glob
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline import config as cfg
from pipeline import errors, rundir
from pipeline.training import callbacks as cbs
from pipeline.training import trainer
from tests.helpers import FAST, REPO, last_line, run_cli


def tiny_run(model_dir, *, epochs=2, lr=0.05, resume=False, model="resnet20", dataset="digits", **train):
    return cfg.RunConfig(
        model_dir=str(model_dir), resume=resume,
        data=cfg.DataConfig(dataset=dataset, batch_size=64, augment="none"),
        model=cfg.ModelConfig(name=model, width_multiplier=0.25),
        train=cfg.TrainConfig(epochs=epochs, steps_per_epoch=1, schedule="constant",
                              optimizer=cfg.OptimizerConfig("sgd", lr), precision="float32",
                              strategy="default", tensorboard=False, verbose=0, **train),
        flags_text="#   python -m pipeline.train --flagfile=<this file>\n")


def tiny_model(num_classes=10):
    """Conv, BatchNorm, pooling, logits: all a run directory needs of a model (weights, optimizer state,
    checkpoints) traces in seconds, where resnet20's train step alone takes ~10 s to trace."""
    keras.utils.set_random_seed(0)  # the same initial weights in every run (trainer.train seeds after the build)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(num_classes, name="logits")(x))


def train(run, **kwargs):
    """`trainer.train(run)` on `tiny_model` (the run's config still names resnet20: what resumes compare)."""
    return trainer.train(run, model=tiny_model(), **kwargs)


def snapshot(model_dir):
    """Every file of the run (but the lock) with its bytes."""
    out = {}
    for root, _, files in os.walk(model_dir):
        for name in files:
            full = os.path.join(root, name)
            if name != rundir.LOCK_FILE:
                out[os.path.relpath(full, model_dir)] = open(full, "rb").read()
    return out


def leftovers(model_dir):
    return [p for p in glob.glob(os.path.join(model_dir, "**", ".tmp-*"), recursive=True)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 2-epoch run, copied by the tests that try to break it."""
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(tiny_run(model_dir))
    assert result.status == "completed"
    return str(model_dir)


def copy_run(source, tmp_path):
    import shutil
    target = str(tmp_path / "run")
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("change", [{"model": "resnet32"}, {"dataset": "mnist"}])
def test_refused_resume_with_another_model_or_dataset_changes_nothing(finished, tmp_path, change):
    """Item 1/9: the refusal is one line, before anything of the run is rewritten (summary stays completed)."""
    model_dir = copy_run(finished, tmp_path)
    before = snapshot(model_dir)
    with pytest.raises(rundir.RunDirError) as err:
        train(tiny_run(model_dir, epochs=3, resume=True, **change))
    message = str(err.value)
    assert "\n" not in message and list(change.values())[0] in message and "Cannot resume" in message
    assert snapshot(model_dir) == before
    assert json.load(open(os.path.join(model_dir, "summary.json")))["status"] == "completed"


def test_resume_from_a_truncated_last_checkpoint_is_one_line_and_changes_nothing(finished, tmp_path):
    """Items 1/7: a corrupt last.keras names the file in one line (no BadZipFile traceback); nothing changes."""
    model_dir = copy_run(finished, tmp_path)
    last = rundir.committed_checkpoint(model_dir, "last")  # last.keras is a link to it
    assert last.endswith("epoch-0002.keras")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    before = snapshot(model_dir)
    with pytest.raises(rundir.RunDirError) as err:
        train(tiny_run(model_dir, epochs=3, resume=True))
    message = str(err.value)
    assert "\n" not in message and len(message) < 500 and last in message
    after = snapshot(model_dir)
    for which in ("best", "last"):  # the copy broke their links to the epoch files; the start relinks them
        name = os.path.join("checkpoints", os.path.basename(rundir.committed_checkpoint(model_dir, which)))
        before.pop(f"checkpoints/{which}.keras")
        assert after.pop(f"checkpoints/{which}.keras") == after[name]
    assert after == before


def test_failed_start_does_not_block_the_corrected_command(tmp_path):
    """Item 2: the issue's two commands: a start failing on its data, then the fixed one, in one directory."""
    model_dir = str(tmp_path / "R")
    bad = run_cli("train", *FAST, "--epochs=1", "--dataset=folder:/nope", f"--model_dir={model_dir}",
                  check=False)
    assert bad.returncode != 0 and "/nope" in last_line(bad.stderr)
    os.makedirs(os.path.join(model_dir, "checkpoints"), exist_ok=True)  # what the old start left too
    run_cli("train", *FAST, "--epochs=1", "--steps_per_epoch=1", "--width_multiplier=0.25",
            f"--model_dir={model_dir}", tiny=True)
    assert rundir.read_json(os.path.join(model_dir, "checkpoints", "state.json"))["epochs_done"] == 1


def test_fresh_start_refuses_committed_runs_foreign_folders_and_files(tmp_path):
    """Item 2's limits and item 9: a committed run, a folder of other files, a regular file are refused."""
    committed = tmp_path / "committed"
    (committed / "checkpoints").mkdir(parents=True)
    (committed / "checkpoints" / "state.json").write_text("{}")
    with pytest.raises(rundir.RunDirError, match="pass --resume"):
        rundir.prepare(str(committed), resume=False)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("x")
    with pytest.raises(rundir.RunDirError, match="cat.jpg"):
        rundir.prepare(str(foreign), resume=False)
    assert (foreign / "cat.jpg").exists()
    regular = tmp_path / "file"
    regular.write_text("x")
    for resume in (False, True):
        with pytest.raises(rundir.RunDirError, match="is a file, not a directory"):
            rundir.prepare(str(regular), resume=resume)


HOLD_LOCK = """
import sys
from pipeline import rundir
lock = rundir.RunLock(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def test_lock_refuses_a_second_process_and_never_goes_stale(tmp_path):
    """Item 3: while another process holds the run, prepare stops naming its host and PID; after kill -9 it is free."""
    model_dir = str(tmp_path / "run")
    os.makedirs(model_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, model_dir], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in (False, True):
            with pytest.raises(rundir.RunLockedError) as err:
                if resume:
                    (tmp_path / "run" / "checkpoints").mkdir(exist_ok=True)
                    (tmp_path / "run" / "checkpoints" / "state.json").write_text("{}")
                rundir.prepare(model_dir, resume=resume)
            assert isinstance(err.value, ValueError)
            assert f"PID {holder.pid} on host " in str(err.value) and "\n" not in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = rundir.prepare(model_dir, resume=True)
    assert f"pid={os.getpid()}" in open(os.path.join(model_dir, rundir.LOCK_FILE)).read()
    lock.release()


def test_nan_stop_keeps_only_a_finite_best_checkpoint(tmp_path):
    """Item 4: the issue's `--learning_rate=1e8 --epochs=3 --steps_per_epoch=3`: the best is finite, or there is none."""
    model_dir = str(tmp_path / "nan")
    run = tiny_run(model_dir, epochs=3, lr=1e8)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, steps_per_epoch=3))
    with pytest.raises(trainer.TrainingDiverged) as err:
        train(run)
    best = rundir.checkpoint_file(model_dir, "best")
    state = rundir.read_json(os.path.join(model_dir, "checkpoints", "state.json"))
    if state is None or state.get("best_epoch") is None:
        assert "no checkpoint is kept" in str(err.value) and not os.path.exists(best)
    else:
        assert f"(epoch {state['best_epoch']}) is kept" in str(err.value)
        model = keras.saving.load_model(best, compile=False)
        assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)


def test_nan_val_loss_or_weights_end_the_epoch_unsaved():
    """Item 4: only the mean training loss used to be checked."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert not cbs.epoch_diverged({"loss": 1.0, "val_loss": 1.0}, model)
    assert cbs.epoch_diverged({"loss": 1.0, "val_loss": float("nan")}, model)
    model.layers[0].kernel.assign([[np.nan], [0.0]])
    assert cbs.epoch_diverged({"loss": 1.0}, model)


class _InterruptAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


def test_ctrl_c_records_interrupted_and_says_how_to_resume(tmp_path):
    """Item 9: Ctrl-C is one line naming the epoch and the command; the resumed run counts each epoch once."""
    model_dir = str(tmp_path / "run")
    with pytest.raises(errors.RunInterrupted) as err:
        train(tiny_run(model_dir, epochs=3), extra_callbacks=[_InterruptAfter(2)])
    assert str(err.value) == ("interrupted after epoch 2; resume with: "
                              f"python -m pipeline.train --model_dir={model_dir} --resume")
    assert json.load(open(os.path.join(model_dir, "summary.json")))["status"] == "interrupted"
    result = train(tiny_run(model_dir, epochs=3, resume=True))
    assert result.status == "completed"
    assert [r["epoch"] for r in rundir.read_metrics(model_dir)] == [1, 2, 3]
    model = keras.saving.load_model(rundir.checkpoint_file(model_dir, "last"))
    assert int(model.optimizer.iterations) == 3
    assert not leftovers(model_dir)


def test_full_disk_during_a_checkpoint_is_one_transient_line(tmp_path, monkeypatch):
    """Item 9: ENOSPC while saving epoch 2 is errors.TransientError naming the file; epoch 1 stays committed."""
    model_dir = str(tmp_path / "run")
    saves = []
    real_save = keras.Model.save

    def save(self, filepath, *args, **kwargs):
        saves.append(filepath)
        if len(saves) == 2:
            with open(filepath, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, filepath, *args, **kwargs)
    monkeypatch.setattr(keras.Model, "save", save)
    with pytest.raises(errors.TransientError) as err:
        train(tiny_run(model_dir, epochs=3))
    assert str(err.value) == (f"disk full while writing {rundir.epoch_checkpoint(model_dir, 2)}; free space "
                              f"and resume with: python -m pipeline.train --model_dir={model_dir} --resume")
    assert rundir.read_json(os.path.join(model_dir, "checkpoints", "state.json"))["epochs_done"] == 1
    assert not leftovers(model_dir)


def test_files_are_created_with_the_process_umask(tmp_path):
    """Item 12: mkstemp made every run file 0600; now 0666 & ~umask like other tools."""
    for umask in (0o022, 0o002):
        old = os.umask(umask)
        try:
            target = str(tmp_path / f"summary-{umask}.json")
            rundir.write_json_atomic(target, {"a": 1})
        finally:
            os.umask(old)
        assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask


def test_commit_names_its_checkpoint_and_removes_killed_leftovers(tmp_path):
    """Item 8: state.json names the epoch's own checkpoint; .tmp-* and unnamed epochs go at the next start."""
    model_dir = str(tmp_path / "run")
    ckpt = os.path.join(model_dir, "checkpoints")
    os.makedirs(ckpt)
    for name in ("epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras", ".tmp-1-x-state.json"):
        open(os.path.join(ckpt, name), "w").write(name)
    open(os.path.join(model_dir, ".tmp-1-x-summary.json"), "w").write("x")
    rundir.write_json_atomic(os.path.join(ckpt, "state.json"), {
        "epochs_done": 2, "last_checkpoint": "epoch-0002.keras", "best_checkpoint": "epoch-0001.keras"})
    rundir.prepare(model_dir, resume=True).release()
    assert sorted(os.listdir(ckpt)) == ["best.keras", "epoch-0001.keras", "epoch-0002.keras", "last.keras",
                                        "state.json"]
    assert open(rundir.checkpoint_file(model_dir, "last")).read() == "epoch-0002.keras"
    assert open(rundir.checkpoint_file(model_dir, "best")).read() == "epoch-0001.keras"
    assert not leftovers(model_dir)


def _train_cli(model_dir, *args, fault=None):
    env = {rundir.FAULT_ENV: fault} if fault else {}
    return run_cli("train", *FAST, "--epochs=4", "--steps_per_epoch=1", "--width_multiplier=0.25",
                   "--notensorboard", "--deterministic", "--augment=cifar", "--mixup_alpha=0.2",
                   f"--model_dir={model_dir}", *args, env=env,
                   check=fault is None, tiny=True)


def _learning_curves(model_dir):
    """metrics.csv without its timings."""
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
            for row in rundir.read_metrics(model_dir)]


def test_resumed_full_pass_epochs_equal_an_uninterrupted_run(tmp_path):
    """Epochs that read the split once (no --steps_per_epoch): resuming after epoch 1 changes nothing."""
    def run(model_dir, epochs, resume=False):
        r = tiny_run(model_dir, epochs=epochs, resume=resume, deterministic=True, mixup_alpha=0.2)
        r = dataclasses.replace(r, data=dataclasses.replace(r.data, augment="cifar", batch_size=256),
                                train=dataclasses.replace(r.train, steps_per_epoch=None))
        train(r)
    run(tmp_path / "whole", 2)
    run(tmp_path / "resumed", 1)
    run(tmp_path / "resumed", 2, resume=True)
    assert _learning_curves(tmp_path / "resumed") == _learning_curves(tmp_path / "whole")


def test_kills_at_each_fault_point_resume_exactly(tmp_path):
    """Item 8 and the fault-injection contract: a kill at each step of the commit sequence, resumed each time.

    Before, a kill after the checkpoint but before state.json repeated an
    epoch's optimizer steps; now each epoch's steps run once (iterations == 4).
    With --deterministic the metrics equal an uninterrupted run's exactly: each
    epoch's batches (order, augmentation, MixUp) depend only on the seed and
    the epoch (`data.TrainingStream`, `training.inputs`). The last resume is
    what a user types after a kill -9: only the run directory and --resume
    (the run's flags.cfg holds the rest), and the run ends completed.
    """
    model_dir = str(tmp_path / "killed")
    for args, fault in [((), "after_checkpoint:2"), (("--resume",), "inside_state:2"),
                        (("--resume",), "after_state:1")]:
        proc = _train_cli(model_dir, *args, fault=fault)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_cli("train", f"--model_dir={model_dir}", "--resume", "--noexport", "--noreport",  # (not run flags)
            tiny=True)
    assert [r["epoch"] for r in rundir.read_metrics(model_dir)] == [1, 2, 3, 4]
    summary = rundir.read_json(os.path.join(model_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["epochs_done"] == 4
    whole = str(tmp_path / "whole")  # (a subprocess too: in-process validation losses differ in the 3rd digit)
    _train_cli(whole)
    assert _learning_curves(model_dir) == _learning_curves(whole)
    for which in ("last", "best"):
        model = keras.saving.load_model(rundir.checkpoint_file(model_dir, which))
        assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)
    last = keras.saving.load_model(rundir.checkpoint_file(model_dir, "last"))
    assert int(last.optimizer.iterations) == 4
    assert not leftovers(model_dir)
    named = {rundir.read_json(os.path.join(model_dir, "checkpoints", "state.json"))[k]
             for k in ("last_checkpoint", "best_checkpoint")}
    assert {os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "checkpoints", "epoch-*"))} == named


def test_without_advisory_locks_the_lock_file_still_refuses_a_live_holder(tmp_path, monkeypatch, capsys):
    """The NFS fallback: one warning; a live holder's file refuses, a dead holder's never blocks."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    model_dir = str(tmp_path / "run")
    os.makedirs(model_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock_file = os.path.join(model_dir, rundir.LOCK_FILE)
    try:
        import socket
        open(lock_file, "w").write(f"host={socket.gethostname()} pid={holder.pid} since=now\n")
        with pytest.raises(rundir.RunLockedError, match=f"PID {holder.pid} on host"):
            rundir.RunLock(model_dir)
        assert "no working file locks" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    rundir.RunLock(model_dir).release()
    assert f"pid={os.getpid()}" in open(lock_file).read()
