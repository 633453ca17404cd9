"""The learning-rate range test (`pipeline.lr_find`).

Costs: the rules on synthetic curves (no TensorFlow); one in-process scan of
12 steps of a quarter-width ResNet-20 on 16 px digits; one CLI call refused
before TensorFlow.
"""
import json
import os

import numpy as np
import pytest

from pipeline import config as cfg
from tests.helpers import run_cli


def _rules():
    from pipeline.training import lr_find
    return lr_find


def test_rates_grow_exponentially_between_the_ends():
    rates = _rules().exponential_rates(1e-6, 1.0, 7)
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(rates)), 1.0)


def test_valley_is_inside_the_falling_stretch_and_steepest_where_it_falls_fastest():
    lr_find = _rules()
    rates = lr_find.exponential_rates(1e-6, 10.0, 71)
    x = np.log10(rates)
    # flat until 1e-4, falls (fastest near 1e-2) until 1e-1, then diverges
    loss = 2.3 - 1.5 / (1 + np.exp(-(x + 2) * 3)) + np.where(x > -1, (x + 1) ** 2 * 4, 0)
    smoothed = lr_find.smooth(loss, 0.0)  # beta 0: no smoothing
    assert np.allclose(smoothed, loss)
    valley = rates[lr_find.valley_index(smoothed)]
    assert 1e-4 < valley < 1e-1
    assert rates[lr_find.steepest_index(rates, smoothed)] == pytest.approx(1e-2, rel=0.5)
    assert lr_find.flag_text(3.2e-3) == "--learning_rate=3.2e-3"
    assert lr_find.flag_text(0.1) == "--learning_rate=1.0e-1"


def test_the_scan_stops_when_the_smoothed_loss_diverges():
    test = _rules()._RangeTest(cfg.LRFindConfig(smoothing=0.0, diverge_factor=4.0))
    assert all(test.record(v) for v in (2.0, 1.5, 1.0, 3.9))
    assert not test.record(4.1) and "4x its minimum at step 5" in test.reason
    nan = _rules()._RangeTest(cfg.LRFindConfig())
    assert nan.record(2.0) and not nan.record(float("nan")) and "nan" in nan.reason


def test_a_scan_gives_a_finite_suggestion_inside_the_range_and_a_plot(tmp_path):
    lr_find = _rules()
    run = cfg.RunConfig(
        model_dir=str(tmp_path / "scan"),
        data=cfg.DataConfig(dataset="digits", batch_size=32, augment="none", image_size=16),
        model=cfg.ModelConfig(name="resnet20", width_multiplier=0.25),
        train=cfg.TrainConfig(optimizer=cfg.OptimizerConfig(learning_rate=0.1), tensorboard=False, verbose=0))
    scan = cfg.LRFindConfig(start_lr=1e-4, end_lr=1e2, steps=12)
    result = lr_find.find_learning_rate(run, scan)
    assert result.suggestion is not None and np.isfinite(result.suggestion)
    assert scan.start_lr <= result.suggestion <= scan.end_lr
    assert scan.start_lr <= result.steepest <= scan.end_lr
    assert len(result.losses) == len(result.rates) <= 12
    assert np.allclose(result.rates, lr_find.exponential_rates(1e-4, 1e2, 12)[:len(result.rates)])
    # Only the result is written: the numbers and the plot, no checkpoint.
    assert sorted(os.listdir(run.model_dir)) == ["lr_find.json", "lr_find.png"]
    with open(os.path.join(run.model_dir, "lr_find.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(run.model_dir, "lr_find.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["flag"] == result.flag == lr_find.flag_text(result.suggestion)
    assert saved["suggestion"] == result.suggestion


def test_a_backwards_range_is_refused_before_tensorflow(tmp_path):
    proc = run_cli("lr_find", f"--model_dir={tmp_path}/x", "--lr_find_start=1", "--lr_find_end=0.1",
                   check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--lr_find_end=0.1 is out of range: must be > --lr_find_start=1" in proc.stderr
    assert not os.path.exists(f"{tmp_path}/x")
