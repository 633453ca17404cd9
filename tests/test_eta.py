"""The run's clock: a whole-run estimate, the over-an-hour warning on CPU-only machines, the budget stop.

The callback is driven with a fake clock the way the loop drives it (the
hooks `fit` calls), so a 4,000-step BiT-like run at 1.05 s per step is a
forced slow estimate without waiting for it; a real short digits run checks
that the estimate is within a factor of 2 of the run's actual wall time.
"""
import json
import os
import types

import pytest

from pipeline.training import budget, eta

SLOW = budget.RunShape(total_steps=4000, steps_per_epoch=100, val_steps=10, test_steps=10, resolution=480)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _drive(clock, shape, *, step_seconds, steps, deadline=None, gpu=False, val_seconds=None):
    lines = []
    timer = eta.RunClock(shape, wall_start=clock.now - 30, deadline=deadline, gpu=gpu, clock=clock,
                         out=lines.append)
    model = types.SimpleNamespace(stop_training=False)
    timer.set_model(model)
    timer.on_train_begin()
    logs = None
    for step in range(steps):
        epoch, batch = divmod(step, shape.steps_per_epoch)
        if batch == 0:
            timer.on_epoch_begin(epoch)
        timer.on_train_batch_begin(batch)
        clock.now += step_seconds * (5 if step == 0 else 1)  # the first step traces
        timer.on_train_batch_end(batch, {})
        if batch == shape.steps_per_epoch - 1 or model.stop_training:
            timer.on_test_begin()
            clock.now += val_seconds if val_seconds is not None else step_seconds * shape.val_steps / 3
            timer.on_test_end()
            logs = {"loss": 1.0}
            timer.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
    timer.on_train_end()
    return timer, lines, model, logs


def test_a_slow_cpu_estimate_warns_once_with_cheaper_alternatives():
    timer, lines, model, _ = _drive(FakeClock(), SLOW, step_seconds=1.05, steps=12)
    estimate = [line for line in lines if line.startswith("estimated run time")]
    assert len(estimate) == 1 and "4000 steps x 1.05 s" in estimate[0]
    n = eta.WARM_STEPS + eta.TIMED_STEPS  # the estimate comes after these steps; the first one traced (5 x)
    expected = 30 + (5 + n - 1) * 1.05 + (4000 - n) * 1.05 + 40 * 10 * 1.05 / 3 + 10 * 1.05 / 3
    assert timer.estimate == pytest.approx(expected, rel=0.01)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "without a GPU" in warnings[0] and "Continuing" in warnings[0]
    # 224 and 128 px (step time scaled by pixels), and the steps that fit in an hour
    assert "--image_size=224" in warnings[0] and "--image_size=128" in warnings[0]
    steps = budget.most_steps(3600 - 30 - (5 + n - 1) * 1.05, 1.05, SLOW)
    assert f"--total_steps={steps} (~" in warnings[0]
    assert not model.stop_training  # a warning, not a stop
    options = eta.alternatives(1.05, SLOW)
    assert [flags for flags, _ in options][:2] == ["--image_size=224", "--image_size=128"]
    assert options[2][0].startswith("--total_steps=")
    assert options[1][1] < options[0][1] < timer.estimate


def test_no_warning_with_a_gpu_or_under_an_hour():
    _, lines, _, _ = _drive(FakeClock(), SLOW, step_seconds=1.05, steps=12, gpu=True)
    assert not [line for line in lines if line.startswith("warning:")]
    short = budget.RunShape(total_steps=200, steps_per_epoch=100, val_steps=2)
    timer, lines, _, _ = _drive(FakeClock(), short, step_seconds=1.05, steps=12)
    assert len(lines) == 1 and lines[0].startswith(f"estimated run time: {budget.format_duration(timer.estimate)} (")
    assert 200 < timer.estimate < 3600


def test_every_epoch_carries_the_runs_eta():
    shape = budget.RunShape(total_steps=30, steps_per_epoch=10, val_steps=3)
    timer, _, _, logs = _drive(FakeClock(), shape, step_seconds=2.0, steps=20, val_seconds=1.5)
    # after epoch 2 of 3: 10 steps x 2 s + one validation (1.5 s measured) + the overhead measured between epochs
    assert logs["eta_seconds"] == pytest.approx(10 * 2.0 + 1.5, abs=0.2)
    assert timer.summary()["training_seconds"] > 0 and timer.summary()["step_seconds"] == pytest.approx(2.0)


def test_the_deadline_stops_after_a_finished_epoch_and_says_budget_exhausted():
    clock = FakeClock()
    shape = budget.RunShape(total_steps=1000, steps_per_epoch=50, val_steps=5, test_steps=5)
    timer, lines, model, logs = _drive(clock, shape, step_seconds=1.0, steps=1000, deadline=clock.now + 100)
    assert model.stop_training and timer.exhausted and logs is not None  # the epoch ended: RunCheckpoint commits
    assert timer.status("completed") == "budget_exhausted" and timer.status("diverged") == "diverged"
    assert clock.now <= 1000.0 + 100  # validation included, the test evaluation (5 x 1/3 s) still fits
    assert any(line.startswith("time budget:") for line in lines)
    assert timer.summary()["budget_exhausted"] is True


def test_a_search_stops_starting_trials_when_the_rest_cannot_hold_one():
    clock, stopped = FakeClock(), []
    search = eta.SearchBudget(clock.now + 250, lambda left, needed: stopped.append((left, needed)), clock=clock)
    for _ in range(3):
        search.on_train_begin()
        clock.now += 100
        search.on_train_end()
    assert stopped and stopped[0] == (50, 100)  # after trial 2: 50 s left, a trial takes 100 s


def test_a_short_digits_runs_estimate_is_within_a_factor_of_2_of_its_wall_time(digits_run):
    summary = json.load(open(os.path.join(digits_run["model_dir"], "summary.json")))
    timing = summary["time"]
    assert "estimated run time:" in digits_run["stdout"]
    ratio = timing["estimated_seconds"] / summary["wall_seconds"]
    assert 0.5 <= ratio <= 2.0, (timing, summary["wall_seconds"])
    assert "eta_seconds" in digits_run["stdout"] and timing["training_seconds"] <= summary["wall_seconds"]
