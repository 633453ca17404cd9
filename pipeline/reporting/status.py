"""Whether a run finished, diverged, is still training, or was interrupted (read, never guessed).

Unfinished runs are reported, not refused: summary status "running" with no
live process on this machine (no process holds a file of the run open, and no
`pipeline.train|finetune|tune` process names it on its command line) reads
"interrupted after epoch N".
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Optional, Sequence

from pipeline import rundir

STATE_PATH = (rundir.CHECKPOINT_DIR, rundir.STATE_FILE)
TRAINING_VERBS = ("train", "finetune", "tune")


def mtime(filename: str) -> Optional[float]:
    """When `filename` last changed (seconds since the epoch); None if it does not exist."""
    try:
        return os.path.getmtime(filename)
    except OSError:
        return None


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


@dataclasses.dataclass
class RunStatus:
    kind: str                  # completed | diverged | running | interrupted
    epochs_done: int
    text: str                  # one sentence for people
    live_pids: tuple = ()


def _proc_ancestors() -> set:
    """This process and its parents: they hold the run's files open to report on it, not to write."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _names_run(argv: Sequence[str], cwd: str, run: str) -> bool:
    """Whether a training command line (`pipeline.train|finetune|tune`) writes into `run`."""
    verbs = "|".join(TRAINING_VERBS)
    if not any(re.search(rf"pipeline[./]({verbs})(\.py)?$", a) for a in argv[:3]):
        return False
    for arg in argv:
        match = re.fullmatch(r"--(model_dir|tune_dir)=(.+)", arg)
        if not match:
            continue
        target = os.path.realpath(os.path.join(cwd, os.path.expanduser(match[2])))
        if target == run or (match[1] == "tune_dir" and run.startswith(target + os.sep)):
            return True
    return False


def live_writers(model_dir: str) -> list[int]:
    """PIDs of processes on this machine that hold a file of the run open or train into it.

    Linux only (/proc); [] elsewhere. A process on another machine writing to a
    shared file system cannot be seen.
    """
    run = os.path.realpath(model_dir)
    if not os.path.isdir("/proc"):
        return []
    skip = _proc_ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        base = f"/proc/{entry}"
        try:
            with open(f"{base}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            cwd = os.readlink(f"{base}/cwd")
        except OSError:
            continue
        if argv and _names_run(argv, cwd, run):
            found.append(int(entry))
            continue
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{base}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(run + os.sep):
                found.append(int(entry))
                break
    return found


def read_state(model_dir: str) -> dict:
    """checkpoints/state.json (epochs done, best epoch and value), {} before the first epoch."""
    return rundir.read_json(rundir.path(model_dir, *STATE_PATH), {}) or {}


def run_status(model_dir: str, summary: Optional[dict] = None,
               metrics: Optional[list] = None) -> RunStatus:
    """Completed, diverged, still running, or interrupted after epoch N (never raises)."""
    summary = summary if summary is not None else (
        rundir.read_json(rundir.path(model_dir, rundir.SUMMARY_FILE), {}) or {})
    metrics = metrics if metrics is not None else rundir.read_metrics(model_dir)
    state = read_state(model_dir)
    done = max([int(state.get("epochs_done") or 0), int(summary.get("epochs_done") or 0)]
               + [r["epoch"] for r in metrics if r.get("epoch") is not None])
    status = summary.get("status")
    if status == "completed":
        return RunStatus("completed", done, f"completed: {done} epoch{'s' * (done != 1)} trained.")
    if status == "budget_exhausted":  # --time_budget stopped it after a committed epoch (pipeline.training.eta)
        return RunStatus("completed", done, f"stopped by its time budget after epoch {done} (a finished "
                         f"checkpoint); --resume --model_dir={model_dir} trains the rest.")
    if status == "diverged":
        return RunStatus("diverged", done, f"diverged: the loss became NaN or infinite in epoch "
                         f"{done + 1}; training stopped after epoch {done}, the best checkpoint is kept.")
    last = max(filter(None, (mtime(rundir.path(model_dir, rundir.METRICS_FILE)),
                             mtime(rundir.path(model_dir, rundir.SUMMARY_FILE)))), default=None)
    pids = tuple(live_writers(model_dir))
    so_far = (f"{done} epoch{'s' * (done != 1)} finished so far" if done
              else "no epoch finished yet")
    if pids:
        return RunStatus("running", done, f"still running (process {', '.join(map(str, pids))}): "
                         f"{so_far}; last update {_when(last)}.", pids)
    why = "no summary.json" if not summary else f"summary status {status!r}"
    if done:
        text = f"interrupted after epoch {done} ({why}, no live process; last update {_when(last)})."
    else:
        text = f"interrupted before finishing its first epoch ({why}, no live process)."
    return RunStatus("interrupted", done, text + f" Resume it with --resume --model_dir={model_dir}.")
