"""ONNX and LiteRT exports in their own runtimes, quantization, calibration, rejection and TTA (issue 18).

The runtime checks run in a FRESH Python process that imports only numpy and
onnxruntime (or ai-edge-litert's interpreter) and proves it imported neither
TensorFlow nor Keras: the answer is the runtime's, not ours.
"""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as cfg
from pipeline import data, rundir, tta
from pipeline.serving import calibration, deploy, export, formats, head, latency, predict, runtimes
from tests.helpers import REPO

LABELS = ["a", "b", "c"]


def tiny_model(seed=0, size=8):
    from pipeline.models.layers import Normalize
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = Normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(LABELS), name="logits")(x))


def keras_probabilities(model, images, size=8):
    """What every format must return without TTA or temperature: softmax(model(bilinear resize))."""
    resized = tf.image.resize(images, [size, size], method="bilinear")
    return tf.nn.softmax(tf.cast(model(resized), tf.float32)).numpy()


RUNTIME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    kind, model_path, inputs, outputs = sys.argv[1:]
    if kind == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        run = lambda x: dict(zip(names, session.run(names, {"images": x})))
    else:
        from ai_edge_litert.interpreter import Interpreter
        runner = Interpreter(model_path=model_path).get_signature_runner()
        run = lambda x: runner(images=x)
    arrays = np.load(inputs)
    result = {}
    for key in arrays.files:
        for name, value in run(arrays[key]).items():
            result[f"{key}/{name}"] = value
    np.savez(outputs, **result)
    heavy = sorted(m for m in ("tensorflow", "keras", "pipeline") if m in sys.modules)
    print(json.dumps({"imported": heavy}))
""")


def run_in_runtime(kind, model_path, batches, tmp_path):
    """Outputs `{key/output: array}` of `model_path` on `batches` in a fresh runtime-only process."""
    inputs, outputs = str(tmp_path / f"in-{kind}.npz"), str(tmp_path / f"out-{kind}.npz")
    np.savez(inputs, **batches)
    proc = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT, kind, model_path, inputs, outputs],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"imported": []}
    with np.load(outputs) as out:
        return {k: out[k] for k in out.files}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(1)
    return {f"{h}x{w}-b{b}": rng.random((b, h, w, 3), dtype=np.float32)
            for (h, w) in ((8, 8), (13, 11)) for b in (1, 3)}


@pytest.fixture(scope="module")
def all_formats(model, batches, tmp_path_factory):
    """The tiny model exported as every format, with a reject threshold splitting the test images."""
    top = np.concatenate([keras_probabilities(model, x).max(-1) for x in batches.values()])
    threshold = float(np.median(top))
    plan = formats.DeployPlan(options=head.DeployOptions(reject_below=threshold), formats=formats.FORMATS)
    path = export.export_model(model, LABELS, str(tmp_path_factory.mktemp("exports")), "m", deploy=plan)
    return {"path": path, "threshold": threshold}


# ------------------------------------------------------------------ TTA


def test_tta_flip_is_the_mean_of_the_image_and_its_mirror(model):
    images = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    got = tta.tta_probabilities(model, images, "flip").numpy()
    plain = tf.nn.softmax(model(images)).numpy()
    mirror = tf.nn.softmax(model(images[:, :, ::-1, :].copy())).numpy()
    np.testing.assert_allclose(got, (plain + mirror) / 2, atol=1e-6)
    views = tta.tta_views(images, "flip_crops").numpy()
    assert views.shape == (10, 2, 8, 8, 3)
    # The top-left 87.5% crop (7 of 8 pixels) resized back, and its mirror.
    top_left = tf.image.resize(images[:, :7, :7, :], [8, 8], method="bilinear").numpy()
    np.testing.assert_allclose(views[0], top_left, atol=1e-6)
    np.testing.assert_allclose(views[1], top_left[:, :, ::-1, :], atol=1e-6)
    np.testing.assert_array_equal(tta.tta_views(images, "none").numpy()[0], images)
    with pytest.raises(ValueError, match="none, flip, flip_crops"):
        tta.view_count("five_crops")


# ------------------------------------------------------------------ formats in their runtimes


def test_float_onnx_and_litert_equal_keras_in_a_runtime_only_process(model, batches, all_formats, tmp_path):
    path = all_formats["path"]
    card = export.read_model_card(path)
    for fmt, name in (("onnx", "model.onnx"), ("litert", "model.tflite")):
        entry = card["files"][fmt]
        entry.pop("quantize", None)
        assert entry == formats.file_entry(os.path.join(path, name))  # size and sha256 as written
        out = run_in_runtime("onnx" if fmt == "onnx" else "litert", os.path.join(path, name), batches,
                             tmp_path)
        for key, x in batches.items():
            expected = keras_probabilities(model, x)
            np.testing.assert_allclose(out[f"{key}/probabilities"], expected, atol=1e-4, err_msg=f"{fmt} {key}")
            np.testing.assert_array_equal(out[f"{key}/class_ids"], expected.argmax(-1))
            np.testing.assert_array_equal(out[f"{key}/is_unknown"],
                                          expected.max(-1) < all_formats["threshold"])
    assert open(os.path.join(path, "labels.txt")).read().split() == LABELS
    assert formats.onnx_labels(os.path.join(path, "model.onnx")) == LABELS
    assert formats.litert_labels(os.path.join(path, "model.tflite")) == LABELS


def test_litert_uses_builtin_operations_only(all_formats):
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils
    tflite = flatbuffer_utils.read_model(os.path.join(all_formats["path"], "model.tflite"))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in tflite.operatorCodes]
    assert codes and schema.BuiltinOperator.CUSTOM not in codes
    assert not [c.customCode for c in tflite.operatorCodes if c.customCode]  # no Flex (SELECT_TF_OPS)


def test_unknown_in_saved_model_bytes_signature_and_predict(model, all_formats, tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(5)
    pixels = [np.round(rng.random((8, 8, 3)) * 255).astype(np.uint8) for _ in range(6)]
    files = []
    for i, p in enumerate(pixels):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(p).save(files[-1])
    expected = keras_probabilities(model, np.stack(pixels).astype(np.float32) / 255.0)
    unknown = expected.max(-1) < all_formats["threshold"]
    assert unknown.any() and not unknown.all()
    signature = tf.saved_model.load(all_formats["path"]).signatures["serving_bytes"]
    out = signature(image_bytes=tf.constant([open(f, "rb").read() for f in files]))
    names = [n.decode() for n in out["class_names"].numpy()]
    assert [n == head.UNKNOWN_CLASS for n in names] == list(unknown)
    assert all(n == LABELS[i] for n, i, u in zip(names, expected.argmax(-1), unknown) if not u)
    for target in (all_formats["path"], os.path.join(all_formats["path"], "model.onnx"),
                   os.path.join(all_formats["path"], "model.tflite")):
        assert predict.print_predictions(target, files, top_k=1, as_json=True) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [line["is_unknown"] for line in lines] == list(unknown), target
        assert [line["predictions"][0]["class_id"] for line in lines] == list(expected.argmax(-1))


def test_serving_bench_times_every_runtime(all_formats):
    results = latency.measure_runtimes(all_formats["path"], batch_sizes=(1, 2), iterations=2, warmup=1)
    assert [r["runtime"] for r in results] == ["saved_model", "onnxruntime", "litert"]
    for r in results:
        assert [m["batch_size"] for m in r["measurements"]] == [1, 2]
        assert all(m["p50_ms"] > 0 and m["images_per_second"] > 0 for m in r["measurements"])


def test_export_with_tta_averages_inside_every_format(model, tmp_path):
    plan = formats.DeployPlan(options=head.DeployOptions(tta="flip", temperature=2.0), formats=formats.FORMATS)
    path = export.export_model(model, LABELS, str(tmp_path), "m", deploy=plan)
    images = np.random.default_rng(3).random((3, 8, 8, 3), dtype=np.float32)
    expected = tta.tta_probabilities(model, images, "flip", temperature=2.0).numpy()
    for target in runtimes.runtimes_of(path):
        got = runtimes.open_runtime(target).run(images)
        np.testing.assert_allclose(got["probabilities"], expected, atol=1e-4, err_msg=target)
        assert "is_unknown" not in got


# ------------------------------------------------------------------ calibration


def test_temperature_lowers_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 2000)
    # 70% right, but every answer 12 logits above the rest: overconfident.
    predicted = np.where(rng.random(2000) < 0.7, labels, rng.integers(0, 5, 2000))
    logits = rng.normal(0, 1, (2000, 5)) + 12.0 * np.eye(5)[predicted]
    t = calibration.fit_temperature(logits, labels)
    from scipy.special import log_softmax
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 601))
    brute = grid[np.argmin([-log_softmax(logits / g, axis=-1)[np.arange(2000), labels].mean() for g in grid])]
    assert t > 2.0 and abs(np.log(t) - np.log(brute)) < 0.02
    s = calibration.calibration_summary(logits, labels, t)
    assert s["nll_after"] < s["nll_before"] / 2 and s["ece_after"] < s["ece_before"] / 2
    assert (calibration.softmax(logits, t).argmax(-1) == logits.argmax(-1)).all()  # same classes
    probabilities = calibration.softmax(logits, t)
    top, right = probabilities.max(-1), probabilities.argmax(-1) == labels
    p = float(np.median(top))
    table = calibration.rejection_table(probabilities, labels, thresholds=(0.0, p, 1.1))
    assert table[0] == {"threshold": 0.0, "rejected": 0.0, "accepted_accuracy": float(right.mean())}
    assert table[1] == {"threshold": p, "rejected": pytest.approx(float((top < p).mean())),
                        "accepted_accuracy": pytest.approx(float(right[top >= p].mean()))}
    assert table[2] == {"threshold": 1.1, "rejected": 1.0, "accepted_accuracy": None}


# ------------------------------------------------------------------ int8 on digits, from a run


@pytest.fixture(scope="module")
def digits_mini_run(tmp_path_factory):
    """A run directory on digits (its config, labels, best checkpoint) with a small CNN fitted for seconds."""
    model_dir = str(tmp_path_factory.mktemp("digits_run"))
    run = cfg.RunConfig(model_dir=model_dir, data=cfg.DataConfig(dataset="digits", augment="none",
                                                                 batch_size=64))
    rundir.write_json_atomic(rundir.path(model_dir, rundir.CONFIG_FILE), cfg.to_dict(run))
    datasets = data.load_dataset(run.data)
    with open(rundir.path(model_dir, rundir.LABELS_FILE), "w") as f:
        f.write("\n".join(datasets.class_names) + "\n")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
                              keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, labels, (train, _, _) = data.digits_arrays()
    model.fit(images[train], labels[train], epochs=10, batch_size=32, verbose=0)
    os.makedirs(rundir.path(model_dir, rundir.CHECKPOINT_DIR))
    model.save(rundir.checkpoint_file(model_dir, "best"))
    return {"model_dir": model_dir, "model": model, "datasets": datasets}


def test_int8_litert_from_a_run_keeps_the_float_class_of_digits(digits_mini_run, tmp_path):
    model_dir, datasets = digits_mini_run["model_dir"], digits_mini_run["datasets"]
    settings = deploy.DeploySettings(format="litert", quantize="int8", quantize_samples=200,
                                     reject_below=0.5)
    path = deploy.export_run(model_dir, settings, export_root=str(tmp_path))
    images = np.concatenate([x.numpy() for x, _ in datasets.test])
    floats = digits_mini_run["model"].predict(images, verbose=0).argmax(-1)
    out = run_in_runtime("litert", os.path.join(path, "model.tflite"), {"test": images}, tmp_path)
    agreement = (out["test/class_ids"] == floats).mean()
    labels = np.concatenate([y.numpy() for _, y in datasets.test])
    assert agreement >= 0.97 and (floats == labels).mean() > 0.9, agreement
    card = export.read_model_card(path)
    assert card["files"]["litert"]["quantize"] == "int8"
    assert set(card["test_accuracy"]) == {"keras_float_no_tta", "saved_model", "litert"}
    assert card["test_accuracy"]["litert"] == pytest.approx((out["test/class_ids"] == labels).mean())
    record = rundir.read_json(rundir.path(model_dir, deploy.DEPLOY_FILE))
    assert record["calibration"]["temperature"] == card["deploy"]["temperature"] != 1.0
    assert record["calibration"]["nll_after"] <= record["calibration"]["nll_before"] + 1e-9
    assert [r["threshold"] for r in record["rejection"]] == list(calibration.REJECTION_THRESHOLDS)
    # The run report's deployment section shows the same numbers, the table and the curve.
    from pipeline.reporting import deploy_section
    from pipeline.reporting.document import Document, Facts
    from pipeline.reporting.render import render_markdown
    sections = deploy_section.deploy_sections(model_dir, model_dir)
    text = render_markdown(Document("r", "", "completed", "completed", Facts([]), sections))
    assert "model.tflite (LiteRT interpreter), quantize=int8" in text
    assert f"{100 * card['test_accuracy']['litert']:.2f}%" in text
    assert f"temperature {record['calibration']['temperature']:.3f}" in text and "reject_below" in text
    assert os.path.getsize(os.path.join(model_dir, "plots", deploy_section.REJECTION_PLOT)) > 1000


# ------------------------------------------------------------------ refusals and faults


def test_missing_extra_and_bad_combinations_are_one_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    with pytest.raises(formats.MissingExtraError, match=r'pip install -e "\.\[deploy\]"'):
        deploy.check_settings(deploy.DeploySettings(format="onnx"))
    with pytest.raises(ValueError, match="applies to LiteRT"):
        deploy.check_settings(deploy.DeploySettings(format="saved_model", quantize="int8"))
    with pytest.raises(ValueError, match=r"reject_below must be in \(0, 1\)"):
        deploy.check_settings(deploy.DeploySettings(reject_below=1.5))


KILLED_EXPORT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from tests.test_deploy import LABELS, tiny_model
    from pipeline.serving import export, formats
    export.export_model(tiny_model(), LABELS, sys.argv[2], "m",
                        deploy=formats.DeployPlan(formats=formats.FORMATS))
""")


def test_a_kill_during_a_multi_format_export_leaves_no_partial_version(model, tmp_path):
    root = str(tmp_path / "exports")
    # Killed with the SavedModel written, before the ONNX file (the fast point to reach).
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, REPO, root], capture_output=True, text=True,
                          timeout=300, env={**os.environ, rundir.FAULT_ENV: "export_between_formats"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = os.listdir(os.path.join(root, "m"))
    assert not [n for n in left if n.isdigit()] and any(n.startswith(".tmp-") for n in left)
    tmp = os.path.join(root, "m", left[0])
    assert os.path.isfile(os.path.join(tmp, "saved_model.pb")) and not os.path.exists(os.path.join(tmp, "model.onnx"))
    path = export.export_model(model, LABELS, root, "m")  # the next export removes the killed one's folder
    assert sorted(os.listdir(os.path.join(root, "m"))) == ["1"] and path.endswith(os.sep + "1")
