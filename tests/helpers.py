"""Shared helpers for tests that run the entry points as a user would."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny settings that keep an end-to-end run to seconds on 2 cores.
FAST = ["--dataset=digits", "--model=resnet20", "--batch_size=64", "--augment=none", "--verbose=2",
        "--noexport", "--noreport"]


def run_cli(verb, *args, timeout=600, check=True, env=None, tiny=False):
    """Run `python -m pipeline.<verb> args...` in a subprocess; returns CompletedProcess.

    `tiny=True`: the same command with every model the trainer builds replaced by
    `tiny_model` (see `cli_command`).
    """
    proc = subprocess.run(cli_command(verb, *args, tiny=tiny), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline.{verb} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


# `python -m pipeline.<verb>` with `use_tiny_model()` applied first: the verb's own main, flags and
# `__main__` block, run by runpy as `-m` would.
_TINY_MAIN = """
import runpy, sys
from tests.helpers import use_tiny_model
use_tiny_model()
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def cli_command(verb, *args, tiny=False):
    """The argv of `python -m pipeline.<verb> args...`; with `tiny`, through `use_tiny_model` first.

    Why `tiny`: a process's fixed cost is mostly tracing the model's train and test
    steps (resnet20: ~10 s, a quarter width too); a conv-BN-pool net traces in about
    a second. Tests whose claim is a run's machinery (kills and resumes, clusters,
    searches), not an architecture, pass it; the run's config still names its model.
    """
    if not tiny:
        return [sys.executable, "-m", f"pipeline.{verb}", *args]
    return [sys.executable, "-c", _TINY_MAIN, f"pipeline.{verb}", *args]


def tiny_model(num_classes=10, image_size=32, normalization=None, name="tiny"):
    """Normalize, conv, BatchNorm, ReLU, pooling, logits: what the trainer needs of a model.

    The registry models' contract, small: float32 [0, 1] images in (the model owns its
    normalization), float32 logits out (under mixed precision too), the "pool" and
    "logits" layers that fine-tuning and the feature cache look up; weights, BatchNorm
    statistics and optimizer state to checkpoint and resume.
    """
    import keras

    from pipeline.models.layers import Normalize

    mean, std = normalization or (None, None)
    inp = keras.Input((image_size, image_size, 3))
    x = Normalize(mean, std, name="normalize")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem_conv")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inp, out, name=name)


def use_tiny_model():
    """Make `trainer.build_model` (every run's and every tuner trial's model) build `tiny_model`.

    For this process only: the CLI subprocesses of `run_cli(..., tiny=True)`; in a test,
    `monkeypatch.setattr(trainer, "build_model", tiny_build_model)` instead. Nothing else
    changes: flags, config.json and flags.cfg still name the run's model, and a resume
    builds the same tiny model to load its checkpoint into.
    """
    from pipeline.training import trainer
    trainer.build_model = tiny_build_model


def tiny_build_model(run, datasets):
    """`trainer.build_model`'s signature and inputs (classes, size, statistics), `tiny_model`'s net."""
    return tiny_model(len(datasets.class_names), datasets.image_size, (datasets.mean, datasets.std))


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def free_ports(n):
    """`n` distinct localhost ports free right now (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def make_image_folder(root, classes=("red", "green", "blue"), per_class=12, size=32, seed=0):
    """Write a small class-per-subfolder PNG dataset whose classes are learnable (by colour)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            image = rng.randint(0, 60, (size, size, 3)).astype("uint8")
            image[..., c % 3] += 180
            Image.fromarray(image).save(os.path.join(root, name, f"{i}.png"))
    return str(root)


def shared_across_workers(tmp_path_factory, name, make):
    """`make(directory)` once per pytest session, even with xdist's several worker processes.

    Why: a session fixture is per process, so with `-n 2` both workers trained the same
    expensive run. The first worker to ask makes it under the session's own temp dir (the
    workers' common parent) while holding a lock; the other waits, then reads what it made.
    `make` returns something JSON-serializable, which every caller gets.
    """
    import fcntl
    import json
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's, never older ones
    directory, done = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a failed earlier attempt's leftovers
            done.write_text(json.dumps(make(str(directory))))
        return json.loads(done.read_text())
