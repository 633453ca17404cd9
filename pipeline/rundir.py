"""The run directory: one run, one folder, everything needed to read, resume or repeat it.

Layout (names are the contract other commands rely on):
    flags.cfg       resolved flags; `--flagfile=<run>/flags.cfg` repeats the run
    config.json     the same settings as JSON, for library code (no absl needed)
    labels.txt      class names, one per line, in label order
    metrics.csv     one row per finished epoch (see METRIC_COLUMNS)
    summary.json    status, best epoch, test metrics, precision, device, timing
    tensorboard/    TensorBoard event files
    checkpoints/    epoch-NNNN.keras (model + optimizer), state.json naming the last and best
                    of them, and best.keras / last.keras (links to those two)
    .lock           held (`fcntl.flock`) by the one process writing the run

Every file is written atomically (temp file, then rename) so a crash never
leaves a half-written checkpoint or summary behind. An epoch commits in one
step: its checkpoint is written under its own name first, then state.json is
replaced naming it (`commit_epoch`), so a kill at any instant leaves the
previous epoch or the next, never a mix. Files get the process umask's mode.
A phase that trains a head on cached features commits less often
(`callbacks.RunCheckpoint.defer_commits`); what it commits is the same.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import fcntl
import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid

from pipeline import keras_file

METRIC_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                  "epoch_seconds", "images_per_second")
# --ema_decay / --best_metric (training recipes): validation's macro F1, and the raw (not averaged)
# weights' validation beside the EMA's (empty without EMA).
METRIC_COLUMNS += ("val_macro_f1", "val_loss_raw", "val_accuracy_raw", "val_macro_f1_raw")
# An EMA run's raw weights and step count beside each epoch checkpoint (`training.ema`).
RAW_WEIGHTS_SUFFIX = ".raw.npz"
FLAGS_FILE = "flags.cfg"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.txt"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.keras"
LAST_CHECKPOINT = "last.keras"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
# Every name a run directory holds before its first committed epoch (a fresh start may reuse it).
RUN_ENTRIES = {FLAGS_FILE, CONFIG_FILE, LABELS_FILE, METRICS_FILE, SUMMARY_FILE, TENSORBOARD_DIR,
               CHECKPOINT_DIR, LOCK_FILE}
# Environment variable naming a fault point (`name` or `name:N`, the N-th pass) where the process
# SIGKILLs itself: how the tests prove that a kill at any step of a commit resumes exactly.
FAULT_ENV = "PIPELINE_FAULT"
_fault_hits: dict = {}
CHECKPOINTS = {"best": BEST_CHECKPOINT, "last": LAST_CHECKPOINT}
# How each epoch metric ranks epochs ("max": higher is better).
METRIC_MODES = {"val_accuracy": "max", "val_loss": "min", "accuracy": "max", "loss": "min",
                "val_macro_f1": "max"}


class RunDirError(ValueError):
    """A run directory is missing, incomplete, or would be overwritten."""


def slug(text: str) -> str:
    """`text` safe as one path component: runs of other characters than [A-Za-z0-9_.-] become `_`,
    and leading/trailing `_` and `.` go (no hidden names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.")


def run_name(model: str, dataset: str) -> str:
    """`<model>-<dataset>` as a slug; an image folder counts by its folder name (`folder-<name>`)."""
    if dataset.startswith("folder:"):
        dataset = "folder-" + os.path.basename(os.path.normpath(dataset[len("folder:"):]))
    return slug(f"{model}-{dataset}")


def default_model_dir(model: str, dataset: str, now: datetime.datetime | None = None,
                      root: str = "runs") -> str:
    """`runs/<model>-<dataset>-<YYYYmmdd-HHMMSS>` (see `run_name`)."""
    now = now or datetime.datetime.now()
    return os.path.join(root, f"{run_name(model, dataset)}-{now:%Y%m%d-%H%M%S}")


def path(model_dir: str, *parts: str) -> str:
    return os.path.join(model_dir, *parts)


def checkpoint_file(model_dir: str, which: str = "best") -> str:
    """Where a run keeps its `best` or `last` `.keras` checkpoint (whether or not it exists yet)."""
    if which not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    return os.path.join(model_dir, CHECKPOINT_DIR, CHECKPOINTS[which])


def require_checkpoint(model_dir: str, which: str = "best") -> str:
    """The run's `best`/`last` checkpoint file; RunDirError if the run or the file is missing."""
    checkpoint_file(model_dir, which)  # checks `which`
    filename = committed_checkpoint(model_dir, which)
    if not os.path.isdir(model_dir):
        raise RunDirError(f"Run directory {model_dir!r} does not exist.")
    if not os.path.isfile(filename):
        raise RunDirError(f"{model_dir!r} has no {which} checkpoint ({filename} is missing): "
                          "not a run directory, or its training finished no epoch.")
    return filename


def improves(value: float, best: float | None, metric: str) -> bool:
    """Whether an epoch's `metric` value beats the best so far; a tie does (the later epoch wins)."""
    if best is None:
        return True
    return value >= best if METRIC_MODES[metric] == "max" else value <= best


def best_row(rows, metric: str) -> dict | None:
    """The epoch row (metrics.csv) best by `metric`, ties to the later epoch; None if no row has it."""
    best = None
    for row in rows:
        if row.get(metric) is not None and (best is None or improves(row[metric], best[metric], metric)):
            best = row
    return best


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def fault_point(name: str) -> None:
    """SIGKILL this process here if `$PIPELINE_FAULT` names this point (fault-injection tests only).

    `PIPELINE_FAULT` is a comma list of `<point>` (the first pass) or
    `<point>:N` (the N-th pass); the points are the named steps of the run
    directory's commit sequence and of an export's publication.
    """
    for entry in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        point, _, nth = entry.partition(":")
        if point != name:
            continue
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _tmp_name(filename: str) -> str:
    directory = os.path.dirname(filename) or "."
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{os.path.basename(filename)}")


def _disk_full(err: OSError, filename: str) -> OSError:
    """ENOSPC naming the file being written (`errno` kept: callers tell it from other faults)."""
    return OSError(errno.ENOSPC, "disk full while writing", filename)


def write_text_atomic(filename: str, text: str, *, fault: str | None = None) -> None:
    """Write `text` so readers see the old file or the new one, never a mix.

    The file gets the process umask's mode (like every other tool), not mkstemp's 0600.
    `fault` names the fault point between the temp file's write and its rename.
    """
    def write(tmp):
        with open(tmp, "x", encoding="utf-8") as f:  # created 0666 & ~umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(fault)
    replace_atomic(filename, write)


def write_json_atomic(filename: str, data: dict, *, fault: str | None = None) -> None:
    write_text_atomic(filename, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", fault=fault)


def read_json(filename: str, default=None):
    try:
        with open(filename, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def replace_atomic(filename: str, write) -> None:
    """`write(tmp)` a temp file beside `filename` (same extension), then rename it over `filename`.

    A reader sees the old file or the whole new one, never a part; a failed
    `write` leaves no temp file behind.
    """
    os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)
    tmp = _tmp_name(filename)
    try:
        write(tmp)
        os.replace(tmp, filename)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            raise _disk_full(e, filename) from e
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_model_atomic(model, filename: str) -> None:
    """`model.save` into a temp file beside `filename`, then rename over it (weights streamed via disk)."""
    replace_atomic(filename, lambda tmp: keras_file.save_keras(model, tmp))


def copy_atomic(source: str, filename: str) -> None:
    """Copy `source` to a temp file beside `filename`, then rename over it."""
    replace_atomic(filename, lambda tmp: shutil.copyfile(source, tmp))


class RunLockedError(RunDirError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive `fcntl.flock` on `<model_dir>/.lock`, held while this process writes the run.

    The OS releases it when the process dies (even by SIGKILL), so a stale lock
    never blocks. The file names the holder (host, PID) for the message of a
    second process. Where the storage has no working advisory locks (some NFS
    mounts) a warning says so and the file alone is the lock: it holds back a
    second process while its holder's PID lives (same host) or its heartbeat
    (the file's mtime, touched at every commit) is younger than STALE_SECONDS.
    """

    STALE_SECONDS = 3600.0

    def __init__(self, model_dir: str):
        self.filename = path(model_dir, LOCK_FILE)
        self._fd = os.open(self.filename, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(model_dir)
        except OSError as e:  # ENOLCK, EOPNOTSUPP: no advisory locks on this storage
            print(f"warning: {model_dir!r} has no working file locks ({os.strerror(e.errno)}); "
                  f"falling back to {self.filename} holding host, PID and a heartbeat.",
                  file=sys.stderr, flush=True)
            if self._held_elsewhere():
                self._refuse(model_dir)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host={socket.gethostname()} pid={os.getpid()} "
                            f"since={datetime.datetime.now():%Y-%m-%dT%H:%M:%S}\n".encode(), 0)

    def _fields(self) -> dict:
        text = os.pread(self._fd, 400, 0).decode(errors="replace")
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def _refuse(self, model_dir: str):
        fields = self._fields()
        os.close(self._fd)
        raise RunLockedError(f"Run directory {model_dir!r} is in use by PID {fields.get('pid', '?')} on host "
                             f"{fields.get('host', '?')}: wait for it to finish or choose another --model_dir.")

    def _held_elsewhere(self) -> bool:
        """Fallback lock: whether the file names another live holder (a stale one never blocks)."""
        fields = self._fields()
        if "pid" not in fields or fields["pid"] == str(os.getpid()):
            return False
        if fields.get("host") == socket.gethostname():
            return fields["pid"].isdigit() and process_alive(int(fields["pid"]))
        return time.time() - os.fstat(self._fd).st_mtime < self.STALE_SECONDS

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def prepare(model_dir: str, *, resume: bool, config: dict | None = None, lock: bool = True):
    """Create a new run directory, or check that a resumable one exists; take its lock.

    A fresh start may reuse a directory whose run committed no epoch (a start
    that failed before its first epoch ended): its files are removed. With the
    lock held, leftovers of killed writes are removed (their writer is gone).

    Args:
      model_dir: the run directory.
      resume: continue the run (it must have a committed epoch).
      config: on resume, this run's `config.to_dict`: its model and dataset
        must be the run's (`config.json`), checked before anything is written.
      lock: take the run's lock (False in the non-chief tasks of a
        multi-worker job, which only read the run directory).

    Returns:
      The held RunLock (release it when the run ends), or None if `lock` is False.

    Raises:
      RunDirError: `model_dir` is not a directory, a new run would reuse a
        directory holding a committed epoch or other files, `resume` names a
        directory without a committed epoch or with another model or dataset.
      RunLockedError: another process holds the lock.
    """
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise RunDirError(f"--model_dir={model_dir} is a file, not a directory: choose another --model_dir.")
    state = path(model_dir, CHECKPOINT_DIR, STATE_FILE)
    if resume and not os.path.exists(state):
        raise RunDirError(
            f"Cannot resume {model_dir!r}: it has no finished epoch ({state} is missing); "
            "start it again without --resume.")
    if resume:
        check_same_run(model_dir, config)
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"Cannot create --model_dir={model_dir}: {os.strerror(e.errno)}.") from None
    held = RunLock(model_dir) if lock else None
    try:
        if not resume:
            _clear_uncommitted(model_dir)
        if lock:
            remove_leftovers(model_dir)
            if resume:
                publish_checkpoints(model_dir, read_json(state))
    except BaseException:
        if held:
            held.release()
        raise
    os.makedirs(path(model_dir, CHECKPOINT_DIR), exist_ok=True)
    return held


def _clear_uncommitted(model_dir: str) -> None:
    """Empty a directory for a fresh start; refuse one holding a committed epoch or foreign files."""
    if os.path.exists(path(model_dir, CHECKPOINT_DIR, STATE_FILE)):
        raise RunDirError(
            f"Run directory {model_dir!r} already holds a run; pass --resume to continue it "
            "or choose another --model_dir.")
    entries = [e for e in os.listdir(model_dir) if not e.startswith(TMP_PREFIX)]
    foreign = sorted(set(entries) - RUN_ENTRIES)
    if foreign:
        raise RunDirError(f"--model_dir={model_dir} holds other files than a run's ({', '.join(foreign[:3])}): "
                          "choose another --model_dir.")
    for entry in set(entries) - {LOCK_FILE}:  # a start that failed before its first epoch ended
        target = path(model_dir, entry)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)


def check_same_run(model_dir: str, config: dict | None) -> None:
    """RunDirError unless `config` (a `config.to_dict`) has the model and dataset of the run's config.json."""
    recorded = read_json(path(model_dir, CONFIG_FILE))
    if config is None or recorded is None:
        return
    config = json.loads(json.dumps(config, default=str))
    changes = [f"--{'model' if key == 'name' else key}={config['model'][key]} "
               f"(the run has {recorded['model'].get(key)})"
               for key in sorted(config.get("model", {}))
               if key in recorded.get("model", {}) and config["model"][key] != recorded["model"][key]]
    if config.get("data", {}).get("dataset") != recorded.get("data", {}).get("dataset"):
        changes.append(f"--dataset={config['data']['dataset']} (the run has {recorded['data']['dataset']})")
    if changes:
        raise RunDirError(f"Cannot resume {model_dir!r} with {', '.join(changes)}: resume without them, "
                          "or start a new run in another --model_dir.")


def remove_leftovers(model_dir: str) -> None:
    """Remove temp files of killed writes and epoch checkpoints no committed state names (hold the lock)."""
    state = read_json(path(model_dir, CHECKPOINT_DIR, STATE_FILE)) or {}
    named = {state.get("last_checkpoint"), state.get("best_checkpoint")}
    for pattern in (TMP_PREFIX + "*", os.path.join(CHECKPOINT_DIR, TMP_PREFIX + "*"),
                    os.path.join(CHECKPOINT_DIR, "epoch-*.keras"),
                    os.path.join(CHECKPOINT_DIR, "epoch-*.keras" + RAW_WEIGHTS_SUFFIX)):
        for leftover in glob.glob(path(glob.escape(model_dir), pattern)):
            if os.path.basename(leftover).removesuffix(RAW_WEIGHTS_SUFFIX) not in named:
                with contextlib.suppress(OSError):
                    shutil.rmtree(leftover) if os.path.isdir(leftover) else os.remove(leftover)


def epoch_checkpoint(model_dir: str, epoch: int) -> str:
    """Where epoch `epoch`'s checkpoint is written before a commit names it."""
    return path(model_dir, CHECKPOINT_DIR, f"epoch-{epoch:04d}.keras")


def commit_epoch(model_dir: str, state: dict) -> None:
    """The commit point: replace state.json (naming the epoch's checkpoints), then refresh the links."""
    write_json_atomic(path(model_dir, CHECKPOINT_DIR, STATE_FILE), state, fault="inside_state")
    fault_point("after_state")
    with contextlib.suppress(FileNotFoundError):
        os.utime(path(model_dir, LOCK_FILE))  # the fallback lock's heartbeat (RunLock)
    publish_checkpoints(model_dir, state)


def publish_checkpoints(model_dir: str, state: dict | None) -> None:
    """best.keras / last.keras as links to the checkpoints `state` names; drop the unnamed epochs."""
    state = state or {}
    for which in CHECKPOINTS:
        name = state.get(f"{which}_checkpoint")
        source = path(model_dir, CHECKPOINT_DIR, name) if name else None
        if source and os.path.exists(source):
            replace_atomic(checkpoint_file(model_dir, which), lambda tmp, src=source: _link_or_copy(src, tmp))
    if state.get("last_checkpoint"):
        remove_leftovers(model_dir)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links on this storage
        shutil.copyfile(source, target)


def committed_checkpoint(model_dir: str, which: str = "best") -> str:
    """The `best`/`last` checkpoint the committed state.json names (`best.keras`/`last.keras` for older runs)."""
    state = read_json(path(model_dir, CHECKPOINT_DIR, STATE_FILE)) or {}
    name = state.get(f"{which}_checkpoint")
    if name and os.path.isfile(path(model_dir, CHECKPOINT_DIR, name)):
        return path(model_dir, CHECKPOINT_DIR, name)
    return checkpoint_file(model_dir, which)


def resume_command(model_dir: str, flags_text: str = "") -> str:
    """The command that continues the run (its verb is read from its flags.cfg text)."""
    verb = re.search(r"python -m pipeline\.(\w+)", flags_text or "")
    return f"python -m pipeline.{verb.group(1) if verb else 'train'} --model_dir={model_dir} --resume"


def read_metrics(model_dir: str) -> list[dict]:
    """Rows of metrics.csv as dicts of floats (epoch as int); [] if absent."""

    rows = []
    try:
        with open(path(model_dir, METRICS_FILE), newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows.append({k: (int(float(v)) if k == "epoch" else float(v)) if v not in ("", None)
                             else None for k, v in row.items()})
    except FileNotFoundError:
        pass
    return rows


def read_labels(model_dir: str) -> list[str]:
    with open(path(model_dir, LABELS_FILE), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def write_evaluation(model_dir: str, split: str, result: dict) -> None:
    """`evaluation_<split>.json` and `confusion_<split>.csv` (rows: true class, columns: predicted).

    Written by `pipeline.evaluate` and by reports, read back by reports.
    """
    names = result["class_names"]
    rows = [["true\\predicted", *names]] + [[n, *map(str, row)] for n, row in zip(names, result["confusion"])]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)  # quotes (and doubles quotes) where needed
    write_text_atomic(path(model_dir, f"confusion_{split}.csv"), text.getvalue())
    write_json_atomic(path(model_dir, f"evaluation_{split}.json"),
                      {k: v for k, v in result.items() if k != "confusion"})
