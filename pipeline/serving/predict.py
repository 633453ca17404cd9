"""Classify image files with an export, exactly as TF Serving would (`python -m pipeline.predict`).

Loads the SavedModel with `tf.saved_model.load` (the newest version when none
is named) and sends the files' bytes to its `serving_bytes` signature: no Keras
and no pipeline model code is involved, so the answer is the server's answer.
`print_predictions` prints one line per image (`as_json`: one JSON object per
line). An image the model cannot decode is reported on stderr, the others are
still classified, and it counts as a failure (the command then exits with 1).
"""
import json
import os
import sys

from pipeline.serving.export import BYTES_SIGNATURE, LABELS_FILE, resolve_export


class PredictError(ValueError):
    """A file or export problem reported as one line."""


def load_signature(export: str):
    """(export_dir, loaded SavedModel, its serving_bytes signature, class names) of an export path."""
    export_dir = resolve_export(export)  # path errors before the slow TensorFlow import
    import tensorflow as tf
    loaded = tf.saved_model.load(export_dir)
    if BYTES_SIGNATURE not in loaded.signatures:
        raise PredictError(f"{export_dir} has no {BYTES_SIGNATURE!r} signature "
                           f"(it has {', '.join(loaded.signatures) or 'none'}).")
    labels_file = os.path.join(export_dir, "assets", LABELS_FILE)
    labels = None
    if os.path.isfile(labels_file):
        with open(labels_file, encoding="utf-8") as f:
            labels = [line.rstrip("\n") for line in f if line.strip()]
    # Keep `loaded` alive: the signature's resources belong to it.
    return export_dir, loaded, loaded.signatures[BYTES_SIGNATURE], labels


def top_k_classes(probabilities, labels, k):
    """[(class_id, class_name, probability)] of the k most probable classes."""
    import numpy as np
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(int(i), labels[i] if labels and i < len(labels) else str(int(i)), float(probabilities[i]))
            for i in order]


def predict_files(signature, files, *, batch_size=32):
    """Yield (file, probabilities or None, error or None) for every file, in order.

    A batch that fails is retried image by image, so one undecodable file
    is named and does not take its neighbours down with it.
    """
    import tensorflow as tf

    def call(chunk):
        data = []
        for name in chunk:
            with open(name, "rb") as f:
                data.append(f.read())
        return signature(image_bytes=tf.constant(data, dtype=tf.string))["probabilities"].numpy()

    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        try:
            probabilities = call(chunk)
        except tf.errors.InvalidArgumentError as e:
            if len(chunk) == 1:
                yield chunk[0], None, _first_line(e.message)
            else:
                for name in chunk:
                    yield from predict_files(signature, [name], batch_size=1)
            continue
        for name, p in zip(chunk, probabilities):
            yield name, p, None


def _first_line(message: str) -> str:
    """The reason in a failed request's error message, as one short phrase."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "could not be decoded" in line:
            return "the image could not be decoded (not a JPEG, PNG, BMP or GIF file)"
    for line in lines:
        if "Invalid" in line or "format" in line or "corrupt" in line.lower():
            return f"the image could not be decoded: {line}"
    return "the image could not be decoded"


def print_predictions(export: str, files, *, top_k: int = 3, as_json: bool = False,
                      batch_size: int = 32) -> int:
    """Print the top-k classes of every file (a line or a JSON object each); returns the failures.

    Files that do not exist are refused before the export is loaded; a file the
    model cannot decode is named on stderr and the others are still classified.
    """
    if not files:
        raise PredictError("no images given: python -m pipeline.predict --export=<export> IMAGE...")
    for name in files:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"image {name!r} does not exist")
    _, _loaded, signature, labels = load_signature(export)
    failed = 0
    for name, probabilities, error in predict_files(signature, files, batch_size=batch_size):
        if error is not None:
            failed += 1
            print(f"error: {name}: {error}", file=sys.stderr, flush=True)
            continue
        best = top_k_classes(probabilities, labels, top_k)
        if as_json:
            print(json.dumps({"image": name, "predictions": [
                {"class_id": i, "class_name": c, "probability": p} for i, c, p in best]}), flush=True)
        else:
            print(f"{name}: " + ", ".join(f"{c} {p:.4f}" for _, c, p in best), flush=True)
    return failed
