"""Session-scoped fixtures for anything expensive (one trained run shared by many tests)."""
import atexit
import json
import os
import shutil
import tempfile

import pytest

from tests.helpers import FAST, run_cli, shared_across_workers

# The data checks cache their scans under $XDG_CACHE_HOME/pipeline (a user's ~/.cache): tests
# and the training subprocesses they start (which inherit the environment) write to a temp dir.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="pipeline-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


@pytest.fixture(scope="session", autouse=True)
def _one_data_cache_per_session(tmp_path_factory):
    """Every xdist worker (and what it starts) uses one cache dir: runs shared across workers
    (`shared_across_workers`) record it in their config, which a repeated run must match."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["XDG_CACHE_HOME"] = str(root / "xdg-cache")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A resnet20 run on digits: 3 epochs through `python -m pipeline.train`, exported at the end.

    Trained once per session (`shared_across_workers`): every xdist worker reads the same run.
    """
    def train(root):
        model_dir, export_root = os.path.join(root, "digits_resnet20"), os.path.join(root, "saved_models")
        args = [a for a in FAST if a != "--noexport"]
        proc = run_cli("train", *args, "--epochs=3", "--learning_rate=0.05", "--schedule=cosine",
                       f"--model_dir={model_dir}", f"--export_dir={export_root}")
        assert os.path.isdir(model_dir)
        return {"model_dir": model_dir, "export_root": export_root, "stdout": proc.stdout,
                "stderr": proc.stderr}
    return shared_across_workers(tmp_path_factory, "digits_run", train)


@pytest.fixture(scope="session")
def mirrored_recipe_run(tmp_path_factory):
    """One `python -m pipeline.train --strategy=mirrored` run over two logical CPUs, every recipe flag on.

    The training-loop recipes (EMA, clipping, accumulation, class weights, best metric:
    tests/test_recipes_loop.py), an augmentation policy with batch mixing
    (tests/test_augment_policies.py) and layer decay with drop path (tests/test_layer_decay.py)
    together: each file checks what its flags did, and the run (a subprocess: logical devices
    must be set before TensorFlow starts) is paid once.
    """
    def train(root):
        os.makedirs(root)
        weights = os.path.join(root, "weights.json")
        with open(weights, "w") as f:
            json.dump({str(i): 1.0 + i for i in range(10)}, f)
        model_dir = os.path.join(root, "run")
        args = [a for a in FAST if not a.startswith("--augment")]
        run_cli("train", *args, "--strategy=mirrored", "--epochs=2", "--steps_per_epoch=2", "--image_size=16",
                "--ema_decay=0.9", "--noema_warmup", "--clip_norm=1", "--accumulation_steps=4",
                f"--class_weight={weights}", "--best_metric=val_loss",
                "--augment=cifar+randaugment", "--randaugment_magnitude=7", "--random_erasing=0.25",
                "--color_jitter=0.2", "--cutmix_alpha=1.0", "--mixup_alpha=0.2", "--mix_switch_prob=0.6",
                "--mix_off_epoch=1", "--layer_decay=0.7", "--drop_path=0.1", "--notensorboard",
                f"--model_dir={model_dir}",
                env={"PIPELINE_LOGICAL_CPUS": "2"})
        return model_dir
    return shared_across_workers(tmp_path_factory, "mirrored_recipe_run", train)


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


# Files by cost, heaviest first (seconds of one worker on a quiet 2-core machine, roughly). With
# `-n 2 --dist loadfile` a file is one unit of work and xdist hands units out in order; by default
# in order of their number of tests, which left the few-test, many-minute files (kills, clusters,
# searches) for the end while the other worker sat idle. Longest first keeps both busy to the end.
HEAVY_FIRST = ("test_rundir.py", "test_distribute.py", "test_tune.py", "test_finetune.py", "test_train.py",
               "test_export.py", "test_contract.py", "test_flagfiles.py", "test_models.py",
               "test_time_budget.py", "test_keras_hub.py", "test_recipes_loop.py", "test_augment_policies.py",
               "test_feature_cache.py", "test_bit.py", "test_visualize.py", "test_pretrained.py",
               "test_report.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's scheduler (runs in the controller)
        config.option.loadscopereorder = False  # keep the order below, not "most tests first"


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)
    items.sort(key=rank)  # stable: tests keep their order within a file
