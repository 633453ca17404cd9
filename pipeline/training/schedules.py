"""Learning-rate schedules and the BiT-HyperRule, as small pure functions.

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


# ---- BiT-HyperRule (Kolesnikov et al. 2020, google-research/big_transfer) ----

HYPERRULE_BASE_BATCH = 512
HYPERRULE_BASE_LR = 0.003


def hyperrule_resolution(original_size: tuple[int, int]) -> tuple[int, int]:
    """(resize, crop): small images (area < 96x96) go to 160/128, others to 512/480."""
    h, w = original_size
    return (160, 128) if h * w < 96 * 96 else (512, 480)


def hyperrule_steps(dataset_size: int) -> tuple[int, int, int, int, int]:
    """BiT's schedule at batch 512: (warm-up end, 3 decay steps, total steps)."""
    if dataset_size < 20_000:
        return (100, 200, 300, 400, 500)
    if dataset_size < 500_000:
        return (500, 3000, 6000, 9000, 10_000)
    return (500, 6000, 12_000, 18_000, 20_000)


def hyperrule_mixup(dataset_size: int) -> float:
    """MixUp alpha: 0.1 from 20k examples on, none below."""
    return 0.1 if dataset_size >= 20_000 else 0.0


def hyperrule_learning_rate(batch_size: int) -> float:
    """0.003 at batch 512, scaled linearly with the batch size."""
    return HYPERRULE_BASE_LR * batch_size / HYPERRULE_BASE_BATCH


def hyperrule_schedule(dataset_size: int, batch_size: int) -> ScheduleSpec:
    """The whole HyperRule schedule for a batch size.

    The step budget is defined at batch 512; with a smaller batch the same
    number of examples is seen, so steps scale by 512 / batch_size.
    """
    scale = HYPERRULE_BASE_BATCH / batch_size
    warmup, *decays, total = (int(round(s * scale)) for s in hyperrule_steps(dataset_size))
    return ScheduleSpec(kind="hyperrule", base_lr=hyperrule_learning_rate(batch_size),
                        total_steps=total, warmup_steps=warmup, boundaries=tuple(decays),
                        decay=0.1)
