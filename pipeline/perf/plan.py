"""What `python -m pipeline.benchmark --what=...` measures, in which order, and how it is printed.

The measurement plan in one function taking plain values, so the verb is flags
plus one call: the machine line first, then one JSON line per measurement as
soon as it is ready (a long run shows progress, and a killed one keeps what it
measured), then on a terminal a short table.
"""
from __future__ import annotations

import json
import sys
from typing import Optional, TextIO

from pipeline.models import get_spec, is_valid_model_name
from pipeline.perf import benchmarks as bench
from pipeline.perf.machine import machine_info, record_rss_after_import
from pipeline.perf.synthetic import stored_size

WHATS = ("train", "input", "predict", "all", "bit_native_vs_savedmodel")
# What --what=bit_native_vs_savedmodel measures when --model is not a BiT model.
DEFAULT_BIT_MODEL = "bit_m_r50x1"


def run_benchmarks(*, what: str = "train", model: str = "resnet20", batch_size: int = 128,
                   image_size: Optional[int] = None, precision: str = "auto", steps: int = 30,
                   warmup_steps: int = 5, augment: Optional[str] = None,
                   shortcut: Optional[str] = None, input_images: int = 256,
                   profile_dir: Optional[str] = None, profile_steps: int = 5, remat: bool = False,
                   out: Optional[TextIO] = None) -> list[dict]:
    """Run the measurements `what` asks for, printing each JSON line to `out` as it is ready.

    Args:
      what: one of WHATS (see `pipeline.benchmark`).
      model: a registered model name.
      batch_size: batch size of every measurement.
      image_size: square input size; default the model's own.
      precision: a `pipeline.training.precision` policy (`auto`: the fastest safe one).
      steps: timed steps (batches, or calls for predict).
      warmup_steps: untimed steps first.
      augment: training augmentation; default the one a real run of `model` uses.
      shortcut: CIFAR ResNets' shortcut option (`A` or `B`), None for the model's default.
      input_images: JPEG files written for the `input` measurement.
      profile_dir: train: trace `profile_steps` steps after warm-up into this directory.
      profile_steps: how many steps `profile_dir` traces.
      remat: train: with gradient checkpointing (`pipeline.training.remat`).
      out: where the lines go (default sys.stdout); a terminal also gets `table(results)`.

    Returns:
      The printed measurements, the machine line first.

    Raises:
      ValueError: unknown `what` or `model`.
    """
    if what not in WHATS:
        raise ValueError(f"what must be one of {', '.join(WHATS)}, got {what!r}")
    if not is_valid_model_name(model):
        raise ValueError(f"Unknown --model={model}.")
    out = out or sys.stdout
    requested_size, image_size = image_size, image_size or get_spec(model).default_image_size
    is_bit = get_spec(model).family == "bit"
    record_rss_after_import()  # TensorFlow and the pipeline are imported; nothing is built yet
    common = dict(steps=steps, warmup_steps=warmup_steps)
    results = []

    def emit(result):
        results.append(result)
        print(json.dumps(result), file=out, flush=True)
        return result

    emit({"what": "machine", **machine_info()})
    train = None
    if what in ("train", "all"):
        train = emit(bench.measure_train(
            model=model, batch_size=batch_size, image_size=image_size, precision=precision,
            augment=augment, model_options={"shortcut": shortcut} if shortcut else None,
            profile_dir=profile_dir, profile_steps=profile_steps,
            train_options={"remat": True} if remat else None, **common))
    if what in ("input", "all"):
        _measure_input(emit, train, model=model, is_bit=is_bit, batch_size=batch_size, augment=augment,
                       image_size=image_size, input_images=input_images, common=common)
    if what in ("predict", "all"):
        emit(bench.measure_predict(model=model, image_size=image_size, precision=precision,
                                   iterations=steps, warmup=warmup_steps))
    if what == "bit_native_vs_savedmodel":
        for r in bench.measure_bit_native_vs_savedmodel(
                model=model if is_bit else DEFAULT_BIT_MODEL, batch_size=batch_size,
                image_size=requested_size or 128, precision=precision, **common):
            emit(r)
    if out.isatty():
        print(table(results), file=out, flush=True)
    return results


def _measure_input(emit, train: Optional[dict], *, model: str, is_bit: bool, batch_size: int,
                   image_size: int, input_images: int, common: dict, augment: Optional[str] = None) -> None:
    """The input measurements (arrays, then JPEG crops uncached and cached), then input/train."""
    cifar = emit(bench.measure_input_cifar(batch_size=batch_size, augment=augment or "cifar",  # issue 16
                                           image_size=32 if is_bit else image_size, **common))
    for line in bench.measure_policy_operations(augment or "cifar", batch_size=batch_size,
                                                image_size=32 if is_bit else image_size, **common):
        emit(line)
    crop = image_size if is_bit else 128
    resize = stored_size("bit", crop)
    jpeg = [emit(bench.measure_input_jpeg(batch_size=batch_size, image_size=crop,
                                          resize_size=resize, images=input_images,
                                          cache=cache, **common))
            for cache in (False, True)]
    if train is not None:
        # The input the trained model really uses: JPEG crops for BiT, arrays otherwise.
        slowest = min(jpeg, key=lambda r: r["images_per_second"]) if is_bit else cifar
        emit({"what": "input_over_train", "model": model, "batch_size": batch_size,
              "input": slowest["source"], "cache": slowest.get("cache"),
              "ratio": round(slowest["images_per_second"] / train["images_per_second"], 2)})


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
