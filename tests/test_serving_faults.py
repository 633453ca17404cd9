"""Serving and export faults (issue 15, items 7, 8, 9 and 10 for exports and predict).

A tiny model with the pipeline's own `Normalize` layer stands in for a trained
one: like the real models it broadcasts a 1-channel batch to 3 channels, which
is how `serving_default` used to answer grayscale input against its signature.
"""
import errno
import io
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import errors, rundir
from pipeline.serving import export, predict, staging
from tests.helpers import REPO, last_line, run_cli

LABELS = ["a", "b", "c"]


def normalized_model(seed=0):
    from pipeline.models.layers import Normalize
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = Normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(LABELS), name="logits")(x))


@pytest.fixture(scope="module")
def model():
    return normalized_model()


@pytest.fixture(scope="module")
def tiny_export(model, tmp_path_factory):
    return export.export_model(model, LABELS, str(tmp_path_factory.mktemp("exports")), "m")


def entries(model_root):
    return sorted(os.listdir(model_root))


def save_png(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return str(path)


def dead_pid():
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 10: predict and the signatures


def image_tree(root):
    """Images in nested folders, a hidden file and folder, a text file and a corrupt PNG."""
    good = [save_png(root / "b.png", 1), save_png(root / "sub" / "a.PNG", 2),
            save_png(root / "sub" / "deeper" / "c.png", 3)]
    save_png(root / ".hidden" / "x.png")
    save_png(root / "sub" / ".x.png")
    (root / "notes.txt").write_text("not an image")
    bad = root / "sub" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return good, str(bad)


def test_predict_classifies_the_images_of_a_directory_recursively(tiny_export, tmp_path, capsys):
    """A directory stands for its image files (recursively, sorted, hidden ones skipped)."""
    good, bad = image_tree(tmp_path / "images")
    assert predict.image_files([str(tmp_path / "images")]) == [good[0], good[1], bad, good[2]]
    failed = predict.print_predictions(tiny_export, [str(tmp_path / "images"), good[0]], top_k=1)
    out, err = capsys.readouterr()
    assert failed == 1
    assert [line.split(": ")[0] for line in out.splitlines()] == [good[0], good[1], good[2], good[0]]
    assert err.strip() == f"error: {bad}: the image could not be decoded: the file is corrupt"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(predict.PredictError, match="holds no image files"):
        predict.print_predictions(tiny_export, [str(tmp_path / "empty")])


def test_predict_cli_names_a_corrupt_image_without_tensorflow_log_lines(tiny_export, tmp_path):
    """TensorFlow's C++ logging left on: a decode failure is our one line, no "rendezvous" lines."""
    good, bad = image_tree(tmp_path / "images")
    proc = run_cli("predict", f"--export={tiny_export}", str(tmp_path / "images"), check=False,
                   env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert [line.split(": ")[0] for line in proc.stdout.splitlines()] == [good[0], good[1], good[2]]
    assert "rendezvous" not in proc.stderr.lower() and "OP_REQUIRES" not in proc.stderr
    assert last_line(proc.stderr) == f"error: {bad}: the image could not be decoded: the file is corrupt"


@pytest.mark.parametrize("channels", [1, 4])
def test_serving_default_refuses_images_that_are_not_rgb(tiny_export, channels):
    serve = tf.saved_model.load(tiny_export).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must be RGB.*\[2 8 8 %d\]" % channels):
        serve(images=tf.fill([2, 8, 8, channels], 0.5))
    out = serve(images=tf.fill([2, 8, 8, 3], 0.5))  # the signature still serves RGB
    assert out["probabilities"].shape == (2, 3)


def test_serving_default_refuses_nan_pixels(tiny_export):
    serve = tf.saved_model.load(tiny_export).signatures["serving_default"]
    images = np.full((2, 8, 8, 3), 0.5, np.float32)
    images[1, 3, 4, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="images contain NaN"):
        serve(images=tf.constant(images))
    assert np.isfinite(serve(images=tf.constant(images[:1]))["probabilities"].numpy()).all()


# ------------------------------------------------------------------ 7: a corrupt checkpoint


def test_export_of_a_corrupt_checkpoint_names_the_file(model, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "labels.txt").write_text("\n".join(LABELS) + "\n")
    model.save(str(run / "checkpoints" / "best.keras"))
    whole = (run / "checkpoints" / "best.keras").read_bytes()
    last = run / "checkpoints" / "last.keras"
    last.write_bytes(whole[: len(whole) // 2])  # a truncated write
    with pytest.raises(export.ExportError) as info:
        export.export_run(str(run), export_root=str(tmp_path / "out"), checkpoint="last")
    message = str(info.value)
    assert f"checkpoint {last} is corrupt or unreadable" in message and "\n" not in message
    assert "File not found" not in message
    assert not os.path.exists(tmp_path / "out")
    proc = run_cli("export", f"--model_dir={run}", f"--export_dir={tmp_path / 'out'}", "--checkpoint=last",
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # fix the command
    assert last_line(proc.stderr) == f"error: {message}"
    assert export.export_run(str(run), export_root=str(tmp_path / "out")).endswith(os.sep + "1")


# ------------------------------------------------------------------ 8: leftovers of killed exports


def test_next_export_removes_only_the_leftovers_of_dead_writers(model, tmp_path):
    root = str(tmp_path)
    model_root = os.path.join(root, "m")
    export.export_model(model, LABELS, root, "m", card={"marker": "v1"})
    host, gone, alive = socket.gethostname(), dead_pid(), os.getpid()
    # A killed overwrite of version 1: the old version moved aside, the new one never arrived.
    aside = os.path.join(model_root, f".old-1-{gone}@{host}-q1")
    os.makedirs(aside)
    os.rename(os.path.join(model_root, "1"), os.path.join(aside, "old"))
    for name in (f".tmp-{gone}@{host}-k1", f".tmp-{alive}@{host}-busy", f".tmp-{gone}@elsewhere-w2",
                 ".tmp-legacy"):
        os.makedirs(os.path.join(model_root, name, "variables"))
    path = export.export_model(model, LABELS, root, "m")
    assert path == os.path.join(model_root, "2")
    assert entries(model_root) == sorted([f".tmp-{alive}@{host}-busy", f".tmp-{gone}@elsewhere-w2",
                                          ".tmp-legacy", "1", "2"])  # as listed: PIDs sort as text
    assert export.read_model_card(os.path.join(model_root, "1"))["marker"] == "v1"  # put back


def test_export_names_its_temporary_folder_after_its_writer(model, tmp_path, monkeypatch):
    seen = []
    real_save = tf.saved_model.save

    def save(obj, export_dir, signatures=None):
        seen.append(os.path.basename(export_dir))
        return real_save(obj, export_dir, signatures=signatures)

    monkeypatch.setattr(tf.saved_model, "save", save)
    export.export_model(model, LABELS, str(tmp_path), "m")
    assert seen[0].startswith(f".tmp-{os.getpid()}@{socket.gethostname()}-")
    assert not staging.writer_gone(seen[0][len(".tmp-"):])


_KILLED_EXPORT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from tests.test_serving_faults import LABELS, normalized_model
    from pipeline.serving import export
    export.export_model(normalized_model(seed=1), LABELS, sys.argv[2], "m", card={"marker": "new"},
                        **({"version": 1, "overwrite": True} if sys.argv[3] == "overwrite" else {}))
    print("not killed")
""")


@pytest.mark.parametrize("point", staging.FAULT_POINTS)
def test_export_killed_at_each_fault_point_leaves_no_partial_version(model, tmp_path, point):
    """SIGKILL inside the publish: every version is complete or absent; the next export cleans up."""
    root = str(tmp_path / "exports")
    model_root = os.path.join(root, "m")
    export.export_model(model, LABELS, root, "m", card={"marker": "old"})
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_EXPORT)
    mode = "overwrite" if point == "export_moved_aside" else "new"
    proc = subprocess.run([sys.executable, str(script), REPO, root, mode], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                            rundir.FAULT_ENV: point})
    assert proc.returncode == -9, proc.stdout + proc.stderr[-2000:]
    for version in export.list_versions(model_root):
        directory = os.path.join(model_root, str(version))
        assert export.read_model_card(directory)["classes"] == LABELS
        tf.saved_model.load(directory).signatures["serving_default"](images=tf.zeros([1, 8, 8, 3]))
    expected = {"export_before_rename": [1], "export_moved_aside": [], "export_after_rename": [1, 2]}
    assert export.list_versions(model_root) == expected[point]

    after = export.export_model(model, LABELS, root, "m")
    assert not [n for n in entries(model_root) if n.startswith(".")]
    versions = {"export_before_rename": [1, 2], "export_moved_aside": [1, 2],
                "export_after_rename": [1, 2, 3]}[point]
    assert export.list_versions(model_root) == versions and after.endswith(str(versions[-1]))
    if point == "export_moved_aside":  # the replaced version came back, unchanged
        assert export.read_model_card(os.path.join(model_root, "1"))["marker"] == "old"


# ------------------------------------------------------------------ 9: a full disk


@pytest.mark.parametrize("raised", ["OSError", "tensorflow"])
def test_full_disk_during_export_is_one_transient_line(model, tmp_path, monkeypatch, raised):
    def full(obj, export_dir, signatures=None):
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        if raised == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise tf.errors.ResourceExhaustedError(
            None, None, "/x/variables/variables.data-00000-of-00001.tempstate123;\nNo space left on device")

    monkeypatch.setattr(tf.saved_model, "save", full)
    with pytest.raises(errors.TransientError) as info:
        export.export_model(model, LABELS, str(tmp_path), "m")
    message = str(info.value)
    assert "disk is full" in message and "\n" not in message and str(tmp_path / "m") in message
    assert not os.path.exists(tmp_path / "m")


def test_predict_image_bytes_of_every_kind_still_decode(tiny_export, tmp_path):
    """The Python pre-check refuses nothing the signature reads (JPEG, BMP, GIF, grayscale PNG)."""
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    files = []
    for fmt, array in (("JPEG", pixels), ("BMP", pixels), ("GIF", pixels), ("PNG", pixels[..., 0])):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        files.append(tmp_path / f"x.{fmt.lower()}")
        files[-1].write_bytes(buf.getvalue())
    _, _loaded, signature, _ = predict.load_signature(tiny_export)
    results = list(predict.predict_files(signature, [str(f) for f in files]))
    assert [error for _, _, error in results] == [None] * 4
    assert all(p.shape == (3,) for _, p, _ in results)
