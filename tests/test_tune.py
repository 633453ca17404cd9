"""Hyperparameter search: `pipeline.tuning` in-process, `python -m pipeline.tune` end to end.

Budgets are tiny (digits at 16x16, 2-8 steps of 32 images, 1 epoch per trial):
these tests check the search machinery, not the hyperparameters found, so the
trials that train build `tests.helpers.tiny_model` for the resnet20 their
configs name (`trainer.build_model` replaced; in the CLI, `run_cli(..., tiny=True)`).
The tests of what a trial builds use the registry's models. Random, hyperband and
bayesian searches run in-process; the grid search runs through the CLI as a
distributed search (a chief and a worker process).
"""
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import time

import keras
import keras_tuner as kt
import pytest

from pipeline import config as cfg
from pipeline import rundir
from pipeline.tuning import hypermodel as hypermodels
from pipeline.tuning import runner
from pipeline.tuning import space as search_space
from pipeline.training import trainer
from pipeline.models import create_model
from tests.helpers import REPO, cli_command, free_ports, last_line, run_cli, tiny_build_model

# Command-line twin of BASE below.
TUNE_FLAGS = ["--dataset=digits", "--model=resnet20", "--batch_size=32", "--augment=none", "--image_size=16",
              "--epochs=1", "--steps_per_epoch=2", "--max_epochs_per_trial=1", "--notensorboard",
              "--verbose=2"]
BASE = cfg.RunConfig(
    model_dir="unused",
    data=cfg.DataConfig(dataset="digits", batch_size=32, augment="none", image_size=16),
    model=cfg.ModelConfig(name="resnet20"),
    train=cfg.TrainConfig(epochs=1, steps_per_epoch=2, tensorboard=False, verbose=0),
    flags_text="# base\n--dataset=digits\n--model=resnet20\n--batch_size=32\n--optimizer=sgd\n"
               "--learning_rate=0.1\n--epochs=1\n--nodeterministic\n")
NARROW = {"tune": ["learning_rate", "optimizer"],
          "ranges": {"learning_rate": ["0.01", "0.2"]}, "choices": {"optimizer": ["sgd", "adam"]}}


def read_rows(filename):
    with open(filename, newline="") as f:
        return list(csv.DictReader(f))


def config_of(model_dir):
    return json.load(open(os.path.join(model_dir, rundir.CONFIG_FILE)))


def without(d, *paths):
    """A copy of a config dict without the given dotted keys."""
    d = json.loads(json.dumps(d))
    for p in paths:
        *parents, leaf = p.split(".")
        node = d
        for k in parents:
            node = node[k]
        node.pop(leaf, None)
    return d


@pytest.fixture(autouse=True)
def _restore_precision_policy():
    policy = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(policy)


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    """A 2-trial search per in-process tuner over the narrowed space (grid: `distributed_grid`)."""
    space = search_space.make_search_space(BASE, **NARROW)
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_model", tiny_build_model)
        for kind in ("random", "hyperband", "bayesian"):
            tune_dir = str(tmp_path_factory.mktemp(kind))
            result = runner.search(BASE, space, tune_dir, tuner=kind, max_trials=2, initial_random_trials=1)
            out[kind] = result
    keras.mixed_precision.set_global_policy("float32")
    return out


# ----------------------------------------------------------------------------- defaults


def test_default_hyperparameters_are_the_untuned_values(tmp_path):
    base = dataclasses.replace(
        BASE, model=cfg.ModelConfig(name="resnet32"),
        data=dataclasses.replace(BASE.data, batch_size=48),
        train=dataclasses.replace(
            BASE.train, optimizer=cfg.OptimizerConfig("nadam", 0.003, weight_decay=5e-4), schedule="cosine",
            warmup_epochs=0.5, label_smoothing=0.05, mixup_alpha=0.2, precision="mixed_bfloat16"))
    space = search_space.make_search_space(base)  # everything that applies to a CIFAR ResNet from scratch
    assert space.names == ["optimizer", "learning_rate", "weight_decay", "schedule", "warmup_epochs",
                           "label_smoothing", "mixup_alpha", "batch_size", "depth", "width_multiplier"]
    hypermodel = hypermodels.PipelineHyperModel(base, space, str(tmp_path))
    hp = kt.HyperParameters()
    model = hypermodel.build(hp)
    assert hp.values == {"optimizer": "nadam", "learning_rate": 0.003, "weight_decay": 5e-4,
                         "schedule": "cosine", "warmup_epochs": 0.5, "label_smoothing": 0.05,
                         "mixup_alpha": 0.2, "batch_size": 48, "depth": 32, "width_multiplier": 1.0}
    # Values outside the built-in search ranges (batch 48) were added as choices.
    assert 48 in next(p for p in hp.space if p.name == "batch_size").values
    # The default trial is the untuned run: same RunConfig (and flags text), only the directory differs.
    run = hypermodel.trial_run_config(hp.values, "0")
    assert run == dataclasses.replace(base, model_dir=os.path.join(str(tmp_path), "trials", "0"))
    assert hypermodel.trial_overrides(hp.values) == {}
    # build(hp) is the registry's model for that config, built under the run's precision.
    reference = create_model("resnet32", num_classes=10, image_size=16)
    assert model.count_params() == reference.count_params()
    assert model.get_layer("stem_conv").dtype_policy.name == "mixed_bfloat16"
    assert model.output.dtype == "float32"

    # A weight decay of 0 (off) stays the default of the log-scaled range.
    off = search_space.make_search_space(BASE, tune=["weight_decay"]).params[0]
    assert off.default == 0.0 and off.low > 0 and off.log
    # Fine-tuning hyperparameters apply to pretrained backbones, not to CIFAR ResNets from scratch.
    finetune = search_space.make_search_space(dataclasses.replace(BASE, model=cfg.ModelConfig("keras_resnet50")))
    assert {"freeze_epochs", "backbone_lr_multiplier"} <= set(finetune.names)
    assert "depth" not in finetune.names and "freeze_epochs" not in space.names


def test_trial_overrides_reach_the_config_and_the_flags_text(tmp_path):
    base = dataclasses.replace(BASE, train=dataclasses.replace(
        BASE.train, epochs=10, lr_boundaries=(5.0, 7.5), switch_optimizer_epoch=8,
        second_optimizer=cfg.OptimizerConfig("sgd", 0.1)))
    space = search_space.make_search_space(base, tune=["learning_rate", "weight_decay", "depth", "batch_size"])
    hypermodel = hypermodels.PipelineHyperModel(base, space, str(tmp_path), max_epochs_per_trial=4)
    values = {"learning_rate": 0.02, "weight_decay": 1e-4, "depth": 44, "batch_size": 64}
    run = hypermodel.trial_run_config(values, "7", execution=2)
    assert run.model_dir == os.path.join(str(tmp_path), "trials", "7-exec2")
    assert (run.model.name, run.data.batch_size, run.train.epochs) == ("resnet44", 64, 4)
    assert run.train.lr_boundaries == (2.0, 3.0)  # scaled with the trial's budget
    assert run.train.optimizer == cfg.OptimizerConfig("sgd", 0.02, weight_decay=1e-4)
    assert run.train.second_optimizer == cfg.OptimizerConfig("sgd", 0.1, weight_decay=1e-4)
    assert run.train.seed == run.data.seed == 2  # execution 2 of seed 0
    lines = run.flags_text.splitlines()
    for line in ["--learning_rate=0.02", "--weight_decay=0.0001", "--model=resnet44", "--batch_size=64",
                 "--epochs=4", "--lr_boundaries=2.0,3.0", "--seed=2", "--second_learning_rate=0.1",
                 "--dataset=digits", "--nodeterministic"]:
        assert lines.count(line) == 1, (line, lines)
    assert "--model=resnet20" not in lines and "--learning_rate=0.1" not in lines


# ----------------------------------------------------------------------------- searches


@pytest.mark.parametrize("kind", ["random", "hyperband", "bayesian"])
def test_each_tuner_runs_a_two_trial_search(searches, kind):
    result = searches[kind]
    rows = read_rows(result.trials_csv)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert set(rows[0]) >= {"trial_id", "optimizer", "learning_rate", "val_accuracy", "best_epoch", "run_dir"}
    scores = [float(r["val_accuracy"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        d = r["run_dir"]
        assert d == os.path.join(result.tune_dir, "trials", r["trial_id"])
        summary = json.load(open(os.path.join(d, "summary.json")))
        assert summary["status"] == "completed" and summary["epochs_done"] == 1
        metrics = rundir.read_metrics(d)
        assert [m["epoch"] for m in metrics] == [1] and int(r["best_epoch"]) == 1
        assert float(r["val_accuracy"]) == pytest.approx(metrics[0]["val_accuracy"], abs=1e-5)
        assert os.path.isfile(os.path.join(d, "checkpoints", "best.keras"))
        assert json.load(open(os.path.join(d, "tuning.json")))["tuner_id"] == "tuner0"
    # best.cfg holds the best trial's flags (its flags.cfg without comments).
    best = open(result.best_cfg).read()
    trial_flags = open(os.path.join(rows[0]["run_dir"], "flags.cfg")).read()
    assert [l for l in best.splitlines() if not l.startswith("#")] == \
        [l for l in trial_flags.splitlines() if not l.startswith("#")]
    assert f"trial {rows[0]['trial_id']}" in best
    # The oracle's own records agree: 2 trials, each scored.
    assert len(result.rows) == 2 and all(r.objective is not None for r in result.rows)


def test_narrowed_space_varies_only_the_named_hyperparameters(searches):
    base = without(cfg.to_dict(BASE), "model_dir", "train.optimizer.name", "train.optimizer.learning_rate")
    seen = set()
    for result in searches.values():
        for row in result.rows:
            config = config_of(row.run_dir)
            assert without(config, "model_dir", "train.optimizer.name", "train.optimizer.learning_rate") == base
            opt = config["train"]["optimizer"]
            assert opt["name"] in ("sgd", "adam") and 0.01 <= opt["learning_rate"] <= 0.2
            assert (opt["name"], opt["learning_rate"]) == (row.values["optimizer"], row.values["learning_rate"])
            seen.add((opt["name"], opt["learning_rate"]))
    assert len(seen) > 1  # the named ones did vary


def test_keras_tuner_adapter_holds(tmp_path, monkeypatch):
    """What pipeline.tuning relies on in keras-tuner (see pipeline/tuning/kt_adapter.py): fails on a change."""
    def no_build(self, hp, **kwargs):
        raise AssertionError("the tuner built the hypermodel outside a trial")

    monkeypatch.setattr(hypermodels.PipelineHyperModel, "build", no_build)
    space = search_space.make_search_space(BASE, **NARROW)
    hypermodel = hypermodels.PipelineHyperModel(BASE, space, str(tmp_path))
    # Constructing a tuner builds nothing; the oracle holds the whole space at its defaults.
    tuner = hypermodels.make_tuner("random", hypermodel, max_trials=1, overwrite=True)
    assert tuner.hypermodel is hypermodel
    assert tuner.oracle.get_space().values == {"optimizer": "sgd", "learning_rate": 0.1}
    # HyperbandOracle takes no max_trials; the attribute set on it still stops the search.
    tuner = hypermodels.make_tuner("hyperband", hypermodel, max_trials=1, overwrite=True)
    first = tuner.oracle.create_trial("tuner0")
    assert first.status == "RUNNING" and set(space.names) <= set(first.hyperparameters.values)
    assert tuner.oracle.create_trial("tuner1").status == "STOPPED"


class _Interrupt(keras.callbacks.Callback):
    """Stands for a kill right after the trial's first epoch was committed."""

    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


def test_rerun_resumes_the_search(searches, tmp_path, monkeypatch):
    tune_dir = str(tmp_path / "resumed")
    shutil.copytree(searches["random"].tune_dir, tune_dir)
    space = search_space.make_search_space(BASE, **NARROW)
    calls = []
    real_train = trainer.train

    def counting_train(run, **kwargs):
        calls.append((os.path.basename(run.model_dir), run.resume))
        return real_train(run, **kwargs)

    monkeypatch.setattr(trainer, "train", counting_train)
    monkeypatch.setattr(trainer, "build_model", tiny_build_model)  # as the searches' trials
    before = {t: os.path.getmtime(os.path.join(tune_dir, "trials", t, "metrics.csv")) for t in ("0", "1")}
    # max_trials 2 -> 3: only one new trial runs; it is interrupted mid-way.
    with pytest.raises(KeyboardInterrupt):
        runner.search(BASE, space, tune_dir, tuner="random", max_trials=3, callbacks=[_Interrupt()])
    assert calls == [("2", False)]
    # Rerunning again resumes trial 2 in its own directory instead of tripping over it.
    result = runner.search(BASE, space, tune_dir, tuner="random", max_trials=3)
    assert calls == [("2", False), ("2", True)]
    assert [r.status for r in result.rows] == ["completed"] * 3
    assert sorted(r.trial_id for r in result.rows) == ["0", "1", "2"]
    assert [m["epoch"] for m in rundir.read_metrics(os.path.join(tune_dir, "trials", "2"))] == [1]
    for t, mtime in before.items():
        assert os.path.getmtime(os.path.join(tune_dir, "trials", t, "metrics.csv")) == mtime
    # A finished search reruns without training anything; other settings are refused.
    again = runner.search(BASE, space, tune_dir, tuner="random", max_trials=3)
    assert len(calls) == 2 and [r.trial_id for r in again.rows] == [r.trial_id for r in result.rows]
    # keras-tuner's own API reads the reloaded search: best hyperparameters, best model from the run dir.
    tuner = hypermodels.make_tuner("random", hypermodels.PipelineHyperModel(BASE, space, tune_dir), max_trials=3)
    best = [r.values for r in result.rows if r.objective == result.rows[0].objective]  # ties are common here
    assert tuner.get_best_hyperparameters()[0].values in best
    assert tuner.get_best_models()[0].output.shape[-1] == 10
    with pytest.raises(ValueError, match="other settings"):
        runner.search(BASE, space, tune_dir, tuner="bayesian", max_trials=3)


def test_early_stopping_ends_a_trial_on_a_plateau(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "build_model", tiny_build_model)
    # A learning rate of 1e-7 leaves the weights where they are: val_accuracy plateaus at once.
    base = dataclasses.replace(BASE, train=dataclasses.replace(
        BASE.train, epochs=4, steps_per_epoch=1, optimizer=cfg.OptimizerConfig("sgd", 1e-7)))
    space = search_space.make_search_space(base, tune=["label_smoothing"], ranges={"label_smoothing": [0, 0.1]})
    result = runner.search(base, space, str(tmp_path), tuner="grid", max_trials=1, early_stopping_patience=1)
    metrics = rundir.read_metrics(result.rows[0].run_dir)
    summary = json.load(open(os.path.join(result.rows[0].run_dir, "summary.json")))
    assert summary["status"] == "completed" and summary["epochs_done"] == len(metrics) < 4
    assert result.rows[0].epochs == 4  # the budget; the trial stopped before it


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,needle", [
    ({"tune": ["optimizer", "learnig_rate"]},
     "Unknown hyperparameter 'learnig_rate' in --tune (did you mean learning_rate?); valid names: optimizer, "),
    ({"tune": ["learning_rate"], "ranges": {"learning_rate": ["0.1", "0.01"]}},
     "--learning_rate_range=0.1,0.01: lo must be below hi."),
    ({"tune": ["learning_rate"], "ranges": {"learning_rate": ["0", "0.5"]}}, "log scale"),
    ({"tune": ["weight_decay"], "ranges": {"weight_decay": ["-1e-4", "1e-3"]}}, "log scale"),
    ({"tune": ["learning_rate"], "ranges": {"learning_rate": ["0.2"]}}, "needs two numbers lo,hi"),
    ({"tune": ["learning_rate"], "ranges": {"learning_rate": ["1e-4", "0.01"]}},
     "--learning_rate=0.1 lies outside --learning_rate_range=0.0001,0.01"),
    ({"tune": ["optimizer"], "choices": {"optimizer": ["sgd", "adamm"]}}, "unknown optimizer 'adamm'"),
    ({"tune": ["optimizer"], "choices": {"optimizer": ["adam", "nadam"]}}, "--optimizer=sgd is not among"),
    ({"tune": ["optimizer"], "choices": {"depth": ["20", "32"]}}, "depth is not searched"),
    ({"tune": ["depth"], "choices": {"depth": ["20", "21"]}}, "no depth-21 twin"),
    ({"tune": ["freeze_epochs"]}, "freeze_epochs applies to fine-tuning"),
])
def test_bad_search_space_is_one_clear_error(kwargs, needle):
    with pytest.raises(ValueError) as info:
        search_space.make_search_space(BASE, **kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_cli_bad_hyperparameter_is_one_error_line(tmp_path):
    proc = run_cli("tune", *TUNE_FLAGS, "--tune=learning_rate,momentum", f"--tune_dir={tmp_path / 't'}",
                   check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [last_line(proc.stderr)] and "Traceback" not in proc.stderr
    assert "'momentum'" in errors[0] and "valid names: optimizer, learning_rate" in errors[0]
    assert not os.path.exists(tmp_path / "t")  # refused before anything was written


# ----------------------------------------------------------------------------- CLI


GRID_FLAGS = [f for f in TUNE_FLAGS if not f.startswith("--max_epochs_per_trial")] + [
    "--steps_per_epoch=8", "--learning_rate=0.05", "--seed=3", "--deterministic"]


@pytest.fixture(scope="module")
def distributed_grid(tmp_path_factory):
    """A 2-trial grid search by a chief (oracle server) and one worker, separate processes on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("distributed")
    tune_dir = str(tmp / "grid")
    cmd = cli_command("tune", *GRID_FLAGS, "--tuner=grid", "--max_trials=2", "--tune=optimizer,learning_rate",
                      "--optimizer_choices=sgd,adam", "--learning_rate_range=0.01,0.1", f"--tune_dir={tune_dir}",
                      tiny=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERASTUNER_ORACLE_IP": "127.0.0.1",
           "KERASTUNER_ORACLE_PORT": str(free_ports(1)[0])}
    logs = {role: open(tmp / f"{role}.log", "w+") for role in ("chief", "tuner0")}
    procs = {}
    try:
        for role in ("chief", "tuner0"):
            procs[role] = subprocess.Popen(cmd, cwd=REPO, env={**env, "KERASTUNER_TUNER_ID": role},
                                           stdout=logs[role], stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 480
        for proc in procs.values():
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        for proc in procs.values():  # every process is stopped, whatever happened
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    out = {}
    for role, f in logs.items():
        f.seek(0)
        out[role] = f.read()
        f.close()
    return {"tune_dir": tune_dir, "out": out, "returncode": {r: p.returncode for r, p in procs.items()}}


def test_distributed_search_with_a_chief_and_a_worker(distributed_grid):
    out, tune_dir = distributed_grid["out"], distributed_grid["tune_dir"]
    assert distributed_grid["returncode"] == {"chief": 0, "tuner0": 0}, out["chief"][-3000:] + out["tuner0"][-3000:]
    assert "worker finished" in out["tuner0"] and "top 2 of 2 trials by val_accuracy" in out["chief"]
    rows = read_rows(os.path.join(tune_dir, "trials.csv"))
    assert sorted(r["trial_id"] for r in rows) == ["0", "1"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    # The chief only served the oracle; the worker ran both trials and reported them to it.
    assert [r["tuner"] for r in rows] == ["tuner0", "tuner0"]
    for r in rows:
        info = json.load(open(os.path.join(r["run_dir"], "tuning.json")))
        assert info["tuner_id"] == "tuner0" and info["trial_id"] == r["trial_id"]
        assert float(r["val_accuracy"]) == pytest.approx(
            max(m["val_accuracy"] for m in rundir.read_metrics(r["run_dir"])), abs=1e-5)
    assert "run directory:" not in out["chief"] and out["tuner0"].count("run directory:") == 2
    assert os.path.isfile(os.path.join(tune_dir, "best.cfg"))


def test_grid_default_trial_is_the_untuned_run(distributed_grid):
    tune_dir = distributed_grid["tune_dir"]
    # search.json records the RunConfig that run_config_from_flags made from the command line.
    base = json.load(open(os.path.join(tune_dir, "search.json")))["base"]
    assert base["train"]["optimizer"]["learning_rate"] == 0.05 and base["train"]["deterministic"]
    trial0 = config_of(os.path.join(tune_dir, "trials", "0"))
    # (a search's --time_budget limits the number of trials, not what one trains: search.json leaves it out)
    assert without(trial0, "model_dir", "resume", "train.verbose", "train.tensorboard", "train.time_budget") == base
    flags0 = open(os.path.join(tune_dir, "trials", "0", "flags.cfg")).read().splitlines()
    assert "--learning_rate=0.05" in flags0 and "--optimizer=sgd" in flags0
    assert not any(line.startswith(("--tune", "--max_trials", "--freeze_epochs")) for line in flags0)
    # Grid trial 1 changes exactly one hyperparameter (the last declared one).
    trial1 = config_of(os.path.join(tune_dir, "trials", "1"))
    assert without(trial1, "model_dir", "train.optimizer.learning_rate") == \
        without(trial0, "model_dir", "train.optimizer.learning_rate")
    lr1 = trial1["train"]["optimizer"]["learning_rate"]
    assert 0.01 <= lr1 <= 0.1 and lr1 != 0.05


def test_best_cfg_retrains_to_the_reported_score(distributed_grid, tmp_path):
    tune_dir = distributed_grid["tune_dir"]
    best = read_rows(os.path.join(tune_dir, "trials.csv"))[0]
    text = open(os.path.join(tune_dir, "best.cfg")).read()
    assert f"Best trial {best['trial_id']}" in text and "python -m pipeline.train --flagfile" in text
    retrain = str(tmp_path / "retrain")
    run_cli("train", f"--flagfile={tune_dir}/best.cfg", f"--model_dir={retrain}", "--noexport", "--noreport",
            tiny=True)  # the trials' model
    assert without(config_of(retrain), "model_dir") == without(config_of(best["run_dir"]), "model_dir")
    # Same seed, data order and op determinism (--deterministic) make the retrain repeat the
    # trial; the tolerance is one of the 180 validation images.
    summary = json.load(open(os.path.join(retrain, "summary.json")))
    assert abs(summary["best_val_accuracy"] - float(best["val_accuracy"])) <= 1 / 180 + 1e-6
