"""Learning-rate schedules as small pure functions (the BiT-HyperRule's numbers: `pipeline.hyperrule`).

Every schedule is expressed in optimizer steps so that epoch-based recipes
(He et al.: /10 at epochs 82 and 123) and step-based ones (BiT-HyperRule: /10 at
30/60/90% of a step budget) share one implementation. `learning_rate()` uses
`keras.ops`, so the same function answers for a Python int in tests and for the
optimizer's step tensor inside a compiled train step.
"""
from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

from pipeline import hyperrule

SCHEDULES = ("constant", "step", "exponential", "cosine", "hyperrule")


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule in steps.

    kind: one of SCHEDULES (`hyperrule` is `step` with BiT's boundaries).
    base_lr: peak learning rate after warm-up.
    total_steps: length of training (cosine decays to 0 over it).
    warmup_steps: linear ramp from 0 to base_lr.
    boundaries: steps at which `step` multiplies by `decay`.
    decay: the multiplier for `step`; for `exponential` the factor per `decay_steps`.
    decay_steps: exponential period in steps (one epoch when built from epochs).
    step_offset: steps already taken before this optimizer started (a second
      optimizer after a mid-run switch continues the global schedule).
    """

    kind: str = "constant"
    base_lr: float = 0.1
    total_steps: int = 1
    warmup_steps: int = 0
    boundaries: tuple = ()
    decay: float = 0.1
    decay_steps: int = 1
    step_offset: int = 0


def learning_rate(step, spec: ScheduleSpec):
    """Learning rate at optimizer `step` (int or tensor) under `spec`."""
    if spec.kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {spec.kind!r}; choose from {', '.join(SCHEDULES)}.")
    step = ops.cast(step, "float32") + float(spec.step_offset)
    base = ops.convert_to_tensor(spec.base_lr, "float32")
    if spec.kind in ("step", "hyperrule"):
        passed = sum((ops.cast(step >= float(b), "float32") for b in spec.boundaries),
                     ops.zeros((), "float32"))
        lr = base * ops.power(ops.convert_to_tensor(spec.decay, "float32"), passed)
    elif spec.kind == "exponential":
        lr = base * ops.power(ops.convert_to_tensor(spec.decay, "float32"),
                              step / float(max(spec.decay_steps, 1)))
    elif spec.kind == "cosine":
        span = float(max(spec.total_steps - spec.warmup_steps, 1))
        progress = ops.clip((step - float(spec.warmup_steps)) / span, 0.0, 1.0)
        lr = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
    else:
        lr = base
    if spec.warmup_steps > 0:
        ramp = (step + 1.0) / float(spec.warmup_steps)
        lr = ops.where(step < float(spec.warmup_steps), base * ramp, lr)
    return lr


@keras.saving.register_keras_serializable(package="pipeline")
class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Keras wrapper around `learning_rate` so optimizers can use a ScheduleSpec."""

    def __init__(self, spec: ScheduleSpec | dict):
        self.spec = spec if isinstance(spec, ScheduleSpec) else ScheduleSpec(
            **{**spec, "boundaries": tuple(spec.get("boundaries", ()))})

    def __call__(self, step):
        return learning_rate(step, self.spec)

    def get_config(self):
        return {"spec": dataclasses.asdict(self.spec)}


def from_epochs(kind: str, *, base_lr: float, epochs: int, steps_per_epoch: int,
                warmup_epochs: float = 0.0, boundaries_epochs=(), decay: float = 0.1,
                step_offset_epochs: int = 0) -> ScheduleSpec:
    """Build a ScheduleSpec from epoch-denominated flags."""
    bad = [b for b in boundaries_epochs if not 0 < b < epochs]
    if kind == "step" and bad:
        raise ValueError(f"--lr_boundaries {bad} lie outside the run's 1..{epochs - 1} epochs.")
    return ScheduleSpec(
        kind=kind, base_lr=base_lr, total_steps=epochs * steps_per_epoch,
        warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
        boundaries=tuple(int(round(b * steps_per_epoch)) for b in boundaries_epochs),
        decay=decay, decay_steps=steps_per_epoch,
        step_offset=step_offset_epochs * steps_per_epoch)


def hyperrule_schedule(dataset_size: int, batch_size: int, total_steps: int | None = None) -> ScheduleSpec:
    """The BiT-HyperRule schedule (`pipeline.hyperrule`) for a batch size, or for a step budget."""
    budget = hyperrule.steps(dataset_size, batch_size, total_steps)
    return ScheduleSpec(kind="hyperrule", base_lr=hyperrule.learning_rate(batch_size),
                        total_steps=budget.total, warmup_steps=budget.warmup, boundaries=budget.boundaries,
                        decay=hyperrule.DECAY)
