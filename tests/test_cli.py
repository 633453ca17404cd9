"""Issue 15's command-line contract: bad values refused before work starts, exit statuses a
cluster manager can act on, flag typos reported before TensorFlow loads, and quiet output."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time

import pytest

from pipeline import cli, errors, validation
from pipeline import config as cfg
from pipeline.data.registry import DataError
from tests.helpers import FAST, REPO, last_line, make_image_folder, run_cli

BASE = cfg.RunConfig(model_dir="unused", train=cfg.TrainConfig(epochs=4))


def _with(section: str, **changes) -> cfg.RunConfig:
    return dataclasses.replace(BASE, **{section: dataclasses.replace(getattr(BASE, section), **changes)})


def _sgd(lr):
    return cfg.OptimizerConfig(name="sgd", learning_rate=lr)


# Each of these trained (and exported) with exit 0, or crashed inside (val_fraction: an
# AttributeError), before the issue: the message must name the flag and the value.
REFUSED = [
    ("train", {"optimizer": _sgd(-1.0)}, "--learning_rate=-1"),
    ("data", {"image_size": 0}, "--image_size=0"),
    ("data", {"image_size": -5}, "--image_size=-5"),
    ("train", {"warmup_epochs": -1.0}, "--warmup_epochs=-1"),
    ("train", {"label_smoothing": 2.0}, "--label_smoothing=2"),
    ("train", {"steps_per_epoch": 0}, "--steps_per_epoch=0"),
    ("train", {"second_optimizer": _sgd(0.1), "switch_optimizer_epoch": 4}, "--switch_optimizer_epoch=4"),
    ("train", {"freeze_epochs": 5}, "--freeze_epochs=5"),
    ("data", {"val_fraction": 1.5}, "--val_fraction=1.5"),
    ("data", {"val_fraction": 0.5, "test_fraction": 0.5}, "sum must be < 1"),
]


@pytest.mark.parametrize("section,changes,named", REFUSED, ids=[r[2] for r in REFUSED])
def test_bad_values_are_refused_with_the_flag_and_its_range(section, changes, named):
    with pytest.raises(ValueError) as info:
        validation.check_run(_with(section, **changes))
    message = str(info.value)
    assert named in message and "\n" not in message
    assert "must" in message  # the allowed range or the rule


def test_good_values_and_edge_cases_pass():
    """The defaults, a linear probe (freeze == epochs) and a switch before the end are valid."""
    validation.check_run(BASE)
    validation.check_run(_with("train", freeze_epochs=4))
    validation.check_run(_with("train", second_optimizer=_sgd(0.01), switch_optimizer_epoch=3))
    # With a step budget the run's epochs come from the data: checked by check_against_data.
    validation.check_run(_with("train", total_steps=10, freeze_epochs=50))


def test_checks_that_need_the_data_use_the_derived_epochs():
    """HyperRule and --total_steps derive the epochs from the dataset size: a freeze past them is refused."""
    run = _with("train", schedule="hyperrule", freeze_epochs=3)
    validation.check_against_data(run, num_train=1000, epochs=3)
    with pytest.raises(ValueError, match=r"--freeze_epochs=3 .*2 epochs \(the BiT-HyperRule over 1000"):
        validation.check_against_data(run, num_train=1000, epochs=2)
    switch = _with("train", total_steps=10, second_optimizer=_sgd(0.01), switch_optimizer_epoch=2)
    with pytest.raises(ValueError, match="--switch_optimizer_epoch=2"):
        validation.check_against_data(switch, num_train=100, epochs=2)
    with pytest.raises(ValueError, match="no training images"):
        validation.check_against_data(BASE, num_train=0, epochs=4)


@pytest.mark.parametrize("dataset", ["digits", "folder"])
def test_split_names_are_refused_where_they_would_be_ignored(dataset, tmp_path):
    """--train_split was silently ignored for digits and folders (issue item 5)."""
    from pipeline import data
    spec = "digits" if dataset == "digits" else "folder:" + make_image_folder(tmp_path / "f", per_class=2)
    with pytest.raises(DataError, match=r"--train_split=train\[:50%\]: TFDS split names do not apply"):
        data.load_dataset(cfg.DataConfig(dataset=spec, train_split="train[:50%]"))


def test_a_single_class_folder_is_refused(tmp_path):
    """A 1-output classifier was trained and exported from a folder with one class (issue item 5)."""
    from pipeline import data
    root = make_image_folder(tmp_path / "one", classes=("red",), per_class=10)
    with pytest.raises(DataError, match="has 1 class .*at least 2"):
        data.load_dataset(cfg.DataConfig(dataset=f"folder:{root}", val_fraction=0.2, test_fraction=0.2))


class _FakeTfError(Exception):
    pass


def _tf_error(name):
    """An exception whose class looks like `tensorflow.python.framework.errors_impl.<name>`."""
    return type(name, (_FakeTfError,), {"__module__": "tensorflow.python.framework.errors_impl"})("x")


STATUSES = [
    (ValueError("bad"), errors.EXIT_BAD_INPUT),
    (DataError("no data"), errors.EXIT_BAD_INPUT),
    (FileNotFoundError(errno.ENOENT, "No such file", "/nope"), errors.EXIT_BAD_INPUT),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/etc/passwd"), errors.EXIT_BAD_INPUT),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), errors.EXIT_BAD_INPUT),
    (FloatingPointError("diverged"), errors.EXIT_BAD_INPUT),
    (errors.TransientError("lost worker"), errors.EXIT_TRANSIENT),
    (OSError(errno.ENOSPC, "No space left on device"), errors.EXIT_TRANSIENT),
    (OSError(errno.EIO, "Input/output error"), errors.EXIT_TRANSIENT),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errors.EXIT_TRANSIENT),
    (_tf_error("UnavailableError"), errors.EXIT_TRANSIENT),
    (_tf_error("AbortedError"), errors.EXIT_TRANSIENT),
    (KeyboardInterrupt(), errors.EXIT_INTERRUPTED),
    (errors.RunInterrupted("interrupted after epoch 2; resume with ..."), errors.EXIT_INTERRUPTED),
]


@pytest.mark.parametrize("err,status", STATUSES, ids=[f"{type(e).__name__}-{s}" for e, s in STATUSES])
def test_run_cli_exits_with_a_status_a_cluster_manager_can_act_on(err, status, capsys):
    """Every expected fault exited 1 (or with a traceback: Ctrl-C, tf.errors) before the issue."""
    def fail():
        raise err
    with pytest.raises(SystemExit) as info:
        cli.run_cli(fail)
    assert info.value.code == status
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    if isinstance(err, KeyboardInterrupt):
        assert stderr.startswith("error: interrupted")


def test_unexpected_errors_keep_their_traceback():
    with pytest.raises(RuntimeError):
        cli.run_cli(lambda: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(_FakeTfError):  # a TensorFlow error nobody classified: not hidden
        cli.run_cli(lambda: (_ for _ in ()).throw(_tf_error("InternalError")))


_PROBE = """
import json, runpy, sys, time
sys.argv = ["pipeline.{verb}", *json.loads(sys.argv[1])]
start = time.time()
try:
    runpy.run_module("pipeline.{verb}", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "tensorflow": "tensorflow" in sys.modules, "s": time.time() - start}}))
"""


def _probe(verb, *args):
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(verb=verb), json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


VERBS = ["train", "finetune", "evaluate", "list_models", "tune", "report", "visualize", "benchmark",
         "export", "predict", "serving_bench", "inspect_data", "lr_find"]


@pytest.mark.parametrize("verb", VERBS)
def test_a_flag_typo_is_reported_before_tensorflow_is_imported(verb):
    """A typo took 5-11 s (TensorFlow imported before the flags were parsed) and exited 1 (item 13)."""
    started = time.time()
    flagfile = ["--flagfile=flags/quickstart.cfg"] if verb in ("train", "finetune") else []
    out, stderr = _probe(verb, *flagfile, "--modle=x")
    assert out["code"] == errors.EXIT_BAD_INPUT
    assert not out["tensorflow"], "TensorFlow was imported before the flags were parsed"
    assert "Unknown command line flag 'modle'" in stderr
    assert time.time() - started < 10  # a whole interpreter start; the parse itself is below:
    assert out["s"] < 2


def test_a_bad_value_is_refused_before_tensorflow_and_before_the_run_directory(tmp_path):
    """--image_size=0 trained at the native size, recorded as 0 (item 5); -5 was a traceback (item 9)."""
    for value in ("0", "-5"):
        model_dir = tmp_path / f"run{value}"
        out, stderr = _probe("train", f"--image_size={value}", f"--model_dir={model_dir}", "--noexport")
        assert out["code"] == errors.EXIT_BAD_INPUT and not out["tensorflow"]
        assert last_line(stderr) == f"error: --image_size={value} is out of range: must be >= 1."
        assert not model_dir.exists()


def test_a_bad_choice_is_still_a_flag_error_listing_the_choices():
    out, stderr = _probe("train", "--augment=nope")
    assert out["code"] == errors.EXIT_BAD_INPUT
    assert "--augment=nope: value should be one of <augmix|bit|bit+augmix|" in stderr


@pytest.mark.parametrize("verb", VERBS)
def test_help_is_fast_and_exits_0(verb):
    """--help took ~10 s for tune and benchmark and exited 1 (absl's status for it)."""
    out, _ = _probe(verb, "--help")
    assert out["code"] == errors.EXIT_OK and not out["tensorflow"] and out["s"] < 2


def test_help_lists_the_choices_of_the_lazy_flags():
    proc = run_cli("train", "--helpfull", check=False)
    text = "".join(proc.stdout.split())  # absl wraps long choice lists anywhere
    assert "--augment:<augmix|bit|bit+augmix|" in text and "|trivialaugment>:Trainingaugmentation" in text
    assert "--optimizer: <adam|" in proc.stdout and "resnet20" in proc.stdout


def test_tensorflow_chatter_is_silenced_unless_verbosity_asks():
    """`make demo` printed TensorFlow's INFO lines between ours (item 13)."""
    code = ("import logging, os, sys; import pipeline; "
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), logging.getLogger('tensorflow').level)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert quiet.stdout.split() == ["2", "40"]
    loud = subprocess.run([sys.executable, "-c", code, "--verbosity=0"], env=env, capture_output=True,
                          text=True)
    assert loud.stdout.split() == ["None", "0"]
    import pipeline
    assert pipeline.verbosity_asked(["-v", "1"]) and pipeline.verbosity_asked(["--verbosity=0"])
    assert not pipeline.verbosity_asked(["--verbosity=-1"]) and not pipeline.verbosity_asked(["--v2=3"])


def test_a_short_run_prints_no_tensorflow_info_lines(tmp_path):
    """End to end: our lines only (TensorFlow's C++ lines start with I0000/W0000 and a timestamp)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *FAST, "--width_multiplier=0.25",
                           "--epochs=1", "--steps_per_epoch=1", f"--model_dir={tmp_path / 'r'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chatter = [line for line in proc.stderr.splitlines()
               if line[:1] in "IW" and line[1:5] == "0000" and "cudart_stub" not in line
               and "port.cc" not in line]
    assert chatter == []
