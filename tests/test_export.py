"""Exports for TF Serving: signatures, parity with Keras, versions, atomic writes, predict CLI."""
import io
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import rundir
from pipeline.serving import export, latency
from tests.helpers import REPO, last_line, run_cli

# A few digits test images, quantized to 8 bits so that float and PNG inputs are the same pixels.
N_IMAGES = 8


@pytest.fixture(scope="module")
def digits_images():
    from pipeline.data import digits_arrays
    images, labels, (_, _, test) = digits_arrays()
    pick = test[:N_IMAGES]
    pixels = np.round(images[pick] * 255).astype(np.uint8)
    return {"uint8": pixels, "float": pixels.astype(np.float32) / 255.0, "labels": labels[pick]}


@pytest.fixture(scope="module")
def digits_export(digits_run, tmp_path_factory):
    """The digits run exported through `python -m pipeline.export` into a fresh folder."""
    root = str(tmp_path_factory.mktemp("saved_models"))
    proc = run_cli("export", f"--model_dir={digits_run['model_dir']}", f"--export_dir={root}",
                   "--nocalibrate")  # the raw softmax, compared with the Keras model below
    path = last_line(proc.stdout)
    return {"root": root, "path": path, "model_dir": digits_run["model_dir"]}


@pytest.fixture(scope="module")
def mixed_export(digits_run, tmp_path_factory):
    """The digits run's weights in a mixed_bfloat16 resnet20, saved as a run and exported from it."""
    import pipeline.models
    from pipeline.models.layers import Normalize
    base = tmp_path_factory.mktemp("mixed")
    source = digits_run["model_dir"]
    trained = keras.saving.load_model(os.path.join(source, "checkpoints", "best.keras"), compile=False)
    norm = next(layer for layer in trained.layers if isinstance(layer, Normalize))
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = pipeline.models.create_model("resnet20", num_classes=10, image_size=32,
                                             normalization=(norm.mean, norm.std))
    finally:
        keras.mixed_precision.set_global_policy(policy)
    model.set_weights(trained.get_weights())
    run = base / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("labels.txt", "config.json", "summary.json"):
        (run / name).write_bytes(open(os.path.join(source, name), "rb").read())
    model.save(str(run / "checkpoints" / "best.keras"))
    path = export.export_run(str(run), export_root=str(base / "exports"))
    return {"model_dir": str(run), "path": path}


_TRAIN_WIRING = textwrap.dedent("""
    import json, sys
    from absl import flags
    from pipeline import train, training
    from pipeline.serving import export

    class Result:
        model_dir = "/runs/r"

    calls = []
    training.train = lambda run: Result()
    export.export_run = lambda model_dir, **kw: calls.append([model_dir, kw]) or "/exports/x/1"
    for args in json.loads(sys.argv[1]):
        calls.clear()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", "--model_dir=/runs/r", "--noreport", *args])
        train.run(["train"])
        print("CALLS " + json.dumps(calls), flush=True)
""")


def keras_probabilities(model_dir, images):
    import pipeline.models  # noqa: F401
    model = keras.saving.load_model(os.path.join(model_dir, "checkpoints", "best.keras"), compile=False)
    logits = keras.ops.convert_to_numpy(model(images, training=False)).astype(np.float32)
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1)), model


def png_bytes(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def tiny_model(classes=3, size=8, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def entries(model_root):
    return sorted(os.listdir(model_root)) if os.path.isdir(model_root) else []


# ------------------------------------------------------------------ the export and its signatures


def test_train_exports_by_default(digits_run):
    lines = [line for line in digits_run["stdout"].splitlines() if line.startswith("export: ")]
    assert len(lines) == 1, digits_run["stdout"][-2000:]
    path = lines[0][len("export: "):]
    assert os.path.dirname(path) == os.path.join(digits_run["export_root"], "resnet20-digits")
    assert os.path.basename(path).isdigit()
    full = os.path.join(REPO, path)
    assert os.path.isfile(os.path.join(full, "saved_model.pb"))
    card = export.read_model_card(full)
    assert card["source_run"] == os.path.abspath(digits_run["model_dir"])
    flags_cfg = open(os.path.join(digits_run["model_dir"], "flags.cfg")).read()
    assert "export" not in flags_cfg  # where the export goes is not part of the run


def test_train_exports_unless_noexport(tmp_path):
    script = tmp_path / "wiring.py"
    script.write_text(_TRAIN_WIRING)
    cases = [[], ["--noexport"], ["--export_dir=/elsewhere", "--export_name=mine"]]
    proc = subprocess.run([sys.executable, str(script), json.dumps(cases)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line[len("CALLS "):]) for line in proc.stdout.splitlines() if line.startswith("CALLS ")]
    assert calls == [
        [["/runs/r", {"export_root": "saved_models", "name": None}]],
        [],
        [["/runs/r", {"export_root": "/elsewhere", "name": "mine"}]],
    ]
    assert proc.stdout.count("export: /exports/x/1") == 2


def test_export_cli_writes_version_1_with_labels_and_model_card(digits_export):
    path, model_dir = digits_export["path"], digits_export["model_dir"]
    assert path == os.path.join(digits_export["root"], "resnet20-digits", "1")
    assert entries(os.path.dirname(path)) == ["1"]  # no temp dir left
    labels = open(os.path.join(path, "assets", "labels.txt")).read().split()
    assert labels == rundir.read_labels(model_dir) == [str(i) for i in range(10)]
    card = export.read_model_card(path)
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert card["model"] == "resnet20" and card["dataset"] == "digits"
    assert card["classes"] == labels and card["image_size"] == [32, 32]
    assert card["metrics"]["test_accuracy"] == summary["test_accuracy"]
    assert card["metrics"]["best_epoch"] == summary["best_epoch"]
    assert card["tensorflow"] == tf.__version__ and card["pipeline"]
    assert card["checkpoint"] == "best" and os.path.isfile(card["source_checkpoint"])
    assert card["source_run"] == os.path.abspath(model_dir) and card["created"]


def test_saved_model_cli_lists_both_signatures(digits_export):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    cmd = [cli] if os.path.exists(cli) else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run([*cmd, "show", "--dir", digits_export["path"], "--all"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "MetaGraphDef with tag-set: 'serve'" in out
    blocks = {name: out.split(f"signature_def['{name}']:")[1].split("Method name is")[0]
              for name in ("serving_default", "serving_bytes")}
    assert "inputs['images']" in blocks["serving_default"]
    assert "shape: (-1, -1, -1, 3)" in blocks["serving_default"]
    assert "inputs['image_bytes']" in blocks["serving_bytes"] and "DT_STRING" in blocks["serving_bytes"]
    for block in blocks.values():
        for output in ("probabilities", "class_ids", "class_names"):
            assert f"outputs['{output}']" in block
        assert "shape: (-1, 10)" in block  # probabilities: [batch, classes]
        assert "DT_FLOAT" in block and "DT_INT64" in block


_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    exports, inputs_file, out_file = sys.argv[1:4]
    data = np.load(inputs_file, allow_pickle=True)
    results = {}
    for key, path in json.loads(exports).items():
        loaded = tf.saved_model.load(path, tags=["serve"])
        by_float = loaded.signatures["serving_default"](images=tf.constant(data["images"]))
        by_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(data["pngs"])))
        for sig, out in (("default", by_float), ("bytes", by_bytes)):
            results[f"{key}_{sig}_dtypes"] = np.array([out[k].dtype.name for k in sorted(out)])
            for k, v in out.items():
                results[f"{key}_{sig}_{k}"] = v.numpy()
    results["imported_pipeline"] = np.array([m for m in sys.modules if m.startswith("pipeline")] or [""])
    np.savez(out_file, **results)
""")


def test_fresh_tensorflow_process_serves_the_keras_predictions(digits_export, mixed_export, digits_images,
                                                               tmp_path):
    mixed_path = mixed_export["path"]
    assert export.read_model_card(mixed_path)["compute_dtype"] == "mixed_bfloat16"
    x = digits_images["float"]
    pngs = np.array([png_bytes(p) for p in digits_images["uint8"]], dtype=object)
    np.savez(tmp_path / "inputs.npz", images=x, pngs=pngs)
    script = tmp_path / "serve.py"
    script.write_text(_FRESH_PROCESS)
    exports = json.dumps({"f32": digits_export["path"], "mixed": mixed_path})
    proc = subprocess.run([sys.executable, str(script), exports, str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz", allow_pickle=True)
    assert list(out["imported_pipeline"]) == [""]

    for key, model_dir, tol in (("f32", digits_export["model_dir"], 1e-5),
                                ("mixed", mixed_export["model_dir"], 1e-2)):
        expected, model = keras_probabilities(model_dir, x)
        assert export.compute_policy(model) == ("mixed_bfloat16" if key == "mixed" else "float32")
        for sig in ("default", "bytes"):
            assert list(out[f"{key}_{sig}_dtypes"]) == ["int64", "string", "float32"]  # sorted keys
            probs = out[f"{key}_{sig}_probabilities"]
            assert probs.dtype == np.float32 and probs.shape == (N_IMAGES, 10)
            np.testing.assert_allclose(probs, expected, atol=tol)
            np.testing.assert_array_equal(out[f"{key}_{sig}_class_ids"], expected.argmax(-1))
            names = [n.decode() for n in out[f"{key}_{sig}_class_names"]]
            assert names == [str(i) for i in expected.argmax(-1)]
    # The trained float32 model is right about most digits.
    assert (out["f32_default_class_ids"] == digits_images["labels"]).mean() >= 0.5


def test_serving_default_resizes_any_input_size(digits_export, digits_images):
    loaded = tf.saved_model.load(digits_export["path"])
    big = tf.image.resize(digits_images["float"], [48, 40], method="bilinear")
    out = loaded.signatures["serving_default"](images=big)
    assert out["probabilities"].shape == (N_IMAGES, 10)
    back = tf.image.resize(big, [32, 32], method="bilinear", antialias=True).numpy()
    expected, _ = keras_probabilities(digits_export["model_dir"], back)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    assert (out["class_ids"].numpy() == expected.argmax(-1)).all()


def test_serving_bytes_reads_every_format_and_survives_a_corrupt_image(digits_export, digits_images):
    loaded = tf.saved_model.load(digits_export["path"])
    serve = loaded.signatures["serving_bytes"]
    pixels = np.kron(digits_images["uint8"][0], np.ones((2, 2, 1), np.uint8))  # 64x64, JPEG-friendly
    files = {}
    for fmt in ("PNG", "BMP", "GIF", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        files[fmt] = buf.getvalue()
    files["gray PNG"] = png_bytes(pixels[..., 0])
    out = serve(image_bytes=tf.constant(list(files.values())))
    probs = out["probabilities"].numpy()
    assert probs.shape == (len(files), 10)
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-6)  # BMP is lossless like PNG
    np.testing.assert_allclose(probs[4], probs[0], atol=1e-6)  # grayscale -> RGB
    assert len(set(out["class_ids"].numpy().tolist())) == 1  # GIF and JPEG agree on the digit

    good = png_bytes(digits_images["uint8"][1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="could not be decoded"):
        serve(image_bytes=tf.constant([good, b"this is not an image"]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)png"):
        serve(image_bytes=tf.constant([good[:60]]))  # truncated PNG
    again = serve(image_bytes=tf.constant([good]))
    expected, _ = keras_probabilities(digits_export["model_dir"], digits_images["float"][1:2])
    np.testing.assert_allclose(again["probabilities"].numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------ versions and atomic writes


def test_versions_count_up_and_can_be_pinned(tiny, tmp_path):
    root = str(tmp_path)
    labels = ["cat", "dog", "emu"]
    assert export.export_model(tiny, labels, root, "pets") == os.path.join(root, "pets", "1")
    assert export.export_model(tiny, labels, root, "pets") == os.path.join(root, "pets", "2")
    assert export.export_model(tiny, labels, root, "pets", version=7) == os.path.join(root, "pets", "7")
    assert export.export_model(tiny, labels, root, "pets") == os.path.join(root, "pets", "8")
    assert entries(os.path.join(root, "pets")) == ["1", "2", "7", "8"]
    assert export.resolve_export(os.path.join(root, "pets")) == os.path.join(root, "pets", "8")
    loaded = tf.saved_model.load(os.path.join(root, "pets", "7"))
    out = loaded.signatures["serving_default"](images=tf.zeros([2, 8, 8, 3]))
    assert out["class_names"].numpy().tolist() == [labels[i].encode() for i in out["class_ids"].numpy()]


def test_existing_version_is_refused_then_replaced_with_overwrite(tiny, tmp_path):
    root = str(tmp_path)
    export.export_model(tiny, ["a", "b", "c"], root, "m", card={"marker": "old"})
    with pytest.raises(export.ExportError, match="already exists.*--overwrite"):
        export.export_model(tiny, ["a", "b", "c"], root, "m", version=1, card={"marker": "new"})
    assert export.read_model_card(os.path.join(root, "m", "1"))["marker"] == "old"
    other = tiny_model(seed=1)
    path = export.export_model(other, ["x", "y", "z"], root, "m", version=1, overwrite=True,
                               card={"marker": "new"})
    assert path == os.path.join(root, "m", "1") and entries(os.path.join(root, "m")) == ["1"]
    assert export.read_model_card(path)["marker"] == "new"
    assert open(os.path.join(path, "assets", "labels.txt")).read().split() == ["x", "y", "z"]
    x = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(other(x)))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("where", ["saved_model.save", "model card"])
def test_failure_mid_export_leaves_no_version_and_no_temp_dir(tiny, tmp_path, monkeypatch, where):
    root = str(tmp_path)
    export.export_model(tiny, ["a", "b", "c"], root, "m")  # version 1 stays untouched
    seen = []

    def half_save(obj, export_dir, signatures=None):
        seen.append(export_dir)
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    def broken_card(filename, data):
        seen.append(os.path.dirname(os.path.dirname(filename)))
        assert os.path.isfile(os.path.join(seen[-1], "saved_model.pb"))  # the SavedModel is complete
        raise OSError("disk full")

    if where == "saved_model.save":
        monkeypatch.setattr(tf.saved_model, "save", half_save)
    else:
        monkeypatch.setattr(export.rundir, "write_json_atomic", broken_card)
    for kwargs in ({}, {"version": 1, "overwrite": True}):
        with pytest.raises(OSError, match="disk full"):
            export.export_model(tiny, ["a", "b", "c"], root, "m", **kwargs)
        assert entries(os.path.join(root, "m")) == ["1"]
    assert export.read_model_card(os.path.join(root, "m", "1"))["classes"] == ["a", "b", "c"]
    for d in seen:  # the work happened in a temp dir beside the target
        assert os.path.dirname(d) == os.path.join(root, "m") and os.path.basename(d).startswith(".tmp-")
    # A failed first export of a new name leaves nothing behind at all.
    with pytest.raises(OSError, match="disk full"):
        export.export_model(tiny, ["a", "b", "c"], root, "fresh")
    assert entries(root) == ["m"]


def test_version_helpers_ignore_temp_and_non_integer_dirs(tmp_path):
    for name in ("1", "3", "10", ".tmp-abc", "latest", ".old-2-x"):
        os.makedirs(tmp_path / "m" / name)
    assert export.list_versions(str(tmp_path / "m")) == [1, 3, 10]
    assert export.next_version(str(tmp_path / "m")) == 11
    assert export.next_version(str(tmp_path / "missing")) == 1
    assert rundir.run_name("resnet20", "digits") == "resnet20-digits"
    assert rundir.run_name("bit_m_r50x1", "folder:/data/my photos/") == "bit_m_r50x1-folder-my_photos"
    assert rundir.run_name("hub:https://tfhub.dev/x/1", "tfds:cifar10") == "hub_https_tfhub.dev_x_1-tfds_cifar10"
    with pytest.raises(export.ExportError, match="no export"):
        export.resolve_export(str(tmp_path / "m" / "latest"))


def test_labels_must_match_the_model(tiny, tmp_path):
    with pytest.raises(ValueError, match="3 outputs but there are 2 labels"):
        export.export_model(tiny, ["a", "b"], str(tmp_path), "m")
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_export_cli_from_missing_or_empty_dir_fails_with_one_line(case, tmp_path):
    model_dir = tmp_path / "run"
    if case == "empty":
        model_dir.mkdir()
    proc = run_cli("export", f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2  # fix the command (issue 15's exit statuses)
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("error: ") and str(model_dir) in line
    assert ("does not exist" if case == "missing" else "no best checkpoint") in line
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------ predict and the benchmark


def test_predict_prints_top_k_per_image_and_json(digits_export, digits_images, tmp_path):
    files = []
    for i, pixels in enumerate(digits_images["uint8"][:4]):
        files.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(pixels).save(files[-1])
    expected, _ = keras_probabilities(digits_export["model_dir"], digits_images["float"][:4])
    name_dir = os.path.dirname(digits_export["path"])  # no version named: the newest

    proc = run_cli("predict", f"--export={name_dir}", "--top_k=2", *files)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4
    for line, f, p in zip(lines, files, expected):
        assert line.startswith(f"{f}: ")
        first, second = line.split(": ", 1)[1].split(", ")
        assert first.split()[0] == str(p.argmax())
        assert float(first.split()[1]) == pytest.approx(p.max(), abs=1e-4)
        assert float(second.split()[1]) <= float(first.split()[1])

    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_cli("predict", f"--export={digits_export['path']}", "--json", files[0], str(bad), files[1],
                   check=False)
    assert proc.returncode == 1  # one image failed; the others were still answered
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["image"] for r in records] == [files[0], files[1]]
    for r, p in zip(records, expected[:2]):
        assert len(r["predictions"]) == 3
        probs = [q["probability"] for q in r["predictions"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert r["predictions"][0]["class_id"] == int(p.argmax())
        assert all(q["class_name"] == str(q["class_id"]) for q in r["predictions"])
    assert last_line(proc.stderr).startswith(f"error: {bad}: the image could not be decoded")


def test_predict_missing_image_or_export_fails_with_one_line(digits_export, tmp_path):
    proc = run_cli("predict", f"--export={digits_export['path']}", str(tmp_path / "nope.png"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # fix the command
    assert last_line(proc.stderr) == f"error: image {str(tmp_path / 'nope.png')!r} does not exist"
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "empty_model").mkdir()
    proc = run_cli("predict", f"--export={tmp_path / 'empty_model'}", str(image), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("error: ") and "no integer version" in last_line(proc.stderr)


def test_serving_bench_measures_latency_and_throughput(tiny, tmp_path):
    path = export.export_model(tiny, ["a", "b", "c"], str(tmp_path), "m")
    for signature in ("serving_default", "serving_bytes"):
        result = latency.measure(os.path.dirname(path), batch_sizes=(1, 4), iterations=5,
                                       signature=signature)
        assert result["export"] == path and result["image_size"] == [8, 8]
        assert [m["batch_size"] for m in result["measurements"]] == [1, 4]
        for m in result["measurements"]:
            assert m["iterations"] == 5 and 0 < m["p50_ms"] <= m["p99_ms"]
            assert m["images_per_second"] > 0
        assert result["latency_p50_ms"] == result["measurements"][0]["p50_ms"]
        assert result["images_per_second"] == result["measurements"][1]["images_per_second"]


def test_a_bit_export_serves_its_predictions_from_standardized_kernels(tmp_path):
    """BiT's weight standardization is a constant at inference: the export holds the standardized kernels
    (plain convolutions) and answers what the Keras model answers."""
    from pipeline.models import bit
    from pipeline.models.inference import inference_model
    keras.utils.set_random_seed(0)
    model = bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=3, input_shape=(32, 32, 3))
    head = model.get_layer("logits")
    head.kernel.assign(np.random.RandomState(0).normal(size=head.kernel.shape).astype("f4"))
    copy = inference_model(model)
    assert not any(isinstance(layer, bit.StandardizedConv2D) for layer in copy.layers)
    images = np.random.RandomState(1).uniform(size=(4, 32, 32, 3)).astype("f4")
    compiled = tf.function(lambda m, x: m(x, training=False), reduce_retracing=False)
    np.testing.assert_array_equal(np.asarray(compiled(copy, images)), np.asarray(compiled(model, images)))
    path = export.export_model(model, ["a", "b", "c"], str(tmp_path), "bit")
    loaded = tf.saved_model.load(path)
    served = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(served, np.asarray(tf.nn.softmax(model(images))), atol=1e-6)
    kernel = {v.name: v.numpy() for v in loaded.model_variables}["block1_unit01_b_conv/kernel:0"]
    np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)  # standardized per output channel
    np.testing.assert_allclose(kernel.var(axis=(0, 1, 2)), 1.0, rtol=1e-4)
    assert isinstance(model.get_layer("block1_unit01_b_conv"), bit.StandardizedConv2D)  # the model is unchanged
