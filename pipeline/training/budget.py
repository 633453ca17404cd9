"""Fit a run to a time budget: a pure chooser over a measured step-time table, and the probe that measures it.

Why: on a 2-core CPU the BiT-HyperRule's 480 px and thousands of steps take
days; `--time_budget=4m` should instead pick what fits. `choose` is the rule,
a pure function of a table `{resolution: seconds per training step}`: the
largest resolution of the HyperRule's ladder (480, 384, 224, 160, 128; never
above the HyperRule's own choice for the data) that still allows
`MIN_STEPS` optimizer steps, then the most steps that fit (whole epochs,
validation after each and the test evaluation included). `fit_to_budget`
measures the table (`probe_step_seconds`: a few timed steps of the model on
synthetic batches at one resolution, scaled to the others by pixel count, then
at the chosen one when that is cheap) and rewrites the run with explicit
`--image_size` / `--total_steps` (config and flags.cfg), so the flagfile
repeats the run without a probe. Start-up and the probe count against the
budget: it runs from the process start (`process_start_time`). The run itself
stops at the deadline if it is slower than measured (`eta.RunClock`).

Also here: `step_budget`, the trainer's step budget with `--hyperrule_steps`
(`pipeline.hyperrule.STEP_SCALING`). Nothing here imports TensorFlow at
module level (flags are checked with `parse_time_budget` before it loads).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Optional, Sequence

from pipeline import config as cfg
from pipeline import hyperrule
from pipeline.durations import format_duration, parse_time_budget  # noqa: F401 (re-exported)

LADDER = (480, 384, 224, 160, 128)   # the HyperRule's resolutions, largest first
MIN_STEPS = 100                      # fewer optimizer steps than this is not a fine-tuning
EVAL_TO_TRAIN = 1 / 3                # an evaluation batch: a forward pass, about a third of a training step
PROBE_STEPS = 2                      # timed steps of the probe (after one that traces)
CHEAP_PROBE = 0.15                   # a second probe may use this share of what is left
SLOW_TRACE = 20.0                    # seconds: a probe whose trace took longer times one step only
STARTUP_MARGIN = 1.2                 # the run's own start-up vs the probe's build + trace + data loading
BATCH_FLOOR = 2                      # the smallest batch a budget falls back to (when --batch_size was not given)
PROBE_BATCH = 8                      # images per probe step when the batch may shrink (scaled linearly by batch)
STEP_MARGIN = 1.25                   # real steps vs the probe's synthetic ones (input pipeline, callbacks on the
                                     # same cores): BiT-R50x1 128 px batch 8, 0.98 s probed, 1.2-1.3 s trained

class BudgetTooSmall(ValueError):
    """Nothing fits in the time budget (one line with the smallest estimate)."""


def process_start_time() -> float:
    """When this process started (time.time() scale): start-up counts against a budget."""
    try:
        import psutil
        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - no psutil or no /proc: count from the first call
        return _FIRST_CALL


_FIRST_CALL = time.time()


# -------------------------------------------------------------------- the pure rule


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What a run consists of, in steps.

    total_steps: optimizer steps of the whole run (the cap of a choice).
    steps_per_epoch: steps in one epoch (a validation follows each).
    val_steps, test_steps: evaluation batches per validation and of the final test (0: none).
    resolution: the model's input size (None when unknown).
    """

    total_steps: int
    steps_per_epoch: int
    val_steps: int = 0
    test_steps: int = 0
    resolution: Optional[int] = None


def scaled_step_seconds(seconds: float, from_resolution: int, to_resolution: int) -> float:
    """A step time measured at one resolution, scaled to another by the pixel count (convolutions' cost)."""
    return seconds * (to_resolution / from_resolution) ** 2


def fill_table(measured: Mapping[int, float], resolutions: Sequence[int]) -> dict[int, float]:
    """Seconds per step at every resolution: measured ones as they are, others scaled from the nearest."""
    table = {}
    for r in resolutions:
        if r in measured:
            table[r] = measured[r]
        else:
            near = min(measured, key=lambda m: abs(math.log(m / r)))
            table[r] = scaled_step_seconds(measured[near], near, r)
    return table


def run_seconds(steps: int, step_seconds: float, shape: RunShape, *, epoch_overhead: float = 0.0) -> float:
    """Wall time of `steps` training steps: the steps, a validation (+ overhead) per epoch, the test."""
    epochs = math.ceil(steps / shape.steps_per_epoch) if steps else 0
    evaluation = step_seconds * EVAL_TO_TRAIN
    return (steps * step_seconds + epochs * (shape.val_steps * evaluation + epoch_overhead)
            + shape.test_steps * evaluation)


def most_steps(available: float, step_seconds: float, shape: RunShape, *, cap: Optional[int] = None,
               epoch_overhead: float = 0.0) -> int:
    """The most steps (<= `cap`, default the run's) whose `run_seconds` fit in `available` (0 if none)."""
    low, high = 0, shape.total_steps if cap is None else cap
    while low < high:  # run_seconds grows with the steps: bisect
        mid = (low + high + 1) // 2
        if run_seconds(mid, step_seconds, shape, epoch_overhead=epoch_overhead) <= available:
            low = mid
        else:
            high = mid - 1
    return low


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a budget allows: the resolution, the steps (and an epoch length when one epoch is too long)."""

    resolution: int
    total_steps: int
    estimate_seconds: float
    available_seconds: float
    step_seconds: float
    steps_per_epoch: Optional[int] = None  # set when fewer steps than one pass over the data fit


def candidates(max_resolution: int, ladder: Sequence[int] = LADDER) -> list[int]:
    """The ladder's resolutions not above `max_resolution` (the HyperRule's own), largest first."""
    return [r for r in ladder if r <= max_resolution] or [max_resolution]


def choose(available: float, table: Mapping[int, float], shape: RunShape, *, resolutions: Sequence[int],
           min_steps: int = MIN_STEPS, fixed_steps: Optional[int] = None, epoch_overhead: float = 0.0) -> Choice:
    """The largest resolution that allows `min_steps` (or `fixed_steps`), then the most whole epochs that fit.

    Args:
      available: seconds left for training, validation and the test (start-up already taken off).
      table: seconds per training step by resolution (`fill_table`).
      shape: the run at its own length (`shape.total_steps` caps the steps: the HyperRule's budget).
      resolutions: the candidates, any order.
      min_steps: fewest optimizer steps worth a run (a run shorter than this asks for its own length).
      fixed_steps: --total_steps given: only the resolution is chosen.
      epoch_overhead: seconds per epoch besides validation (checkpoint, logs).

    Raises:
      BudgetTooSmall: nothing fits; the message gives the smallest estimate.
    """
    cap = fixed_steps or shape.total_steps
    need = fixed_steps or min(min_steps, cap)
    for r in sorted(resolutions, reverse=True):
        seconds = table[r]
        steps = most_steps(available, seconds, shape, cap=cap, epoch_overhead=epoch_overhead)
        if steps < need:
            continue
        steps_per_epoch = None
        if fixed_steps:
            steps = fixed_steps
        elif steps // shape.steps_per_epoch * shape.steps_per_epoch >= need:
            steps = steps // shape.steps_per_epoch * shape.steps_per_epoch  # the loop trains whole epochs
        else:  # whole passes would fall below `need`: as many epochs, each a little shorter
            epochs = math.ceil(steps / shape.steps_per_epoch)
            steps_per_epoch = max(steps // epochs, math.ceil(need / epochs))
            steps = epochs * steps_per_epoch
            shorter = dataclasses.replace(shape, steps_per_epoch=steps_per_epoch)
            if run_seconds(steps, seconds, shorter, epoch_overhead=epoch_overhead) > available:
                continue
        short = dataclasses.replace(shape, steps_per_epoch=steps_per_epoch or shape.steps_per_epoch)
        return Choice(r, steps, run_seconds(steps, seconds, short, epoch_overhead=epoch_overhead), available,
                      seconds, steps_per_epoch)
    smallest = min(resolutions)
    estimate = run_seconds(need, table[smallest], shape, epoch_overhead=epoch_overhead)
    raise BudgetTooSmall(
        f"--time_budget leaves {format_duration(max(available, 0))} after start-up and the probe, and nothing "
        f"fits: the cheapest run, --image_size={smallest} with {need} steps "
        f"({table[smallest]:.3g} s/step measured or scaled), is estimated at {format_duration(estimate)}; "
        "give a larger budget or a smaller --batch_size or model.")


def batch_ladder(batch: int, *, keep: bool) -> list[int]:
    """The batches a budget may use, largest first: the run's, then halved down to `BATCH_FLOOR` (unless `keep`)."""
    ladder = [batch]
    while not keep and ladder[-1] // 2 >= BATCH_FLOOR:
        ladder.append(ladder[-1] // 2)
    return ladder


def choose_batch(available: float, per_image: Mapping[int, float], shapes: Mapping[int, RunShape], *,
                 resolutions: Sequence[int], min_steps: int = MIN_STEPS, fixed_steps: Optional[int] = None,
                 epoch_overhead: float = 0.0) -> tuple[int, Choice]:
    """The largest batch of `shapes` at which `choose` finds a run, and that run.

    A smaller batch is a last resort: it keeps the fine-tuning's `min_steps`
    optimizer steps (BiT's GroupNorm does not depend on the batch; a BatchNorm
    model's statistics get noisier). Step time is taken as proportional to the
    batch (`per_image`: seconds per image and step by resolution), which
    overestimates small batches slightly on a CPU: conservative.

    Raises:
      BudgetTooSmall: nothing fits even at the smallest batch (its message).
    """
    error = None
    for batch in sorted(shapes, reverse=True):
        table = {r: per_image[r] * batch for r in resolutions}
        try:
            return batch, choose(available, table, shapes[batch], resolutions=resolutions, min_steps=min_steps,
                                 fixed_steps=fixed_steps, epoch_overhead=epoch_overhead)
        except BudgetTooSmall as e:
            error = e
    raise error


# -------------------------------------------------------------------- the step budget


def step_budget(t: cfg.TrainConfig, *, num_train: int, batch_size: int, drop_remainder: bool):
    """`phases.step_budget`, with the HyperRule's steps unscaled for `--hyperrule_steps=authors`."""
    from pipeline.training import phases
    budget = phases.step_budget(t, num_train=num_train, batch_size=batch_size, drop_remainder=drop_remainder)
    if budget.hyperrule is None or getattr(t, "hyperrule_steps", "scaled") != "authors":
        return budget
    steps = hyperrule.steps(num_train, batch_size, t.total_steps, scaled=False)
    spec = dataclasses.replace(budget.hyperrule, total_steps=steps.total, warmup_steps=steps.warmup,
                               boundaries=steps.boundaries)
    return dataclasses.replace(budget, hyperrule=spec,
                               epochs=max(1, math.ceil(steps.total / budget.steps_per_epoch)))


# -------------------------------------------------------------------- the probe (TensorFlow)


def probe_step_seconds(run: cfg.RunConfig, datasets, resolution: int, *, steps: int = PROBE_STEPS
                       ) -> tuple[float, float, float]:
    """(seconds per training step, seconds to build and trace, seconds to save a checkpoint) at `resolution`.

    The model is built without its pretrained weights (the cost is the same)
    and trained through the run's own loop (`loop.Loop`) on a synthetic batch
    of the run's batch size, so the data pipeline is not in the time
    (`STEP_MARGIN` stands for it; the run's clock, `eta.RunClock`, measures the
    real steps and stops at the deadline). The save is what every epoch adds
    (a BiT-R50x1 checkpoint is 95 MB: 1-2 s here).
    """
    import os
    import tempfile

    import keras
    import tensorflow as tf

    from pipeline import keras_file
    from pipeline.models import create_model
    from pipeline.training import distribute, precision
    from pipeline.training import loop as loop_lib
    start = time.time()
    t, classes, batch = run.train, len(datasets.class_names), run.data.batch_size
    precision.apply_precision(t.precision)
    strategy, _ = distribute.resolve_strategy(t.strategy, tpu=t.tpu)
    with strategy.scope():
        model = create_model(run.model.name, num_classes=classes, image_size=resolution, weights=None,
                             normalization=(datasets.mean, datasets.std), **run.model.options())
        model.compile(optimizer=keras.optimizers.SGD(1e-5, momentum=0.9), jit_compile=False,
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    runner = loop_lib.Loop(model, strategy)
    runner.set_optimizer(model.optimizer)
    images = tf.random.uniform((batch, resolution, resolution, 3), seed=t.seed)
    labels = tf.one_hot(tf.range(batch) % classes, classes)
    data = runner.distribute(tf.data.Dataset.from_tensors((images, labels)).repeat())
    callbacks = loop_lib.callback_list([], model=model, epochs=2, steps=steps, verbose=0)
    callbacks.on_train_begin()
    runner.train_epoch(0, data, callbacks=callbacks, steps_per_epoch=1, repeat=True)  # traces
    setup = time.time() - start
    steps = 1 if setup > SLOW_TRACE else steps  # a model this slow to trace: one timed step is enough
    timed = time.time()
    runner.train_epoch(1, data, callbacks=callbacks, steps_per_epoch=steps, repeat=True)
    seconds = (time.time() - timed) / steps
    with tempfile.TemporaryDirectory() as tmp:
        saving = time.time()
        keras_file.save_keras(model, os.path.join(tmp, "probe.keras"))  # as the epochs' checkpoints
        save_seconds = time.time() - saving
    del model, runner
    keras.backend.clear_session()
    return seconds, setup, save_seconds


def _shape(run: cfg.RunConfig, datasets, batch: int) -> RunShape:
    """The run at its own length at `batch` (HyperRule, --total_steps or --epochs)."""
    budget = step_budget(run.train, num_train=datasets.num_train, batch_size=batch,
                         drop_remainder=run.data.drop_remainder)
    total = budget.hyperrule.total_steps if budget.hyperrule else budget.epochs * budget.steps_per_epoch
    return RunShape(total, budget.steps_per_epoch,
                    math.ceil(datasets.num_val / batch) if datasets.val is not None else 0,
                    math.ceil(datasets.num_test / batch) if datasets.test is not None else 0,
                    datasets.image_size)


def _at_batch(run: cfg.RunConfig, batch: int) -> cfg.RunConfig:
    return dataclasses.replace(run, data=dataclasses.replace(run.data, batch_size=batch))


def _say(line: str) -> None:
    print(line, flush=True)


def fit_to_budget(run: cfg.RunConfig, *, keep_batch: bool = True, probe: Callable = probe_step_seconds,
                  now: Callable[[], float] = time.time, out: Callable[[str], None] = _say,
                  started: Optional[float] = None) -> cfg.RunConfig:
    """`run` with the `--image_size` / `--total_steps` (and batch) its `time_budget` allows (unchanged without one).

    Given flags are kept: `--image_size` pins the resolution, `--total_steps`
    the steps; with both, or on `--resume` (flags.cfg holds the choice), there
    is nothing to probe. Unless `keep_batch` (the verbs pass whether
    `--batch_size` was given), a budget in which nothing fits at the run's
    batch halves the batch (`choose_batch`); the probe then times
    `PROBE_BATCH` images per step so that it stays cheap. The choice goes into
    the config, flags.cfg (explicit flags) and `train.time_budget_plan` (the
    report's explanation).

    `probe`, `now`, `out` and `started` (default: the process start) are for tests.

    Raises:
      BudgetTooSmall: nothing fits (before the run directory is touched).
    """
    t = run.train
    if not t.time_budget or run.resume or (run.data.image_size and t.total_steps):
        return run
    from pipeline import data
    started = process_start_time() if started is None else started
    loading = now()
    datasets = data.load_dataset(run.data)
    batches = batch_ladder(run.data.batch_size, keep=keep_batch)
    shapes = {b: _shape(run, datasets, b) for b in batches}
    fixed = t.total_steps or None
    if run.data.image_size or run.data.resolution_rule != "hyperrule":
        resolutions, ceiling = [datasets.image_size], "the data's"
    else:
        resolutions, ceiling = candidates(datasets.image_size), f"the HyperRule's {datasets.image_size}"
    measured, setups, saves = {}, {}, {}  # (batch, resolution) -> s per step, s to build and trace, s to save
    first = (batches[0] if keep_batch else min(batches[0], PROBE_BATCH), min(resolutions))
    loaded = now() - loading
    measured[first], setups[first], saves[first] = probe(_at_batch(run, first[0]), datasets, first[1])
    startup = STARTUP_MARGIN * (loaded + setups[first])  # the run loads, builds and traces again

    def left():
        return t.time_budget - (now() - started) - startup

    def pick():
        per_image = fill_table({r: STEP_MARGIN * s / b for (b, r), s in measured.items()}, resolutions)
        return choose_batch(left(), per_image, shapes, resolutions=resolutions, fixed_steps=fixed,
                            epoch_overhead=max(saves.values()))  # each epoch writes a checkpoint

    batch, choice = pick()
    if (batch, choice.resolution) not in measured:
        guess = setups[first] + PROBE_STEPS * choice.step_seconds
        if guess < CHEAP_PROBE * left():
            key = (batch, choice.resolution)
            measured[key], setups[key], saves[key] = probe(_at_batch(run, batch), datasets, choice.resolution)
            batch, choice = pick()
    plan = _plan_text(t.time_budget, choice, measured, shapes[batch], ceiling, batch, run.data.batch_size,
                      max(saves.values()))
    out(plan)
    return _with_choice(run, choice, plan, batch=batch, hyperrule_crop=datasets.image_size)


def _plan_text(budget: float, c: Choice, measured: Mapping[tuple, float], shape: RunShape, ceiling: str,
               batch: int, asked_batch: int, save_seconds: float) -> str:
    probes = ", ".join(f"{s:.3g} s/step at {r} px, batch {b}" for (b, r), s in sorted(measured.items()))
    scaled = "" if (batch, c.resolution) in measured else " (scaled by pixel count and batch)"
    epoch = f", --steps_per_epoch={c.steps_per_epoch}" if c.steps_per_epoch else ""
    smaller = (f" and --batch_size={batch} (batch {asked_batch} did not allow {MIN_STEPS} steps at any "
               "resolution; --batch_size keeps yours)" if batch != asked_batch else "")
    return (f"time budget {format_duration(budget)}: measured {probes}; chose "
            f"--image_size={c.resolution} (the largest of {'/'.join(map(str, LADDER))} not above {ceiling} "
            f"that allows {MIN_STEPS} steps){smaller} and --total_steps={c.total_steps}{epoch} (of the run's "
            f"{shape.total_steps}): {c.step_seconds:.3g} s/step{scaled} (the probe's x{STEP_MARGIN:g}: the input "
            f"pipeline shares the cores) and {save_seconds:.2g} s per epoch's checkpoint; estimated "
            f"{format_duration(c.estimate_seconds)} of the {format_duration(c.available_seconds)} left after "
            "start-up and the probe (validation and test included).")


def _with_choice(run: cfg.RunConfig, c: Choice, plan: str, *, batch: int, hyperrule_crop: int) -> cfg.RunConfig:
    """The run with the choice as explicit settings, in its config and in the flags that repeat it."""
    from pipeline.tuning.overrides import override_flags_text
    resize = run.data.resize_size
    if resize is None and run.data.resolution_rule == "hyperrule" and c.resolution == hyperrule_crop:
        resize = hyperrule.resize_for(c.resolution)  # the rule's own pair (512/480, 160/128)
    flags = {"image_size": c.resolution, "total_steps": c.total_steps, "resize_size": resize}
    if c.steps_per_epoch:
        flags["steps_per_epoch"] = c.steps_per_epoch
    if batch != run.data.batch_size:
        flags["batch_size"] = batch
    data = dataclasses.replace(run.data, image_size=c.resolution, resize_size=resize, batch_size=batch)
    train = dataclasses.replace(run.train, total_steps=c.total_steps, time_budget_plan=plan,
                                steps_per_epoch=c.steps_per_epoch or run.train.steps_per_epoch)
    text = override_flags_text(run.flags_text, flags) if run.flags_text else ""
    return dataclasses.replace(run, data=data, train=train, flags_text=text)
