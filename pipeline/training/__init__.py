"""Training: the trainer (`train`), its loop, optimizers, schedules, callbacks, precision and distribution."""
from pipeline.training.callbacks import TrainingDiverged  # noqa: F401
from pipeline.training.trainer import TrainResult, evaluate_checkpoint, train  # noqa: F401
