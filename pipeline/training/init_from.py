"""`--init_from`: start a new task from one of our own runs or exports.

Pretrain on one task, adapt to another: every layer of the new model whose name
and weight shapes match a layer of the source model gets the source's weights;
the `logits` head (a different set of classes) stays freshly initialized.
"""
from __future__ import annotations

import json
import os

import keras
import numpy as np

from pipeline import rundir
from pipeline.models import load_model
from pipeline.models.pretrained import HEAD


class InitFromError(ValueError):
    """The source of --init_from is missing or shares no layer with the model."""


def find_checkpoint(source: str) -> str:
    """The `.keras` file behind a run directory, an export directory or a file.

    Exports record the checkpoint they were made from in `assets/model_card.json`
    (key `source_checkpoint`); a run directory offers `checkpoints/best.keras`.
    """
    if os.path.isfile(source) and source.endswith(".keras"):
        return source
    best = rundir.checkpoint_file(source, "best")
    if os.path.isfile(best):
        return best
    candidates = [source]
    if os.path.isdir(source):  # an export root: newest integer version first
        versions = sorted((int(v) for v in os.listdir(source) if v.isdigit()), reverse=True)
        candidates += [os.path.join(source, str(v)) for v in versions]
    for directory in candidates:
        card = os.path.join(directory, "assets", "model_card.json")
        if os.path.isfile(card):
            with open(card, encoding="utf-8") as f:
                ckpt = json.load(f).get("source_checkpoint")
            if ckpt and os.path.isfile(ckpt):
                return ckpt
            raise InitFromError(
                f"--init_from={source}: the export's source checkpoint {ckpt!r} no longer exists; "
                "pass the run directory it came from instead.")
    raise InitFromError(
        f"--init_from={source}: not a run directory (no {best}), an export with a model card, "
        "or a .keras file.")


def copy_matching_weights(target: keras.Model, source: keras.Model) -> list[str]:
    """Copy weights layer by layer where names and shapes match; returns copied layer names."""
    donors = {layer.name: layer for layer in source.layers}
    copied = []
    for layer in target.layers:
        donor = donors.get(layer.name)
        if layer.name == HEAD or donor is None or not layer.weights:
            continue
        theirs = donor.get_weights()
        if [w.shape for w in layer.weights] != [np.shape(w) for w in theirs]:
            continue
        layer.set_weights(theirs)
        copied.append(layer.name)
    return copied


def load_backbone(model: keras.Model, source: str) -> list[str]:
    """Initialize `model` (all but its head) from `source`; raises if nothing matches."""
    checkpoint = find_checkpoint(source)
    donor = load_model(checkpoint)
    copied = copy_matching_weights(model, donor)
    if not copied:
        raise InitFromError(
            f"--init_from={source}: no layer of {model.name!r} matches {donor.name!r} by name and "
            "shape; use the same --model as the source run.")
    total = sum(1 for layer in model.layers if layer.weights and layer.name != HEAD)
    print(f"init_from: copied {len(copied)}/{total} layers from {checkpoint}", flush=True)
    return copied
