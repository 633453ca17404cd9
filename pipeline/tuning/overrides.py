"""A trial's hyperparameters as flag overrides, applied to a RunConfig and to a flagfile's text.

Both sides take the same overrides (flag name -> value), so a trial's RunConfig
and its `flags.cfg` say the same thing and `--flagfile=<trial>/flags.cfg`
repeats the trial.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from pipeline import config as cfg


def format_value(value) -> str:
    """Flag-file text of one value (floats round-trip exactly, lists are comma-separated)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def apply_overrides(run: cfg.RunConfig, overrides: Mapping[str, Any], **replace) -> cfg.RunConfig:
    """`run` with flag overrides applied the way `cli.run_config_from_flags` reads flags.

    `--weight_decay` sets both optimizers', `--seed` the data's and the
    trainer's; `--learning_rate` the first optimizer's (`second_learning_rate`
    pins the second's). Extra keyword arguments replace RunConfig fields.
    """
    data, model, train = {}, {}, {}
    opt, second = run.train.optimizer, run.train.second_optimizer
    for name, value in overrides.items():
        if name == "optimizer":
            opt = dataclasses.replace(opt, name=value)
        elif name == "learning_rate":
            opt = dataclasses.replace(opt, learning_rate=float(value))
        elif name == "second_learning_rate":
            second = second and dataclasses.replace(second, learning_rate=float(value))
        elif name == "weight_decay":
            opt = dataclasses.replace(opt, weight_decay=float(value))
            second = second and dataclasses.replace(second, weight_decay=float(value))
        elif name == "batch_size":
            data["batch_size"] = int(value)
        elif name == "seed":
            data["seed"] = train["seed"] = int(value)
        elif name == "model":
            model["name"] = value
        elif name == "width_multiplier":
            model["width_multiplier"] = float(value)
        elif name == "drop_path":  # issue 16: a model option
            model["drop_path"] = float(value)
        elif name == "lr_boundaries":
            train["lr_boundaries"] = tuple(float(b) for b in value)
        elif name in ("randaugment_ops", "randaugment_magnitude", "random_erasing", "color_jitter"):
            data[name] = value  # issue 16: augmentation policy options are DataConfig fields
        elif name in {f.name for f in dataclasses.fields(cfg.TrainConfig)}:
            train[name] = value
        else:
            raise ValueError(f"cannot apply override --{name}")
    train.update(optimizer=opt, second_optimizer=second)
    return dataclasses.replace(run, data=dataclasses.replace(run.data, **data),
                               model=dataclasses.replace(run.model, **model),
                               train=dataclasses.replace(run.train, **train), **replace)


def _flag_line_name(line: str, known: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The flag a flagfile line sets (`--name=...`, `--name`, or `--noname` of a known bool), or None."""
    line = line.strip()
    if not line.startswith("--"):
        return None
    name = line[2:].split("=", 1)[0]
    if known is not None and name not in known and name.startswith("no") and name[2:] in known:
        return name[2:]
    return name


def override_flags_text(text: str, overrides: Mapping[str, Any]) -> str:
    """A flagfile's text with `--name=value` lines replaced or appended (None removes the flag)."""
    lines, done = [], set()
    for line in text.splitlines():
        name = _flag_line_name(line, overrides)
        if name in overrides:
            if name not in done:
                lines.extend(_flag_lines(name, overrides[name]))
                done.add(name)
            continue
        lines.append(line)
    for name, value in overrides.items():
        if name not in done:
            lines.extend(_flag_lines(name, value))
    return "\n".join(lines) + "\n"


def _flag_lines(name, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no{name}"]
    return [f"--{name}={format_value(value)}"]
