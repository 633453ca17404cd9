"""One tiny trained run shared by the metrics and report-mistakes tests (trained once per session).

A quarter-width ResNet-20 on digits at 16 px for 2 short epochs, in-process:
a real model with real (imperfect) predictions, in seconds. The run lives in
the session's temp dir (`shared_across_workers`), so every test module that asks, in any
xdist worker, finds the same one.
"""
from pipeline import config as cfg
from tests.helpers import shared_across_workers


def small_run(tmp_path_factory) -> str:
    return shared_across_workers(tmp_path_factory, "small_digits_run", _train)


def _train(model_dir: str) -> str:
    from pipeline import training

    run = cfg.RunConfig(
        model_dir=model_dir,
        data=cfg.DataConfig(dataset="digits", batch_size=64, augment="none", image_size=16),
        model=cfg.ModelConfig(name="resnet20", width_multiplier=0.25),
        train=cfg.TrainConfig(epochs=2, steps_per_epoch=8, optimizer=cfg.OptimizerConfig(learning_rate=0.05),
                              schedule="cosine", tensorboard=False, verbose=0))
    training.train(run)
    return model_dir
