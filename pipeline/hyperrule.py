"""The BiT-HyperRule (Kolesnikov et al. 2020, google-research/big_transfer) as pure functions.

Each function maps what is known about a fine-tuning job (the stored image
size, the dataset size, the batch size, a step budget) to plain numbers, the
way `bit_hyperrule.py` does upstream: trivially testable, and the one home of
the rule (data picks the resolution, the trainer the schedule and MixUp,
`pipeline.finetune` the defaults). It imports nothing of the project.
"""
from __future__ import annotations

import dataclasses

BASE_BATCH = 512
BASE_LR = 0.003
DECAY = 0.1
DECAY_FRACTIONS = (0.3, 0.6, 0.9)
# --hyperrule_steps: whether the step budget (defined at batch 512) follows the batch size, and who says so.
STEP_SCALING = {
    "scaled": "steps x 512/batch, the same examples seen at any batch (keras.io's BiT example)",
    "authors": "500/10k/20k steps at any batch, as google-research/big_transfer bit_tf2/train.py "
               "(\"Let's not do that unless verified necessary\"; its batch is 512, split with --batch_split)",
}


def resolution(original_size: tuple[int, int]) -> tuple[int, int]:
    """(resize, crop): small images (area < 96x96) go to 160/128, others to 512/480."""
    h, w = original_size
    return (160, 128) if h * w < 96 * 96 else (512, 480)


def resize_for(crop: int):
    """The rule's resize for one of its own crops (480 -> 512, 128 -> 160), else None."""
    return {c: r for r, c in (resolution((1, 1)), resolution((96, 96)))}.get(crop)


def steps_at_base_batch(dataset_size: int) -> tuple[int, int, int, int, int]:
    """BiT's schedule at batch 512: (warm-up end, 3 decay steps, total steps)."""
    if dataset_size < 20_000:
        return (100, 200, 300, 400, 500)
    if dataset_size < 500_000:
        return (500, 3000, 6000, 9000, 10_000)
    return (500, 6000, 12_000, 18_000, 20_000)


def mixup_alpha(dataset_size: int) -> float:
    """MixUp alpha: 0.1 from 20k examples on, none below."""
    return 0.1 if dataset_size >= 20_000 else 0.0


def learning_rate(batch_size: int) -> float:
    """0.003 at batch 512, scaled linearly with the batch size."""
    return BASE_LR * batch_size / BASE_BATCH


@dataclasses.dataclass(frozen=True)
class Steps:
    """A step budget: linear warm-up to `warmup`, lr x DECAY at each of `boundaries`, stop at `total`."""

    warmup: int
    boundaries: tuple[int, ...]
    total: int


def steps(dataset_size: int, batch_size: int, total_steps: int | None = None, *,
          scaled: bool = True) -> Steps:
    """The HyperRule step budget for a batch size, or for an explicit `total_steps`.

    The budget is defined at batch 512; with `scaled` (`--hyperrule_steps=scaled`)
    a smaller batch sees the same number of examples, so steps scale by
    512 / batch_size; unscaled (`authors`) they stay as the authors' bit_tf2
    keeps them (see STEP_SCALING). An explicit budget keeps the rule's shape:
    decays at 30/60/90% of it, warm-up no longer than a fifth.
    """
    scale = BASE_BATCH / batch_size if scaled else 1.0
    warmup, *decays, total = (int(round(s * scale)) for s in steps_at_base_batch(dataset_size))
    if not total_steps:
        return Steps(warmup, tuple(decays), total)
    return Steps(min(warmup, max(total_steps // 5, 1)),
                 tuple(int(total_steps * f) for f in DECAY_FRACTIONS), total_steps)
