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

from tests.helpers import REPO

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
