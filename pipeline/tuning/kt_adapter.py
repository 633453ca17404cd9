"""The one keras-tuner behaviour the tuning code relies on beyond its documented API (keras-tuner 1.4.8).

`HyperbandOracle` takes no `max_trials`: Hyperband decides how many trials its
brackets hold. `--max_trials` must bound a hyperband search like any other, so
the oracle's `max_trials` attribute (which the base `Oracle.create_trial`
honours: it stops the search at that many trials) is set after construction.
`tests/test_tune.py::test_keras_tuner_adapter_holds` fails if a keras-tuner
release stops honouring it.
"""
from __future__ import annotations

import keras_tuner as kt


def hyperband_oracle(*, max_trials: int, **kwargs) -> kt.oracles.HyperbandOracle:
    """A HyperbandOracle (keyword arguments: its own) running brackets until `max_trials` trials."""
    oracle = kt.oracles.HyperbandOracle(hyperband_iterations=None, **kwargs)
    oracle.max_trials = max_trials
    return oracle
