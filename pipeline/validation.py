"""Checks of a RunConfig's values, as pure functions raising ValueError with one line.

`check_run(run)` needs nothing but the config: `cli.run_config_from_flags` calls
it before anything is built (no TensorFlow work, nothing written). What depends
on the data (the epochs a step budget or the BiT-HyperRule derives from the
dataset size) is `check_against_data(run, num_train, epochs)`, which the trainer
calls right after the data is measured, before the model is built.

(Bounds absl already enforces on the flags and `load_dataset` checks, such as
--batch_size >= 1, are not repeated here.) Messages name the flag, the value and the allowed range, because the flags are
how users set these values; library callers get the same names.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from pipeline import config as cfg


def _refuse(flag: str, value, allowed: str):
    raise ValueError(f"--{flag}={value} is out of range: {allowed}.")


def _at_least(flag: str, value, low, *, strict: bool = False):
    """`value` >= low (> low when strict); None passes (the flag is unset)."""
    if value is None:
        return
    if not math.isfinite(value) or value < low or (strict and value == low):
        _refuse(flag, value, f"must be {'>' if strict else '>='} {low:g}")


def _fraction(flag: str, value, *, upper_open: bool = True):
    """0 <= value < 1 (<= 1 when not upper_open)."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value >= 1 if upper_open else value > 1):
        _refuse(flag, value, f"must be in [0, 1{')' if upper_open else ']'}")


def check_data(d: cfg.DataConfig):
    """Values of the data settings that are wrong whatever the data holds."""
    _at_least("image_size", d.image_size, 1)
    _at_least("resize_size", d.resize_size, 1)
    _fraction("val_fraction", d.val_fraction)
    _fraction("test_fraction", d.test_fraction)
    if d.val_fraction + d.test_fraction >= 1:
        raise ValueError(f"--val_fraction={d.val_fraction:g} and --test_fraction={d.test_fraction:g} "
                         "leave no training images: their sum must be < 1.")
    _check_augment_policy(d)
    if not 0 <= d.near_duplicate_bits <= 64:  # data checks (issue 17): a 64-bit difference hash
        _refuse("near_duplicate_bits", d.near_duplicate_bits, "must be in [0, 64]")


def _check_augment_policy(d: cfg.DataConfig):
    """Augmentation policy options (issue 16: pipeline.data.policies)."""
    _at_least("randaugment_ops", d.randaugment_ops, 0)
    if not (math.isfinite(d.randaugment_magnitude) and 0 <= d.randaugment_magnitude <= 10):
        _refuse("randaugment_magnitude", d.randaugment_magnitude, "must be in [0, 10] (timm's scale)")
    _fraction("random_erasing", d.random_erasing, upper_open=False)
    _fraction("color_jitter", d.color_jitter, upper_open=False)


def check_model(m: cfg.ModelConfig):
    _at_least("width_multiplier", m.width_multiplier, 0, strict=True)
    _fraction("drop_path", m.drop_path)  # issue 16: stochastic depth, a drop probability < 1


def _check_optimizer(opt: Optional[cfg.OptimizerConfig], lr_flag: str):
    if opt is None:
        return
    _at_least(lr_flag, opt.learning_rate, 0, strict=True)
    _fraction("momentum", opt.momentum, upper_open=False)
    _at_least("weight_decay", opt.weight_decay, 0)


def _epochs_known(t: cfg.TrainConfig) -> bool:
    """--epochs is the run's length (not derived from a step budget or the HyperRule)."""
    return t.schedule != "hyperrule" and not t.total_steps


def check_train(t: cfg.TrainConfig):
    """Training values, and combinations of them, that no dataset can make right."""
    _check_optimizer(t.optimizer, "learning_rate")
    _check_optimizer(t.second_optimizer, "second_learning_rate")
    _at_least("lr_decay", t.lr_decay, 0, strict=True)
    for b in t.lr_boundaries:
        _at_least("lr_boundaries", b, 0)
    _at_least("warmup_epochs", t.warmup_epochs, 0)
    _fraction("label_smoothing", t.label_smoothing)
    _at_least("mixup_alpha", t.mixup_alpha, 0)
    _check_mixing(t)
    _at_least("steps_per_epoch", t.steps_per_epoch, 1)
    _at_least("total_steps", t.total_steps, 1)
    _at_least("switch_optimizer_epoch", t.switch_optimizer_epoch, 0)
    _at_least("backbone_lr_multiplier", t.backbone_lr_multiplier, 0)
    # issue 16: layer-wise decay in (0, 1] (above 1 the stem would learn fastest)
    if not (math.isfinite(t.layer_decay) and 0 < t.layer_decay <= 1):
        _refuse("layer_decay", t.layer_decay, "must be in (0, 1]")
    if t.switch_optimizer_epoch and not t.second_optimizer:
        raise ValueError("--switch_optimizer_epoch needs --second_optimizer.")
    if t.second_optimizer and not t.switch_optimizer_epoch:
        raise ValueError("--second_optimizer needs --switch_optimizer_epoch > 0.")
    if getattr(t, "hyperrule_steps", "scaled") != "scaled" and t.schedule != "hyperrule":  # issue 20
        raise ValueError(f"--hyperrule_steps={t.hyperrule_steps} applies to --schedule=hyperrule only.")
    if _epochs_known(t):
        _check_phase_epochs(t, t.epochs, "--epochs")


def _check_mixing(t: cfg.TrainConfig):
    """Batch mixing (issue 16: pipeline.data.mixing)."""
    _at_least("cutmix_alpha", t.cutmix_alpha, 0)
    _fraction("mix_switch_prob", t.mix_switch_prob, upper_open=False)
    _at_least("mix_off_epoch", t.mix_off_epoch, 0)
    if t.mix_off_epoch and not t.cutmix_alpha and t.mixup_alpha == 0:
        raise ValueError("--mix_off_epoch needs --mixup_alpha or --cutmix_alpha > 0 (there is no mixing to stop).")
    if t.mix_off_epoch and _epochs_known(t) and t.mix_off_epoch >= t.epochs:
        _refuse("mix_off_epoch", t.mix_off_epoch, f"must be < --epochs={t.epochs}, or mixing never stops")


def _check_phase_epochs(t: cfg.TrainConfig, epochs: int, source: str):
    """A switch or an unfreeze that would never happen in `epochs` epochs is a mistake.

    --freeze_epochs equal to the run's epochs is allowed (a linear probe: the
    head only); a switch at the last epoch's end would train nothing after it.
    """
    if t.switch_optimizer_epoch and t.switch_optimizer_epoch >= epochs:
        _refuse("switch_optimizer_epoch", t.switch_optimizer_epoch,
                f"must be < the run's {epochs} epochs ({source}), or the switch never happens")
    if t.freeze_epochs > epochs:
        _refuse("freeze_epochs", t.freeze_epochs,
                f"must be <= the run's {epochs} epochs ({source}), or the backbone never unfreezes")


def check_run(run: cfg.RunConfig):
    """Every check that needs no data; raises ValueError naming the flag, value and range."""
    check_data(run.data)
    check_model(run.model)
    check_train(run.train)
    check_recipes(run.train, run.data.batch_size)  # training-loop recipes (issues 16, 17)


def check_recipes(t: cfg.TrainConfig, batch_size: int):
    """--ema_decay, --clip_norm, --accumulation_steps, --class_weight (pipeline.training.loop's recipes)."""
    _fraction("ema_decay", t.ema_decay)
    _at_least("clip_norm", t.clip_norm, 0)
    _at_least("accumulation_steps", t.accumulation_steps, 1)
    if batch_size % t.accumulation_steps:
        raise ValueError(f"--batch_size={batch_size} is the effective batch and must be a multiple of "
                         f"--accumulation_steps={t.accumulation_steps} (micro-batches of equal size).")
    if t.class_weight not in ("none", "balanced"):
        if not t.class_weight.endswith(".json"):
            raise ValueError(f"--class_weight={t.class_weight}: use none, balanced or the path of a .json "
                             'file ({"class name": weight, ...}).')
        if not os.path.isfile(t.class_weight):
            raise ValueError(f"--class_weight={t.class_weight}: no such file.")


def check_against_data(run: cfg.RunConfig, num_train: int, epochs: int) -> None:
    """Checks that need the data: `epochs` is what the run will train (its step budget).

    Args:
      run: the run's config.
      num_train: training examples measured in the data.
      epochs: epochs derived for this data (`phases.step_budget(...).epochs`).
    """
    if num_train < 1:
        raise ValueError(f"--dataset={run.data.dataset} has no training images.")
    if not _epochs_known(run.train):
        rule = "the BiT-HyperRule" if run.train.schedule == "hyperrule" else "--total_steps"
        _check_phase_epochs(run.train, epochs, f"{rule} over {num_train} training images")


def check_lr_find(c: cfg.LRFindConfig):
    """The range test's scan (`pipeline.lr_find`): positive, increasing rates, enough steps to smooth."""
    _at_least("lr_find_start", c.start_lr, 0.0, strict=True)
    _at_least("lr_find_end", c.end_lr, 0.0, strict=True)
    if c.end_lr <= c.start_lr:
        _refuse("lr_find_end", c.end_lr, f"must be > --lr_find_start={c.start_lr:g}")
    _at_least("lr_find_steps", c.steps, 5)
    _at_least("lr_find_diverge", c.diverge_factor, 1.0, strict=True)
