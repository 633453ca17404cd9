"""Training: the trainer (`train`), its loop, phases, optimizers, schedules, callbacks, precision, distribution."""
from pipeline.training.callbacks import TrainingDiverged  # noqa: F401
from pipeline.training.evaluation import evaluate_checkpoint  # noqa: F401
from pipeline.training.trainer import TrainResult, train  # noqa: F401
