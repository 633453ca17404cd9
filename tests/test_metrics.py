"""Per-class precision/recall/F1, macro-F1, balanced accuracy, confused pairs and TTA in `pipeline.evaluate`.

Costs: one tiny in-process training shared with test_report_mistakes
(`tests.small_run`), one evaluation with flip TTA, one short CLI call that
fails before TensorFlow.
"""
import json
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline import metrics
from tests.helpers import run_cli
from tests.small_run import small_run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from pipeline.training import evaluation

    model_dir = small_run(tmp_path_factory)
    result = evaluation.evaluate_and_save(model_dir, split="test", checkpoint="best", tta_mode="flip")
    return model_dir, result


def _predictions_by_hand(model_dir):
    """The model's own probabilities on the test split, plain and mirrored, without pipeline.tta."""
    import keras

    from pipeline import config as cfg
    from pipeline import data, rundir
    from pipeline.models import load_model

    run = cfg.from_dict(rundir.read_json(rundir.path(model_dir, "config.json")))
    model = load_model(rundir.checkpoint_file(model_dir, "best"))
    labels, plain, mirrored = [], [], []
    for x, y in data.load_dataset(run.data).test:
        plain.append(keras.ops.softmax(model(x, training=False)).numpy())
        mirrored.append(keras.ops.softmax(model(x[:, :, ::-1, :], training=False)).numpy())
        labels.append(y.numpy())
        assert not np.array_equal(x.numpy(), x.numpy()[:, :, ::-1, :])  # the mirror is another image
    return np.concatenate(labels), np.concatenate(plain), np.concatenate(mirrored)


def test_macro_f1_and_balanced_accuracy_are_sklearns_on_the_models_predictions(evaluated):
    model_dir, result = evaluated
    labels, plain, mirrored = _predictions_by_hand(model_dir)
    predicted = ((plain + mirrored) / 2).argmax(-1)
    assert len(set(predicted)) > 1 and (predicted != labels).any()   # a real, imperfect model
    assert result["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"), abs=1e-9)
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted, zero_division=0)
    for i, name in enumerate(result["class_names"]):
        row = result["per_class_metrics"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
    # And what pipeline.evaluate wrote is what it computed.
    with open(os.path.join(model_dir, "evaluation_test.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["macro_f1"] == result["macro_f1"] and saved["tta"] == "flip"


def test_tta_flip_is_the_mean_of_the_model_on_the_image_and_its_mirror(evaluated):
    model_dir, result = evaluated
    labels, plain, mirrored = _predictions_by_hand(model_dir)
    mean = (plain + mirrored) / 2
    assert result["accuracy"] == pytest.approx(float((mean.argmax(-1) == labels).mean()))
    assert result["tta_accuracy"]["none"] == pytest.approx(float((plain.argmax(-1) == labels).mean()))
    assert result["loss"] == pytest.approx(metrics.negative_log_likelihood(mean, labels), rel=1e-4)
    assert result["ece"] == pytest.approx(metrics.expected_calibration_error(mean, labels), abs=1e-4)
    # The highest-loss images are the ones the averaged probabilities rank worst.
    losses = metrics.per_example_loss(mean, labels)
    worst = [e["index"] for e in result["top_losses"]]
    assert np.allclose([e["loss"] for e in result["top_losses"]], losses[worst], rtol=1e-4)
    assert min(losses[worst]) >= np.sort(losses)[-len(worst)] - 1e-4
    assert result["top_loss_images"].shape[0] == len(worst) and result["top_loss_images"].dtype == np.uint8


def test_classification_report_scores_every_class_and_confused_pairs_rank_mistakes():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 1, 2, 0, 2, 2])
    report = metrics.classification_report(labels, predicted, ["a", "b", "c", "never"])
    assert report["per_class_metrics"]["never"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    assert report["per_class_metrics"]["b"]["precision"] == pytest.approx(0.5)
    confusion = skm.confusion_matrix(labels, predicted, labels=[0, 1, 2])
    pairs = metrics.confused_pairs(confusion, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("a", "b", 2), ("c", "a", 1)]
    assert pairs[0]["fraction"] == pytest.approx(2 / 3)


def test_an_unknown_tta_mode_is_refused_before_tensorflow(tmp_path):
    proc = run_cli("evaluate", f"--model_dir={tmp_path}", "--tta=mirror", check=False, timeout=60)
    assert proc.returncode == 2 and "flip_crops" in proc.stderr
