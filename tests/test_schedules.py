"""Learning-rate schedules and BiT-HyperRule rules (pure functions)."""
import math

import pytest

from pipeline import hyperrule
from pipeline.training import schedules


def lr(step, spec):
    return float(schedules.learning_rate(step, spec))


def test_step_schedule_divides_at_boundaries():
    spec = schedules.from_epochs("step", base_lr=0.1, epochs=182, steps_per_epoch=352,
                                 boundaries_epochs=(91, 136), decay=0.1)
    assert lr(0, spec) == pytest.approx(0.1)
    assert lr(91 * 352 - 1, spec) == pytest.approx(0.1)
    assert lr(91 * 352, spec) == pytest.approx(0.01)
    assert lr(136 * 352, spec) == pytest.approx(0.001)


def test_warmup_ramps_linearly_then_hands_over():
    spec = schedules.from_epochs("constant", base_lr=0.2, epochs=10, steps_per_epoch=10, warmup_epochs=1)
    assert lr(0, spec) == pytest.approx(0.02)
    assert lr(4, spec) == pytest.approx(0.1)
    assert lr(10, spec) == pytest.approx(0.2)


def test_cosine_reaches_zero_at_the_end_and_half_in_the_middle():
    spec = schedules.from_epochs("cosine", base_lr=1.0, epochs=10, steps_per_epoch=100)
    assert lr(0, spec) == pytest.approx(1.0)
    assert lr(500, spec) == pytest.approx(0.5, abs=1e-6)
    assert lr(1000, spec) == pytest.approx(0.0, abs=1e-6)


def test_exponential_decays_per_epoch():
    spec = schedules.from_epochs("exponential", base_lr=1.0, epochs=10, steps_per_epoch=50, decay=0.9)
    assert lr(100, spec) == pytest.approx(0.81, rel=1e-5)


def test_step_offset_continues_global_schedule():
    spec = schedules.from_epochs("step", base_lr=0.1, epochs=10, steps_per_epoch=10,
                                 boundaries_epochs=(5,), step_offset_epochs=6)
    assert lr(0, spec) == pytest.approx(0.01)


def test_boundaries_outside_the_run_are_an_error():
    with pytest.raises(ValueError, match="lr_boundaries"):
        schedules.from_epochs("step", base_lr=0.1, epochs=10, steps_per_epoch=1, boundaries_epochs=(12,))


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="Unknown schedule"):
        schedules.learning_rate(0, schedules.ScheduleSpec(kind="triangle"))


def test_keras_schedule_round_trips_through_config():
    sched = schedules.StepSchedule(schedules.ScheduleSpec(kind="step", base_lr=0.1, boundaries=(10,)))
    again = schedules.StepSchedule.from_config(sched.get_config())
    assert float(again(11)) == pytest.approx(0.01)


@pytest.mark.parametrize("size,expected", [((32, 32), (160, 128)), ((95, 95), (160, 128)),
                                           ((96, 96), (512, 480)), ((500, 375), (512, 480))])
def test_hyperrule_resolution(size, expected):
    assert hyperrule.resolution(size) == expected


@pytest.mark.parametrize("n,total", [(1_000, 500), (19_999, 500), (20_000, 10_000), (50_000, 10_000),
                                     (500_000, 20_000)])
def test_hyperrule_step_budget(n, total):
    assert hyperrule.steps_at_base_batch(n)[-1] == total


def test_hyperrule_mixup_and_lr():
    assert hyperrule.mixup_alpha(19_999) == 0.0
    assert hyperrule.mixup_alpha(20_000) == 0.1
    assert hyperrule.learning_rate(512) == pytest.approx(0.003)
    assert hyperrule.learning_rate(64) == pytest.approx(0.003 / 8)


def test_hyperrule_schedule_scales_steps_with_batch():
    spec = schedules.hyperrule_schedule(50_000, 128)
    assert spec.total_steps == 40_000 and spec.warmup_steps == 2_000
    assert spec.boundaries == (12_000, 24_000, 36_000)
    assert lr(spec.warmup_steps - 1, spec) == pytest.approx(spec.base_lr)
    assert lr(36_000, spec) == pytest.approx(spec.base_lr * 1e-3)
    assert math.isclose(spec.base_lr, 0.003 / 4)


def test_hyperrule_step_budget_keeps_its_shape_for_an_explicit_total():
    budget = hyperrule.steps(1_000, 512, total_steps=40)
    assert budget == hyperrule.Steps(warmup=8, boundaries=(12, 24, 36), total=40)
    spec = schedules.hyperrule_schedule(1_000, 512, total_steps=40)
    assert (spec.warmup_steps, spec.boundaries, spec.total_steps) == (8, (12, 24, 36), 40)
