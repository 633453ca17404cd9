"""Classify image files with an export, exactly as TF Serving would.

    python -m pipeline.predict --export=saved_models/<name>[/<version>]|<file>.onnx|<file>.tflite \
        IMAGE|DIR... [--top_k=3] [--json] [--tta=none|flip|flip_crops]

Prints one line per image (`--json`: one JSON object per line); a directory
stands for the image files under it, recursively. An image the model cannot
decode is reported on stderr; the others are still classified and the exit
status is 1 (some answers were given: not a refused command, which is 2).
See `pipeline.serving.predict`.
"""
import sys

from absl import app, flags

from pipeline import cli, cli_deploy
from pipeline.serving import predict

flags.DEFINE_string("export", None, "An export: saved_models/<name> (newest version), "
                    "saved_models/<name>/<version>, or its model.onnx / model.tflite.", required=True)
flags.DEFINE_integer("top_k", 3, "How many classes to print per image.", lower_bound=1)
flags.DEFINE_bool("json", False, "Print one JSON object per image instead of text.")
flags.DEFINE_integer("batch_size", 32, "Images per request.", lower_bound=1)
cli_deploy.define_predict_tta_flag()
FLAGS = flags.FLAGS


def run(argv):
    return predict.print_predictions(FLAGS.export, argv[1:], top_k=FLAGS.top_k, as_json=FLAGS.json,
                                     batch_size=FLAGS.batch_size, tta=FLAGS.tta)


def main(argv):
    if cli.run_cli(run, argv):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
