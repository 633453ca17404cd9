"""Train a model from scratch: `python -m pipeline.train --flagfile=flags/quickstart.cfg`."""
from absl import app, flags

from pipeline import cli

cli.define_data_flags()
cli.define_model_flags()
cli.define_train_flags()
cli.define_run_flags()
cli.define_export_flags()
FLAGS = flags.FLAGS


def run(argv):
    if FLAGS.resume:
        cli.reparse_with_run_flagfile(FLAGS)
    run_config = cli.run_config_from_flags(FLAGS, "train")  # bad values refused here, before TensorFlow
    from pipeline import training  # imports TensorFlow
    from pipeline.training import budget

    # --time_budget: the steps (and size; a smaller batch when --batch_size was not given) that fit
    run_config = budget.fit_to_budget(run_config, keep_batch=FLAGS["batch_size"].present)
    result = training.train(run_config)
    return cli.after_training(FLAGS, result)


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
