"""Latency and throughput of an export in each of its runtimes, side by side.

    python -m pipeline.serving_bench --export=saved_models/<name>[/<version>]|<file>.onnx|<file>.tflite \
        [--batch_sizes=1,64] [--iterations=50] [--signature=serving_default]

prints one JSON line per runtime and batch size: the SavedModel's signature,
then the version folder's model.onnx (onnxruntime) and model.tflite (LiteRT
interpreter) when present (see `pipeline.serving.latency.measure_runtimes`).
`--signature=serving_bytes` times the SavedModel's bytes signature alone.
"""
import json

from absl import app, flags

from pipeline import cli
from pipeline.serving import latency

flags.DEFINE_string("export", None, "saved_models/<name>[/<version>]", required=True)
flags.DEFINE_integer("image_size", None, "Input side (default: the model card's size).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes to measure.")
flags.DEFINE_integer("iterations", latency.DEFAULT_ITERATIONS, "Timed calls per batch size.", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed calls first.", lower_bound=0)
flags.DEFINE_float("max_seconds", 60.0, "Per batch size, stop timing after this long.")
flags.DEFINE_enum("signature", "serving_default", ["serving_default", "serving_bytes"],
                  "Which signature to time.")
flags.DEFINE_integer("threads", 0, "Intra- and inter-op threads (0: TensorFlow's default).")
FLAGS = flags.FLAGS


def run(argv):
    cli.no_arguments(argv)
    if FLAGS.signature == "serving_default":
        results = latency.measure_runtimes(FLAGS.export, FLAGS.image_size, [int(b) for b in FLAGS.batch_sizes],
                                           FLAGS.iterations, warmup=FLAGS.warmup,
                                           max_seconds=FLAGS.max_seconds, threads=FLAGS.threads)
        for result in results:
            for m in result["measurements"]:
                print(json.dumps({"runtime": result["runtime"], "export": result["export"],
                                  "image_size": result["image_size"], **m}), flush=True)
        return results
    result = latency.measure(FLAGS.export, FLAGS.image_size, [int(b) for b in FLAGS.batch_sizes],
                             FLAGS.iterations, signature=FLAGS.signature, warmup=FLAGS.warmup,
                             max_seconds=FLAGS.max_seconds, threads=FLAGS.threads)
    for m in result["measurements"]:
        print(json.dumps({"export": result["export"], "signature": result["signature"],
                          "image_size": result["image_size"], **m}), flush=True)
    return result


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
