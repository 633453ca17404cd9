"""One tiny trained run shared by the metrics and report-mistakes tests (trained once per session).

A quarter-width ResNet-20 on digits at 16 px for 2 short epochs, in-process:
a real model with real (imperfect) predictions, in seconds. The run lives in
the session's base temp dir, so every test module that asks finds the same one.
"""
import os

from pipeline import config as cfg


def small_run(tmp_path_factory) -> str:
    model_dir = str(tmp_path_factory.getbasetemp() / "small_digits_run")
    if os.path.exists(os.path.join(model_dir, "summary.json")):
        return model_dir
    from pipeline import training

    run = cfg.RunConfig(
        model_dir=model_dir,
        data=cfg.DataConfig(dataset="digits", batch_size=64, augment="none", image_size=16),
        model=cfg.ModelConfig(name="resnet20", width_multiplier=0.25),
        train=cfg.TrainConfig(epochs=2, steps_per_epoch=8, optimizer=cfg.OptimizerConfig(learning_rate=0.05),
                              schedule="cosine", tensorboard=False, verbose=0))
    training.train(run)
    return model_dir
