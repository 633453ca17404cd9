"""Evaluate a run's checkpoint: `python -m pipeline.evaluate --model_dir=<run>`.

Prints test loss and accuracy and per-class accuracy, and writes
`<run>/evaluation_<split>.json` and `<run>/confusion_<split>.csv`.
"""

from absl import app, flags

from pipeline import cli, rundir

flags.DEFINE_string("model_dir", None, "Run directory to evaluate.", required=True)
flags.DEFINE_enum("split", "test", ["test", "val"], "Which split to evaluate.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to evaluate.")
FLAGS = flags.FLAGS


def run(argv):
    from pipeline import training  # imports TensorFlow: after the flags are parsed (fast --help, typos)

    result = training.evaluate_checkpoint(FLAGS.model_dir, split=FLAGS.split, checkpoint=FLAGS.checkpoint)
    rundir.write_evaluation(FLAGS.model_dir, FLAGS.split, result)
    print(f"{FLAGS.split}: loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f} "
          f"({result['examples']} images, {FLAGS.checkpoint} checkpoint)")
    width = max(len(n) for n in result["class_names"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print(f"confusion matrix: {rundir.path(FLAGS.model_dir, f'confusion_{FLAGS.split}.csv')}")


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
