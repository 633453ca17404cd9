"""Evaluate a run's checkpoint: `python -m pipeline.evaluate --model_dir=<run>`.

Prints test loss and accuracy and per-class accuracy, and writes
`<run>/evaluation_<split>.json` and `<run>/confusion_<split>.csv`.
"""

from absl import app, flags

from pipeline import flags_common, rundir, training

flags.DEFINE_string("model_dir", None, "Run directory to evaluate.", required=True)
flags.DEFINE_enum("split", "test", ["test", "val"], "Which split to evaluate.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to evaluate.")
FLAGS = flags.FLAGS


def write_results(model_dir: str, split: str, result: dict) -> None:
    names = result["class_names"]
    rows = [["true\\predicted", *names]] + [[n, *map(str, row)] for n, row in zip(names, result["confusion"])]
    rundir.write_text_atomic(rundir.path(model_dir, f"confusion_{split}.csv"),
                             "\n".join(",".join(_csv_cell(c) for c in r) for r in rows) + "\n")
    summary = {k: v for k, v in result.items() if k != "confusion"}
    rundir.write_json_atomic(rundir.path(model_dir, f"evaluation_{split}.json"), summary)


def _csv_cell(value: str) -> str:
    return f'"{value}"' if ("," in value or '"' in value) else value


def run(argv):
    result = training.evaluate_checkpoint(FLAGS.model_dir, split=FLAGS.split, checkpoint=FLAGS.checkpoint)
    write_results(FLAGS.model_dir, FLAGS.split, result)
    print(f"{FLAGS.split}: loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f} "
          f"({result['examples']} images, {FLAGS.checkpoint} checkpoint)")
    width = max(len(n) for n in result["class_names"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print(f"confusion matrix: {rundir.path(FLAGS.model_dir, f'confusion_{FLAGS.split}.csv')}")


def main(argv):
    flags_common.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main)
