"""`weight_standardization.standardize`: the plain formula's values, autodiff's gradient, less kept for backward."""
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from pipeline.models import bit
from pipeline.models.weight_standardization import standardize

EPS = bit.WS_EPSILON


def _plain(k, epsilon=EPS):
    """The formula differentiated op by op (what StandardizedConv2D computed before)."""
    mean, var = ops.moments(k, axes=[0, 1, 2], keepdims=True)
    return (k - mean) / ops.sqrt(var + epsilon)


def _kernel(shape=(3, 3, 8, 16), seed=0):
    rng = np.random.RandomState(seed)
    # Per-channel offsets and scales, as trained kernels have: the mean and std terms matter.
    return (rng.normal(size=shape) * rng.uniform(0.01, 2.0, shape[-1]) + rng.normal(size=shape[-1])).astype("f4")


def _value_and_grad(fn, kernel, upstream, compiled):
    def run(k):
        with tf.GradientTape() as tape:
            tape.watch(k)
            w = fn(k, EPS)
            loss = tf.reduce_sum(w * upstream)
        return w, tape.gradient(loss, k)
    run = tf.function(run) if compiled else run
    w, g = run(tf.constant(kernel))
    return w.numpy(), g.numpy()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (1, 1, 64, 32), (7, 7, 3, 4)])
def test_values_equal_and_gradient_matches_autodiff(shape, compiled):
    kernel = _kernel(shape)
    upstream = tf.constant(np.random.RandomState(1).normal(size=shape).astype("f4"))
    w, grad = _value_and_grad(standardize, kernel, upstream, compiled)
    w_plain, grad_plain = _value_and_grad(_plain, kernel, upstream, compiled)
    np.testing.assert_array_equal(w, w_plain)  # the same forward ops: identical activations
    np.testing.assert_allclose(grad, grad_plain, rtol=1e-4, atol=1e-5 * np.abs(grad_plain).max())
    # The gradient is orthogonal to what standardization removes: per channel, sum(dk) = 0.
    np.testing.assert_allclose(grad.sum(axis=(0, 1, 2)), 0.0, atol=1e-4 * np.abs(grad).max())


def test_layer_gradient_through_a_variable_matches_autodiff():
    """Through StandardizedConv2D's float32 kernel variable and a convolution, as in training."""
    layer = bit.StandardizedConv2D(8, 3, padding="same")
    x = tf.constant(np.random.RandomState(2).uniform(size=(2, 9, 9, 4)).astype("f4"))
    layer(x)

    def grad_with(fn):
        with tf.GradientTape() as tape:
            kernel = fn(ops.cast(layer.kernel, "float32"), EPS)
            y = layer.convolution_op(x, kernel)
            loss = tf.reduce_sum(tf.square(y))
        return tape.gradient(loss, layer.kernel).numpy()

    expected = grad_with(_plain)
    np.testing.assert_allclose(grad_with(standardize), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _kept_for_backward(fn, shape):
    """Graph tensors of the kernel's shape that the gradient function reads from the forward pass."""
    @tf.function
    def step(k, upstream):
        with tf.GradientTape() as tape:
            tape.watch(k)
            loss = tf.reduce_sum(fn(k, EPS) * upstream)
        return tape.gradient(loss, k)

    spec = tf.TensorSpec(shape, tf.float32)
    graph = step.get_concrete_function(spec, spec).graph
    forward = {op.name for op in graph.get_operations() if "gradient" not in op.name.lower()}
    kept = set()
    for op in graph.get_operations():
        if "gradient" not in op.name.lower():
            continue
        for t in op.inputs:
            if t.op.name in forward and t.shape == shape and t.op.type not in ("Placeholder", "Identity", "IdentityN"):
                kept.add(t.name)
    return kept


def test_backward_reads_only_the_standardized_kernel():
    """Autodiff reads the centred kernel (and w); the written-out gradient reads w alone."""
    shape = (3, 3, 8, 16)
    assert len(_kept_for_backward(_plain, shape)) >= 2
    assert len(_kept_for_backward(standardize, shape)) <= 1
