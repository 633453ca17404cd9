"""SavedModel export for TF Serving: signatures, integer versions, atomic writes.

`python -m pipeline.export --model_dir=<run> [--name=...] [--export_dir=saved_models]
[--version=N] [--overwrite] [--checkpoint=best|last]` prints the export path.

An export is `<export_dir>/<name>/<version>/`, a SavedModel that TF Serving
loads as it is (tag `serve`):

  serving_default  images       float32 [batch, height, width, 3] in [0, 1], any
                                height and width (resized inside to the model's size)
  serving_bytes    image_bytes  string [batch] of JPEG, PNG, BMP or GIF files

Both return `probabilities` (float32 [batch, classes], softmax of the float32
logits, also for mixed-precision models), `class_ids` (int64 [batch]) and
`class_names` (string [batch], looked up in the `assets/labels.txt` asset).
`assets/model_card.json` records the model, data, metrics and provenance.
ONNX and LiteRT files, calibration, rejection (`is_unknown`, class name
`unknown`) and TTA come with `export_model(deploy=formats.DeployPlan(...))`
(see `pipeline.serving.formats`, `head` and `deploy`).

Every version is written into `<name>/.tmp-...` beside its target and renamed
into place only when complete, so a server watching `<name>/` never sees a
half-written version (TF Serving ignores names that are not integers).
Killed exports' temporary folders are removed by the next export, a full disk
is an `errors.TransientError`, and fault points let tests kill an export at
each step of the publish (`pipeline.serving.staging`). A checkpoint that
cannot be read is an `ExportError` naming the file.

This module imports TensorFlow only inside the functions that need it and Keras
only where it loads checkpoints: `pipeline.serving.predict`,
`pipeline.serving.latency` and the reports use its path helpers without Keras,
and errors about paths come before the slow imports.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import zipfile
from typing import Optional, Sequence

import pipeline
from pipeline import errors, rundir
from pipeline.serving import head
from pipeline.serving.head import compute_policy  # noqa: F401 - part of this module's API (tests, reports)
from pipeline.serving.staging import (
    OLD_PREFIX,
    TMP_PREFIX,
    disk_full,
    is_saved_model,
    remove,
    remove_leftovers,
    writer_tag,
)

DEFAULT_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
SIGNATURES = (DEFAULT_SIGNATURE, BYTES_SIGNATURE)
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
OUTPUTS = ("probabilities", "class_ids", "class_names")
LABELS_FILE = "labels.txt"
MODEL_CARD_FILE = "model_card.json"
# The run's summary.json entries an export's model card repeats under "metrics".
RUN_METRICS = ("status", "epochs_done", "best_epoch", "best_metric", "best_value", "best_val_accuracy",
               "test_loss", "test_accuracy", "precision", "parameters")

# Leading bytes of the formats tf.io.decode_image reads.
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


class ExportError(ValueError):
    """An export target or source is missing, empty, or would be overwritten."""


# ------------------------------------------------------------------ names and versions


def list_versions(model_root: str) -> list[int]:
    """Sorted integer versions under `model_root` (`saved_models/<name>`); [] if none or absent."""
    try:
        names = os.listdir(model_root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names
                  if n.isdigit() and os.path.isdir(os.path.join(model_root, n)))


def next_version(model_root: str) -> int:
    """The next free version: one more than the newest, 1 for a new model."""
    versions = list_versions(model_root)
    return versions[-1] + 1 if versions else 1


def resolve_export(path: str) -> str:
    """A SavedModel directory from `saved_models/<name>/<version>` or `saved_models/<name>` (newest).

    Raises:
      FileNotFoundError: `path` does not exist.
      ExportError: `path` holds no SavedModel and no integer version.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"export {path!r} does not exist")
    if is_saved_model(path):
        return path
    versions = list_versions(path)
    if not versions:
        raise ExportError(f"{path!r} holds no export: no saved_model.pb and no integer version "
                          "directories")
    newest = os.path.join(path, str(versions[-1]))
    if not is_saved_model(newest):
        raise ExportError(f"{newest!r} is not a SavedModel (no saved_model.pb)")
    return newest


def read_model_card(export_dir: str) -> dict:
    """The export's `assets/model_card.json` ({} when absent)."""
    return rundir.read_json(os.path.join(export_dir, "assets", MODEL_CARD_FILE), {}) or {}


# ------------------------------------------------------------------ the serving module


def _resize(images, height: int, width: int):
    """Bilinear (antialiased) resize of a batch to (height, width); a no-op at that size already."""
    import tensorflow as tf
    shape = tf.shape(images)
    same = tf.logical_and(tf.equal(shape[1], height), tf.equal(shape[2], width))
    return tf.cond(same, lambda: images,
                   lambda: tf.image.resize(images, [height, width], method="bilinear", antialias=True))


def _known_format(data):
    import tensorflow as tf
    return tf.reduce_any(tf.stack([tf.equal(tf.strings.substr(data, 0, len(m)), m) for m in MAGIC]))


def _decode_one(data, index, height: int, width: int):
    import tensorflow as tf
    check = tf.debugging.Assert(
        _known_format(data),
        [f"{BYTES_SIGNATURE}: the image could not be decoded (not a JPEG, PNG, BMP or GIF file); "
         f"index in {BYTES_INPUT}:", index])
    with tf.control_dependencies([check]):
        data = tf.identity(data)
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.ensure_shape(image, [None, None, 3])
    return _resize(image[None], height, width)[0]


def _checked_images(images):
    """`images` once they are proven RGB and free of NaN: InvalidArgumentError otherwise.

    A signature's input shape is not enforced by TensorFlow when a request
    arrives, and a 1-channel batch would be broadcast by the normalization
    into a plausible but meaningless answer. The channel count is checked
    through `tf.size` (the static shape says 3, so a check on `tf.shape(images)[3]`
    could be folded away), and NaN or infinite pixels would come back as NaN
    probabilities without a word.
    """
    import tensorflow as tf
    shape = tf.shape(images, out_type=tf.int64)
    rgb = tf.debugging.Assert(
        tf.equal(tf.size(images, out_type=tf.int64), tf.reduce_prod(shape[:3]) * 3),
        [f"{DEFAULT_SIGNATURE}: {IMAGES_INPUT} must be RGB, [batch, height, width, 3]; got a batch "
         "of shape", shape], summarize=4)
    with tf.control_dependencies([rgb]):
        finite = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(images)),
            [f"{DEFAULT_SIGNATURE}: images contain NaN or infinite pixels; send values in [0, 1]"])
    with tf.control_dependencies([rgb, finite]):
        return tf.identity(images)


def build_serving_module(model, labels_file: str, image_size: tuple[int, int], options=None):
    """A tf.Module with the two serving functions around a Keras model.

    Args:
      model: a Keras model from float32 [0, 1] RGB images to logits.
      labels_file: a file named `labels.txt`, one class name per line; it is
        saved as the SavedModel asset the class-name lookup reads.
      image_size: (height, width) the model takes.
      options: a `head.DeployOptions` (TTA, temperature, reject_below); default: the raw softmax.

    Returns:
      A tf.Module with `serving_default` and `serving_bytes` tf.functions.
    """
    import tensorflow as tf
    height, width = image_size
    module = tf.Module()
    # The signatures capture these variables; tracking them (not the Keras
    # model object) keeps the SavedModel free of Keras-only objects.
    module.model_variables = list(model.variables)
    module.labels = tf.saved_model.Asset(labels_file)
    module.class_table = tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(
            module.labels, key_dtype=tf.int64, key_index=tf.lookup.TextFileIndex.LINE_NUMBER,
            value_dtype=tf.string, value_index=tf.lookup.TextFileIndex.WHOLE_LINE),
        default_value="")

    options = options or head.DeployOptions()

    def outputs(images):
        result = head.outputs(model, _resize(images, height, width), options)
        return {**result, "class_names": head.class_names(module.class_table, result)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name=IMAGES_INPUT)])
    def serving_default(images):
        return outputs(_checked_images(images))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    def serving_bytes(image_bytes):
        index = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])
        images = tf.map_fn(lambda x: _decode_one(x[0], x[1], height, width), (image_bytes, index),
                           fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        return outputs(images)

    module.serving_default = serving_default
    module.serving_bytes = serving_bytes
    return module




def _image_size(model, image_size) -> tuple[int, int]:
    if image_size is not None:
        return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise ValueError(f"The model's input shape {shape} has no fixed height and width; "
                         "pass image_size.")
    return int(shape[1]), int(shape[2])


# ------------------------------------------------------------------ writing versions


def export_model(model, labels: Sequence[str], export_root: str, name: str,
                 version: Optional[int] = None, card: Optional[dict] = None, *,
                 overwrite: bool = False, image_size=None, deploy=None) -> str:
    """Write `model` as `<export_root>/<name>/<version>/`, atomically.

    Args:
      model: Keras model, float32 [0, 1] RGB in, logits out (any dtype policy).
      labels: class names in label order (as many as the model has outputs).
      export_root: the folder holding one subfolder per exported model.
      name: the model's folder name (what TF Serving calls MODEL_NAME).
      version: integer version; None takes the next free one.
      card: extra entries for `assets/model_card.json`.
      overwrite: replace an existing `version` (atomically) instead of refusing.
      image_size: the model's (height, width) or an int; default: its input shape.
      deploy: a `formats.DeployPlan` (options, other formats, quantization,
        checks); default: the SavedModel alone with the raw softmax.

    Returns:
      The export directory.

    Raises:
      ExportError: `version` exists and not `overwrite`, or is not a positive integer.
      ValueError: the labels do not match the model's outputs.
    """
    labels = _check_labels(model, labels)
    _check_name(name)
    height, width = _image_size(model, image_size)
    # Imported here, so that the verbs' --help imports no TensorFlow.
    from pipeline.models.inference import inference_model

    model = inference_model(model)  # BiT: standardized kernels as constants, not recomputed per request
    model_root = os.path.join(export_root, name)
    pinned = version is not None
    version = _check_version(model_root, version, overwrite=overwrite)
    created_root = not os.path.isdir(model_root)
    tmp = None
    try:
        os.makedirs(model_root, exist_ok=True)
        remove_leftovers(model_root)
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX + writer_tag(), dir=model_root)
        options = deploy.options if deploy else None
        _write_saved_model(model, labels, (height, width), tmp, options)
        card = {**(card or {}), **(deploy.write(model, labels, (height, width), tmp) if deploy else {})}
        _write_model_card(tmp, _model_card(model, labels, (height, width), card))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; servers may run as another user
        return _publish(tmp, model_root, version, pinned=pinned, overwrite=overwrite)
    except BaseException as e:
        if tmp:
            remove(tmp)
        if created_root:
            with contextlib.suppress(OSError):
                os.rmdir(model_root)  # only if still empty
        if disk_full(e):
            raise errors.TransientError(
                f"the disk is full while exporting into {model_root} ({' '.join(str(e).split())[:120]}); "
                "nothing was published: free space and run the export again") from e
        raise


def _check_labels(model, labels: Sequence[str]) -> list[str]:
    """`labels` as strings; ValueError unless they are single-line names, one per model output."""
    labels = [str(label) for label in labels]
    if not labels or any(("\n" in label or "\r" in label or not label.strip()) for label in labels):
        raise ValueError("labels must be non-empty single-line class names")
    outputs = model.output_shape[-1]
    if outputs is not None and outputs != len(labels):
        raise ValueError(f"The model has {outputs} outputs but there are {len(labels)} labels.")
    return labels


def _check_name(name: str) -> None:
    """ExportError unless `name` is one plain, visible folder name."""
    if not name or name in (".", "..") or os.sep in name or name.startswith("."):
        raise ExportError(f"Bad export name {name!r}: use a plain folder name.")


def _check_version(model_root: str, version: Optional[int], *, overwrite: bool) -> int:
    """The version to write: `version` if free (or `overwrite`), the next free one if None."""
    if version is None:
        return next_version(model_root)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"Export versions are positive integers, got {version!r}.")
    target = os.path.join(model_root, str(version))
    if os.path.exists(target) and not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite "
                          "to replace it, or leave out --version to write the next one.")
    return version


def _write_saved_model(model, labels: list[str], image_size: tuple[int, int], directory: str,
                       options=None) -> None:
    """Save the serving module of `model` into `directory`, `labels` as its `assets/labels.txt`.

    The labels file is written to a staging folder first: `tf.saved_model.save`
    copies assets into the SavedModel, and the lookup table reads the copy.
    """
    import tensorflow as tf
    staging = tempfile.mkdtemp(prefix="pipeline-export-")
    try:
        labels_file = os.path.join(staging, LABELS_FILE)
        with open(labels_file, "w", encoding="utf-8") as f:
            f.write("\n".join(labels) + "\n")
        module = build_serving_module(model, labels_file, image_size, options)
        tf.saved_model.save(module, directory, signatures={DEFAULT_SIGNATURE: module.serving_default,
                                                           BYTES_SIGNATURE: module.serving_bytes})
    finally:
        remove(staging)


def _model_card(model, labels: list[str], image_size: tuple[int, int],
                extra: Optional[dict] = None) -> dict:
    """The `assets/model_card.json` of an export: `extra`, then the classes, signatures and versions."""
    import tensorflow as tf
    height, width = image_size
    return {
        **(extra or {}),
        "classes": labels,
        "num_classes": len(labels),
        "image_size": [height, width],
        "signatures": {
            DEFAULT_SIGNATURE: {"inputs": {IMAGES_INPUT: "float32 [batch, height, width, 3] in [0, 1]"},
                                "outputs": list(OUTPUTS)},
            BYTES_SIGNATURE: {"inputs": {BYTES_INPUT: "string [batch]: JPEG, PNG, BMP or GIF"},
                              "outputs": list(OUTPUTS)}},
        "compute_dtype": compute_policy(model),
        "pipeline": pipeline.__version__,
        "tensorflow": tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_model_card(export_dir: str, card: dict) -> None:
    """Write `card` into the export, readable by a server running as another user."""
    card_file = os.path.join(export_dir, "assets", MODEL_CARD_FILE)
    rundir.write_json_atomic(card_file, card)
    os.chmod(card_file, 0o644)


def _publish(tmp: str, model_root: str, version: int, *, pinned: bool, overwrite: bool) -> str:
    """Rename the complete `tmp` into `<model_root>/<version>`; returns the version directory."""
    while True:
        target = os.path.join(model_root, str(version))
        if not os.path.exists(target):
            try:
                rundir.fault_point("export_before_rename")
                os.rename(tmp, target)
                rundir.fault_point("export_after_rename")
                return target
            except OSError:
                if not os.path.exists(target):
                    raise
                # Another exporter took this version meanwhile.
        if not pinned:
            version += 1
            continue
        if not overwrite:
            raise ExportError(f"{target} already exists; pass --overwrite to replace it.")
        aside = tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{version}-{writer_tag()}", dir=model_root)
        os.rename(target, os.path.join(aside, "old"))
        try:
            rundir.fault_point("export_moved_aside")
            os.rename(tmp, target)
            rundir.fault_point("export_after_rename")
        except BaseException:
            os.rename(os.path.join(aside, "old"), target)
            remove(aside)
            raise
        remove(aside)
        return target


# ------------------------------------------------------------------ from a run directory


def export_run(model_dir: str, *, export_root: str = "saved_models", name: Optional[str] = None,
               version: Optional[int] = None, overwrite: bool = False,
               checkpoint: str = "best", planner=None) -> str:
    """Export a run directory's checkpoint; returns the export directory.

    Args:
      model_dir: a run directory (`checkpoints/`, `labels.txt`, `config.json`).
      export_root: where `<name>/<version>/` goes.
      name: the export name; default `<model>-<dataset>` of the run (`rundir.run_name`).
      version, overwrite: see `export_model`.
      checkpoint: `best` or `last`.
      planner: called with the loaded model, returns the `formats.DeployPlan` to
        write (`pipeline.serving.deploy.export_run` makes one from the run's data);
        None: the SavedModel with the raw softmax.

    Raises:
      rundir.RunDirError: the run directory is missing or incomplete.
      ExportError: see `export_model`.
    """
    filename = rundir.require_checkpoint(model_dir, checkpoint)
    labels_file = rundir.path(model_dir, rundir.LABELS_FILE)
    if not os.path.isfile(labels_file):
        raise rundir.RunDirError(f"{model_dir!r} has no {rundir.LABELS_FILE}.")
    labels = rundir.read_labels(model_dir)
    config = rundir.read_json(rundir.path(model_dir, rundir.CONFIG_FILE), {}) or {}
    summary = rundir.read_json(rundir.path(model_dir, rundir.SUMMARY_FILE), {}) or {}
    model_name = (config.get("model") or {}).get("name") or summary.get("model") or "model"
    dataset = (config.get("data") or {}).get("dataset") or summary.get("dataset") or "data"

    import keras
    model = _load_checkpoint(filename)
    card = {
        "model": model_name,
        "dataset": dataset,
        "metrics": {k: summary[k] for k in RUN_METRICS if k in summary},
        "weights": summary.get("weights") or (config.get("model") or {}).get("weights"),
        "source_run": os.path.abspath(model_dir),
        "checkpoint": checkpoint,
        "source_checkpoint": os.path.abspath(filename),
        "keras": keras.__version__,
    }
    image_size = summary.get("image_size") or (config.get("data") or {}).get("image_size")
    try:
        size = _image_size(model, None)
    except ValueError:
        if not image_size:
            raise
        size = image_size
    plan = planner(model) if planner is not None else None
    path = export_model(model, labels, export_root, name or rundir.run_name(model_name, dataset),
                        version, card, overwrite=overwrite, image_size=size, deploy=plan)
    if plan is not None and plan.published is not None:
        plan.published(path)
    return path


def _load_checkpoint(filename: str):
    """The Keras model in `filename`; ExportError naming the file if it cannot be read."""
    from pipeline.models import load_model
    try:
        return load_model(filename)
    except Exception as e:  # a truncated zip, a bad config, missing weights: Keras raises many kinds
        if disk_full(e):
            raise errors.TransientError(f"the disk is full while reading {filename}: {e}") from e
        # Keras says "File not found" for a .keras file that is not a zip (a truncated write).
        reason = (errors.short_reason(e, 120) if zipfile.is_zipfile(filename)
                  else "not a complete .keras file: truncated or overwritten")
        raise ExportError(f"checkpoint {filename} is corrupt or unreadable ({reason}); export "
                          "another one (--checkpoint=best or last) or train it again") from e
