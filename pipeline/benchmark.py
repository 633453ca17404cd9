"""Measure training, input-pipeline and serving speed: `python -m pipeline.benchmark`.

    python -m pipeline.benchmark --model=resnet20 --batch_size=128 [--what=train]
    python -m pipeline.benchmark --what=all --model=bit_m_r50x1 --batch_size=32
    python -m pipeline.benchmark --what=bit_native_vs_savedmodel

`--what`:
  train    images/s of real training steps through `training.train` (the
           pipeline's tf.data over in-memory random images, its compiled model
           and training loop), timed after `--warmup_steps`;
  input    images/s of the input pipeline alone: `cifar` augmentation of 32x32
           in-memory arrays, and `bit` 160-to-128 crops of a temporary folder of
           JPEG files (decoded every pass, and cached);
  predict  latency p50/p99 at batch 1 and images/s at batch 64 of the model
           exported as a SavedModel (`pipeline.serving.latency.measure`);
  all      train, input and predict, plus the input/train ratio;
  bit_native_vs_savedmodel
           BiT training steps, native Keras model vs the same weights as a
           SavedModel wrapped in a trainable TFSMLayer.

Prints the machine as the first JSON line, then one JSON line per
measurement, each with `peak_rss_mb` (peak resident memory of the process so
far) and `load_1min`; on a terminal a short table follows. See BENCHMARKS.md
and `pipeline.perf`.
"""
import os

# TensorFlow turns its oneDNN kernels on by default only on CPUs with
# AVX512-VNNI/BF16 or AMX; on AVX2-only CPUs (e.g. AMD Zen 3) they are off,
# although they train ResNet-20 faster there too (BENCHMARKS.md). The switch is
# read once, when TensorFlow is imported, so it is set here, first. An explicit
# TF_ENABLE_ONEDNN_OPTS in the environment wins (=0 measures the Eigen kernels).
# pipeline/__init__.py sets it the same way for every other entry point.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags  # noqa: E402

from pipeline import cli  # noqa: E402


def _whats():
    from pipeline import perf
    return perf.WHATS


flags.DEFINE_string("model", "resnet20", "A registered model name (see pipeline.models.list_models).")
flags.DEFINE_integer("batch_size", 128, "Batch size of every measurement.", lower_bound=1)
flags.DEFINE_integer("image_size", None, "Square input size (default: the model's own).",
                     lower_bound=8)
cli.lazy_enum("precision", "auto", cli.precision_names,
              "Keras dtype policy; auto = the fastest safe one on this machine.")
flags.DEFINE_integer("steps", 30, "Timed steps (batches, or calls for predict).", lower_bound=2)
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps first (tracing, allocator, autotune).",
                     lower_bound=1)
cli.lazy_enum("what", "train", _whats, "What to measure.")
cli.lazy_enum("augment", None, cli.augmentation_names,
              "Training augmentation (default: bit for BiT, cifar up to 64 px, else "
              "inception_crop).")
flags.DEFINE_enum("shortcut", None, ["A", "B"], "CIFAR ResNets: A zero-pad, B projection "
                  "(the PyTorch reference's).")
flags.DEFINE_integer("input_images", 256, "JPEG files written for the `input` measurement.",
                     lower_bound=8)
flags.DEFINE_string("profile_dir", None, "train: trace --profile_steps steps after warm-up "
                    "with the TF profiler into this directory (slows those steps).")
flags.DEFINE_integer("profile_steps", 5, "Steps traced with --profile_dir.", lower_bound=1)
flags.DEFINE_bool("remat", False, "train: with gradient checkpointing of the residual blocks "
                  "(pipeline.training.remat), to compare peak memory and step time.")
FLAGS = flags.FLAGS


def run(argv) -> list[dict]:
    cli.no_arguments(argv)
    from pipeline import perf  # here, not at import: --help and typos need no TensorFlow
    return perf.run_benchmarks(
        what=FLAGS.what, model=FLAGS.model, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
        precision=FLAGS.precision, steps=FLAGS.steps, warmup_steps=FLAGS.warmup_steps,
        augment=FLAGS.augment, shortcut=FLAGS.shortcut, input_images=FLAGS.input_images,
        profile_dir=FLAGS.profile_dir, profile_steps=FLAGS.profile_steps, remat=FLAGS.remat)


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
