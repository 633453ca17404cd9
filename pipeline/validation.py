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


def check_model(m: cfg.ModelConfig):
    _at_least("width_multiplier", m.width_multiplier, 0, strict=True)


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
    _at_least("steps_per_epoch", t.steps_per_epoch, 1)
    _at_least("total_steps", t.total_steps, 1)
    _at_least("switch_optimizer_epoch", t.switch_optimizer_epoch, 0)
    _at_least("backbone_lr_multiplier", t.backbone_lr_multiplier, 0)
    if t.switch_optimizer_epoch and not t.second_optimizer:
        raise ValueError("--switch_optimizer_epoch needs --second_optimizer.")
    if t.second_optimizer and not t.switch_optimizer_epoch:
        raise ValueError("--second_optimizer needs --switch_optimizer_epoch > 0.")
    if _epochs_known(t):
        _check_phase_epochs(t, t.epochs, "--epochs")


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
