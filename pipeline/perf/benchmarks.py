"""Throughput, latency and memory measurements behind `python -m pipeline.benchmark`.

Every measurement is a plain function returning a JSON-ready dict, so tests,
notebooks and the command share one implementation:

* `measure_train`: images/s of real training steps through the pipeline's own
  path, `training.train(run, extra_callbacks=[StepTimer])`: the real tf.data
  pipeline of `data.py` (shuffle, per-example augmentation, batching, one-hot,
  prefetch) over random uint8 images held in memory (the `random:` source
  registered here, so disk is not measured), `training.compile_model` and
  `model.fit`. Only batches after `warmup_steps` are timed.
* `measure_input`: images/s of the input pipeline alone, iterated without a
  model: `cifar` augmentation of in-memory 32x32 arrays, and BiT-HyperRule
  crops (`bit` augmentation, resize 160 then random 128 crop) of a temporary
  folder of JPEG files read through the `folder:` source (decode included).
* `measure_predict`: latency p50/p99 at batch 1 and images/s at batch 64 of an
  export written by `pipeline.export.export_model`, timed by
  `pipeline.serving_bench.measure` (the loaded SavedModel signature).
* `measure_bit_native_vs_savedmodel`: training steps of the native Keras BiT
  model against the same weights in a TF-Hub-layout module of the authors'
  forward pass, wrapped in a trainable `keras.layers.TFSMLayer` plus the
  same Dense head.

Each result carries `peak_rss_mb`, the peak resident memory of the process so
far (`resource.getrusage`), and the 1-minute load average when it was taken:
on a shared machine a number taken under load is not a number about the code.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

RANDOM_SOURCE = "random"
# Per-channel statistics of uniform uint8 noise scaled to [0, 1].
_RANDOM_STATS = ((0.5, 0.5, 0.5), (0.2887, 0.2887, 0.2887))
_INTERESTING_CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                          "amx_bf16", "amx_tile", "avx_vnni")


# ----------------------------------------------------------------------------- the machine


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1024 * 1024 if platform.system() == "Darwin" else 1024
    return round(peak / scale, 1)


def machine_info() -> dict:
    """CPU model, relevant ISA flags, cores and library versions (one JSON line per run)."""
    import keras
    import tensorflow as tf

    from pipeline.training import precision
    from pipeline.models.layers import tf_onednn_enabled
    flags = precision.cpu_flags()
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_flags": [f for f in _INTERESTING_CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "native_bf16": precision.cpu_has_bf16(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "onednn_enabled": tf_onednn_enabled(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "python": platform.python_version(),
    }


def stamp(result: dict) -> dict:
    """`result` plus the process's peak RSS and the current load average."""
    return {**result, "peak_rss_mb": peak_rss_mb(), "load_1min": load_average()}


# ----------------------------------------------------------------------------- data


def random_spec(examples: int, size: int, num_classes: int = 10) -> str:
    """`dataset=` string of the in-memory `random:` source, e.g. `random:1024x32x10`."""
    return f"{RANDOM_SOURCE}:{int(examples)}x{int(size)}x{int(num_classes)}"


def _register_random_source():
    """Register `random:<examples>x<size>[x<classes>]` with `pipeline.data`.

    Random uint8 RGB images (seeded by `DataConfig.seed`) held in memory, square
    `size`, uniform labels; the whole set is the training split (no val/test).
    It goes through the same `_pipeline` as every other source, like the
    embedded `digits`: shuffle, augmentation with per-example seeds, batching,
    prefetch.
    """
    from pipeline.data import sources as data_lib
    if RANDOM_SOURCE in data_lib.SOURCES:
        return

    @data_lib.register_source(RANDOM_SOURCE)
    def _random_source(spec: str, config):
        try:
            parts = [int(p) for p in spec.split("x")]
            examples, size = parts[:2]
            classes = parts[2] if len(parts) > 2 else 10
            if len(parts) > 3 or min(examples, size, classes) < 1:
                raise ValueError
        except ValueError:
            raise data_lib.DataError(
                f"dataset '{RANDOM_SOURCE}:{spec}' must be '{RANDOM_SOURCE}:<examples>x<size>"
                f"[x<classes>]', e.g. '{random_spec(1024, 32)}'.") from None
        import tensorflow as tf
        rng = np.random.default_rng(config.seed)
        images = rng.integers(0, 256, (examples, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, examples, dtype=np.int32)
        train = data_lib._Split(tf.data.Dataset.from_tensor_slices((images, labels)), examples)
        return data_lib._Source(class_names=[f"class{i}" for i in range(classes)], train=train,
                                val=None, test=None, native_size=size, in_memory=True,
                                bytes_per_pixel=1, stats=_RANDOM_STATS)


_register_random_source()


def default_augment(model_name: str, image_size: int) -> str:
    """The augmentation a real run of `model_name` would use: `bit` for BiT, else `cifar` up to 64 px."""
    from pipeline.models import get_spec
    if get_spec(model_name).family == "bit":
        return "bit"
    return "cifar" if image_size <= 64 else "inception_crop"


def stored_size(augment: str, image_size: int) -> int:
    """Side of the stored images: for `bit`, BiT-HyperRule's resize for this crop
    (160 for a 128 crop, 512 for 480), else the 256/224 rule; else `image_size`."""
    from pipeline.data import augment as augment_lib
    if augment != "bit":
        return image_size
    known = {128: 160, 480: 512}
    return known.get(image_size, augment_lib.default_resize_size(image_size))


# ----------------------------------------------------------------------------- timing


class StepTimer:
    """Wall time of training steps after a warm-up, as a Keras callback.

    Keras calls `on_train_batch_end(end_step)` once per execution (every
    `steps_per_execution` steps), so the timer records (last step, time) marks
    and measures from the first mark at or after `warmup_steps` steps to the
    last one.
    """

    def __new__(cls, *args, **kwargs):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self, warmup_steps: int):
                super().__init__()
                self.warmup_steps = int(warmup_steps)
                self.marks: list[tuple[int, float]] = []

            def on_train_begin(self, logs=None):
                self.marks = []

            def on_train_batch_end(self, batch, logs=None):
                self.marks.append((int(batch) + 1, time.perf_counter()))

            def timed(self):
                """(steps, seconds, per-step seconds of every timed execution)."""
                marks = [m for m in self.marks if m[0] >= self.warmup_steps]
                if len(marks) < 2:
                    raise ValueError(f"Too few steps to time after {self.warmup_steps} warm-up "
                                     "steps; raise --steps.")
                per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:])]
                return marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1], per_step

        return _Timer(*args, **kwargs)


def profile_callback(logdir: str, first_step: int, num_steps: int = 5):
    """A callback tracing steps [first_step, first_step + num_steps) with the TF profiler.

    Read the trace with TensorBoard's profile plugin (`xprof --logdir=<logdir>`)
    or `pipeline.benchmarking.op_stats(logdir)`.
    """
    import keras
    import tensorflow as tf

    class _Profile(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.active = False

        def on_train_batch_begin(self, batch, logs=None):
            if not self.active and first_step <= batch < first_step + num_steps:
                tf.profiler.experimental.start(logdir)
                self.active = True

        def on_train_batch_end(self, batch, logs=None):
            if self.active and batch + 1 >= first_step + num_steps:
                tf.profiler.experimental.stop()
                self.active = False

        def on_train_end(self, logs=None):
            if self.active:
                tf.profiler.experimental.stop()
                self.active = False

    return _Profile()


def summarize_steps(steps: int, seconds: float, per_step: Sequence[float], batch_size: int) -> dict:
    """images/s over the timed window, and from the median step (robust to load spikes)."""
    median = statistics.median(per_step)
    return {
        "timed_steps": int(steps),
        "seconds": round(seconds, 3),
        "images_per_second": round(steps * batch_size / seconds, 1),
        "images_per_second_median_step": round(batch_size / median, 1),
        "step_ms_median": round(median * 1e3, 2),
        "step_ms_min": round(min(per_step) * 1e3, 2),
        "step_ms_max": round(max(per_step) * 1e3, 2),
    }


@contextlib.contextmanager
def _tempdir(prefix: str):
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- train


def train_run_config(model_dir: str, *, model: str, batch_size: int, image_size: int,
                     precision: str, steps: int, warmup_steps: int, augment: Optional[str] = None,
                     num_classes: int = 10, examples: Optional[int] = None,
                     model_options: Optional[dict] = None, seed: int = 0):
    """The RunConfig `measure_train` trains: one epoch of `warmup_steps + steps` steps."""
    from pipeline import config as cfg
    augment = augment or default_augment(model, image_size)
    size = stored_size(augment, image_size)
    examples = examples or max(4 * batch_size, 256)
    data = cfg.DataConfig(
        dataset=random_spec(examples, size, num_classes), image_size=image_size,
        resize_size=size if augment == "bit" else None, augment=augment, batch_size=batch_size,
        seed=seed, drop_remainder=True)
    model_cfg = cfg.ModelConfig(name=model, **(model_options or {}))
    train = cfg.TrainConfig(
        epochs=1, steps_per_epoch=warmup_steps + steps, schedule="constant",
        optimizer=cfg.OptimizerConfig("sgd", learning_rate=0.01, momentum=0.9),
        precision=precision, tensorboard=False, verbose=0, seed=seed)
    return cfg.RunConfig(model_dir=model_dir, data=data, model=model_cfg, train=train)


def measure_train(*, model: str = "resnet20", batch_size: int = 128, image_size: Optional[int] = None,
                  precision: str = "auto", steps: int = 30, warmup_steps: int = 5,
                  augment: Optional[str] = None, model_options: Optional[dict] = None,
                  profile_dir: Optional[str] = None, profile_steps: int = 5) -> dict:
    """Images/s of `training.train` on the in-memory `random:` source (see module docstring).

    With `profile_dir`, the `profile_steps` steps after warm-up are traced by the
    TF profiler (which slows them: the images/s of such a run are not comparable).
    """
    from pipeline.training import trainer as training
    from pipeline.models import get_spec
    image_size = image_size or get_spec(model).default_image_size
    augment = augment or default_augment(model, image_size)
    timer = StepTimer(warmup_steps)
    with _tempdir("pipeline-bench-train-") as tmp:
        run = train_run_config(os.path.join(tmp, "run"), model=model, batch_size=batch_size,
                               image_size=image_size, precision=precision, steps=steps,
                               warmup_steps=warmup_steps, augment=augment,
                               model_options=model_options)
        with contextlib.redirect_stdout(_Quiet()):
            callbacks = [timer]
            if profile_dir:
                callbacks.append(profile_callback(profile_dir, warmup_steps, profile_steps))
            result = training.train(run, extra_callbacks=callbacks)
    timed = summarize_steps(*timer.timed(), batch_size)
    return stamp({"what": "train", "model": model, "batch_size": batch_size,
                  "image_size": image_size, "augment": augment,
                  "precision": result.precision, "requested_precision": precision,
                  **{k: v for k, v in (model_options or {}).items() if v is not None},
                  **timed})


class _Quiet:
    """A stdout that swallows the trainer's progress lines (JSON lines stay clean)."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


# ----------------------------------------------------------------------------- input


def write_jpeg_folder(root: str, *, images: int = 256, classes: int = 4, min_side: int = 160,
                      max_side: int = 320, seed: int = 0, quality: int = 90) -> str:
    """Write `images` photo-like JPEGs (smooth colour fields plus noise, random sizes) into
    one subfolder per class under `root`; returns `root`."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        h, w = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
        coarse = rng.random((4, 4, 3)) * 255
        field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR),
                           dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.jpg"), quality=quality)
    return root


def time_batches(dataset, *, batch_size: int, steps: int, warmup_steps: int) -> dict:
    """Images/s of pulling `steps` batches from `dataset` (repeated) after `warmup_steps`."""
    it = iter(dataset.repeat())
    for _ in range(warmup_steps):
        next(it)
    marks = [time.perf_counter()]
    for _ in range(steps):
        next(it)
        marks.append(time.perf_counter())
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    return summarize_steps(steps, marks[-1] - marks[0], per_step, batch_size)


def measure_input_cifar(*, batch_size: int = 128, image_size: int = 32, steps: int = 30,
                        warmup_steps: int = 5, augment: str = "cifar") -> dict:
    """The input pipeline alone: `augment` over in-memory random uint8 images (the `random:` source)."""
    from pipeline import config as cfg
    from pipeline.data import sources as data_lib
    examples = max(4 * batch_size, 256)
    datasets = data_lib.load_dataset(cfg.DataConfig(
        dataset=random_spec(examples, image_size), augment=augment, batch_size=batch_size,
        drop_remainder=True))
    timed = time_batches(datasets.train, batch_size=batch_size, steps=steps, warmup_steps=warmup_steps)
    return stamp({"what": "input", "source": "memory uint8", "augment": augment,
                  "batch_size": batch_size, "image_size": image_size, **timed})


def measure_input_jpeg(*, batch_size: int = 32, image_size: int = 128, resize_size: int = 160,
                       steps: int = 30, warmup_steps: int = 5, images: int = 256,
                       cache: bool = False, augment: str = "bit",
                       folder: Optional[str] = None) -> dict:
    """The input pipeline alone over a folder of JPEG files (`folder:` source).

    `cache=False` decodes and resizes every file on every pass (the cost when a
    dataset does not fit in memory); `cache=True` is the pipeline's default for
    small data: after the first pass only the augmentation runs.
    """
    from pipeline import config as cfg
    from pipeline.data import sources as data_lib
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = write_jpeg_folder(stack.enter_context(_tempdir("pipeline-bench-jpeg-")),
                                       images=images)
        datasets = data_lib.load_dataset(cfg.DataConfig(
            dataset=f"folder:{folder}", image_size=image_size, resize_size=resize_size,
            augment=augment, batch_size=batch_size, val_fraction=0.0, test_fraction=0.0,
            cache=cache, drop_remainder=True))
        timed = time_batches(datasets.train, batch_size=batch_size, steps=steps,
                             warmup_steps=warmup_steps)
    return stamp({"what": "input", "source": f"jpeg folder ({datasets.num_train} files)",
                  "augment": augment, "cache": cache, "batch_size": batch_size,
                  "image_size": image_size, "resize_size": resize_size, **timed})


# ----------------------------------------------------------------------------- predict


def measure_predict(*, model: str = "resnet20", image_size: Optional[int] = None,
                    precision: str = "auto", iterations: int = 30, warmup: int = 3,
                    batch_sizes: Sequence[int] = (1, 64), seed: int = 0) -> dict:
    """Latency and throughput of the model exported for TF Serving (`export.export_model`),
    timed through its loaded `serving_default` signature by `serving_bench.measure`."""
    import keras

    from pipeline.serving import export
    from pipeline.serving import latency as serving_bench
    from pipeline.training import precision as precision_lib
    from pipeline.models import create_model, get_spec
    image_size = image_size or get_spec(model).default_image_size
    policy = precision_lib.apply_precision(precision)
    keras.utils.set_random_seed(seed)
    net = create_model(model, num_classes=10, image_size=image_size)
    with _tempdir("pipeline-bench-export-") as tmp:
        path = export.export_model(net, [f"class{i}" for i in range(10)], tmp, "bench", version=1)
        result = serving_bench.measure(path, image_size, batch_sizes=batch_sizes,
                                       iterations=iterations, warmup=warmup)
    out = {"what": "predict", "model": model, "image_size": image_size, "precision": policy,
           "through": "SavedModel serving_default"}
    for m in result["measurements"]:
        b = m["batch_size"]
        out[f"batch{b}_p50_ms"] = m["p50_ms"]
        out[f"batch{b}_p99_ms"] = m["p99_ms"]
        out[f"batch{b}_images_per_second"] = m["images_per_second"]
    out["latency_p50_ms"] = result["latency_p50_ms"]
    out["latency_p99_ms"] = result["latency_p99_ms"]
    out["images_per_second"] = result["images_per_second"]
    return stamp(out)


# ----------------------------------------------------------------------------- BiT native vs SavedModel


def measure_bit_native_vs_savedmodel(*, model: str = "bit_m_r50x1", batch_size: int = 32,
                                     image_size: int = 128, precision: str = "auto",
                                     steps: int = 10, warmup_steps: int = 3) -> list[dict]:
    """Training steps of the native Keras BiT model vs the same weights as a SavedModel layer.

    The SavedModel is what a user would otherwise fine-tune: a TF-Hub-layout
    module computing the BiT authors' forward pass
    (`pipeline.models.bit_reference`, random weights under the authors'
    names). The native model loads its weights from that module through the
    TF-Hub path (`create_model(model, weights=<module dir>)`, self-check
    included); the other is `hub:<module dir>`, the module wrapped as a
    trainable `TFSMLayer`. Both then go through `training.train` with the same
    data (in-memory `bit` crops), a zero-initialized Dense head and the same
    optimizer. The native model computes under `precision`; the module, as
    saved, in float32.

    Returns:
      [native result, SavedModel result, ratio line].
    """
    import keras

    from pipeline.training import precision as precision_lib
    from pipeline.training import trainer as training
    from pipeline.models import bit as bit_lib
    from pipeline.models import bit_reference, create_model

    arch = bit_lib.arch_of(model)
    results = []
    with _tempdir("pipeline-bench-bit-") as tmp:
        keras.mixed_precision.set_global_policy("float32")
        module = bit_reference.save_hub_module(
            os.path.join(tmp, "module"), bit_reference.random_weights(arch.depths, arch.width),
            arch.depths)
        for kind in ("native", "savedmodel"):
            kind_precision = precision if kind == "native" else "float32"  # a SavedModel keeps float32
            policy = precision_lib.apply_precision(kind_precision)
            keras.utils.set_random_seed(0)
            if kind == "native":
                net = create_model(model, num_classes=10, image_size=image_size, weights=module)
                name = model
            else:
                name = f"hub:{module}"
                net = create_model(name, num_classes=10, image_size=image_size)
            timer = StepTimer(warmup_steps)
            run = train_run_config(os.path.join(tmp, f"run_{kind}"), model=name,
                                   batch_size=batch_size, image_size=image_size,
                                   precision=kind_precision,
                                   steps=steps, warmup_steps=warmup_steps, augment="bit")
            with contextlib.redirect_stdout(_Quiet()):
                training.train(run, model=net, extra_callbacks=[timer])
            del net
            results.append(stamp({
                "what": "bit_native_vs_savedmodel", "variant": kind, "model": name,
                "batch_size": batch_size, "image_size": image_size, "precision": policy,
                **summarize_steps(*timer.timed(), batch_size)}))
    native, wrapped = results
    results.append(stamp({
        "what": "bit_native_vs_savedmodel", "variant": "ratio", "model": model,
        "batch_size": batch_size, "image_size": image_size,
        "native_over_savedmodel": round(native["images_per_second"] / wrapped["images_per_second"], 2),
        "native_over_savedmodel_median_step": round(
            native["images_per_second_median_step"] / wrapped["images_per_second_median_step"], 2)}))
    return results
