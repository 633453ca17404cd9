"""Session-scoped fixtures for anything expensive (one trained run shared by many tests)."""
import os

import pytest

from tests.helpers import FAST, run_cli


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
