"""A run's step budget, its phases and each phase's learning-rate schedule.

A run is a list of *phases* (frozen-backbone epochs, then the first optimizer,
then an optional second optimizer); each phase continues the global epoch count
and the global learning-rate schedule, so a mid-run optimizer switch or an
unfreeze is a recompile, not a second loop.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from pipeline import config as cfg
from pipeline import hyperrule
from pipeline.training import schedules


@dataclasses.dataclass(frozen=True)
class StepBudget:
    """How long a run trains.

    Attributes:
      steps_per_epoch: optimizer steps in one epoch.
      epochs: epochs to run (from --epochs, or a step budget rounded up).
      full_batches: every step sees a full batch (--steps_per_epoch, or the
        remainder dropped), so an epoch holds steps_per_epoch x batch images.
      hyperrule: the BiT-HyperRule schedule, for --schedule=hyperrule.
    """

    steps_per_epoch: int
    epochs: int
    full_batches: bool
    hyperrule: Optional[schedules.ScheduleSpec] = None


def step_budget(t: cfg.TrainConfig, *, num_train: int, batch_size: int, drop_remainder: bool) -> StepBudget:
    """Steps per epoch and epochs of a run over `num_train` examples."""
    if t.steps_per_epoch:
        steps_per_epoch = t.steps_per_epoch
    elif drop_remainder:
        steps_per_epoch = num_train // batch_size
        if not steps_per_epoch:
            raise ValueError(f"--batch_size={batch_size} is larger than the {num_train} training "
                             "examples: no full batch to split over the replicas.")
    else:
        steps_per_epoch = max(1, math.ceil(num_train / batch_size))
    rule = None
    epochs = t.epochs
    if t.schedule == "hyperrule":
        rule = schedules.hyperrule_schedule(num_train, batch_size, t.total_steps)
        epochs = max(1, math.ceil(rule.total_steps / steps_per_epoch))
    elif t.total_steps:
        epochs = max(1, math.ceil(t.total_steps / steps_per_epoch))
    return StepBudget(steps_per_epoch, epochs, bool(t.steps_per_epoch or drop_remainder), rule)


def mixup_alpha(t: cfg.TrainConfig, budget: StepBudget, num_train: int) -> float:
    """--mixup_alpha, or (unset) the HyperRule's for HyperRule runs and none otherwise."""
    if t.mixup_alpha is not None:
        return t.mixup_alpha
    return hyperrule.mixup_alpha(num_train) if budget.hyperrule else 0.0


@dataclasses.dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained with one optimizer and one trainability setting."""

    start: int
    end: int
    optimizer: cfg.OptimizerConfig
    freeze_backbone: bool


def plan_phases(t: cfg.TrainConfig, epochs: int) -> list[Phase]:
    """Split the run at the unfreeze epoch and the optimizer-switch epoch."""
    cuts = sorted({0, epochs} | {e for e in (t.freeze_epochs, t.switch_optimizer_epoch) if 0 < e < epochs})
    if t.switch_optimizer_epoch and t.second_optimizer is None:
        raise ValueError("--switch_optimizer_epoch needs --second_optimizer.")
    phases = []
    for start, end in zip(cuts, cuts[1:]):
        switched = t.switch_optimizer_epoch and start >= t.switch_optimizer_epoch
        phases.append(Phase(start, end, t.second_optimizer if switched else t.optimizer,
                            freeze_backbone=start < t.freeze_epochs))
    return phases


def schedule_for(t: cfg.TrainConfig, opt: cfg.OptimizerConfig, *, epochs: int,
                 steps_per_epoch: int, start_epoch: int, hyperrule=None, lr_scale: float = 1.0):
    """The learning-rate schedule of one phase's optimizer, in global steps.

    For `hyperrule`, an explicit optimizer learning rate replaces the rule's
    batch-scaled 0.003; None keeps the rule's. `lr_scale` multiplies the
    result (`--lr_scaling`, see `distribute.lr_scale`).
    """
    return scale_learning_rate(_schedule(t, opt, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                         start_epoch=start_epoch, hyperrule=hyperrule), lr_scale)


def scale_learning_rate(lr, factor: float):
    """A float learning rate or a `schedules.StepSchedule` times `factor`."""
    if factor == 1.0:
        return lr
    if isinstance(lr, schedules.StepSchedule):
        return schedules.StepSchedule(dataclasses.replace(lr.spec, base_lr=lr.spec.base_lr * factor))
    return lr * factor


def _schedule(t, opt, *, epochs, steps_per_epoch, start_epoch, hyperrule):
    if t.schedule == "hyperrule":
        spec = dataclasses.replace(hyperrule, step_offset=start_epoch * steps_per_epoch)
        if opt.learning_rate is not None:
            spec = dataclasses.replace(spec, base_lr=opt.learning_rate)
        return schedules.StepSchedule(spec)
    if opt.learning_rate is None:
        raise ValueError("--learning_rate is required unless --schedule=hyperrule.")
    if t.schedule == "constant" and not t.warmup_epochs:
        return opt.learning_rate
    spec = schedules.from_epochs(
        t.schedule, base_lr=opt.learning_rate, epochs=epochs, steps_per_epoch=steps_per_epoch,
        warmup_epochs=t.warmup_epochs, boundaries_epochs=t.lr_boundaries, decay=t.lr_decay,
        step_offset_epochs=start_epoch)
    return schedules.StepSchedule(spec)
