"""Run an export in its own runtime: TensorFlow's SavedModel loader, onnxruntime, or the LiteRT interpreter.

What `pipeline.predict`, `pipeline.serving_bench` and the export's own
accuracy check call, so a number is the runtime's answer and never our Keras
code's. `open_runtime(path)` takes a version folder (its SavedModel), a
`.onnx` or a `.tflite` file and returns a `Runtime`: `run(images)` maps
float32 [batch, height, width, 3] RGB in [0, 1] to a dict of NumPy outputs
(`probabilities`, `class_ids`, and `is_unknown` when the export rejects).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from pipeline.serving import formats

RUNTIMES = ("saved_model", "onnxruntime", "litert")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A loaded export: `run(images) -> {name: ndarray}`, its runtime's name, file and class names."""
    name: str
    path: str
    labels: list
    run: Callable
    deploy: dict = dataclasses.field(default_factory=dict)  # tta, temperature, reject_below
    keep: object = None  # the loaded object the callable needs alive


def kind_of(path: str) -> str:
    """The runtime that runs `path`: by extension for files, `saved_model` for folders."""
    if path.endswith(".onnx"):
        return "onnxruntime"
    if path.endswith(".tflite"):
        return "litert"
    return "saved_model"


def _open_saved_model(path: str, threads: int) -> Runtime:
    import tensorflow as tf

    if threads:  # before TensorFlow runs its first op
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    from pipeline.serving.export import DEFAULT_SIGNATURE, LABELS_FILE, read_model_card, resolve_export
    export_dir = resolve_export(path)
    loaded = tf.saved_model.load(export_dir)
    signature = loaded.signatures[DEFAULT_SIGNATURE]

    def run(images):
        out = signature(images=tf.constant(np.asarray(images, dtype=np.float32)))
        return {k: v.numpy() for k, v in out.items() if k != "class_names"}

    with open(os.path.join(export_dir, "assets", LABELS_FILE), encoding="utf-8") as f:
        labels = [line.rstrip("\n") for line in f if line.strip()]
    return Runtime("saved_model", export_dir, labels, run, read_model_card(export_dir).get("deploy", {}),
                   loaded)


def _open_onnx(path: str, threads: int) -> Runtime:
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(images):
        return dict(zip(names, session.run(names, {"images": np.asarray(images, dtype=np.float32)})))

    meta = session.get_modelmeta().custom_metadata_map
    return Runtime("onnxruntime", path, formats.onnx_labels(path), run,
                   json.loads(meta.get("deploy", "{}")), session)


def _open_litert(path: str, threads: int) -> Runtime:
    from ai_edge_litert.interpreter import Interpreter
    # The interpreter's own default is one thread; use every core like the other runtimes.
    interpreter = Interpreter(model_path=path, num_threads=threads or os.cpu_count())
    runner = interpreter.get_signature_runner()

    def run(images):
        return runner(images=np.asarray(images, dtype=np.float32))

    return Runtime("litert", path, formats.litert_labels(path), run, formats.litert_deploy(path),
                   interpreter)


OPENERS = {"saved_model": _open_saved_model, "onnxruntime": _open_onnx, "litert": _open_litert}


def open_runtime(path: str, *, threads: int = 0) -> Runtime:
    """The export at `path` loaded in its runtime (FileNotFoundError if absent).

    `threads`: intra-op threads (0: each runtime's default; LiteRT's is one, so all cores).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"export {path!r} does not exist")
    kind = kind_of(path)
    if kind != "saved_model":
        formats.check_runtime(kind)
    return OPENERS[kind](path, threads)


def runtimes_of(version_dir: str) -> list[str]:
    """Every file of a version folder a runtime can run: the folder itself, then its `.onnx`/`.tflite`."""
    found = [version_dir]
    for name in (formats.ONNX_FILE, formats.LITERT_FILE):
        if os.path.isfile(os.path.join(version_dir, name)):
            found.append(os.path.join(version_dir, name))
    return found


def accuracy(runtime: Runtime, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 64) -> float:
    """The fraction of `images` whose `class_ids` from `runtime` equal `labels`."""
    correct = 0
    for start in range(0, len(images), batch_size):
        out = runtime.run(images[start:start + batch_size])
        correct += int((np.asarray(out["class_ids"]) == labels[start:start + batch_size]).sum())
    return correct / max(len(images), 1)
