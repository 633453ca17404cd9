"""Latency and throughput of an export through its loaded SavedModel signature.

`measure()` is what `python -m pipeline.serving_bench` and
`pipeline.benchmark --what=predict` call. What is timed is one call of
the signature loaded by `tf.saved_model.load` — the model, the resize (and for
`serving_bytes` the image decoding) and the label lookup — on inputs already in
memory; no network or request parsing, so a real server adds its own overhead.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from pipeline.serving import export

DEFAULT_ITERATIONS = 50


def _inputs(signature_name: str, batch_size: int, image_size: tuple[int, int], seed: int):
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, *image_size, 3), dtype=np.float32)
    if signature_name == export.DEFAULT_SIGNATURE:
        return {export.IMAGES_INPUT: tf.constant(images)}
    if signature_name == export.BYTES_SIGNATURE:
        data = [tf.io.encode_png(tf.constant((im * 255).astype(np.uint8))).numpy() for im in images]
        return {export.BYTES_INPUT: tf.constant(data, dtype=tf.string)}
    raise ValueError(f"signature must be one of {', '.join(export.SIGNATURES)}, got {signature_name!r}")


def time_calls(fn, inputs: dict, *, iterations: int, warmup: int = 2,
               max_seconds: Optional[float] = None) -> list[float]:
    """Wall seconds of `iterations` calls of `fn(**inputs)` (results fetched) after `warmup` calls.

    Stops early after `max_seconds` (at least 3 timed calls are kept).
    """
    for _ in range(warmup):
        _fetch(fn(**inputs))
    times = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        _fetch(fn(**inputs))
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return times


def _fetch(outputs):
    return {k: v.numpy() if hasattr(v, "numpy") else v for k, v in outputs.items()}


def summarize(times: Sequence[float], batch_size: int) -> dict:
    """Latency percentiles (ms) and throughput (images/s) of per-call times."""
    t = np.asarray(times, dtype=np.float64)
    return {
        "batch_size": int(batch_size),
        "iterations": int(len(t)),
        "p50_ms": round(float(np.percentile(t, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(t, 99)) * 1e3, 3),
        "mean_ms": round(float(t.mean()) * 1e3, 3),
        "images_per_second": round(batch_size * len(t) / float(t.sum()), 2),
    }


def _input_size(image_size, card_dir: str, name: str, batch_sizes) -> tuple:
    """(height, width) to time: `image_size`, else the model card's; batch sizes checked too."""
    if image_size is None:
        image_size = export.read_model_card(card_dir).get("image_size")
        if image_size is None:
            raise ValueError(f"{name} has no model card with image_size; pass image_size.")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
    return (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)


def measure(export_dir: str, image_size=None, batch_sizes: Sequence[int] = (1, 64),
            iterations: int = DEFAULT_ITERATIONS, *, signature: str = "serving_default",
            warmup: int = 2, max_seconds: Optional[float] = 60.0, seed: int = 0,
            threads: int = 0) -> dict:
    """Time an export's signature at each batch size.

    Args:
      export_dir: `saved_models/<name>/<version>` or `saved_models/<name>` (newest).
      image_size: int or (height, width) of the generated inputs; default: the
        model's own size from its model card.
      batch_sizes: one measurement per batch size.
      iterations: timed calls per batch size (after `warmup` untimed ones).
      signature: `serving_default` (float32 images) or `serving_bytes` (PNG bytes).
      max_seconds: per batch size, stop timing after this long (>= 3 calls kept).
      threads: intra- and inter-op threads (0: TensorFlow's default); set before
        TensorFlow runs its first op.

    Returns:
      {"export", "signature", "image_size", "measurements": [per batch size:
      batch_size, iterations, p50_ms, p99_ms, mean_ms, images_per_second],
      "latency_p50_ms", "latency_p99_ms" (smallest batch), "images_per_second"
      (largest batch)}.
    """
    import tensorflow as tf
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    export_dir = export.resolve_export(export_dir)
    size = _input_size(image_size, export_dir, export_dir, batch_sizes)
    loaded = tf.saved_model.load(export_dir)
    if signature not in loaded.signatures:
        raise ValueError(f"{export_dir} has no signature {signature!r}")
    fn = loaded.signatures[signature]
    measurements = []
    for batch_size in batch_sizes:
        inputs = _inputs(signature, batch_size, size, seed)
        times = time_calls(fn, inputs, iterations=iterations, warmup=warmup, max_seconds=max_seconds)
        measurements.append(summarize(times, batch_size))
    smallest = min(measurements, key=lambda m: m["batch_size"])
    largest = max(measurements, key=lambda m: m["batch_size"])
    return {
        "export": export_dir,
        "signature": signature,
        "image_size": list(size),
        "measurements": measurements,
        "latency_p50_ms": smallest["p50_ms"],
        "latency_p99_ms": smallest["p99_ms"],
        "images_per_second": largest["images_per_second"],
    }


def measure_runtimes(export_path: str, image_size=None, batch_sizes: Sequence[int] = (1, 64),
                     iterations: int = DEFAULT_ITERATIONS, *, warmup: int = 2,
                     max_seconds: Optional[float] = 60.0, seed: int = 0, threads: int = 0) -> list[dict]:
    """`measure`'s numbers for every runtime of an export, side by side (float32 images in).

    `export_path`: a version folder (its SavedModel, then its model.onnx and
    model.tflite when present) or one `.onnx`/`.tflite` file. Each runtime is
    timed through `runtimes.open_runtime(...).run` on the same random images.

    Returns:
      One dict per runtime: {"runtime", "export", "image_size", "measurements", ...}.
    """
    from pipeline.serving import runtimes
    if runtimes.kind_of(export_path) == "saved_model":
        paths = runtimes.runtimes_of(export.resolve_export(export_path))
        card_dir = paths[0]
    else:
        paths, card_dir = [export_path], os.path.dirname(export_path)
    size = _input_size(image_size, card_dir, export_path, batch_sizes)
    results = []
    for path in paths:
        runtime = runtimes.open_runtime(path, threads=threads)
        measurements = []
        for batch_size in batch_sizes:
            images = np.random.default_rng(seed).random((batch_size, *size, 3), dtype=np.float32)
            times = time_calls(lambda images: runtime.run(images), {"images": images},
                               iterations=iterations, warmup=warmup, max_seconds=max_seconds)
            measurements.append(summarize(times, batch_size))
        results.append({"runtime": runtime.name, "export": path, "image_size": list(size),
                        "measurements": measurements})
    return results
