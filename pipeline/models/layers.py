"""Small Keras layers shared by the model families.

Every layer here is registered as serializable under the "pipeline" package and
implements `get_config`, so models using them round-trip through `.keras`
files, `.weights.h5` files and SavedModel export without `custom_objects`.
They use `keras.ops` only (no `tf.*`) so the models run on any Keras backend.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import keras
import numpy as np
from keras import ops

# Used when the caller gives no dataset statistics. Inputs are float32 RGB in
# [0, 1]; (x - 0.5) / 0.25 maps them to [-2, 2], centred on zero with roughly
# unit spread, which is what the He-normal initialisation of the first conv
# assumes. Real per-dataset statistics are better and are passed in by callers.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)


def _as_float_tuple(value: float | Sequence[float], what: str) -> tuple[float, ...]:
    """`value` as a tuple of Python floats (a scalar becomes a 1-tuple)."""
    if isinstance(value, numbers.Real):
        return (float(value),)
    try:
        values = tuple(float(v) for v in value)
    except TypeError as err:
        raise ValueError(f"Normalize {what} must be a float or a sequence of floats, "
                         f"got {value!r}.") from err
    if not values:
        raise ValueError(f"Normalize {what} must not be empty.")
    return values


@keras.saving.register_keras_serializable(package="pipeline")
class Normalize(keras.layers.Layer):
    """Per-channel `(x - mean) / std`, the first layer of from-scratch models.

    Why a layer: the project's contract is that a model takes float32 RGB in
    [0, 1] and owns its normalization, so an exported model needs no outside
    preprocessing. The statistics live in the layer config (not in weights), so
    they survive saving and are visible in `model.summary()`/`get_config()`.

    Args:
      mean: per-channel means (or one float for all channels). Defaults to
        `DEFAULT_MEAN`: dataset statistics unknown, keep [0, 1] inputs centred.
      std: per-channel standard deviations, all > 0. Defaults to `DEFAULT_STD`.
      **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).
    """

    def __init__(self, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.mean = _as_float_tuple(DEFAULT_MEAN if mean is None else mean, "mean")
        self.std = _as_float_tuple(DEFAULT_STD if std is None else std, "std")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalize std must be positive, got {self.std}.")
        if len(self.mean) != len(self.std):
            if 1 not in (len(self.mean), len(self.std)):
                raise ValueError(f"Normalize mean {self.mean} and std {self.std} have "
                                 "different numbers of channels.")
            channels = max(len(self.mean), len(self.std))
            self.mean = self.mean * (channels // len(self.mean))
            self.std = self.std * (channels // len(self.std))

    def build(self, input_shape):
        channels = input_shape[-1]
        for values, what in ((self.mean, "mean"), (self.std, "std")):
            if channels is not None and len(values) not in (1, channels):
                raise ValueError(f"Normalize {what} has {len(values)} values but the "
                                 f"input has {channels} channels.")
        super().build(input_shape)

    def call(self, inputs):
        # x * (1/std) + (-mean/std): one multiply-add that graph optimizers fold.
        scale = ops.convert_to_tensor([1.0 / s for s in self.std], dtype=inputs.dtype)
        offset = ops.convert_to_tensor([-m / s for m, s in zip(self.mean, self.std)],
                                       dtype=inputs.dtype)
        return inputs * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mean=list(self.mean), std=list(self.std))
        return config


@keras.saving.register_keras_serializable(package="pipeline")
class ZeroPadShortcut(keras.layers.Layer):
    """He et al. (2016) "option A" shortcut: subsample, then zero-pad channels.

    Why: on CIFAR the paper uses parameter-free shortcuts so ResNets and their
    plain twins have exactly the same parameter count. Spatial subsampling is
    `x[:, ::stride, ::stride, :]`; the extra channels are zeros appended after
    the input channels. Inputs are channels_last.

    Args:
      filters: output channels, at least the input channels.
      stride: spatial subsampling factor (1 keeps the resolution).
      **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, filters: int, stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(filters) < 1 or int(stride) < 1:
            raise ValueError(f"ZeroPadShortcut needs filters >= 1 and stride >= 1, "
                             f"got filters={filters}, stride={stride}.")
        self.filters = int(filters)
        self.stride = int(stride)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is not None and channels > self.filters:
            raise ValueError(f"ZeroPadShortcut cannot reduce {channels} channels to "
                             f"{self.filters}; use a projection shortcut instead.")
        super().build(input_shape)

    def call(self, inputs):
        channels = inputs.shape[-1]
        if self.stride == 1 and channels == self.filters:
            return inputs
        if channels is not None:
            # The same values as slicing and padding, as one 1x1 convolution with a
            # constant 0/1 kernel (identity on the input channels, zeros after):
            # x * 1 + sum(other * 0) is exact for finite inputs. On TensorFlow
            # (oneDNN) the convolution and its input gradient take ~6 ms per
            # step at batch 128 where StridedSlice + Pad + StridedSliceGrad took
            # ~21 ms (BENCHMARKS.md). No weight: nothing is trained or saved.
            kernel = np.eye(channels, self.filters, dtype="float32")[None, None]
            return ops.conv(inputs, ops.cast(kernel, inputs.dtype), strides=self.stride,
                            padding="valid")
        x = inputs
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.filters - channels]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape

        def subsample(size):
            return None if size is None else -(-size // self.stride)  # ceil division

        return (batch, subsample(height), subsample(width), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, stride=self.stride)
        return config


def drop_path_rates(num_blocks: int, drop_path: float) -> list[float]:
    """Stochastic-depth drop rates of `num_blocks` residual blocks: linear from 0 (first) to `drop_path` (last).

    The linear rule of Huang et al. 2016 as timm spaces it (`linspace(0, P, n)`):
    early blocks, whose features everything later builds on, are dropped least.
    """
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}.")
    if num_blocks <= 1:
        return [0.0] * num_blocks
    return [drop_path * i / (num_blocks - 1) for i in range(num_blocks)]


def drop_path(x, rate: float, *, name: str, dtype=None):
    """Stochastic depth on a residual branch `x`: in training, each example's branch is zeroed
    with probability `rate` and kept ones are scaled by 1/(1 - rate); the identity at inference.

    That is exactly `keras.layers.Dropout` with a noise shape of one value per
    example (`(None, 1, 1, 1)`: Keras fills the batch size at call time), seeded
    by its own `keras.random.SeedGenerator` (from `keras.utils.set_random_seed`),
    so no layer of ours is needed. A rate of 0 adds no layer at all, so a model
    built without stochastic depth is the same model as before it existed.
    """
    if rate <= 0.0:
        return x
    noise_shape = (None,) + (1,) * (len(x.shape) - 1)
    return keras.layers.Dropout(rate, noise_shape=noise_shape, name=f"{name}_drop_path", dtype=dtype)(x)


@keras.saving.register_keras_serializable(package="pipeline")
class GroupNormalization(keras.layers.GroupNormalization):
    """`keras.layers.GroupNormalization` with statistics gathered per channel first.

    Same arguments, weights (`gamma`, `beta`), config and results (to float32
    round-off) as the Keras layer. Why it exists: Keras reshapes the input to
    [N, H, W, G, C/G] and takes `ops.moments` over axes (1, 2, 4): a mean,
    then a squared difference broadcast over the 5-D tensor and a second
    strided reduction, and the same again backward. In BiT-R50 that was about
    a fifth of a CPU training step. For channels-last 4-D inputs this layer
    takes per-(sample, channel) sums of x and x**2 over H, W (contiguous
    reductions over the big tensor), averages them over each group's C/G
    channels (a tiny [N, G, C/G] tensor), and normalizes with a single
    per-(sample, channel) multiply-add. The variance is E[x**2] - E[x]**2 in
    float32 (clamped at 0): its error relative to the two-pass one is about
    1e-7 * (1 + mean**2 / variance), far below the BiT self-check's 1e-4
    tolerance for activations whose group means are not hundreds of standard
    deviations from zero. Like Keras, statistics are computed in float32
    under mixed precision. Other ranks and channels-first inputs use the
    Keras computation.
    """

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs)
        x = ops.cast(inputs, "float32")
        channels = x.shape[-1]
        size = channels // self.groups

        def group_mean(per_channel):  # [N, C] -> [N, G, 1]
            return ops.mean(ops.reshape(per_channel, (-1, self.groups, size)), axis=-1,
                            keepdims=True)

        mean = group_mean(ops.mean(x, axis=(1, 2)))
        variance = ops.maximum(group_mean(ops.mean(ops.square(x), axis=(1, 2)))
                               - ops.square(mean), 0.0)
        gamma = ops.cast(self.gamma, "float32") if self.scale else ops.ones((channels,), "float32")
        beta = ops.cast(self.beta, "float32") if self.center else ops.zeros((channels,), "float32")
        scale = ops.rsqrt(variance + self.epsilon) * ops.reshape(gamma, (self.groups, size))
        shift = ops.reshape(beta, (self.groups, size)) - mean * scale  # [N, G, C/G]
        outputs = (x * ops.reshape(scale, (-1, 1, 1, channels))
                   + ops.reshape(shift, (-1, 1, 1, channels)))
        return ops.cast(outputs, self.compute_dtype)


# ---------------------------------------------------------------------------
# Backend dispatch: the ONE place where model code reaches a backend kernel.
#
# Keras 3's BatchNormalization computes batch statistics with `ops.moments`
# and normalizes with elementwise ops on every backend. On TensorFlow that is
# ~10 ops forward and more backward, each a pass over the activation tensor;
# tf_keras used TensorFlow's fused kernel (FusedBatchNormV3 and its gradient),
# one pass each way. `FusedBatchNormalization` below takes that kernel for
# the training-mode case on the TensorFlow backend and falls back to the
# Keras computation everywhere else (other backends, inference, masks,
# renorm, synchronized BN, non-4D inputs), so the architecture still runs on
# any Keras backend. See BENCHMARKS.md for the measured effect.
#
# The fused kernel is taken only where it was measured faster: with
# TensorFlow's oneDNN kernels on (TF_ENABLE_ONEDNN_OPTS=1, TensorFlow's own
# default on AVX512/AMX CPUs). With the plain Eigen kernels, FusedBatchNormV3
# trained ResNet-20 slower than Keras's elementwise ops on a 2-core Zen 3.

_fused_batch_norm: list = []  # the answer, once known (fixed for the process)


def fused_batch_norm_enabled() -> bool:
    """Whether `FusedBatchNormalization` trains with TensorFlow's fused kernel in this process."""
    if not _fused_batch_norm:
        _fused_batch_norm.append(keras.backend.backend() == "tensorflow"
                                 and tf_onednn_enabled() is True)
    return _fused_batch_norm[0]


def _tf_fused_batch_norm_training(x, gamma, beta, epsilon: float):
    """TensorFlow's fused training-mode batch norm over N, H, W of an NHWC float32 `x`.

    Returns `(y, mean, variance)` with the *biased* batch variance (what
    `ops.moments` returns), converted from the kernel's Bessel-corrected one.
    """
    import tensorflow as tf  # only reached with the TensorFlow backend

    empty = tf.constant([], dtype=tf.float32)
    # The raw op keeps `epsilon` exact (tf.compat.v1.nn.fused_batch_norm raises it to 1.001e-5).
    y, mean, unbiased_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    shape = tf.shape(x)
    count = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
    variance = unbiased_variance * ((count - 1.0) / tf.maximum(count, 1.0))
    return y, mean, variance


def tf_onednn_enabled() -> Optional[bool]:
    """Whether TensorFlow runs its oneDNN kernels (read once, at TensorFlow's import);
    None when this TensorFlow cannot tell. Also reported by `pipeline.benchmark`."""
    try:  # the flag TensorFlow's own test utilities read
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


@keras.saving.register_keras_serializable(package="pipeline")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` that trains with the backend's fused kernel.

    Same arguments, weights, config and results as the Keras layer (outputs,
    gradients and moving-statistics updates agree to float32 round-off; the
    moving variance is updated with the biased batch variance, as Keras does).
    Only the training-mode computation of channels-last 4-D inputs on the
    TensorFlow backend with oneDNN on differs: it runs TensorFlow's
    FusedBatchNormV3 kernel (see the dispatch note above). Everything else is
    the Keras layer's code.
    """

    def _can_fuse(self, inputs, training, mask) -> bool:
        return (bool(training) and self.trainable and mask is None
                and fused_batch_norm_enabled()
                and len(inputs.shape) == 4 and self.axis in (3, -1)
                and not self.renorm and not self.synchronized)

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        # As the Keras layer: statistics and normalization in float32.
        x = ops.cast(inputs, "float32")
        channels = inputs.shape[-1]
        gamma = ops.cast(self.gamma, "float32") if self.scale else ops.ones((channels,), "float32")
        beta = ops.cast(self.beta, "float32") if self.center else ops.zeros((channels,), "float32")
        outputs, mean, variance = _tf_fused_batch_norm_training(x, gamma, beta, self.epsilon)
        moving_mean = ops.cast(self.moving_mean, "float32")
        moving_variance = ops.cast(self.moving_variance, "float32")
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return ops.cast(outputs, self.compute_dtype)
