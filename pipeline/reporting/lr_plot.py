"""The figure of `pipeline.lr_find`: smoothed loss against learning rate (log scale), suggestion marked.

Kept apart from `pipeline.training.lr_find` so the training side needs no
matplotlib until it writes its result.
"""
from __future__ import annotations

import numpy as np

from pipeline.reporting import plots


def lr_find_figure(result):
    """Raw and smoothed loss per step against its rate; the valley suggestion and the steepest point."""
    rates = np.asarray(result.rates, dtype=float)
    raw = np.array([np.nan if v is None else v for v in result.losses], dtype=float)
    smoothed = np.asarray(result.smoothed, dtype=float)
    fig = plots.new_figure(7.0, 4.5)
    ax = fig.subplots()
    ax.plot(rates, raw, color="#c7c7c7", linewidth=1, label="loss per step")
    ax.plot(rates[:len(smoothed)], smoothed, color=plots.TRAIN_COLOR, linewidth=2, label="smoothed loss")
    for value, color, label in ((result.suggestion, "#d62728", "suggestion (valley)"),
                                (result.steepest, "#2ca02c", "steepest descent")):
        if value is None:
            continue
        i = int(np.argmin(np.abs(rates[:len(smoothed)] - value)))
        ax.plot([value], [smoothed[i]], "o", color=color, markersize=8, label=f"{label}: {value:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    if len(smoothed):  # the divergence at the end would flatten the interesting part
        low, high = np.nanmin(smoothed), smoothed[0]
        ax.set_ylim(low - 0.1 * abs(high - low) - 1e-3, max(high, low) + 0.5 * abs(high - low) + 1e-3)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Learning-rate range test: {result.reason}", fontsize=10)
    return fig


def save_lr_find_plot(result, filename: str) -> str:
    return plots.save_figure(lr_find_figure(result), filename)
