"""Classify image files with an export, exactly as its runtime would (`python -m pipeline.predict`).

A `.onnx` file runs in onnxruntime and a `.tflite` in the LiteRT interpreter
(`pipeline.serving.runtimes`), images decoded by PIL; a SavedModel as below.

Loads the SavedModel with `tf.saved_model.load` (the newest version when none
is named) and sends the files' bytes to its `serving_bytes` signature: no Keras
and no pipeline model code is involved, so the answer is the server's answer.
`print_predictions` prints one line per image (`as_json`: one JSON object per
line). An image the model cannot decode is reported on stderr, the others are
still classified, and it counts as a failure (the command then exits with 1).
A directory stands for the image files under it, recursively (by extension,
as `folder:` datasets read them; hidden files and folders are skipped). Every
file is decoded here first, so a file TensorFlow cannot read is named without
the signature failing (and without TensorFlow's C++ error lines on stderr).
"""
import json
import os
import re
import sys

from pipeline import errors

from pipeline.serving.export import BYTES_SIGNATURE, LABELS_FILE, MAGIC, read_model_card, resolve_export


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
        names = files[start:start + batch_size]
        problems = [_decode_error(name) for name in names]
        answers = [None] * len(names)
        good = [i for i, problem in enumerate(problems) if problem is None]
        try:
            for i, p in zip(good, call([names[i] for i in good]) if good else []):
                answers[i] = p
        except tf.errors.InvalidArgumentError as e:
            if len(good) == 1:
                problems[good[0]] = _first_line(e.message)
            else:  # one image the checks let through fails: find it, answer the others
                for i in good:
                    _, answers[i], problems[i] = next(predict_files(signature, [names[i]]))
        yield from zip(names, answers, problems)


def _decode_error(name: str):
    """Why `name` cannot be decoded as the `serving_bytes` signature decodes it, or None.

    Checked in Python (the signature's format check, then a full decode by
    PIL) because any failing TensorFlow op, eager ones too, also prints the
    C++ "Local rendezvous is aborting" lines; a file PIL reads and TensorFlow
    does not is still named, by the signature's own error.
    """
    import io

    from PIL import Image
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"the image could not be read: {e.strerror or e}"
    if not data.startswith(MAGIC):
        return _first_line("could not be decoded")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Image.UnidentifiedImageError:
        return "the image could not be decoded: the file is corrupt"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"the image could not be decoded: {errors.short_reason(e, 120)}"
    return None


def _first_line(message: str) -> str:
    """The reason in a failed request's error message, as one short phrase."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "could not be decoded" in line:
            return "the image could not be decoded (not a JPEG, PNG, BMP or GIF file)"
    for line in lines:
        if "Invalid" in line or "format" in line or "corrupt" in line.lower():
            line = re.sub(r"\{\{[^}]*\}\}|\[Op:[^]]*\]", "", line).strip()  # TF's node names
            return f"the image could not be decoded: {line}"
    return "the image could not be decoded"


def image_files(paths) -> list:
    """`paths` with every directory replaced by its image files (recursively, sorted).

    Raises:
      FileNotFoundError: a path does not exist.
      PredictError: a directory holds no image file.
    """
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = _images_under(path)
            if not found:
                raise PredictError(f"directory {path!r} holds no image files "
                                   f"({', '.join(_extensions())})")
            files.extend(found)
        else:
            raise FileNotFoundError(f"image {path!r} does not exist")
    return files


def _extensions():
    from pipeline.data.folder import IMAGE_EXTENSIONS
    return IMAGE_EXTENSIONS


def _images_under(directory: str) -> list:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, n) for n in sorted(names)
                     if not n.startswith(".") and n.lower().endswith(_extensions()))
    return found


def _pixels(name: str):
    """float32 [H, W, 3] RGB in [0, 1] of an image file, decoded by PIL (the runtimes have no decoder)."""
    import numpy as np
    from PIL import Image
    with Image.open(name) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def runtime_predictions(runtime, files, *, tta: str = "none"):
    """Yield (file, probabilities or None, error or None) from a `runtimes.Runtime`, image by image.

    With `tta`, the views (`pipeline.tta.tta_views`) go through the export as one
    batch and their probabilities are averaged.
    """
    import numpy as np
    for name in files:
        problem = _decode_error(name)
        if problem is not None:
            yield name, None, problem
            continue
        image = _pixels(name)[None]
        if tta != "none":
            from pipeline.tta import tta_views
            image = np.asarray(tta_views(image, tta))[:, 0]
        yield name, np.asarray(runtime.run(image)["probabilities"]).mean(axis=0), None


def _answers(export: str, files, *, batch_size: int, tta: str):
    """(labels, reject_below or None, iterator of (file, probabilities, error)) for any export path."""
    from pipeline.serving import runtimes
    if runtimes.kind_of(export) == "saved_model" and tta == "none":
        export_dir, _loaded, signature, labels = load_signature(export)
        reject = (read_model_card(export_dir).get("deploy") or {}).get("reject_below")

        def saved_model_answers(loaded):  # holds `loaded`: the signature's resources belong to it
            yield from predict_files(signature, files, batch_size=batch_size)
        return labels, reject, saved_model_answers(_loaded)
    runtime = runtimes.open_runtime(export if runtimes.kind_of(export) != "saved_model"
                                    else resolve_export(export))
    return runtime.labels, runtime.deploy.get("reject_below"), runtime_predictions(runtime, files, tta=tta)


def print_predictions(export: str, files, *, top_k: int = 3, as_json: bool = False,
                      batch_size: int = 32, tta: str = "none") -> int:
    """Print the top-k classes of every file (a line or a JSON object each); returns the failures.

    `export` is a version folder (or its model folder: the newest version), a
    `.onnx` or a `.tflite` file, run in its own runtime. An export made with
    `--reject_below=P` answers `unknown` when the top probability is below P
    (`is_unknown` in JSON). Files that do not exist are refused before the
    export is loaded; a file the model cannot decode is named on stderr and
    the others are still classified.
    """
    if not files:
        raise PredictError("no images given: python -m pipeline.predict --export=<export> IMAGE...")
    files = image_files(files)
    labels, reject, answers = _answers(export, files, batch_size=batch_size, tta=tta)
    failed = 0
    for name, probabilities, error in answers:
        if error is not None:
            failed += 1
            print(f"error: {name}: {error}", file=sys.stderr, flush=True)
            continue
        best = top_k_classes(probabilities, labels, top_k)
        unknown = reject is not None and float(probabilities.max()) < reject
        if as_json:
            print(json.dumps({"image": name, "is_unknown": unknown, "predictions": [
                {"class_id": i, "class_name": c, "probability": p} for i, c, p in best]}), flush=True)
        else:
            print(f"{name}: " + ("unknown; " if unknown else "")
                  + ", ".join(f"{c} {p:.4f}" for _, c, p in best), flush=True)
    return failed
