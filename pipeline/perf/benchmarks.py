"""Throughput, latency and memory measurements behind `python -m pipeline.benchmark`.

Every measurement is a plain function returning a JSON-ready dict, so tests,
notebooks and the command share one implementation:

* `measure_train`: images/s of real training steps through the pipeline's own
  path, `training.train(run, extra_callbacks=[StepTimer])`: the tf.data
  pipeline of `pipeline.data` (shuffle, per-example augmentation, batching,
  one-hot, prefetch) over random uint8 images held in memory (the `random:`
  source of `pipeline.perf.synthetic`, so disk is not measured), the compiled
  model and the training loop of `pipeline.training.loop`. Only steps after
  `warmup_steps` are timed.
* `measure_input_cifar`, `measure_input_jpeg`: images/s of the input pipeline
  alone, iterated without a model: `cifar` augmentation of in-memory 32x32
  arrays, and BiT-HyperRule crops (`bit` augmentation, resize 160 then random
  128 crop) of a temporary folder of JPEG files read through the `folder:`
  source (decode included).
* `measure_predict`: latency p50/p99 at batch 1 and images/s at batch 64 of an
  export written by `pipeline.serving.export.export_model`, timed by
  `pipeline.serving.latency.measure` (the loaded SavedModel signature).
* `measure_bit_native_vs_savedmodel`: training steps of the native Keras BiT
  model against the same weights in a TF-Hub-layout module of the authors'
  forward pass, wrapped in a trainable `keras.layers.TFSMLayer` plus the
  same Dense head.

Each result is `machine.stamp`ed with the peak resident memory of the process
so far and the 1-minute load average when it was taken.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from typing import Optional, Sequence

import keras
import tensorflow as tf

from pipeline import config as cfg
from pipeline import data, training
from pipeline.models import bit_reference, create_model, get_spec
from pipeline.perf.machine import stamp
from pipeline.perf.synthetic import default_augment, random_spec, stored_size, write_jpeg_folder
from pipeline.serving import export, latency
from pipeline.training.precision import apply_precision

# ----------------------------------------------------------------------------- timing


class StepTimer(keras.callbacks.Callback):
    """Wall time of training steps after a warm-up, as a Keras callback.

    The training loop (like Keras `fit`) calls `on_train_batch_end(last step)`
    once per execution (every `steps_per_execution` steps), so the timer
    records (steps done, time) marks and measures from the first mark at or
    after `warmup_steps` steps to the last one.
    """

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


class ProfileSteps(keras.callbacks.Callback):
    """Traces steps [first_step, first_step + num_steps) with the TF profiler into `logdir`.

    Read the trace with TensorBoard's profile plugin (`xprof --logdir=<logdir>`).
    """

    def __init__(self, logdir: str, first_step: int, num_steps: int = 5):
        super().__init__()
        self.logdir, self.first_step, self.num_steps = logdir, first_step, num_steps
        self.active = False

    def on_train_batch_begin(self, batch, logs=None):
        if not self.active and self.first_step <= batch < self.first_step + self.num_steps:
            tf.profiler.experimental.start(self.logdir)
            self.active = True

    def on_train_batch_end(self, batch, logs=None):
        if self.active and batch + 1 >= self.first_step + self.num_steps:
            self._stop()

    def on_train_end(self, logs=None):
        if self.active:
            self._stop()

    def _stop(self):
        tf.profiler.experimental.stop()
        self.active = False


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
                     model_options: Optional[dict] = None, seed: int = 0,
                     train_options: Optional[dict] = None):
    """The RunConfig `measure_train` trains: one epoch of `warmup_steps + steps` steps.

    `train_options`: more TrainConfig fields (`{"remat": True}`).
    """
    augment = augment or default_augment(model, image_size)
    size = stored_size(augment, image_size)
    examples = examples or max(4 * batch_size, 256)
    data_cfg = cfg.DataConfig(
        dataset=random_spec(examples, size, num_classes), image_size=image_size,
        resize_size=size if augment == "bit" else None, augment=augment, batch_size=batch_size,
        seed=seed, drop_remainder=True)
    model_cfg = cfg.ModelConfig(name=model, **(model_options or {}))
    train = cfg.TrainConfig(
        epochs=1, steps_per_epoch=warmup_steps + steps, schedule="constant",
        optimizer=cfg.OptimizerConfig("sgd", learning_rate=0.01, momentum=0.9),
        precision=precision, tensorboard=False, verbose=0, seed=seed, **(train_options or {}))
    return cfg.RunConfig(model_dir=model_dir, data=data_cfg, model=model_cfg, train=train)


def measure_train(*, model: str = "resnet20", batch_size: int = 128, image_size: Optional[int] = None,
                  precision: str = "auto", steps: int = 30, warmup_steps: int = 5,
                  augment: Optional[str] = None, model_options: Optional[dict] = None,
                  profile_dir: Optional[str] = None, profile_steps: int = 5,
                  train_options: Optional[dict] = None) -> dict:
    """Images/s of `training.train` on the in-memory `random:` source (see module docstring).

    `train_options` (e.g. `{"remat": True}`) are TrainConfig fields, recorded in the result.

    With `profile_dir`, the `profile_steps` steps after warm-up are traced by the
    TF profiler (which slows them: the images/s of such a run are not comparable).
    """
    image_size = image_size or get_spec(model).default_image_size
    augment = augment or default_augment(model, image_size)
    timer = StepTimer(warmup_steps)
    with _tempdir("pipeline-bench-train-") as tmp:
        run = train_run_config(os.path.join(tmp, "run"), model=model, batch_size=batch_size,
                               image_size=image_size, precision=precision, steps=steps,
                               warmup_steps=warmup_steps, augment=augment,
                               model_options=model_options, train_options=train_options)
        with contextlib.redirect_stdout(_Quiet()):
            callbacks = [timer]
            if profile_dir:
                callbacks.append(ProfileSteps(profile_dir, warmup_steps, profile_steps))
            result = training.train(run, extra_callbacks=callbacks)
    timed = summarize_steps(*timer.timed(), batch_size)
    return stamp({"what": "train", "model": model, "batch_size": batch_size,
                  "image_size": image_size, "augment": augment,
                  "precision": result.precision, "requested_precision": precision,
                  **{k: v for k, v in (model_options or {}).items() if v is not None},
                  **(train_options or {}), **timed})


class _Quiet:
    """A stdout that swallows the trainer's progress lines (JSON lines stay clean)."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


# ----------------------------------------------------------------------------- input


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
    examples = max(4 * batch_size, 256)
    datasets = data.load_dataset(cfg.DataConfig(
        dataset=random_spec(examples, image_size), augment=augment, batch_size=batch_size,
        drop_remainder=True))
    timed = time_batches(datasets.train, batch_size=batch_size, steps=steps, warmup_steps=warmup_steps)
    return stamp({"what": "input", "source": "memory uint8", "augment": augment,
                  "batch_size": batch_size, "image_size": image_size, **timed})


def measure_policy_operations(augment: str, *, batch_size: int = 128, image_size: int = 32, steps: int = 30,
                              warmup_steps: int = 5) -> list[dict]:
    """Images/s of each operation of `augment`'s policy alone, as the pipeline runs it (issue 16).

    Each operation at 9/10 of its largest strength in a parallel `tf.data`
    map over one in-memory image, then the same map calling nothing (`none`):
    what a policy costs per operation, to weigh against the training rate.
    Returns [] when `augment` has no policy (a crop alone).
    """
    from pipeline.data import augment as augment_lib, policies

    policy = augment_lib.AUGMENT_PARTS[augment][1] if augment in augment_lib.AUGMENT_PARTS else None
    if policy is None:
        return []
    ops = {"randaugment": policies.RANDAUGMENT_OPS, "trivialaugment": policies.TRIVIALAUGMENT_OPS,
           "augmix": policies.AUGMIX_OPS}[policy]
    image = tf.random.stateless_uniform([image_size, image_size, 3], seed=[0, 1])
    examples = (steps + warmup_steps) * batch_size
    results = []
    for name, op in {"none": None, **ops}.items():
        fn = (lambda x: x) if op is None else (lambda x, op=op: policies.apply_op(x, op, op.offset + op.scale * 0.9))
        ds = (tf.data.Dataset.from_tensors(image).repeat(examples)
              .map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True))
        timed = time_batches(ds, batch_size=batch_size, steps=steps, warmup_steps=warmup_steps)
        results.append(stamp({"what": "input_operation", "augment": augment, "operation": name,
                              "batch_size": batch_size, "image_size": image_size, **timed}))
    return results


def measure_input_jpeg(*, batch_size: int = 32, image_size: int = 128, resize_size: int = 160,
                       steps: int = 30, warmup_steps: int = 5, images: int = 256,
                       cache: bool = False, augment: str = "bit",
                       folder: Optional[str] = None) -> dict:
    """The input pipeline alone over a folder of JPEG files (`folder:` source).

    `cache=False` decodes and resizes every file on every pass (the cost when a
    dataset does not fit in memory); `cache=True` is the pipeline's default for
    small data: after the first pass only the augmentation runs.
    """
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = write_jpeg_folder(stack.enter_context(_tempdir("pipeline-bench-jpeg-")),
                                       images=images)
        datasets = data.load_dataset(cfg.DataConfig(
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
    timed through its loaded `serving_default` signature by `latency.measure`."""
    image_size = image_size or get_spec(model).default_image_size
    policy = apply_precision(precision)
    keras.utils.set_random_seed(seed)
    net = create_model(model, num_classes=10, image_size=image_size)
    with _tempdir("pipeline-bench-export-") as tmp:
        path = export.export_model(net, [f"class{i}" for i in range(10)], tmp, "bench", version=1)
        result = latency.measure(path, image_size, batch_sizes=batch_sizes,
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
    spec = get_spec(model)
    if spec.family != "bit":
        raise ValueError(f"{model!r} is not a BiT model (family {spec.family!r}).")
    results = []
    with _tempdir("pipeline-bench-bit-") as tmp:
        keras.mixed_precision.set_global_policy("float32")
        module = bit_reference.save_hub_module(
            os.path.join(tmp, "module"), bit_reference.random_weights(spec.depths, spec.width),
            spec.depths)
        for kind in ("native", "savedmodel"):
            kind_precision = precision if kind == "native" else "float32"  # a SavedModel keeps float32
            policy = apply_precision(kind_precision)
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
