"""The whole run's clock: an estimate after the first timed steps, a run ETA per epoch, a budget's stop.

Why: Keras's progress bar only gives the current epoch's ETA, so a run that
will take 70 hours on a CPU says nothing until the user has waited. `RunClock`
(one per training, added by the trainer) times a few steps once the trace and
the first batches are behind it, then prints the estimated wall time of the
whole run (start-up so far + the remaining steps x the measured step time +
validation + the test evaluation), warns in one line on a machine without a
GPU when that is over an hour (with the cheapest alternatives, from
`alternatives`), and puts `eta_seconds` (the run's remaining time) into every
epoch's logs, so each epoch line and metrics consumer shows it.

With `TrainConfig.time_budget` it also stops the run when what is left of the
budget (counted from the process start, `budget.process_start_time`) holds no
more than the validation, checkpoint and test evaluation still to come: the
loop then finishes the epoch's validation and RunCheckpoint commits it, so the
run ends with a finished checkpoint and the status `budget_exhausted`.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import keras

from pipeline.durations import format_duration
from pipeline.training import budget as budget_lib
from pipeline.training.budget import RunShape

WARM_STEPS = 3     # steps not timed: the trace, and batches tf.data prefetched during it
TIMED_STEPS = 5    # steps timed before the whole-run estimate is printed (their mean: input stalls count)
HOUR = 3600.0
SAFETY = 1.1       # the reserve kept for validation, checkpoint and test is 10% larger than measured


def alternatives(step_seconds: float, shape: RunShape, *, fixed_seconds: float = 0.0,
                 limit: float = HOUR, ladder: Sequence[int] = budget_lib.LADDER) -> list[tuple[str, float]]:
    """Two or three cheaper runs as (flags, estimated seconds), cheapest last.

    Smaller resolutions of the HyperRule's ladder (the step time scaled by the
    pixel count: `budget.scaled_step_seconds`): 224, the usual ImageNet size, and
    the smallest; then the `--total_steps` that fit in `limit` at this resolution.
    """
    out = []
    if shape.resolution:
        smaller = [r for r in ladder if r < shape.resolution]
        picks = sorted({r for r in (max([r for r in smaller if r <= 224], default=None),
                                    min(smaller, default=None)) if r}, reverse=True)
        for r in picks:
            seconds = budget_lib.scaled_step_seconds(step_seconds, shape.resolution, r)
            out.append((f"--image_size={r}", fixed_seconds + budget_lib.run_seconds(
                shape.total_steps, seconds, shape)))
    steps = budget_lib.most_steps(limit - fixed_seconds, step_seconds, shape)
    if 0 < steps < shape.total_steps:
        out.append((f"--total_steps={steps}", fixed_seconds + budget_lib.run_seconds(
            steps, step_seconds, shape)))
    return out[:3]


def slow_warning(estimate: float, options: list[tuple[str, float]]) -> str:
    """The one line said when a CPU-only run is estimated at over an hour (the run continues)."""
    cheaper = "; ".join(f"{flags} (~{format_duration(s)})" for flags, s in options)
    return (f"warning: this run is estimated at {format_duration(estimate)} on a machine without a GPU"
            + (f"; cheaper: {cheaper}" if cheaper else "")
            + "; or let --time_budget=<minutes|30m|2h> choose. Continuing.")


def has_gpu() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


class RunClock(keras.callbacks.Callback):
    """Times the run, prints its estimate and warning, adds `eta_seconds`, enforces a deadline.

    Args:
      shape: the run's steps (`RunShape`).
      wall_start: when the run (or, with a budget, the process) started, on `clock`'s scale.
      deadline: stop by this time (`clock` scale), or None.
      gpu: whether a GPU trains (None: ask TensorFlow); the warning is for CPU-only machines.
      clock, out: time source and printer (tests pass fakes).
    """

    def __init__(self, shape: RunShape, *, wall_start: float, deadline: Optional[float] = None,
                 gpu: Optional[bool] = None, budget_seconds: Optional[float] = None, plan: str = "",
                 clock: Callable[[], float] = time.time,
                 out: Callable[[str], None] = lambda line: print(line, flush=True)):
        super().__init__()
        self.shape, self.wall_start, self.deadline = shape, wall_start, deadline
        self._gpu, self.clock, self.out = gpu, clock, out
        self.budget_seconds, self.plan = budget_seconds, plan
        self.step_seconds: Optional[float] = None
        self.estimate: Optional[float] = None
        self.estimated_after: Optional[int] = None
        self.exhausted = False
        self.warning: Optional[str] = None
        self._durations: list[float] = []
        self._seen = 0
        self._epoch = self._in_epoch = 0
        self._batch_start = self._epoch_end = self._val_start = None
        self._val_seconds: Optional[float] = None
        self._overhead = 0.0  # checkpoint, metrics and logging after an epoch
        self._train_begin = None
        self.training_seconds: Optional[float] = None

    # ------------------------------------------------------------------ estimates

    def _eval_seconds(self, steps: int) -> float:
        return steps * (self.step_seconds or 0.0) * budget_lib.EVAL_TO_TRAIN

    def remaining(self, steps_done: int, epochs_finished: int) -> float:
        """Seconds still to come after `steps_done` steps (validation, checkpoints, test included)."""
        s = self.shape
        left = max(0, s.total_steps - steps_done)
        epochs_left = max(0, math.ceil(s.total_steps / s.steps_per_epoch) - epochs_finished)
        val = self._val_seconds if self._val_seconds is not None else self._eval_seconds(s.val_steps)
        return (left * (self.step_seconds or 0.0) + epochs_left * (val + self._overhead)
                + self._eval_seconds(s.test_steps))

    def _reserve(self) -> float:
        """What must stay in the budget for this epoch's validation, its checkpoint and the test."""
        val = self._val_seconds if self._val_seconds is not None else 2 * self._eval_seconds(self.shape.val_steps)
        return SAFETY * (val + self._overhead + self._eval_seconds(self.shape.test_steps)) + (self.step_seconds or 0)

    def _estimate_now(self, steps_done: int):
        self.step_seconds = sum(self._durations) / len(self._durations)
        now = self.clock()
        self.estimate = now - self.wall_start + self.remaining(steps_done, self._epoch)
        self.estimated_after = steps_done
        s = self.shape
        val = f" + validation {format_duration(self._eval_seconds(s.val_steps))} per epoch" if s.val_steps else ""
        self.out(f"estimated run time: {format_duration(self.estimate)} ({s.total_steps} steps x "
                 f"{self.step_seconds:.3g} s{val}; {format_duration(now - self.wall_start)} so far)")
        gpu = has_gpu() if self._gpu is None else self._gpu
        if not gpu and self.estimate > HOUR:
            fixed = now - self.wall_start
            self.warning = slow_warning(self.estimate, alternatives(self.step_seconds, s, fixed_seconds=fixed))
            self.out(self.warning)

    # ------------------------------------------------------------------ Keras hooks

    def begin(self) -> None:
        """Start the training clock (once): the trainer calls it before the first phase compiles, so that
        what precedes the first step (a feature cache's pass over the data, a resume's restore) counts."""
        if self._train_begin is None:
            self._train_begin = self.clock()

    def on_train_begin(self, logs=None):
        self.begin()

    def on_epoch_begin(self, epoch, logs=None):
        now = self.clock()
        if self._epoch_end is not None:
            self._overhead = now - self._epoch_end
        self._epoch, self._epoch_end, self._val_start, self._in_epoch = epoch, None, None, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        steps, self._in_epoch = batch + 1 - self._in_epoch, batch + 1  # an execution may run several
        done = self._epoch * self.shape.steps_per_epoch + batch + 1
        self._seen += 1
        if self._seen > WARM_STEPS and self._batch_start is not None and self.estimate is None:
            self._durations.append((now - self._batch_start) / max(1, steps))
            if len(self._durations) == TIMED_STEPS or done >= self.shape.total_steps:
                self._estimate_now(done)
        if (self.deadline is not None and self.step_seconds is not None and done < self.shape.total_steps
                and now + self._reserve() > self.deadline):
            self._stop()

    def on_test_begin(self, logs=None):
        self._val_start = self.clock()

    def on_test_end(self, logs=None):
        if self._val_start is not None:
            self._val_seconds = self.clock() - self._val_start

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        self._epoch_end = now
        done = (epoch + 1) * self.shape.steps_per_epoch
        if logs is not None and self.step_seconds is not None:
            logs["eta_seconds"] = round(self.remaining(done, epoch + 1), 1)
        if (self.deadline is not None and self.step_seconds is not None and done < self.shape.total_steps
                and now + self._reserve() > self.deadline):
            self._stop()

    def on_train_end(self, logs=None):
        if self._train_begin is not None:
            self.training_seconds = self.clock() - self._train_begin

    def _stop(self):
        if not self.exhausted:
            self.out(f"time budget: {format_duration(max(0.0, self.deadline - self.clock()))} left, which "
                     "the validation, checkpoint and test still to come need: stopping after this epoch")
        self.exhausted = True
        self.model.stop_training = True

    # ------------------------------------------------------------------ results

    def status(self, status: str) -> str:
        """The run's status: `budget_exhausted` for a completed run the deadline stopped."""
        return "budget_exhausted" if self.exhausted and status == "completed" else status

    def summary(self) -> dict:
        """summary.json's timing fields: the estimate printed, the step time, the training time."""
        return {"estimated_seconds": None if self.estimate is None else round(self.estimate, 2),
                "estimated_after_steps": self.estimated_after,
                "step_seconds": None if self.step_seconds is None else round(self.step_seconds, 4),
                "training_seconds": None if self.training_seconds is None else round(self.training_seconds, 2),
                "slow_warning": self.warning, "budget_seconds": self.budget_seconds,
                "budget_plan": self.plan or None, "budget_exhausted": self.exhausted}


def clock_for_run(run, budget, datasets, *, wall_start: float) -> RunClock:
    """The trainer's RunClock for `run` (its `phases.StepBudget` and loaded data)."""
    batch = run.data.batch_size
    shape = RunShape(total_steps=budget.epochs * budget.steps_per_epoch, steps_per_epoch=budget.steps_per_epoch,
                     val_steps=math.ceil(datasets.num_val / batch) if datasets.val is not None else 0,
                     test_steps=math.ceil(datasets.num_test / batch) if datasets.test is not None else 0,
                     resolution=datasets.image_size)
    deadline = None
    if run.train.time_budget:
        deadline = budget_lib.process_start_time() + run.train.time_budget
    return RunClock(shape, wall_start=wall_start, deadline=deadline, budget_seconds=run.train.time_budget,
                    plan=run.train.time_budget_plan)


class SearchBudget(keras.callbacks.Callback):
    """A search's time budget: after each trial, stop starting trials when the rest cannot hold one more.

    A trial's cost is its own measured wall time (its clock's estimate when it
    stopped early); `stop_search(left, needed)` is called once the budget left
    is smaller. The running trial itself stops at the deadline (its RunClock,
    from `TrainConfig.time_budget`). Deep-copied per trial like every search
    callback: `stop_search` and `clock` are functions, shared by the copies.
    """

    def __init__(self, deadline: float, stop_search: Callable[[float, float], None],
                 clock: Callable[[], float] = time.time):
        super().__init__()
        self.deadline, self.stop_search, self.clock = deadline, stop_search, clock
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = self.clock()

    def on_train_end(self, logs=None):
        now = self.clock()
        needed = now - (self._start if self._start is not None else now)
        if self.deadline - now < needed:
            self.stop_search(self.deadline - now, needed)
