"""`python -m pipeline.train` end to end: run directory, resume, errors, divergence."""
import csv
import json
import os

import pytest

from pipeline import config as cfg
from pipeline import rundir
from pipeline.training import phases
from tests.helpers import FAST, last_line, run_cli


def read_csv(model_dir):
    with open(os.path.join(model_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_every_run_directory_file(digits_run):
    d = digits_run["model_dir"]
    for name in ["flags.cfg", "config.json", "labels.txt", "metrics.csv", "summary.json",
                 "checkpoints/best.keras", "checkpoints/last.keras", "checkpoints/state.json"]:
        assert os.path.isfile(os.path.join(d, name)), name
    events = [f for _, _, fs in os.walk(os.path.join(d, "tensorboard")) for f in fs if "tfevents" in f]
    assert events, "no TensorBoard event files"
    rows = read_csv(d)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == list(rundir.METRIC_COLUMNS)
    for r in rows:
        assert all(r[c] != "" for c in rundir.METRIC_COLUMNS if not c.endswith("_raw"))  # _raw: EMA runs
        assert float(r["images_per_second"]) > 0 and float(r["lr"]) > 0
    assert f"run directory: {d}" in digits_run["stdout"]


def test_trained_model_beats_chance_and_summary_is_consistent(digits_run):
    d = digits_run["model_dir"]
    summary = json.load(open(os.path.join(d, "summary.json")))
    rows = read_csv(d)
    assert summary["status"] == "completed"
    assert summary["epochs_done"] == 3
    assert summary["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    best = max(float(r["val_accuracy"]) for r in rows)
    assert summary["best_val_accuracy"] == pytest.approx(best, abs=1e-5)
    # A tie goes to the later epoch.
    ties = [int(r["epoch"]) for r in rows if abs(float(r["val_accuracy"]) - best) < 1e-6]
    assert summary["best_epoch"] == max(ties)
    assert summary["precision"] in ("float32", "mixed_bfloat16", "mixed_float16")
    assert summary["split_sizes"]["test"] > 0 and summary["device"]


def test_flagfile_repeats_the_run(digits_run, tmp_path):
    d = digits_run["model_dir"]
    text = open(os.path.join(d, "flags.cfg")).read()
    assert "--model=resnet20" in text and "--epochs=3" in text and "--model_dir" not in text
    again = str(tmp_path / "again")
    run_cli("train", f"--flagfile={d}/flags.cfg", "--epochs=1", "--steps_per_epoch=2", "--noexport",
            "--noreport", f"--model_dir={again}")  # (export and report: test_export, test_report)
    first = json.load(open(os.path.join(d, "config.json")))
    second = json.load(open(os.path.join(again, "config.json")))
    for key in ("model", "data"):
        assert first[key] == second[key]
    assert first["train"]["optimizer"] == second["train"]["optimizer"]


def test_evaluate_cli_reports_test_accuracy_and_confusion(digits_run):
    d = digits_run["model_dir"]
    proc = run_cli("evaluate", f"--model_dir={d}")
    assert "test: loss" in proc.stdout
    result = json.load(open(os.path.join(d, "evaluation_test.json")))
    summary = json.load(open(os.path.join(d, "summary.json")))
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"], abs=2e-3)
    rows = open(os.path.join(d, "confusion_test.csv")).read().strip().splitlines()
    assert len(rows) == 11  # header + 10 classes
    counts = [int(c) for r in rows[1:] for c in r.split(",")[1:]]
    assert sum(counts) == result["examples"]


# A kill -9 mid-run, then `--model_dir=... --resume` alone, each epoch once and the run completed:
# tests/test_rundir.py::test_kills_at_each_fault_point_resume_exactly (a kill at each commit step, and
# equal to an uninterrupted run); for a cluster, test_distribute's restarted_cluster.


def test_nan_loss_stops_with_a_clear_message_and_keeps_best(tmp_path):
    model_dir = str(tmp_path / "nan")
    proc = run_cli("train", *FAST, "--epochs=3", "--steps_per_epoch=3", "--optimizer=sgd", "--learning_rate=0.01",
                   "--switch_optimizer_epoch=1", "--second_optimizer=sgd", "--second_learning_rate=1e30",
                   "--schedule=constant", f"--model_dir={model_dir}", check=False)
    assert proc.returncode == 2
    line = last_line(proc.stderr)
    assert line.startswith("error: Loss became NaN") and "epoch 2" in line, line
    assert os.path.exists(os.path.join(model_dir, "checkpoints", "best.keras"))
    state = rundir.read_json(os.path.join(model_dir, "checkpoints", "state.json"))
    assert state["epochs_done"] == 1 and state["best_epoch"] == 1
    assert json.load(open(os.path.join(model_dir, "summary.json")))["status"] == "diverged"


@pytest.mark.parametrize("args,needle", [
    (["--model=resnet2O"], "model"),
    (["--dataset=no_such_dataset_xyz"], "no_such_dataset_xyz"),
    (["--dataset=folder:/nonexistent/photos"], "/nonexistent/photos"),
    (["--optimizer=sgdd"], "optimizer"),
])
def test_bad_flags_exit_nonzero_with_one_clear_line(args, needle, tmp_path):
    proc = run_cli("train", *FAST, *args, "--epochs=1", f"--model_dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode != 0
    messages = [line for line in proc.stderr.splitlines()
                if line.startswith("error:") or "Flags parsing error" in line]
    assert len(messages) == 1 and needle in messages[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_existing_run_dir_is_not_overwritten(digits_run):
    proc = run_cli("train", *FAST, f"--model_dir={digits_run['model_dir']}", check=False)
    assert proc.returncode == 2 and "--resume" in last_line(proc.stderr)


def test_phases_split_at_unfreeze_and_switch():
    t = cfg.TrainConfig(epochs=10, freeze_epochs=2, switch_optimizer_epoch=5,
                        optimizer=cfg.OptimizerConfig("adam", 1e-3),
                        second_optimizer=cfg.OptimizerConfig("sgd", 1e-2))
    planned = phases.plan_phases(t, 10)
    assert [(p.start, p.end, p.optimizer.name, p.freeze_backbone) for p in planned] == [
        (0, 2, "adam", True), (2, 5, "adam", False), (5, 10, "sgd", False)]


def test_confusion_csv_quotes_class_names_as_csv_readers_expect(tmp_path):
    import csv
    import numpy as np
    names = ['say "cheese"', "a,b", "plain"]
    rundir.write_evaluation(str(tmp_path), "test", {"class_names": names, "confusion": np.eye(3, dtype=int),
                                                    "loss": 0.1, "accuracy": 1.0})
    with open(tmp_path / "confusion_test.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\predicted", *names]
    assert [r[0] for r in rows[1:]] == names and rows[1][1:] == ["1", "0", "0"]
