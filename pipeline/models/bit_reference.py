"""The BiT authors' forward pass in plain TensorFlow, and a TF-Hub-style module of it.

Why this exists: a tfhub.dev BiT module cannot be downloaded here, yet two
things need one. The tests need a reference that does not share code with the
native Keras model (`pipeline.models.bit`) to prove that weights mapped onto
it reproduce the module. The benchmark needs what a user would otherwise
fine-tune: the module's own graph (the authors' computation, not ours)
wrapped as a SavedModel layer. This module is that stand-in, written from
the authors' published description (bit_tf2): weight-standardized convs
(`tf.nn.moments` of the HWIO kernel, `(k - mean) / sqrt(var + 1e-10)`),
GroupNorm over [N, H, W, G, C/G] with `tf.nn.moments` and
`tf.nn.batch_normalization`, explicit zero padding, stride on the 3x3 conv,
inputs in [0, 1] mapped to [-1, 1]; variables under the authors' names
(`resnet/block1/unit01/a/group_norm/gamma`, ...), saved the way reusable TF-Hub
modules are (`__call__`, `variables`, `trainable_variables`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

GROUPS = 32
GN_EPSILON = 1e-5
WS_EPSILON = 1e-10


def random_weights(depths: Sequence[int], width: float, *, seed: int = 0,
                   num_classes: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the authors' variable names (kernels HWIO).

    Kernels have a non-zero mean so that the weight standardization matters;
    `num_classes` > 0 adds the authors' 1x1-conv head.
    """
    rng = np.random.RandomState(seed)
    base = int(64 * width)
    params = {}

    def conv(key, shape):
        params[f"{key}/standardized_conv2d/kernel"] = rng.normal(0.05, 0.3, shape).astype("f4")

    def norm(key, channels):
        params[f"{key}/group_norm/gamma"] = rng.uniform(0.5, 1.5, channels).astype("f4")
        params[f"{key}/group_norm/beta"] = rng.normal(0.0, 0.2, channels).astype("f4")

    conv("resnet/root_block", (7, 7, 3, base))
    cin = base
    for b, units in enumerate(depths, start=1):
        mid = base * 2 ** (b - 1)
        for u in range(1, units + 1):
            key = f"resnet/block{b}/unit{u:02d}"
            norm(f"{key}/a", cin)
            conv(f"{key}/a", (1, 1, cin, mid))
            if u == 1:
                conv(f"{key}/a/proj", (1, 1, cin, 4 * mid))
            norm(f"{key}/b", mid)
            conv(f"{key}/b", (3, 3, mid, mid))
            norm(f"{key}/c", mid)
            conv(f"{key}/c", (1, 1, mid, 4 * mid))
            cin = 4 * mid
    norm("resnet", cin)
    if num_classes:
        kernel = rng.normal(0, 0.05, (1, 1, cin, num_classes))
        params["resnet/head/conv2d/kernel"] = kernel.astype("f4")
        params["resnet/head/conv2d/bias"] = rng.normal(0, 0.05, num_classes).astype("f4")
    return params


def features(params: Mapping[str, "tf.Tensor"], images, depths: Sequence[int], *,
             swap: Optional[Mapping[str, str]] = None):
    """Pooled backbone features of `images` in [0, 1] under the authors' computation.

    Args:
      params: authors' variable name -> tensor (or variable).
      images: float32 [N, H, W, 3].
      depths: bottleneck units per block.
      swap: name -> the name actually used in its place (fakes a module whose
        variable names lie about their role, for the self-check tests).
    """
    get = (lambda k: params[swap.get(k, k)]) if swap else (lambda k: params[k])

    def ws_conv(x, key, stride=1, pad=0):
        kernel = get(f"{key}/standardized_conv2d/kernel")
        mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
        kernel = (kernel - mean) / tf.sqrt(var + WS_EPSILON)
        if pad:
            x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        return tf.nn.conv2d(x, kernel, stride, "VALID")

    def group_norm(x, key):
        shape = tf.shape(x)
        channels = x.shape[-1]
        g = tf.reshape(x, tf.concat([shape[:-1], [GROUPS, channels // GROUPS]], 0))
        mean, var = tf.nn.moments(g, [1, 2, 4], keepdims=True)
        gamma = tf.reshape(get(f"{key}/group_norm/gamma"), [GROUPS, channels // GROUPS])
        beta = tf.reshape(get(f"{key}/group_norm/beta"), [GROUPS, channels // GROUPS])
        g = tf.nn.batch_normalization(g, mean, var, beta, gamma, GN_EPSILON)
        return tf.reshape(g, shape)

    x = images * 2.0 - 1.0
    x = ws_conv(x, "resnet/root_block", stride=2, pad=3)
    x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    x = tf.nn.max_pool2d(x, 3, 2, "VALID")
    for b, units in enumerate(depths, start=1):
        for u in range(1, units + 1):
            key = f"resnet/block{b}/unit{u:02d}"
            stride = 2 if (u == 1 and b > 1) else 1
            pre = tf.nn.relu(group_norm(x, f"{key}/a"))
            shortcut = ws_conv(pre, f"{key}/a/proj", stride=stride) if u == 1 else x
            y = ws_conv(pre, f"{key}/a")
            y = ws_conv(tf.nn.relu(group_norm(y, f"{key}/b")), f"{key}/b", stride=stride, pad=1)
            y = ws_conv(tf.nn.relu(group_norm(y, f"{key}/c")), f"{key}/c")
            x = y + shortcut
    x = tf.nn.relu(group_norm(x, "resnet"))
    return tf.reduce_mean(x, axis=[1, 2])


def save_hub_module(path: str, params: Mapping[str, np.ndarray], depths: Sequence[int], *,
                    swap: Optional[Mapping[str, str]] = None,
                    rename: Optional[Callable[[str], str]] = None) -> str:
    """Save `params` (backbone only) as a TF-Hub image feature-vector SavedModel; returns `path`.

    Args:
      path: the SavedModel directory to write.
      params: the authors' name -> array (`random_weights` without the head).
      depths: bottleneck units per block.
      swap: see `features`.
      rename: the authors' name -> the variable name saved (default: unchanged),
        to fake exporters that name variables differently (e.g. without
        `resnet/`); the computation is the same.
    """
    variables = {k: tf.Variable(v, name=rename(k) if rename else k) for k, v in params.items()}
    obj = tf.train.Checkpoint()
    obj.variables = list(variables.values())
    obj.trainable_variables = list(variables.values())
    obj.__call__ = tf.function(
        lambda images: features(variables, images, depths, swap=swap),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    tf.saved_model.save(obj, str(path))
    return str(path)
