"""The run report shows the mistakes; the comparison shows per-class F1 side by side.

Costs: the tiny run of `tests.small_run` (shared with test_metrics), copied;
one report that evaluates its best checkpoint (plain and flip TTA), one
comparison of two copies (no TensorFlow).
"""
import json
import os
import re
import shutil

import pytest

from pipeline import metrics, reporting
from tests.small_run import small_run

NEW_SECTIONS = ("Per-class precision, recall and F1", "Mistakes", "Calibration", "Test-time augmentation",
                "Class counts")
DATA_REPORT = {"splits": {"train": {"class_counts": {str(i): 120 + i for i in range(10)}},
                          "test": {"class_counts": {str(i): 36 for i in range(10)}}},
               "imbalance": {"largest": ["9", 129], "smallest": ["0", 120], "ratio": 1.07},
               "warnings": ["2 exact duplicate(s) across train and test: train: a.png = test: b.png"]}


def _copy(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(
        "evaluation_*", "confusion_*", "top_losses_*", "report.*", "plots", "data_report"))
    path = os.path.join(target, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["model_dir"] = str(target)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(target)


def _section(text, title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {title!r}"
    return match[1]


def _rows(text, first_header):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.split("|")[1].strip() == first_header)
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        cells = [c.strip().replace("**", "").strip("`") for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model_dir = _copy(small_run(tmp_path_factory), tmp_path_factory.mktemp("mistakes") / "run")
    os.makedirs(os.path.join(model_dir, "data_report"))
    with open(os.path.join(model_dir, "data_report", "data_report.json"), "w", encoding="utf-8") as f:
        json.dump(DATA_REPORT, f)
    md, page = reporting.write_run_report(model_dir, export_roots=[], load_model=False, read_signatures=False)
    with open(md, encoding="utf-8") as f, open(page, encoding="utf-8") as g:
        return model_dir, f.read(), g.read()


def test_the_report_has_the_new_sections_with_the_evaluations_numbers(report):
    model_dir, text, page = report
    assert [s for s in NEW_SECTIONS if f"\n## {s}\n" not in text] == []
    with open(os.path.join(model_dir, "evaluation_test.json"), encoding="utf-8") as f:
        evaluation = json.load(f)
    # Per-class P/R/F1 and macro-F1 as evaluated (plain predictions: the run's own test accuracy).
    assert evaluation["tta"] == "none"
    per_class = _section(text, "Per-class precision, recall and F1")
    assert f"Macro-F1 **{100 * evaluation['macro_f1']:.2f}%**" in per_class
    rows = {r["class"]: r for r in _rows(per_class, "class")}
    for name, m in evaluation["per_class_metrics"].items():
        assert rows[name]["F1"] == f"{100 * m['f1']:.2f}%" and int(rows[name]["support"]) == m["support"]
    # Mistakes: the thumbnails of the highest-loss images, and the most-confused pairs.
    mistakes = _section(text, "Mistakes")
    assert "![Highest-loss test images](plots/top_losses_test.png)" in mistakes
    assert os.path.getsize(os.path.join(model_dir, "plots", "top_losses_test.png")) > 1000
    pairs = _rows(mistakes, "true class")
    top = evaluation["confused_pairs"][0]
    assert (pairs[0]["true class"], pairs[0]["predicted as"], int(pairs[0]["images"])) == (
        top["true"], top["predicted"], top["count"])
    # Calibration: the reliability diagram and the shared ECE function's number.
    calibration = _section(text, "Calibration")
    assert f"Expected calibration error **{evaluation['ece']:.4f}**" in calibration
    assert "plots/reliability_test.png" in calibration
    assert sum(evaluation["reliability"]["count"]) == evaluation["examples"]
    assert len(evaluation["reliability"]["count"]) == metrics.ECE_BINS
    # Accuracy with and without TTA.
    tta = {r["TTA"]: r["test accuracy"] for r in _rows(_section(text, "Test-time augmentation"), "TTA")}
    assert set(tta) == {"none", "flip"}
    assert tta["none"] == f"{100 * evaluation['tta_accuracy']['none']:.2f}%"
    # The data report's class counts and warnings.
    counts = _section(text, "Class counts")
    by_class = {r["class"]: r for r in _rows(counts, "class")}
    assert by_class["9"]["train"] == "129" and by_class["0"]["test"] == "36"
    assert "exact duplicate(s) across train and test" in counts
    # The HTML says the same, with the figures inline.
    assert "Highest-loss test images" in page and page.count("data:image/png;base64,") >= 4


def test_the_comparison_shows_per_class_f1_side_by_side(report, tmp_path):
    model_dir, _, _ = report
    other = _copy(model_dir, tmp_path / "other")
    shutil.copy(os.path.join(model_dir, "evaluation_test.json"), other)
    md, _ = reporting.write_comparison_report([model_dir, other], str(tmp_path / "comparison"))
    with open(md, encoding="utf-8") as f:
        text = f.read()
    section = _section(text, "Per-class F1")
    rows = {r["class"]: r for r in _rows(section, "class")}
    with open(os.path.join(model_dir, "evaluation_test.json"), encoding="utf-8") as f:
        evaluation = json.load(f)
    for name, m in evaluation["per_class_metrics"].items():
        assert rows[name]["run"] == rows[name]["other"] == f"{100 * m['f1']:.2f}%"
    assert rows["macro-F1"]["run"] == f"{100 * evaluation['macro_f1']:.2f}%"
