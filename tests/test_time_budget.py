"""--time_budget: the pure resolution/step chooser, the run rewritten with explicit flags, and a budgeted run.

The chooser is tested on step-time tables like the ones measured on this 2-core
CPU for BiT-M-R50x1 (about 13.6 s per step of 64 images at 128 px); the
end-to-end run uses a small CIFAR ResNet with a tiny budget on the same path
(`pipeline.finetune` -> `budget.fit_to_budget` -> the trainer's RunClock).
"""
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest

from pipeline import config as cfg
from pipeline import durations
from pipeline.training import budget
from tests.helpers import REPO, make_image_folder, run_cli

# seconds per training step by resolution, proportional to the pixel count
BIT_TABLE = {r: 13.6 * (r / 128) ** 2 for r in budget.LADDER}
SHAPE = budget.RunShape(total_steps=4000, steps_per_epoch=2, val_steps=1, test_steps=1, resolution=480)


def test_time_budget_accepts_minutes_and_units_and_refuses_the_rest():
    assert durations.parse_time_budget("90") == 5400
    assert durations.parse_time_budget("30m") == 1800
    assert durations.parse_time_budget("2h") == 7200
    assert durations.parse_time_budget("45s") == 45
    assert durations.parse_time_budget(None) is None
    for bad in ("soon", "-5", "0", "2d", "1h30"):
        with pytest.raises(ValueError, match="--time_budget"):
            durations.parse_time_budget(bad)


def test_the_largest_resolution_allowing_100_steps_then_the_most_whole_epochs():
    hours = 3 * 3600
    choice = budget.choose(hours, BIT_TABLE, SHAPE, resolutions=budget.candidates(480))
    # 224 px: 41.7 s/step, 100 steps + 50 validations + test ~ 1h17m; 384 px needs ~3h48m for 100 steps
    assert choice.resolution == 224
    per_step = BIT_TABLE[224] * (1 + 1 / 3 / 2)  # a validation of one batch every 2 steps
    assert choice.total_steps == int((hours - BIT_TABLE[224] / 3) / per_step) // 2 * 2
    assert choice.total_steps % SHAPE.steps_per_epoch == 0 and choice.estimate_seconds <= hours
    assert budget.run_seconds(choice.total_steps + 2, BIT_TABLE[224], SHAPE) > hours  # the most that fit


def test_never_above_the_hyperrules_own_resolution_nor_its_steps():
    small_data = budget.candidates(128)
    assert small_data == [128]
    generous = budget.choose(10 ** 9, BIT_TABLE, SHAPE, resolutions=small_data)
    assert generous.resolution == 128 and generous.total_steps == SHAPE.total_steps
    assert budget.candidates(384) == [384, 224, 160, 128]


def test_nothing_fits_is_refused_with_the_smallest_estimate():
    with pytest.raises(budget.BudgetTooSmall) as err:
        budget.choose(240, BIT_TABLE, SHAPE, resolutions=budget.candidates(480))
    message = str(err.value)
    assert "\n" not in message and "--image_size=128 with 100 steps" in message
    expected = budget.run_seconds(100, BIT_TABLE[128], SHAPE)
    assert durations.format_duration(expected) in message


def test_pinned_steps_choose_only_the_resolution_and_a_short_epoch_when_one_pass_is_too_long():
    pinned = budget.choose(3600, BIT_TABLE, SHAPE, resolutions=budget.candidates(480), fixed_steps=60)
    assert pinned.total_steps == 60 and pinned.resolution == 224  # 384 px: 60 x 122 s > 1 h
    # 100 steps fit, 2 whole epochs of 36 (72) do not reach 100: 3 epochs of 33 or more
    bit = budget.RunShape(total_steps=128000, steps_per_epoch=36, val_steps=9, test_steps=9)
    three = budget.choose(425, {128: 3.67}, bit, resolutions=[128])  # 103 steps in 3 passes
    assert three.steps_per_epoch and three.total_steps >= 100 and three.total_steps % three.steps_per_epoch == 0
    assert three.total_steps // three.steps_per_epoch == 3 and three.estimate_seconds <= 425
    with pytest.raises(budget.BudgetTooSmall):  # 100 steps need 411 s in 3 or 4 passes
        budget.choose(410, {128: 3.67}, bit, resolutions=[128])
    long_epochs = dataclasses.replace(SHAPE, steps_per_epoch=1000)
    short = budget.choose(3 * 3600, BIT_TABLE, long_epochs, resolutions=[128])
    assert short.steps_per_epoch == short.total_steps and 100 <= short.total_steps < 1000


def test_fill_table_scales_unmeasured_resolutions_by_pixel_count():
    table = budget.fill_table({128: 2.0, 480: 40.0}, [480, 224, 128])
    assert table[128] == 2.0 and table[480] == 40.0
    assert table[224] == pytest.approx(2.0 * (224 / 128) ** 2)


def test_fit_to_budget_writes_explicit_flags_from_the_probe(tmp_path):
    folder = make_image_folder(tmp_path / "photos", per_class=6, size=100)  # > 96x96: HyperRule 512/480
    run = cfg.RunConfig(
        model_dir=str(tmp_path / "run"),
        data=cfg.DataConfig(dataset=f"folder:{folder}", augment="bit", batch_size=4, resolution_rule="hyperrule"),
        model=cfg.ModelConfig("resnet20"),
        train=cfg.TrainConfig(schedule="hyperrule", time_budget=3 * 3600),
        flags_text="--dataset=x\n--time_budget=3h\n")
    probed = []

    def probe(run, datasets, resolution):
        probed.append(resolution)
        return BIT_TABLE[resolution], 1.0, 0.5
    clock = time.time()
    lines = []
    chosen = budget.fit_to_budget(run, probe=probe, now=lambda: clock, out=lines.append, started=clock)
    assert probed[0] == 128 and chosen.data.image_size == 224  # measured at 128, checked at 224
    assert probed == [128, 224]
    assert chosen.train.total_steps >= 100 and chosen.train.time_budget_plan == lines[0]
    assert "--image_size=224" in lines[0] and f"--total_steps={chosen.train.total_steps}" in lines[0]
    assert "--image_size=224\n" in chosen.flags_text
    assert f"--total_steps={chosen.train.total_steps}\n" in chosen.flags_text
    # the explicit flags repeat it: no second probe, nothing changed
    again = budget.fit_to_budget(chosen, probe=None, now=lambda: clock, started=clock)
    assert again == chosen


def test_a_budget_halves_a_batch_that_was_not_given_only_when_nothing_fits_at_it():
    assert budget.batch_ladder(64, keep=True) == [64]
    assert budget.batch_ladder(64, keep=False) == [64, 32, 16, 8, 4, 2]
    per_image = {r: s / 64 for r, s in BIT_TABLE.items()}  # 0.21 s per image and step at 128 px
    shape = budget.RunShape(total_steps=4000, steps_per_epoch=45)
    shapes = {b: shape for b in budget.batch_ladder(64, keep=False)}
    # 4 minutes: 100 steps of 64 (or 32, 16) images fit at no resolution; 8 images at 128 px do (1.7 s/step)
    batch, choice = budget.choose_batch(240, per_image, shapes, resolutions=budget.LADDER)
    assert (batch, choice.resolution) == (8, 128)
    assert choice.total_steps == 135 and choice.estimate_seconds <= 240  # 3 whole epochs of 45 steps
    # a larger budget keeps the batch: the batch is the last resort, after the resolution
    batch, choice = budget.choose_batch(3 * 3600, per_image, shapes, resolutions=budget.LADDER)
    assert batch == 64 and choice.resolution == 224
    with pytest.raises(budget.BudgetTooSmall, match="nothing fits"):
        budget.choose_batch(240, per_image, {64: shape}, resolutions=budget.LADDER)


def test_fit_to_budget_probes_a_small_batch_and_writes_the_batch_it_chose(tmp_path):
    folder = make_image_folder(tmp_path / "photos", per_class=6, size=100)
    run = cfg.RunConfig(
        model_dir=str(tmp_path / "run"),
        data=cfg.DataConfig(dataset=f"folder:{folder}", augment="bit", batch_size=64, resolution_rule="hyperrule"),
        model=cfg.ModelConfig("resnet20"),
        train=cfg.TrainConfig(schedule="hyperrule", time_budget=240),
        flags_text="--dataset=x\n--time_budget=4m\n")
    probed = []

    def probe(run, datasets, resolution):
        probed.append((run.data.batch_size, resolution))
        return BIT_TABLE[resolution] * run.data.batch_size / 64, 1.0, 0.5
    clock = time.time()
    lines = []
    chosen = budget.fit_to_budget(run, keep_batch=False, probe=probe, now=lambda: clock, out=lines.append,
                                  started=clock)
    assert probed[0] == (budget.PROBE_BATCH, 128)  # not 64 images a step: that probe alone could eat the budget
    assert chosen.data.batch_size < 64 and chosen.train.total_steps >= 100
    assert f"--batch_size={chosen.data.batch_size}\n" in chosen.flags_text
    assert f"--batch_size={chosen.data.batch_size} (batch 64 did not allow" in lines[0]
    with pytest.raises(budget.BudgetTooSmall):  # a given --batch_size is kept
        budget.fit_to_budget(run, keep_batch=True, probe=probe, now=lambda: clock, out=lines.append, started=clock)


_REPEAT = """
import json, sys
from absl import flags
import pipeline.finetune  # defines the finetune flags
from pipeline import cli
from pipeline.training import budget
fv = flags.FLAGS
fv(["parse", f"--flagfile={sys.argv[1]}"])
run = cli.run_config_from_flags(fv, "finetune")
assert budget.fit_to_budget(run, probe=None) == run  # explicit flags: no probe
print(json.dumps({"image_size": run.data.image_size, "total_steps": run.train.total_steps}))
"""


def test_a_budgeted_finetune_finishes_in_its_budget_and_its_flagfile_repeats_it(tmp_path):
    seconds = 300  # a quiet machine finishes the 500 steps in about a minute; a loaded one stops at 5
    model_dir = str(tmp_path / "run")
    start = time.time()
    proc = run_cli("finetune", "--dataset=digits", "--model=resnet20", "--width_multiplier=0.25", "--weights=none",
                   "--batch_size=16", "--image_size=16", "--hyperrule_steps=authors", f"--time_budget={seconds}s",
                   "--verbose=2", "--noexport", "--noreport", f"--model_dir={model_dir}")
    took = time.time() - start
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["status"] in ("completed", "budget_exhausted"), summary["status"]
    assert took <= seconds + 20, f"{took:.0f} s for a {seconds} s budget"  # interpreter exit included
    assert "time budget 5m 00s: measured" in proc.stdout and "estimated run time" in proc.stdout
    flagfile = os.path.join(model_dir, "flags.cfg")
    text = open(flagfile).read()
    assert "--image_size=16\n" in text and "--total_steps=" in text
    steps = int(text.split("--total_steps=")[1].split()[0])
    assert 100 <= steps <= 500  # at least 100 steps, at most the authors' 500
    assert summary["time"]["budget_plan"] and summary["time"]["budget_seconds"] == seconds
    repeat = subprocess.run([sys.executable, "-c", _REPEAT, flagfile], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert repeat.returncode == 0, repeat.stderr[-3000:]
    assert json.loads(repeat.stdout.strip().splitlines()[-1]) == {"image_size": 16, "total_steps": steps}


def test_a_budgeted_search_stops_starting_trials_and_says_how_many_it_ran(tmp_path):
    # A trial (1 epoch of 2 steps, its test, its files) takes a few seconds on `tiny_model` (what is
    # tested is when the search stops starting trials, not what they train): far fewer than 40 fit.
    seconds, trials = 45, 40
    tune_dir = tmp_path / "search"
    start = time.time()
    proc = run_cli("tune", "--dataset=digits", "--model=resnet20", "--width_multiplier=0.25", "--batch_size=32",
                   "--augment=none", "--image_size=16", "--epochs=1", "--steps_per_epoch=2",
                   "--max_epochs_per_trial=1", "--notensorboard", "--verbose=2", "--tuner=random",
                   "--tune=learning_rate",  # the model stays the small one (depth and width are not searched)
                   f"--max_trials={trials}", f"--time_budget={seconds}s", f"--tune_dir={tune_dir}", tiny=True)
    took = time.time() - start
    ran = int(re.search(rf"time budget: ran (\d+) of --max_trials={trials} trials", proc.stdout).group(1))
    assert 1 <= ran < trials
    assert "less than the last trial's" in proc.stdout and "no more trials" in proc.stdout
    # the trial running at the deadline stops after its step; then its test, the results, the comparison report
    assert took <= seconds + 45, f"{took:.0f} s for a {seconds} s budget"
    with open(tune_dir / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == ran  # every trial it started finished and is in the table


def test_a_bad_time_budget_is_one_line_before_tensorflow():
    proc = run_cli("finetune", "--time_budget=soon", "--noexport", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --time_budget=soon is not a duration")


def test_the_report_explains_the_budgets_choice_the_estimate_and_the_step_scaling():
    from pipeline.reporting import timing
    from pipeline.reporting.document import Document, Facts, Section
    from pipeline.reporting.render import render_markdown
    summary = {"wall_seconds": 150.0, "time": {
        "estimated_seconds": 120.0, "estimated_after_steps": 5, "step_seconds": 0.5, "budget_seconds": 240.0,
        "budget_plan": "time budget 4m 00s: measured 0.5 s/step at 128 px (batch 4); chose --image_size=128",
        "budget_exhausted": True}}
    config = {"train": {"schedule": "hyperrule", "hyperrule_steps": "authors"}}
    blocks = timing.time_blocks(summary, config)
    md = render_markdown(Document("t", "", "completed", "completed", Facts([]),
                                  [Section("Training", "training", blocks)]))
    assert "Estimated run time 2m 00s after 5 steps" in md and "actual 2m 30s (x1.25)" in md
    assert "chose --image_size=128" in md and "budget_exhausted" in md
    assert "--hyperrule_steps=authors" in md and "bit_tf2/train.py" in md
    scaled = timing.time_blocks({}, {"train": {"schedule": "hyperrule"}})
    assert "keras.io" in render_markdown(Document("t", "", "completed", "completed", Facts([]),
                                                  [Section("Training", "training", scaled)]))
