"""Train a model from scratch: `python -m pipeline.train --flagfile=flags/quickstart.cfg`."""
from absl import app, flags

from pipeline import flags_common, training

flags_common.define_data_flags()
flags_common.define_model_flags()
flags_common.define_train_flags()
flags_common.define_run_flags()
flags_common.define_export_flags()
FLAGS = flags.FLAGS


def run(argv):
    if FLAGS.resume:
        flags_common.reparse_with_run_flagfile(FLAGS)
    result = training.train(flags_common.run_config_from_flags(FLAGS, "train"))
    return flags_common.after_training(FLAGS, result)


def main(argv):
    flags_common.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main)
