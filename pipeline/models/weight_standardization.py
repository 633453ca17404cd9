"""Weight Standardization of a convolution kernel, with its gradient written out (BiT's convolutions).

Why not autodiff: `w = (k - mean) / sqrt(var + eps)` differentiated op by op
keeps the centred kernel `k - mean` of every convolution until the backward
pass (the divide's gradient needs it): for BiT-R50x1 that is a second copy of
all 23.5M weights (~94 MB float32) alive at the peak of every training step,
beside `w` itself, which the convolution keeps anyway as its filter (measured:
the batch-32, 128 px step's peak fell by 92-104 MB, BENCHMARKS.md). The
closed-form gradient over the standardized axes (n = H * W * I elements per
output channel),

    dL/dk = (g - mean(g) - w * mean(g * w)) / std,   std = sqrt(var + eps),

needs only `w` and the per-channel `std` ([1, 1, 1, O]). The forward ops are
those of the plain formula (`ops.moments`, subtract, sqrt, divide), so
standardized kernels, and hence every activation, are unchanged bit for bit;
the gradient agrees with autodiff to float32 round-off
(`tests/test_weight_standardization.py`). `keras.ops` only: any backend.
"""
from __future__ import annotations

from keras import ops

AXES = (0, 1, 2)  # H, W, I of an HWIO kernel: statistics per output channel


def standardize(kernel, epsilon: float):
    """`(kernel - mean) / sqrt(var + epsilon)` per output channel (biased variance), float32 in, float32 out."""

    @ops.custom_gradient
    def _standardize(k):
        mean, var = ops.moments(k, axes=list(AXES), keepdims=True)
        std = ops.sqrt(var + epsilon)
        w = (k - mean) / std

        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            return (g - ops.mean(g, axis=AXES, keepdims=True)
                    - w * ops.mean(g * w, axis=AXES, keepdims=True)) / std

        return w, grad

    return _standardize(kernel)
