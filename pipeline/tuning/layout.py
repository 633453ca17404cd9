"""The layout of a tuning directory: the one place its names are written (read by reporting too).

    <tune_dir>/search.json      what was searched (base config, space, tuner, objective)
    <tune_dir>/trials/<id>/     each trial's run directory, with tuning.json
    <tune_dir>/keras_tuner/     keras-tuner's own oracle and trial state
    <tune_dir>/trials.csv       one row per trial; best.cfg: the best trial's flags
"""
import os

from pipeline import rundir

TRIALS_DIR = "trials"
PROJECT_NAME = "keras_tuner"
TRIALS_CSV = "trials.csv"
BEST_CFG = "best.cfg"
SEARCH_FILE = "search.json"
TRIAL_INFO_FILE = "tuning.json"  # written into each trial's run directory
# What a search may optimize, and in which direction.
# keras-tuner oracles `pipeline.tune --tuner` offers (built in `hypermodel.make_tuner`).
TUNERS = ("random", "hyperband", "bayesian", "grid")
# val_macro_f1 (the validation epoch's macro-F1) is for imbalanced data: every class counts alike.
OBJECTIVES = {name: rundir.METRIC_MODES[name] for name in ("val_accuracy", "val_loss", "val_macro_f1")}


def is_tuning_dir(path: str) -> bool:
    """A directory written by `pipeline.tune` (trials/ with trials.csv or search.json)."""
    return os.path.isdir(os.path.join(path, TRIALS_DIR)) and (
        os.path.exists(os.path.join(path, TRIALS_CSV)) or os.path.exists(os.path.join(path, SEARCH_FILE)))
