"""Every experiment in flags/ parses with the flags of the verb its header names, into a valid RunConfig.

A flagfile is what a user runs first; a renamed flag or an unknown model in one
would only show when someone tries it. One subprocess parses them all (absl
flags are process-global), without building a model or loading data.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import rundir
from tests.helpers import REPO, run_cli

FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))

_PARSE = """
import json, sys
from absl import flags
import pipeline.finetune  # defines every train flag plus the fine-tuning ones
from pipeline import cli
out = {}
for path in sys.argv[1:]:
    fv = flags.FLAGS
    fv.unparse_flags()
    fv(["parse", f"--flagfile={path}"])
    run = cli.run_config_from_flags(fv, "finetune")
    out[path] = {"model": run.model.name, "dataset": run.data.dataset}
print(json.dumps(out))
"""


def test_every_flagfile_parses_into_a_run_config():
    assert len(FLAGFILES) >= 16
    proc = subprocess.run([sys.executable, "-c", _PARSE, *FLAGFILES], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(parsed) == FLAGFILES
    assert parsed[os.path.join(REPO, "flags", "folder_resnet18_scratch.cfg")]["model"].startswith("keras_hub:")


def test_every_flagfile_starts_with_what_it_reproduces():
    for path in FLAGFILES:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        assert first.startswith("# ") and len(first) > 20, f"{path} does not say what it reproduces"


_DATA_FLAGS = ("--dataset=", "--train_split=", "--val_split=", "--test_split=", "--data_dir=")


@pytest.mark.parametrize("name", ["cifar10_resnet56_modern.cfg", "imagenet_resnet50_torchvision_v2.cfg"])
def test_recipe_flagfiles_train_one_step_on_tiny_data(name, tmp_path):
    """The modern recipes (issue 16) run as written, on digits: one step, every recipe flag kept.

    Only what ties them to their dataset and length changes: the data flags,
    the epochs, batch and resolution, and the epoch-counted warm-up / mixing stop;
    and the width: a quarter keeps every layer of the recipe's model (what its
    flags act on) at a sixteenth of the compute and checkpoint (ResNet-50's
    190 MB checkpoint, its EMA weights, and their test pass took ~30 s).
    """
    with open(os.path.join(REPO, "flags", name), encoding="utf-8") as f:
        kept = [line for line in f if not line.startswith(_DATA_FLAGS)]
    flagfile = tmp_path / name
    flagfile.write_text("".join(kept), encoding="utf-8")
    model_dir = tmp_path / "run"
    run_cli("train", f"--flagfile={flagfile}", "--dataset=digits", "--epochs=1", "--steps_per_epoch=1",
            "--batch_size=16", "--image_size=32", "--width_multiplier=0.25", "--warmup_epochs=0",
            "--mix_off_epoch=0", "--noexport", "--noreport", "--notensorboard", f"--model_dir={model_dir}")
    rows = rundir.read_metrics(str(model_dir))
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["train"]["ema_decay"] > 0 and config["data"]["augment"].endswith("trivialaugment")
