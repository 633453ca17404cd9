"""The flags of a run's optional features, beside `pipeline.cli`'s core ones.

Training recipes (EMA, clipping, accumulation, class weights, the best
metric, layer-wise decay, stochastic depth, augmentation policies, batch
mixing; issue 16/17), cached features and rematerialization (19), time
budgets (20) and the data checks (17). `cli` calls these `define_*`
functions from its own and spreads the `*_fields(fv)` dicts into the
configs; `cli.flags_text` writes the flags of both modules into flags.cfg.
Like `cli`, nothing here imports TensorFlow.
"""
from __future__ import annotations

import os

from absl import flags


# -- training-loop recipes (issues 16, 17: pipeline.training.ema, .class_weights, .loop)
def define_recipe_flags():
    flags.DEFINE_float("ema_decay", 0.0, "Exponential moving average of the weights with this decay (0 = off), "
                       "updated once per optimizer step, kept across phases; every floating-point weight is "
                       "averaged, BatchNorm's moving statistics too (as timm does). Validation (val_accuracy; "
                       "the raw weights' is val_accuracy_raw), the best checkpoint, evaluate, export and "
                       "reports use the average.")
    flags.DEFINE_bool("ema_warmup", True, "EMA warm-up: effective decay min(--ema_decay, (1 + n) / (10 + n)) "
                      "after n optimizer steps (TF's ExponentialMovingAverage num_updates rule).")
    flags.DEFINE_float("clip_norm", 0.0, "Clip the gradient to this global norm after the cross-replica sum "
                       "(the gradient that is applied; 0 = off).", lower_bound=0.0)
    flags.DEFINE_integer("accumulation_steps", 1, "Gradient accumulation: K micro-batches of --batch_size/K "
                         "per optimizer step (--batch_size stays the effective batch; the schedule, warm-up, "
                         "EMA and metrics count optimizer steps). BatchNorm normalizes and updates its "
                         "statistics per micro-batch; for GroupNorm models (BiT) the update is exact.",
                         lower_bound=1)
    flags.DEFINE_string("class_weight", "none", "Per-class training-loss weights: none, balanced "
                        "(n / (classes x count), scikit-learn's), or a .json file {\"class name\": weight}. "
                        "Mixed or smoothed labels weigh an example by the label-weighted sum.")
    flags.DEFINE_enum("best_metric", "val_accuracy", ["val_accuracy", "val_macro_f1", "val_loss"],
                      "Validation metric choosing the best checkpoint (on the EMA weights with --ema_decay).")


def recipe_fields(fv) -> dict:
    if "ema_decay" not in fv:
        return {}
    return {"ema_decay": fv.ema_decay, "ema_warmup": fv.ema_warmup, "clip_norm": fv.clip_norm,
            "accumulation_steps": fv.accumulation_steps, "class_weight": fv.class_weight,
            "best_metric": fv.best_metric}


# -- layer-wise learning-rate decay and stochastic depth (issue 16: pipeline.models.stages, layers.drop_path)
def define_layer_decay_flags():
    flags.DEFINE_float("layer_decay", 1.0, "Layer-wise learning-rate decay D in (0, 1]: the head learns at the "
                       "scheduled rate, the last stage at D x it, each earlier stage D times its successor's "
                       "(the stem D**(stages+1)); weight decay unchanged; times --backbone_lr_multiplier. "
                       "Stages as the model's registry entry declares them (1 = off).")
    flags.DEFINE_float("drop_path", 0.0, "Stochastic depth of our ResNets and BiT: the last residual block's "
                       "branch is dropped per example with this probability in training, the first block's "
                       "never, linear in between; off at inference (0 = off, today's model).")


def layer_decay_fields(fv) -> dict:
    return {"layer_decay": fv.layer_decay}


# -- time budgets and the HyperRule's step scaling (issue 20: pipeline.training.budget / eta)
def define_time_flags():
    from pipeline import hyperrule  # pure numbers, no TensorFlow
    flags.DEFINE_string("time_budget", None, "Wall-time budget of the run (minutes, or 30m, 2h, 45s), start-up "
                        "included, export and report not: a few timed steps pick the largest HyperRule "
                        "resolution (480/384/224/160/128) allowing 100 steps, then the most steps that fit "
                        "(written to flags.cfg as --image_size/--total_steps); the run stops at the budget "
                        "with a finished checkpoint. pipeline.tune: the whole search's budget.")
    flags.DEFINE_enum("hyperrule_steps", "scaled", list(hyperrule.STEP_SCALING),
                      "BiT-HyperRule step budget: " + "; ".join(f"{k}: {v}" for k, v in
                                                              hyperrule.STEP_SCALING.items()) + ".")


# -- augmentation policies and batch mixing (issue 16: pipeline.data.policies, pipeline.data.mixing)
def define_augment_policy_flags():
    flags.DEFINE_integer("randaugment_ops", 2, "RandAugment (--augment=...randaugment): operations drawn per "
                         "image.", lower_bound=0)
    flags.DEFINE_float("randaugment_magnitude", 9.0, "RandAugment magnitude M on timm's 0-10 scale (every "
                       "operation at M/10 of its largest strength; Keras's factor = M/10).")
    flags.DEFINE_float("random_erasing", 0.0, "Random erasing: probability of replacing one box (2-33% of the "
                       "image, aspect 0.3-3.3) with uniform noise, after the policy (0 = off).")
    flags.DEFINE_float("color_jitter", 0.0, "Colour jitter S: brightness, contrast and saturation factors in "
                       "[1-S, 1+S], after the crop and before the policy (0 = off).")


def augment_policy_fields(fv) -> dict:
    if "randaugment_ops" not in fv:
        return {}
    return {"randaugment_ops": fv.randaugment_ops, "randaugment_magnitude": fv.randaugment_magnitude,
            "random_erasing": fv.random_erasing, "color_jitter": fv.color_jitter}


def define_mixing_flags():
    flags.DEFINE_float("cutmix_alpha", 0.0, "CutMix alpha (0 = off): one box per batch, labels weighted by the "
                       "pasted area.")
    flags.DEFINE_float("mix_switch_prob", 0.5, "With --mixup_alpha and --cutmix_alpha both > 0: each batch is "
                       "CutMix with this probability, else MixUp (timm's switch).")
    flags.DEFINE_integer("mix_off_epoch", 0, "No MixUp/CutMix from this epoch on (0-based; timm's "
                         "mixup_off_epoch; 0 = mix every epoch).", lower_bound=0)


def mixing_fields(fv) -> dict:
    return {"cutmix_alpha": fv.cutmix_alpha, "mix_switch_prob": fv.mix_switch_prob,
            "mix_off_epoch": fv.mix_off_epoch}


# -- speed and memory (issue 19: pipeline.training.feature_cache, .remat); --remat is a training flag


def define_feature_cache_flags():
    flags.DEFINE_bool("cache_features", True, "Frozen phases (--freeze_epochs) compute the backbone's pooled "
                      "features once and train the head on them, when every batch is a function of the images "
                      "(--augment=none or --feature_views; not with MixUp). --nocache_features recomputes them.")
    flags.DEFINE_integer("feature_views", 0, "With a random --augment: precompute this many augmented views "
                         "per image for --cache_features (epoch e uses view e mod K).", lower_bound=0)


def define_remat_flags():
    flags.DEFINE_bool("remat", False, "Gradient checkpointing: every layer keeps only its inputs and recomputes "
                      "its insides in the backward pass (less memory, about one more forward pass per step).")


def speed_memory_fields(fv) -> dict:
    fields = {"remat": fv.remat} if "remat" in fv else {}
    if "cache_features" in fv:
        fields.update(cache_features=fv.cache_features, feature_views=fv.feature_views)
    return fields


def time_fields(fv) -> dict:
    """--time_budget in seconds (refused in one line when it is not a duration) and --hyperrule_steps."""
    from pipeline import durations
    return {"time_budget": durations.parse_time_budget(fv.time_budget), "hyperrule_steps": fv.hyperrule_steps}


# -- data checks and balanced sampling (issue 17: pipeline.data.inspection, pipeline.inspect_data, data.balance)

def _default_data_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pipeline", "data_checks")


def define_inspect_flags():
    """Data-check flags, defined with the data flags (train, finetune, tune and inspect_data share them)."""
    flags.DEFINE_bool("data_checks", True, "Training on a folder first writes <run>/data_report/ (class counts, "
                      "sizes, duplicates and leakage across splits, EXIF rotations, imbalance; cached).")
    flags.DEFINE_bool("strict_data", False, "An image found in more than one split (exact copy) is an error, "
                      "not a warning.")
    flags.DEFINE_integer("near_duplicate_bits", 6, "Near duplicates across splits: difference hashes (64 bits) "
                         "at most this many bits apart.", lower_bound=0, upper_bound=64)
    flags.DEFINE_string("data_cache_dir", _default_data_cache_dir(), "Where the folder scan (per file: size, "
                        "mtime, hashes) is cached, so the next training does not rescan; '' for no cache.")
    flags.DEFINE_bool("balanced_sampling", False, "Training draws every class equally often (per-class "
                      "streams, tf.data sample_from_datasets); an epoch keeps its usual number of steps.")


def inspect_fields(fv) -> dict:
    if "strict_data" not in fv:
        return {}
    return {"data_checks": fv.data_checks, "strict_data": fv.strict_data,
            "near_duplicate_bits": fv.near_duplicate_bits, "data_cache_dir": fv.data_cache_dir or None,
            "balanced_sampling": fv.balanced_sampling}
