"""What fine-tuning changes in a run's configuration: the model's own pretrained weights and the HyperRule data.

`pipeline.finetune` applies it to the flags' RunConfig; a search over
fine-tuning runs can apply the same rule. The weights come from the registry's
metadata (`ModelSpec.default_weights`), never from the model's name.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from pipeline import config as cfg
from pipeline.models import get_spec
from pipeline.models.registry import NO_WEIGHTS, default_image_size


def resolve_weights(model_name: str, weights: Optional[str]) -> Optional[str]:
    """The weights a fine-tuning run loads: the model's own pretrained ones when unset, none for 'none'/'random'."""
    if weights is None:
        return get_spec(model_name).default_weights
    return None if weights.lower() in NO_WEIGHTS else weights


def finetune_run(run: cfg.RunConfig) -> cfg.RunConfig:
    """`run` with fine-tuning's model-dependent defaults.

    The weights (see `resolve_weights`); the resolution: the HyperRule's with its
    schedule, else, with `--image_size` unset, the one the pretrained model was
    trained at (`registry.default_image_size`: a keras-hub preset's own size).
    """
    data = run.data
    if run.train.schedule == "hyperrule":
        data = dataclasses.replace(data, resolution_rule="hyperrule")
    elif data.image_size is None and get_spec(run.model.name).pretrained:
        data = dataclasses.replace(data, image_size=default_image_size(run.model.name))
    model = dataclasses.replace(run.model, weights=resolve_weights(run.model.name, run.model.weights))
    return dataclasses.replace(run, data=data, model=model)
