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

    def options(self) -> dict:
        """Family options for `create_model` (None values are dropped there)."""
        return {"shortcut": self.shortcut, "stem": self.stem, "pooling": self.pooling,
                "width_multiplier": self.width_multiplier}


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
    tensorboard: bool = True
    histogram_freq: int = 0  # TensorBoard weight/gradient histograms every N epochs (0 = off)
    verbose: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; `model_dir` is the run directory."""

    model_dir: str
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    resume: bool = False
    flags_text: str = ""


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
