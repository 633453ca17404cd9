"""ONNX and LiteRT (TFLite) files beside the SavedModel, through Keras's own `model.export`.

`model.export(path, format="onnx"|"litert")` wraps only a model's `call()`, so
what is exported is `deploy_model(model, ...)`: a Keras model whose one layer
holds the network and does the resize, TTA, temperature, softmax, class ids and
"unknown" of `pipeline.serving.head` (the same function the SavedModel's
signatures call). Contract of both files: input `images` float32 [batch,
height, width, 3] RGB in [0, 1], any batch and size; outputs `probabilities`,
`class_ids` and, with `--reject_below`, `is_unknown`.

The class names travel inside the files: ONNX `metadata_props` (`classes`,
a JSON list, and the model card's deploy settings), and in the `.tflite` as
an associated file `labels.txt` (a zip archive appended to the flatbuffer, the
TFLite metadata convention: `zipfile.ZipFile("model.tflite").read("labels.txt")`).

LiteRT files use TFLite builtin operations only (the ai-edge-litert
interpreter has no Flex delegate); quantization (`QUANTIZATIONS`): float16
weights, dynamic-range int8 weights, or full int8 inside with float32 input
and output calibrated on a representative set of training images.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Callable, Optional

from pipeline import rundir
from pipeline.serving import head

FORMATS = ("saved_model", "onnx", "litert")
FORMAT_CHOICES = FORMATS + ("all",)
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
ONNX_FILE = "model.onnx"
LITERT_FILE = "model.tflite"
FILES = {"onnx": ONNX_FILE, "litert": LITERT_FILE}
EXTRA = "deploy"
# The Python modules each format needs at export time (installed by `pip install -e ".[deploy]"`).
REQUIRED_MODULES = {"saved_model": (), "onnx": ("tf2onnx", "onnx"), "litert": ()}


class MissingExtraError(ValueError):
    """A format's converter or runtime is not installed: names the extra (a bad-command exit, 2)."""


def formats_of(choice: str) -> tuple[str, ...]:
    """The formats `--format=<choice>` writes (`all`: every one), ValueError for an unknown one."""
    if choice == "all":
        return FORMATS
    if choice not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMAT_CHOICES)}, got {choice!r}")
    return (choice,)


def check_installed(formats) -> None:
    """MissingExtraError in one line if a converter a format needs cannot be imported."""
    import importlib.util
    for fmt in formats:
        for module in REQUIRED_MODULES[fmt]:
            if importlib.util.find_spec(module) is None:
                raise MissingExtraError(
                    f"--format={fmt} needs the {module!r} package: pip install -e \".[{EXTRA}]\"")


RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert"}


def check_runtime(runtime: str) -> None:
    """MissingExtraError in one line if the runtime that runs a `.onnx`/`.tflite` is not installed."""
    import importlib.util
    module = RUNTIME_MODULES[runtime]
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"running this export needs the {module!r} package: "
                                f"pip install -e \".[{EXTRA}]\"")


def float32_model(model):
    """`model` itself if it computes in float32, else a float32 copy with its weights.

    ONNX export needs a float32 policy; `keras.models.clone_model` rebuilds each
    layer from its config with `dtype="float32"` (public API, no attribute surgery).
    """
    import keras

    if head.compute_policy(model) == "float32":
        return model

    def as_float32(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=as_float32)
    copy.set_weights(model.get_weights())
    return copy


def deploy_model(model, image_size: tuple[int, int], options: head.DeployOptions):
    """The Keras model the ONNX and LiteRT files are exported from (see the module docstring)."""
    import keras

    class DeployHead(keras.layers.Layer):
        """Resize to the model's size, then `head.outputs` (the same as the SavedModel's)."""

        def __init__(self, network, **kwargs):
            super().__init__(**kwargs)
            self.network = network

        def call(self, images):
            resized = head.builtin_resize(images, *image_size)
            return head.outputs(self.network, resized, options)

    inputs = keras.Input((None, None, 3), dtype="float32", name="images")
    return keras.Model(inputs, DeployHead(float32_model(model), name="deploy")(inputs), name="deploy")


def input_signature():
    import tensorflow as tf
    return [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]


def write_onnx(wrapper, labels: list[str], directory: str, card: dict) -> str:
    """`<directory>/model.onnx` with the class names and deploy settings in `metadata_props`."""
    import onnx
    path = os.path.join(directory, ONNX_FILE)
    wrapper.export(path, format="onnx", input_signature=input_signature(), verbose=False)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {"classes": json.dumps(labels),
                                        "deploy": json.dumps(card, sort_keys=True)})
    onnx.save(proto, path)
    return path


def converter_settings(quantize: str, representative=None) -> dict:
    """Keras LiteRT converter settings for `quantize`: builtin operations only, always.

    `representative`: a callable yielding `[float32 image batch]` (needed for int8).
    """
    import tensorflow as tf
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS
    if quantize == "none":
        return {"target_spec": {"supported_ops": [builtins]}}
    if quantize == "float16":
        return {"optimizations": [tf.lite.Optimize.DEFAULT],
                "target_spec": {"supported_ops": [builtins], "supported_types": [tf.float16]}}
    if quantize == "dynamic":
        return {"optimizations": [tf.lite.Optimize.DEFAULT], "target_spec": {"supported_ops": [builtins]}}
    if quantize == "int8":
        if representative is None:
            raise ValueError("int8 quantization needs representative images")
        # INT8 builtins plus float ones: int8 inside, float32 input and output (the contract).
        return {"optimizations": [tf.lite.Optimize.DEFAULT], "representative_dataset": representative,
                "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, builtins]}}
    raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")


def write_litert(wrapper, labels: list[str], directory: str, card: dict, *, quantize: str = "none",
                 representative=None) -> str:
    """`<directory>/model.tflite` (builtins only, `quantize`d), `labels.txt` and `deploy.json` inside."""
    path = os.path.join(directory, LITERT_FILE)
    wrapper.export(path, format="litert", input_signature=input_signature(), verbose=False,
                   **converter_settings(quantize, representative))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("labels.txt", "\n".join(labels) + "\n")
        archive.writestr("deploy.json", json.dumps({**card, "quantize": quantize}, sort_keys=True))
    return path


def litert_labels(path: str) -> list[str]:
    """The class names associated inside a `.tflite` file (empty if it carries none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [line for line in archive.read("labels.txt").decode("utf-8").splitlines() if line]
    except (zipfile.BadZipFile, KeyError):
        return []


def litert_deploy(path: str) -> dict:
    """The deploy settings (tta, temperature, reject_below, quantize) inside a `.tflite` file ({} if none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("deploy.json").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError):
        return {}


def onnx_labels(path: str) -> list[str]:
    """The class names in an `.onnx` file's metadata, read with onnxruntime (empty if none)."""
    import onnxruntime
    meta = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).get_modelmeta()
    return json.loads(meta.custom_metadata_map.get("classes", "[]"))


def file_entry(path: str) -> dict:
    """A written file as the model card lists it: name, size in bytes, SHA-256."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


@dataclasses.dataclass(frozen=True)
class DeployPlan:
    """What an export writes beside its SavedModel (`export.export_model(deploy=...)`).

    Attributes:
      options: the `head.DeployOptions` every format applies.
      formats: the formats to write (`saved_model` is always written: it holds the model card).
      quantize: the LiteRT quantization (`QUANTIZATIONS`).
      representative: int8's representative dataset (a callable yielding `[image batch]`).
      check: called with the unpublished version folder once every file is written;
        returns entries for the model card (e.g. each file's accuracy in its runtime).
      published: `export.export_run` calls it with the version folder once it is in place.
    """
    options: head.DeployOptions = head.DeployOptions()
    formats: tuple = ("saved_model",)
    quantize: str = "none"
    representative: Optional[Callable] = None
    check: Optional[Callable] = None
    published: Optional[Callable] = None  # called with the published version folder

    def write(self, model, labels: list[str], image_size: tuple[int, int], directory: str) -> dict:
        """Write the other formats and `labels.txt` into `directory`; the model card's entries."""
        check_installed(self.formats)
        with open(os.path.join(directory, "labels.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(labels) + "\n")
        files = {}
        others = [f for f in self.formats if f != "saved_model"]
        wrapper = deploy_model(model, image_size, self.options) if others else None
        for fmt in others:
            rundir.fault_point("export_between_formats")
            if fmt == "onnx":
                path = write_onnx(wrapper, labels, directory, self.options.as_card())
            else:
                path = write_litert(wrapper, labels, directory, self.options.as_card(),
                                    quantize=self.quantize, representative=self.representative)
            files[fmt] = {**file_entry(path), **({"quantize": self.quantize} if fmt == "litert" else {})}
        card = {"deploy": {**self.options.as_card(), "outputs": self.options.output_names()},
                "files": files}
        if self.check is not None:
            card.update(self.check(directory))
        return card
