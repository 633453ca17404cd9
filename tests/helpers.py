"""Shared helpers for tests that run the entry points as a user would."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny settings that keep an end-to-end run to seconds on 2 cores.
FAST = ["--dataset=digits", "--model=resnet20", "--batch_size=64", "--augment=none", "--verbose=2",
        "--noexport", "--noreport"]


def run_cli(verb, *args, timeout=600, check=True, env=None):
    """Run `python -m pipeline.<verb> args...` in a subprocess; returns CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{verb}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline.{verb} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


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
