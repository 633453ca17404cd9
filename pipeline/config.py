"""Frozen settings objects built from flags by the entry points.

Library code takes these, never absl FLAGS, so it can be called from tests,
keras-tuner and notebooks with plain keyword arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are fed.

    dataset: `digits` (embedded), a TFDS name (`cifar10`, or `tfds:cifar10`),
      or `folder:<path>`.
    train_split, val_split, test_split: TFDS split strings (slicing allowed,
      `train[:90%]`); None takes the per-dataset default in
      `pipeline.data.TFDS_DEFAULT_SPLITS`; "" or "none" means no such split.
    val_fraction, test_fraction: held-out shares when a folder (or a TFDS
      dataset without `validation`) has to be split here, seeded by `seed`.
    image_size: square model resolution; None keeps the source's own size
      (32 for digits, the stored size for TFDS datasets with one square size),
      else 224 (always 224 for folders).
    resize_size: `bit` augmentation and evaluation: resize to this, then crop
      image_size (None with `bit`: image_size * 8/7).
    augment: a name from `pipeline.data.augment.AUGMENTATIONS` (`cifar`, `inception_crop`,
      `bit`, `none`).
    batch_size: global batch size.
    """

    dataset: str = "digits"
    data_dir: Optional[str] = None
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    test_split: Optional[str] = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    image_size: Optional[int] = None
    resize_size: Optional[int] = None
    augment: str = "cifar"
    batch_size: int = 128
    seed: int = 0
    strict_images: bool = False
    cache: bool = True
    shuffle_buffer: int = 10_000
    drop_remainder: bool = False
    resolution_rule: Optional[str] = None  # "hyperrule": pick resize/crop from the stored size
    # -- augmentation policies (pipeline.data.policies; `augment` names the policy, e.g. cifar+randaugment)
    randaugment_ops: int = 2  # RandAugment: operations per image
    randaugment_magnitude: float = 9.0  # RandAugment: timm's 0-10 scale (Keras factor = M / 10)
    random_erasing: float = 0.0  # probability of erasing one box per image (0 = off)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength S: factors in [1-S, 1+S] (0 = off)
    # -- data checks (pipeline.data.inspection, `pipeline.inspect_data`) and balanced sampling
    data_checks: bool = True  # training on a folder writes <run>/data_report/ first
    strict_data: bool = False  # exact duplicates across splits are an error, not a warning
    near_duplicate_bits: int = 6  # difference-hash Hamming distance of a near duplicate
    data_cache_dir: Optional[str] = None  # the folder scan's cache (None: no disk cache)
    balanced_sampling: bool = False  # training draws every class equally often (pipeline.data.balance)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which network to build. Options left None take the model's own default."""

    name: str = "resnet20"
    weights: Optional[str] = None
    shortcut: Optional[str] = None
    stem: Optional[str] = None
    pooling: Optional[str] = None
    width_multiplier: Optional[float] = None
    init_from: Optional[str] = None
    # -- stochastic depth (issue 16: layer decay / drop path; pipeline.models.layers.drop_path)
    drop_path: Optional[float] = None  # the last residual block's drop rate; None or 0: off

    def options(self) -> dict:
        """Family options for `create_model` (None values are dropped there; so is drop_path 0,
        which every model is without, so that models without stochastic depth accept it)."""
        return {"shortcut": self.shortcut, "stem": self.stem, "pooling": self.pooling,
                "width_multiplier": self.width_multiplier, "drop_path": self.drop_path or None}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer phase: name, learning rate and its hyperparameters."""

    name: str = "sgd"
    learning_rate: Optional[float] = 0.1  # None: the schedule decides (HyperRule)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    schedule: a name from `pipeline.training.schedules.SCHEDULES`.
    lr_boundaries: epochs at which `step` multiplies the learning rate by lr_decay.
    switch_optimizer_epoch: if > 0, `second_optimizer` takes over from this epoch
      (0-based count of finished epochs), continuing the global schedule.
    freeze_epochs: fine-tuning: epochs training the head on a frozen backbone.
    steps_per_epoch: None means one pass over the training split.
    total_steps: overrides epochs with a step budget (BiT-HyperRule); epochs are
      then ceil(total_steps / steps_per_epoch).
    """

    epochs: int = 30
    optimizer: OptimizerConfig = OptimizerConfig()
    second_optimizer: Optional[OptimizerConfig] = None
    switch_optimizer_epoch: int = 0
    schedule: str = "step"
    lr_boundaries: tuple = ()
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: Optional[float] = 0.0  # None: the schedule decides (HyperRule: 0.1 from 20k examples)
    # -- batch mixing (pipeline.data.mixing)
    cutmix_alpha: float = 0.0  # CutMix Beta alpha (0 = off)
    mix_switch_prob: float = 0.5  # both alphas > 0: per batch CutMix with this probability, else MixUp
    mix_off_epoch: int = 0  # no mixing from this (0-based) epoch on (0 = mix every epoch)
    precision: str = "auto"
    strategy: str = "auto"
    tpu: Optional[str] = None  # Cloud TPU name/address (`local` on a TPU VM)
    lr_scaling: str = "none"  # "linear": every learning rate x replicas in sync
    seed: int = 0
    deterministic: bool = False
    steps_per_epoch: Optional[int] = None
    total_steps: Optional[int] = None
    freeze_epochs: int = 0
    backbone_lr_multiplier: float = 1.0
    # -- layer-wise learning-rate decay (issue 16; pipeline.models.stages): 1 = off
    layer_decay: float = 1.0
    tensorboard: bool = True
    histogram_freq: int = 0  # TensorBoard weight/gradient histograms every N epochs (0 = off)
    verbose: Optional[int] = None
    # -- time budgets and the HyperRule's step scaling (pipeline.training.budget, pipeline.training.eta)
    hyperrule_steps: str = "scaled"  # "authors": bit_tf2's 500/10k/20k steps at any batch (hyperrule.STEP_SCALING)
    time_budget: Optional[float] = None  # seconds from the process start for all but export and report
    time_budget_plan: str = ""  # how --time_budget chose --image_size/--total_steps (the report says it)
    # -- speed and memory (pipeline.training.feature_cache, .memory, .remat)
    cache_features: bool = True  # frozen phases train the head on cached pooled features when batches allow
    feature_views: int = 0  # augmented views per image precomputed for the cache (0: only seed-free augment)
    remat: bool = False  # gradient checkpointing of the residual blocks (training.remat.RematModel)
    # -- training-loop recipes (pipeline.training.ema, .class_weights, .loop): off by default
    ema_decay: float = 0.0  # weight EMA decay (0 = off); BatchNorm moving statistics are averaged too
    ema_warmup: bool = True  # effective decay min(ema_decay, (1 + n) / (10 + n)) after n optimizer steps
    clip_norm: float = 0.0  # clip the cross-replica summed gradient to this global norm (0 = off)
    accumulation_steps: int = 1  # micro-batches per optimizer step (batch_size stays the effective batch)
    class_weight: str = "none"  # none, balanced, or a .json file {class name: weight}
    best_metric: str = "val_accuracy"  # val_accuracy, val_macro_f1 or val_loss (on the EMA weights with EMA)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; `model_dir` is the run directory."""

    model_dir: str
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    resume: bool = False
    flags_text: str = ""


# -- the learning-rate range test (`pipeline.lr_find`; the metrics engineer's block)

@dataclasses.dataclass(frozen=True)
class LRFindConfig:
    """The scan of `pipeline.lr_find`: lr from `start_lr` to `end_lr`, exponentially, over `steps` steps."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    smoothing: float = 0.98  # beta of the debiased exponential moving average of the loss
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this x its minimum


def to_dict(run: RunConfig) -> dict:
    """JSON-ready dict of a RunConfig (written to `<run>/config.json`)."""
    out = dataclasses.asdict(run)
    out.pop("flags_text", None)
    return out


def from_dict(d: dict) -> RunConfig:
    """Inverse of `to_dict`; unknown keys are ignored so old runs still load."""

    def build(cls, values):
        if values is None:
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in values.items():
            if k not in fields:
                continue
            if k in ("optimizer", "second_optimizer"):
                v = build(OptimizerConfig, v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    return RunConfig(model_dir=d["model_dir"], data=build(DataConfig, d.get("data", {})),
                     model=build(ModelConfig, d.get("model", {})),
                     train=build(TrainConfig, d.get("train", {})),
                     resume=bool(d.get("resume", False)))
