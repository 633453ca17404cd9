"""The learning-rate range test behind `python -m pipeline.lr_find` (Smith 2015; fastai's `lr_find`).

Why: a rate picked by guess is the commonest reason a run on a new folder
trains badly. The test trains the run's own model (fresh or pretrained, with
its optimizer, data, augmentation, precision and strategy: the same
`RunConfig` as train/finetune) for `steps` steps while the rate grows
exponentially from `start_lr` to `end_lr`, records the loss of every step,
and stops once the smoothed loss diverges. The suggestion is the middle of
the longest stretch over which the smoothed loss keeps falling (the "valley"
rule, fastai's default); the steepest descent is reported too. Nothing of the
model is saved: the result is `lr_find.json` and `lr_find.png`.

The rules are pure functions of the recorded arrays (`exponential_rates`,
`smooth`, `valley_index`, `steepest_index`), so they are tested without
training.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional

import keras
import numpy as np

from pipeline import config as cfg
from pipeline import data, rundir
from pipeline.training import distribute, inputs, precision
from pipeline.training import loop as loop_lib
from pipeline.training.optimizers import head_variable_paths, make_optimizer
from pipeline.training.trainer import build_model, compile_model, seed_everything

RESULT_FILE = "lr_find.json"
PLOT_FILE = "lr_find.png"


def exponential_rates(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """The rate of each step: `start_lr * (end_lr / start_lr) ** (i / (steps - 1))`, i = 0..steps-1."""
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / max(steps - 1, 1))


def smooth(losses, beta: float) -> np.ndarray:
    """Debiased exponential moving average (the running mean Adam uses): step noise hides the trend."""
    out, avg = [], 0.0
    for i, loss in enumerate(np.asarray(losses, dtype=np.float64), start=1):
        avg = beta * avg + (1.0 - beta) * loss
        out.append(avg / (1.0 - beta ** i))
    return np.asarray(out)


def valley_index(smoothed: np.ndarray) -> int:
    """Middle of the longest decreasing subsequence of the smoothed loss (the "valley" rule).

    The longest run of ever-lower losses is where training makes progress over
    the widest range of rates; its middle is safely below the edge where the
    loss turns up, and above the flat start where nothing is learned.
    """
    values = np.asarray(smoothed, dtype=np.float64)
    n = len(values)
    length = np.ones(n, dtype=np.int64)
    for i in range(1, n):  # O(n^2) over ~100 steps
        lower = np.nonzero(values[:i] > values[i])[0]
        if len(lower):
            length[i] = length[lower].max() + 1
    # fastai's rule exactly: the valley spans the subsequence's length back from its end (a
    # subsequence that skips the noisy flat start does not stretch the valley into it), and the
    # suggestion is half way along it.
    end = int(np.argmax(length))
    start = max(0, end - int(length[end]))
    sections = (end - start) / 3
    return min(end, start + int(sections) + int(sections / 2))


def steepest_index(rates: np.ndarray, smoothed: np.ndarray) -> int:
    """The step where the smoothed loss falls fastest per decade of rate (most negative slope)."""
    if len(smoothed) < 3:
        return 0
    slope = np.gradient(np.asarray(smoothed), np.log10(np.asarray(rates)))
    return int(np.argmin(slope))


def skip_start(steps: int) -> int:
    """Steps left out of both rules: the first tenth, while the moving average still follows single steps."""
    return steps // 10 if steps >= 10 else 0


def flag_text(rate: float) -> str:
    """`--learning_rate=3.2e-3`: two significant digits, the exponent without padding."""
    mantissa, exponent = f"{rate:.1e}".split("e")
    return f"--learning_rate={mantissa}e{int(exponent)}"


@dataclasses.dataclass
class LRFindResult:
    """What the scan found (written to `lr_find.json`)."""

    model_dir: str
    rates: list
    losses: list
    smoothed: list
    suggestion: Optional[float]
    steepest: Optional[float]
    stopped_early: bool
    reason: str
    seconds: float
    scan: dict

    @property
    def flag(self) -> Optional[str]:
        return flag_text(self.suggestion) if self.suggestion is not None else None


class _RangeTest:
    """Records each step's loss and says when the scan diverged."""

    def __init__(self, scan: cfg.LRFindConfig):
        self.scan, self.losses, self.best, self.reason = scan, [], math.inf, ""

    def record(self, loss: float) -> bool:
        """Add one step's loss; True to go on."""
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.reason = f"the loss became {loss} at step {len(self.losses)}"
            return False
        current = smooth(self.losses, self.scan.smoothing)[-1]
        self.best = min(self.best, current)
        if len(self.losses) > 1 and current > self.scan.diverge_factor * self.best:
            self.reason = (f"the smoothed loss exceeded {self.scan.diverge_factor:g}x its minimum "
                           f"at step {len(self.losses)}")
            return False
        return True


def _model_and_loop(run: cfg.RunConfig, datasets, strategy, policy: str, rates: np.ndarray):
    """The run's model compiled with an exponentially growing rate, and the loop that trains it."""
    t = run.train
    with strategy.scope():
        model = build_model(run, datasets)
        # ExponentialDecay with a rate above 1 grows: start * (end/start) ** (step / (steps - 1)).
        schedule = keras.optimizers.schedules.ExponentialDecay(
            float(rates[0]), decay_steps=max(len(rates) - 1, 1), decay_rate=float(rates[-1] / rates[0]))
        optimizer = make_optimizer(t.optimizer, schedule, backbone_lr_multiplier=t.backbone_lr_multiplier,
                                   head_variable_paths=head_variable_paths(model))
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        compile_model(model, optimizer, t)
    # The training recipe's clipping, accumulation and class weights shape the loss curve; an EMA does not.
    recipes = loop_lib.recipe_options(dataclasses.replace(t, ema_decay=0.0), model, strategy, datasets)
    runner = loop_lib.Loop(model, strategy, label_smoothing=t.label_smoothing, **recipes)
    runner.set_optimizer(model.optimizer)
    return model, runner


def _batches(run: cfg.RunConfig, datasets, steps: int):
    """`steps` training batches as training reads them (one-hot, MixUp when the run mixes)."""
    if datasets.stream is not None:
        batches = datasets.stream.steps(0, steps)
    else:
        batches = datasets.train.repeat().take(steps)
    return inputs.one_hot(batches, len(datasets.class_names), mixup_alpha=run.train.mixup_alpha,
                          seed=run.train.seed)


def find_learning_rate(run: cfg.RunConfig, scan: cfg.LRFindConfig = cfg.LRFindConfig(), *,
                       datasets=None) -> LRFindResult:
    """Run the range test of `run` and write `lr_find.json` and `lr_find.png` into `run.model_dir`.

    Args:
      run: the configuration train/finetune would run (model, weights, data, optimizer...).
        Its schedule, warm-up and epochs are ignored: the scan sets the rate.
      scan: the range and the rules (`cfg.LRFindConfig`).
      datasets: already loaded `pipeline.data` Datasets (tests); loaded from `run.data` when None.

    Returns:
      LRFindResult; `suggestion` is None only when no step had a finite loss.
    """
    start = time.time()
    t = run.train
    seed_everything(t)
    strategy, _ = distribute.resolve_strategy(t.strategy, tpu=t.tpu)
    policy = precision.apply_precision(t.precision)
    datasets = datasets or data.load_dataset(run.data)
    rates = exponential_rates(scan.start_lr, scan.end_lr, scan.steps)
    model, runner = _model_and_loop(run, datasets, strategy, policy, rates)
    test = _RangeTest(scan)
    callbacks = loop_lib.callback_list([], model=model, epochs=scan.steps, steps=1, verbose=0)
    train = runner.distribute(_batches(run, datasets, scan.steps))
    callbacks.on_train_begin()
    for step in range(scan.steps):  # one step per "epoch": the loop's logs are then that step's loss
        logs = runner.train_epoch(step, train, callbacks=callbacks, steps_per_epoch=1, repeat=True)
        if not test.record(float(logs["loss"])):
            break
    callbacks.on_train_end(logs)
    result = _result(run.model_dir, rates, test, scan, time.time() - start)
    write_result(result)
    return result


def _result(model_dir: str, rates: np.ndarray, test: _RangeTest, scan: cfg.LRFindConfig,
            seconds: float) -> LRFindResult:
    losses = np.asarray(test.losses, dtype=np.float64)
    finite = int(np.argmin(np.isfinite(losses))) if not np.all(np.isfinite(losses)) else len(losses)
    used, kept = rates[:len(losses)], losses[:finite]
    smoothed = smooth(kept, scan.smoothing)
    suggestion = steepest = None
    skip = skip_start(len(kept))
    if len(kept) > skip:
        suggestion = float(used[skip + valley_index(smoothed[skip:])])
        steepest = float(used[skip + steepest_index(used[skip:finite], smoothed[skip:])])
    return LRFindResult(model_dir, used.tolist(), [float(v) if math.isfinite(v) else None for v in losses],
                        smoothed.tolist(), suggestion, steepest, bool(test.reason),
                        test.reason or f"all {scan.steps} steps ran", round(seconds, 2),
                        dataclasses.asdict(scan))


def write_result(result: LRFindResult) -> None:
    """`lr_find.json` (the numbers and the flag) and `lr_find.png` (the curve) in the scan's directory."""
    from pipeline.reporting import lr_plot  # matplotlib only when writing

    os.makedirs(result.model_dir, exist_ok=True)
    payload = dataclasses.asdict(result)
    payload["flag"] = result.flag
    rundir.write_json_atomic(rundir.path(result.model_dir, RESULT_FILE), payload)
    lr_plot.save_lr_find_plot(result, rundir.path(result.model_dir, PLOT_FILE))
