"""Fine-tune a pretrained backbone: `python -m pipeline.finetune --model=bit_m_r50x1 --dataset=...`.

Defaults follow the BiT authors (BiT-HyperRule): resolution from the image
size, a step budget from the dataset size scaled to the batch, warm-up, /10
decays at 30/60/90%, lr 0.003 x batch/512, MixUp 0.1 from 20k examples on,
SGD momentum 0.9, no weight decay, zero-initialized head. Any of them can be
overridden by its flag; `--hyperrule_steps=authors` keeps the authors' unscaled
step budget, and `--time_budget=30m` picks the resolution and steps that fit.
Other backbones typically use `--freeze_epochs` and
`--backbone_lr_multiplier` with an ordinary schedule.
"""
from absl import app, flags

from pipeline import cli

cli.define_data_flags()
cli.define_model_flags(default_model="bit_m_r50x1")
cli.define_train_flags(schedule="hyperrule", learning_rate=None, epochs=10)
cli.define_finetune_flags()
cli.define_run_flags()
cli.define_export_flags()
FLAGS = flags.FLAGS
FLAGS.set_default("augment", "bit")
FLAGS.set_default("batch_size", 64)
FLAGS.set_default("mixup_alpha", None)


def run(argv):
    if FLAGS.resume:
        cli.reparse_with_run_flagfile(FLAGS)
    run_config = cli.run_config_from_flags(FLAGS, "finetune")  # bad values refused here, before TensorFlow
    from pipeline import training  # imports TensorFlow
    from pipeline.training import budget, finetuning

    run_config = finetuning.finetune_run(run_config)
    # --time_budget: choose --image_size/--total_steps (and a smaller batch when --batch_size was not given)
    run_config = budget.fit_to_budget(run_config, keep_batch=FLAGS["batch_size"].present)
    return cli.after_training(FLAGS, training.train(run_config))


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
