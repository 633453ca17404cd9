"""Session-scoped fixtures for anything expensive (one trained run shared by many tests)."""
import os

import pytest

from tests.helpers import FAST, run_cli


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A resnet20 run on digits: 3 epochs through `python -m pipeline.train`."""
    model_dir = str(tmp_path_factory.mktemp("runs") / "digits_resnet20")
    proc = run_cli("train", *FAST, "--epochs=3", "--learning_rate=0.05", "--schedule=cosine",
                   f"--model_dir={model_dir}")
    assert os.path.isdir(model_dir)
    return {"model_dir": model_dir, "stdout": proc.stdout, "stderr": proc.stderr}
