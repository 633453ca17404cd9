"""Evaluate a run's checkpoint: `python -m pipeline.evaluate --model_dir=<run> [--tta=flip]`.

Prints test loss, accuracy, macro-F1, balanced accuracy, ECE, per-class
precision/recall/F1/support and the most-confused pairs (with `--tta`, of the
averaged views, and the accuracy without TTA beside), and writes
`<run>/evaluation_<split>.json`, `<run>/confusion_<split>.csv` and
`<run>/top_losses_<split>.npz` (the report reads them).
"""

from absl import app, flags

from pipeline import cli, rundir

flags.DEFINE_string("model_dir", None, "Run directory to evaluate.", required=True)
flags.DEFINE_enum("split", "test", ["test", "val"], "Which split to evaluate.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to evaluate.")
cli.define_evaluate_flags()
FLAGS = flags.FLAGS


def run(argv):
    from pipeline.training import evaluation  # imports TensorFlow: after the flags are parsed (fast --help, typos)

    result = evaluation.evaluate_and_save(FLAGS.model_dir, split=FLAGS.split, checkpoint=FLAGS.checkpoint,
                                          tta_mode=FLAGS.tta)
    print("\n".join(evaluation.evaluation_lines(result)))
    print(f"confusion matrix: {rundir.path(FLAGS.model_dir, f'confusion_{FLAGS.split}.csv')}")


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
