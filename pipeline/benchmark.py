"""Measure training, input-pipeline and serving speed: `python -m pipeline.benchmark`.

    python -m pipeline.benchmark --model=resnet20 --batch_size=128 [--what=train]
    python -m pipeline.benchmark --what=all --model=bit_m_r50x1 --batch_size=32
    python -m pipeline.benchmark --what=bit_native_vs_savedmodel

`--what`:
  train    images/s of real training steps through `training.train` (the
           pipeline's tf.data over in-memory random images, compile_model, fit),
           timed after `--warmup_steps`;
  input    images/s of the input pipeline alone: `cifar` augmentation of 32x32
           in-memory arrays, and `bit` 160-to-128 crops of a temporary folder of
           JPEG files (decoded every pass, and cached);
  predict  latency p50/p99 at batch 1 and images/s at batch 64 of the model
           exported as a SavedModel (`serving_bench.measure`);
  all      train, input and predict, plus the input/train ratio;
  bit_native_vs_savedmodel
           BiT training steps, native Keras model vs the same weights as a
           SavedModel wrapped in a trainable TFSMLayer.

Prints the machine as the first JSON line, then one JSON line per
measurement, each with `peak_rss_mb` (peak resident memory of the process so
far) and `load_1min`; on a terminal a short table follows. See BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import sys

# TensorFlow turns its oneDNN kernels on by default only on CPUs with
# AVX512-VNNI/BF16 or AMX; on AVX2-only CPUs (e.g. AMD Zen 3) they are off,
# although they train ResNet-20 faster there too (BENCHMARKS.md). The switch is
# read once, when TensorFlow is imported, so it is set here, first. An explicit
# TF_ENABLE_ONEDNN_OPTS in the environment wins (=0 measures the Eigen kernels).
# The same line belongs at the top of pipeline/__init__.py so training gets it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags  # noqa: E402

WHATS = ("train", "input", "predict", "all", "bit_native_vs_savedmodel")
FLAGS = flags.FLAGS


def define_flags():
    from pipeline.training import precision
    from pipeline.data.augment import AUGMENTATIONS
    flags.DEFINE_string("model", "resnet20", "A registered model name (see pipeline.models.list_models).")
    flags.DEFINE_integer("batch_size", 128, "Batch size of every measurement.", lower_bound=1)
    flags.DEFINE_integer("image_size", None, "Square input size (default: the model's own).",
                         lower_bound=8)
    flags.DEFINE_enum("precision", "auto", list(precision.POLICIES),
                      "Keras dtype policy; auto = the fastest safe one on this machine.")
    flags.DEFINE_integer("steps", 30, "Timed steps (batches, or calls for predict).", lower_bound=2)
    flags.DEFINE_integer("warmup_steps", 5, "Untimed steps first (tracing, allocator, autotune).",
                         lower_bound=1)
    flags.DEFINE_enum("what", "train", list(WHATS), "What to measure.")
    flags.DEFINE_enum("augment", None, sorted(AUGMENTATIONS),
                      "Training augmentation (default: bit for BiT, cifar up to 64 px, else "
                      "inception_crop).")
    flags.DEFINE_enum("shortcut", None, ["A", "B"], "CIFAR ResNets: A zero-pad, B projection "
                      "(the PyTorch reference's).")
    flags.DEFINE_integer("input_images", 256, "JPEG files written for the `input` measurement.",
                         lower_bound=8)
    flags.DEFINE_string("profile_dir", None, "train: trace --profile_steps steps after warm-up "
                        "with the TF profiler into this directory (slows those steps).")
    flags.DEFINE_integer("profile_steps", 5, "Steps traced with --profile_dir.", lower_bound=1)


def run(fv) -> list[dict]:
    """Run the measurements `fv.what` asks for, printing each JSON line as it is ready."""
    from pipeline.perf import benchmarks as bench
    from pipeline.models import get_spec, is_valid_model_name
    if not is_valid_model_name(fv.model):
        raise ValueError(f"Unknown --model={fv.model}.")
    image_size = fv.image_size or get_spec(fv.model).default_image_size
    is_bit = get_spec(fv.model).family == "bit"
    common = dict(steps=fv.steps, warmup_steps=fv.warmup_steps)
    results = []

    def emit(result):
        results.append(result)
        print(json.dumps(result), flush=True)
        return result

    emit({"what": "machine", **bench.machine_info()})
    train = None
    if fv.what in ("train", "all"):
        train = emit(bench.measure_train(
            model=fv.model, batch_size=fv.batch_size, image_size=image_size,
            precision=fv.precision, augment=fv.augment,
            model_options={"shortcut": fv.shortcut} if fv.shortcut else None,
            profile_dir=fv.profile_dir, profile_steps=fv.profile_steps, **common))
    if fv.what in ("input", "all"):
        cifar = emit(bench.measure_input_cifar(batch_size=fv.batch_size,
                                               image_size=32 if is_bit else image_size, **common))
        crop = image_size if is_bit else 128
        resize = bench.stored_size("bit", crop)
        jpeg = [emit(bench.measure_input_jpeg(batch_size=fv.batch_size, image_size=crop,
                                              resize_size=resize, images=fv.input_images,
                                              cache=cache, **common))
                for cache in (False, True)]
        if train is not None:
            # The input the trained model really uses: JPEG crops for BiT, arrays otherwise.
            slowest = min(jpeg, key=lambda r: r["images_per_second"]) if is_bit else cifar
            emit({"what": "input_over_train", "model": fv.model, "batch_size": fv.batch_size,
                  "input": slowest["source"], "cache": slowest.get("cache"),
                  "ratio": round(slowest["images_per_second"] / train["images_per_second"], 2)})
    if fv.what in ("predict", "all"):
        emit(bench.measure_predict(model=fv.model, image_size=image_size, precision=fv.precision,
                                   iterations=fv.steps, warmup=fv.warmup_steps))
    if fv.what == "bit_native_vs_savedmodel":
        model = fv.model if is_bit else "bit_m_r50x1"
        for r in bench.measure_bit_native_vs_savedmodel(
                model=model, batch_size=fv.batch_size, image_size=fv.image_size or 128,
                precision=fv.precision, **common):
            emit(r)
    if sys.stdout.isatty():
        print(table(results), flush=True)
    return results


def table(results: list[dict]) -> str:
    """A short human-readable table of the measurement lines."""
    rows = [("what", "detail", "images/s", "p50 ms", "p99 ms", "peak MiB", "load")]
    for r in results:
        if r["what"] == "machine":
            continue
        detail = " ".join(str(r[k]) for k in ("model", "variant", "source", "augment", "precision")
                          if r.get(k) is not None)
        if r.get("cache") is not None:
            detail += f" cache={r['cache']}"
        ips = r.get("images_per_second", r.get("ratio", r.get("native_over_savedmodel", "")))
        rows.append((r["what"], detail[:60], str(ips), str(r.get("latency_p50_ms", "")),
                     str(r.get("latency_p99_ms", "")), str(r.get("peak_rss_mb", "")),
                     str(r.get("load_1min", ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(1)
    from pipeline import cli
    cli.run_cli(run, FLAGS)


define_flags()

if __name__ == "__main__":
    app.run(main)
