"""Session-scoped fixtures for anything expensive (one trained run shared by many tests)."""
import atexit
import os
import shutil
import tempfile

import pytest

from tests.helpers import FAST, run_cli

# The data checks cache their scans under $XDG_CACHE_HOME/pipeline (a user's ~/.cache): tests
# and the training subprocesses they start (which inherit the environment) write to a temp dir.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="pipeline-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A resnet20 run on digits: 3 epochs through `python -m pipeline.train`, exported at the end."""
    root = tmp_path_factory.mktemp("runs")
    model_dir, export_root = str(root / "digits_resnet20"), str(root / "saved_models")
    args = [a for a in FAST if a != "--noexport"]
    proc = run_cli("train", *args, "--epochs=3", "--learning_rate=0.05", "--schedule=cosine",
                   f"--model_dir={model_dir}", f"--export_dir={export_root}")
    assert os.path.isdir(model_dir)
    return {"model_dir": model_dir, "export_root": export_root, "stdout": proc.stdout,
            "stderr": proc.stderr}


def _checkout_outputs():
    from tests.helpers import REPO
    found = set()
    for top in ("saved_models", "runs", "tuning"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            found.update(os.path.relpath(os.path.join(root, f), REPO) for f in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests write only under their temporary directories: fail if one wrote into the checkout."""
    before = _checkout_outputs()
    yield
    added = sorted(_checkout_outputs() - before)
    assert not added, f"tests wrote into the checkout: {added[:5]}"
