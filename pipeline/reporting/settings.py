"""A run's settings by flag name: what the hyperparameter tables, comparison columns and legends show.

config.json nests settings by section (`data`, `model`, `train`, optimizers
as dicts); people know them by their flag names (`optimizer`,
`learning_rate`, `model`). This flattens one, and finds in which of them
several runs differ.
"""
from __future__ import annotations

from typing import Optional, Sequence

# Settings that say nothing about the recipe (where, how verbose, resumed or not).
_SKIPPED_SETTINGS = {"model_dir", "resume", "verbose", "tensorboard", "flags_text"}
# The settings people compare first, in this order (the rest follow alphabetically).
COLUMN_ORDER = ("model", "optimizer", "learning_rate", "schedule", "weights", "batch_size", "epochs")


def flag_settings(config: dict) -> dict:
    """A run's config.json flattened to flag names (`optimizer`, `learning_rate`, `model`, ...)."""
    out = {}
    for section, values in config.items():
        if section in _SKIPPED_SETTINGS:
            continue
        if not isinstance(values, dict):
            out[section] = values
            continue
        for key, value in values.items():
            if key in _SKIPPED_SETTINGS:
                continue
            if key in ("optimizer", "second_optimizer") and (value is None or isinstance(value, dict)):
                prefix = "" if key == "optimizer" else "second_"
                out[key] = None if value is None else value.get("name")
                for sub, sub_value in (value or {}).items():
                    if sub != "name":
                        out[prefix + sub] = sub_value
            elif section == "model" and key == "name":
                out["model"] = value
            else:
                out[key] = value
    return out


def format_value(value) -> str:
    """A setting as in a legend: floats short (`0.1`), lists comma-joined, the rest `str`."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value) or "[]"
    return str(value)


def setting_text(value) -> str:
    """A setting as in a report table: like `format_value`, with `–` for unset and lower-case booleans."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(setting_text(v) for v in value) or "[]"
    return format_value(value)


def _display_order(key: str) -> tuple:
    return (COLUMN_ORDER.index(key) if key in COLUMN_ORDER else len(COLUMN_ORDER), key)


def differing_settings(flat: Sequence[dict]) -> tuple[list[str], dict]:
    """(flag names whose values differ between runs, in display order; {flag: value} shared by all).

    Args:
      flat: each run's `flag_settings`.
    """
    keys = sorted(set().union(*flat)) if flat else []
    differing = [k for k in keys if len({format_value(f.get(k)) for f in flat}) > 1]
    common = {k: flat[0].get(k) for k in keys if k not in differing} if flat else {}
    return sorted(differing, key=_display_order), common


def compare_labels(configs: Sequence[dict], names: Optional[Sequence[str]] = None,
                   *, max_settings: int = 4) -> tuple[list[str], dict]:
    """Legend labels from the settings in which runs differ, and the settings they share.

    Args:
      configs: each run's config.json as a dict.
      names: fallback labels (run directory names) when runs do not differ or
        two labels would coincide.
      max_settings: at most this many differing settings per label.

    Returns:
      (labels like "optimizer=sgd", {setting: value} common to all runs).
    """
    flat = [flag_settings(c) for c in configs]
    names = list(names) if names is not None else [f"run {i + 1}" for i in range(len(configs))]
    differing, common = differing_settings(flat)
    labels = []
    for f, name in zip(flat, names):
        parts = [f"{k}={format_value(f.get(k))}" for k in differing[:max_settings]]
        if len(differing) > max_settings:
            parts.append("...")
        labels.append(", ".join(parts) if parts else name)
    if len(set(labels)) < len(labels):
        labels = [f"{name}: {label}" if label != name else name for label, name in zip(labels, names)]
    return labels, common
