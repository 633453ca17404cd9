"""BiT (Big Transfer) ResNet-v2 in native Keras 3, with the authors' weights.

Architecture (Kolesnikov et al. 2020; google-research/big_transfer, TF2 code
`bit_tf2/models.py` and `bit_tf2/normalization.py`), reproduced layer for layer:

  * inputs float32 RGB in [0, 1] (the TF-Hub convention) are mapped to [-1, 1]
    inside the model, which is what the BiT weights expect;
  * every convolution is a weight-standardized `StandardizedConv2D` (kernel
    standardized per output channel over H, W, I with `tf.nn.moments`-style
    biased variance and `1e-10` added to the variance), without bias;
  * GroupNormalization with 32 groups and epsilon 1e-5 (`bit_tf2` default);
  * root: zero-pad 3, 7x7 stride-2 VALID conv (64*width filters), zero-pad 1,
    3x3 stride-2 VALID max-pool;
  * four blocks of pre-activation bottleneck units, strides (1, 2, 2, 2),
    bottleneck widths 64/128/256/512 * width, unit output 4x that:
    GN-ReLU -> 1x1 conv a; GN-ReLU -> pad 1 -> 3x3 conv b (carries the stride);
    GN-ReLU -> 1x1 conv c; plus the shortcut, which in the first unit of each
    block is a 1x1 strided projection conv applied to the *pre-activated* input
    (the output of a's GN-ReLU), elsewhere the identity;
  * final GN, ReLU, global average pooling (layer "pool"), and a zero-initialized
    float32 Dense head "logits".

Layer names mirror the authors' variable paths, so loading is a table
(`bit_weight_table`; `expected_tensors` adds the shapes in creation order),
e.g. `block1_unit01_a_conv` <-> `resnet/block1/unit01/a/standardized_conv2d/
kernel`, `block1_unit01_a_proj` <-> `.../a/proj/standardized_conv2d/kernel`,
`root_block_conv`, `pre_head_gn` <-> `resnet/group_norm/{gamma,beta}`,
`logits` <-> `resnet/head/conv2d/{kernel,bias}`.

Backbone convention (used by the trainer to freeze / scale learning rates):
every layer except "logits" is backbone; see `pipeline.models.pretrained.
backbone_layers`.

Weights (`weights=`):
  * None: random init (zero head);
  * `"hub"` (or `"imagenet"`): the variant's TF-Hub handle (registered models
    only; BiT-S was trained on ImageNet-1k, BiT-M on ImageNet-21k);
  * a TF-Hub handle (`https://tfhub.dev/google/bit/m-r50x1/1`), its Kaggle URL,
    or a local SavedModel directory: variables mapped by name where the names
    identify them, else by structure (order and shapes, unit by unit; see
    `pipeline.models.bit_mapping`), then a self-check compares the module's and
    the native model's features on a fixed probe batch and refuses relative
    errors above 1e-4;
  * the authors' `BiT-{S,M}-R50x1.npz`: same table; the head is loaded when its
    class count equals `num_classes` (21843 for BiT-M, 1000 for BiT-S),
    otherwise it stays zero;
  * `.h5`: refused. The authors' `.h5` files are Keras-2 `save_weights` dumps of
    their subclassed TF2 model, whose internal layout follows that model's
    topology and is documented nowhere public; use the `.npz` or a hub handle.

Model code here is `keras.layers`/`keras.ops` only; TensorFlow is used (lazily,
through `pipeline.models.hub_io`) only to read hub modules.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import keras
import numpy as np
from absl import logging
from keras import ops

from pipeline.errors import short_reason
from pipeline.models import hub_io
from pipeline.models.bit_mapping import HEAD_KEYS, infer_arch, map_tensors
from pipeline.models.layers import GroupNormalization, drop_path_rates
from pipeline.models.layers import drop_path as drop_path_branch
from pipeline.models.registry import register_model
from pipeline.models.stages import numbered, table
from pipeline.models.weight_standardization import standardize

GN_GROUPS = 32
GN_EPSILON = 1e-5  # bit_tf2/normalization.py: GroupNormalization(eps=1e-5)
WS_EPSILON = 1e-10  # bit_tf2/models.py: (kernel - mean) / sqrt(var + 1e-10)
STRIDES = (1, 2, 2, 2)
SELF_CHECK_TOLERANCE = 1e-4
_PROBE_SEED = 20200101
# Stages for --layer_decay (`pipeline.models.stages`): the root block, the four blocks by their
# layer names, the final GroupNorm with the last block.
STAGES = table(("stem", "root_block"), *numbered("block", 1, 3), ("stage4", ("block4", "pre_head")))


# --------------------------------------------------------------------------- layers

@keras.saving.register_keras_serializable(package="pipeline")
class StandardizedConv2D(keras.layers.Conv2D):
    """Conv2D with Weight Standardization (Qiao et al., arXiv:1903.10520).

    Before each convolution the kernel (HWIO) is standardized per output
    channel over H, W and I: `(k - mean) / sqrt(var + epsilon)` (biased
    variance), exactly as BiT's TF2 code. The standardization always runs in
    float32 on the float32 variable (stable under mixed precision); the
    convolution itself runs in the layer's compute dtype.

    Args:
      filters, kernel_size, strides, padding, ...: as `keras.layers.Conv2D`
        (`use_bias` defaults to False: BiT convs have no bias).
      epsilon: added to the variance, default `WS_EPSILON` (1e-10).
    """

    def __init__(self, filters, kernel_size, *, epsilon: float = WS_EPSILON, **kwargs):
        kwargs.setdefault("use_bias", False)
        super().__init__(filters, kernel_size, **kwargs)
        self.epsilon = float(epsilon)
        # Read the float32 kernel ourselves instead of an autocast copy.
        self.autocast = False

    def standardized_kernel(self):
        """The float32 standardized kernel actually convolved with (its gradient written out: less memory)."""
        return standardize(ops.cast(self.kernel, "float32"), self.epsilon)

    def call(self, inputs):
        inputs = ops.cast(inputs, self.compute_dtype)
        kernel = ops.cast(self.standardized_kernel(), self.compute_dtype)
        outputs = self.convolution_op(inputs, kernel)
        if self.use_bias:
            outputs = ops.add(outputs, ops.cast(self.bias, self.compute_dtype))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}

    def plain_layer(self) -> keras.layers.Conv2D:
        """A plain Conv2D of this configuration (same name), to hold the standardized kernel for inference.

        The `pipeline.models.inference` protocol: with frozen weights the
        standardization is a constant, yet this layer recomputes it at every
        call (63 ms per call for BiT-R50x1 here, batch 1 or 64 alike).
        """
        config = {k: v for k, v in self.get_config().items() if k != "epsilon"}
        return keras.layers.Conv2D.from_config(config)

    def inference_weights(self) -> list:
        """`plain_layer`'s weights as tensors: the standardized kernel (float32), then the bias if any."""
        return [self.standardized_kernel()] + ([ops.convert_to_tensor(self.bias)] if self.use_bias else [])


# --------------------------------------------------------------------------- architecture

@dataclasses.dataclass(frozen=True)
class BitArch:
    """One BiT ResNet-v2 size.

    Attributes:
      label: the authors' name for it (`R50x1`), used in file names and handles.
      depths: bottleneck units per block.
      width: width multiplier (root conv has 64*width filters).
    """

    label: str
    depths: tuple[int, int, int, int]
    width: int

    def hub_handle(self, upstream: str) -> str:
        """TF-Hub feature-vector handle, e.g. `https://tfhub.dev/google/bit/m-r50x1/1`."""
        return f"https://tfhub.dev/google/bit/{upstream}-{self.label.lower()}/1"

    def npz_name(self, upstream: str) -> str:
        """The authors' weight file name, e.g. `BiT-M-R50x1.npz`."""
        return f"BiT-{upstream.upper()}-{self.label}.npz"


# The BiT sizes (big_transfer README / bit_tf2 NUM_UNITS): ResNet-50/101/152 depths.
BIT_ARCHS: dict[str, BitArch] = {
    "r50x1": BitArch("R50x1", (3, 4, 6, 3), 1),
    "r50x3": BitArch("R50x3", (3, 4, 6, 3), 3),
    "r101x1": BitArch("R101x1", (3, 4, 23, 3), 1),
    "r101x3": BitArch("R101x3", (3, 4, 23, 3), 3),
    "r152x4": BitArch("R152x4", (3, 8, 36, 3), 4),
}
# Upstream pre-training: BiT-S on ImageNet-1k (head 1000), BiT-M on ImageNet-21k (head 21843).
BIT_UPSTREAMS: dict[str, int] = {"s": 1000, "m": 21843}


def _root_filters(width: float) -> int:
    filters = 64 * width
    if filters != int(filters) or int(filters) % GN_GROUPS:
        raise ValueError(f"BiT width {width!r} gives {filters} root filters; it must be a "
                         f"multiple of {GN_GROUPS} (GroupNorm groups): use width 0.5, 1, 2, ...")
    return int(filters)


def _check_depths(depths: Sequence[int]) -> tuple[int, ...]:
    depths = tuple(int(d) for d in depths)
    if len(depths) != len(STRIDES) or min(depths) < 1:
        raise ValueError(f"BiT depths must be {len(STRIDES)} positive unit counts, got {depths}.")
    return depths


def bit_param_count(depths: Sequence[int], width: float, num_classes: int = 0) -> int:
    """Analytic parameter count of a BiT ResNet-v2 (head included when num_classes > 0).

    Per unit with `cin` inputs and bottleneck `mid` (output 4*mid): GN a (2*cin),
    conv a (cin*mid), GN b (2*mid), conv b (9*mid^2), GN c (2*mid), conv c
    (4*mid^2), plus the projection (cin*4*mid) in each block's first unit.
    """
    depths = _check_depths(depths)
    base = _root_filters(width)
    total = 7 * 7 * 3 * base
    cin = base
    for b, units in enumerate(depths):
        mid = base * 2 ** b
        out = 4 * mid
        for u in range(units):
            total += 2 * cin + cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * out
            if u == 0:
                total += cin * out
            cin = out
    total += 2 * cin
    if num_classes:
        total += cin * num_classes + num_classes
    return total


def _unit_name(block: int, unit: int) -> str:
    return f"block{block}_unit{unit:02d}"


def _unit(x, *, name: str, mid: int, stride: int, project: bool, dtype, drop_rate: float = 0.0):
    """One pre-activation bottleneck unit (GN-ReLU-conv x3 + shortcut; the residual branch dropped
    per example with probability `drop_rate` in training: stochastic depth, none at 0)."""
    gn = dict(groups=GN_GROUPS, epsilon=GN_EPSILON, dtype=dtype)
    pre = GroupNormalization(name=f"{name}_a_gn", **gn)(x)
    pre = keras.layers.ReLU(name=f"{name}_a_relu", dtype=dtype)(pre)
    shortcut = x
    if project:
        shortcut = StandardizedConv2D(4 * mid, 1, strides=stride, padding="valid",
                                      name=f"{name}_a_proj", dtype=dtype)(pre)
    y = StandardizedConv2D(mid, 1, padding="valid", name=f"{name}_a_conv", dtype=dtype)(pre)
    y = GroupNormalization(name=f"{name}_b_gn", **gn)(y)
    y = keras.layers.ReLU(name=f"{name}_b_relu", dtype=dtype)(y)
    if stride > 1:  # bit_tf2's explicit pad 1 + VALID (SAME would pad 0 before, 1 after)
        y = keras.layers.ZeroPadding2D(1, name=f"{name}_b_pad", dtype=dtype)(y)
    # At stride 1, SAME is exactly pad 1 + VALID, without a padded copy of the
    # activations kept for the backward pass (-65 MB in BiT-R50x1's 128 px,
    # batch-32 step: BENCHMARKS.md); the pad layer held no weights.
    y = StandardizedConv2D(mid, 3, strides=stride, padding="same" if stride == 1 else "valid",
                           name=f"{name}_b_conv", dtype=dtype)(y)
    y = GroupNormalization(name=f"{name}_c_gn", **gn)(y)
    y = keras.layers.ReLU(name=f"{name}_c_relu", dtype=dtype)(y)
    y = StandardizedConv2D(4 * mid, 1, padding="valid", name=f"{name}_c_conv", dtype=dtype)(y)
    y = drop_path_branch(y, drop_rate, name=name, dtype=dtype)
    return keras.layers.Add(name=f"{name}_add", dtype=dtype)([y, shortcut])


def _assemble(*, depths, width, num_classes, input_shape, include_top, dtype, name, drop_path_rate=0.0):
    base = _root_filters(width)
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_pm1", dtype=dtype)(inputs)
    x = keras.layers.ZeroPadding2D(3, name="root_block_pad", dtype=dtype)(x)
    x = StandardizedConv2D(base, 7, strides=2, padding="valid", name="root_block_conv",
                           dtype=dtype)(x)
    x = keras.layers.ZeroPadding2D(1, name="root_block_pool_pad", dtype=dtype)(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="root_block_pool",
                                  dtype=dtype)(x)
    cin = base
    rates = iter(drop_path_rates(sum(depths), drop_path_rate))
    for b, (units, stride) in enumerate(zip(depths, STRIDES), start=1):
        mid = base * 2 ** (b - 1)
        for u in range(1, units + 1):
            unit_stride = stride if u == 1 else 1
            # bit_tf2 rule: project when the unit changes resolution or width.
            project = unit_stride > 1 or cin != 4 * mid
            x = _unit(x, name=_unit_name(b, u), mid=mid, stride=unit_stride, project=project,
                      dtype=dtype, drop_rate=next(rates))
            cin = 4 * mid
    x = GroupNormalization(groups=GN_GROUPS, epsilon=GN_EPSILON, name="pre_head_gn", dtype=dtype)(x)
    x = keras.layers.ReLU(name="pre_head_relu", dtype=dtype)(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool", dtype=dtype)(x)
    if include_top:
        x = keras.layers.Dense(num_classes, kernel_initializer="zeros", bias_initializer="zeros",
                               name="logits", dtype="float32")(x)
    else:
        x = keras.layers.Activation("linear", name="features", dtype="float32")(x)
    return keras.Model(inputs, x, name=name)


def build_bit(*, depths: Sequence[int], width: float, num_classes: int,
              input_shape: Sequence[int | None], weights=None, include_top: bool = True,
              self_check: bool = True, dtype=None, name: str = "bit",
              drop_path_rate: float = 0.0) -> keras.Model:
    """Build a BiT ResNet-v2 of any size, optionally loading the authors' weights.

    Args:
      depths: bottleneck units per block, e.g. (3, 4, 6, 3) for R50.
      width: width multiplier (64*width must be a multiple of 32).
      num_classes: classes of the zero-initialized float32 "logits" head.
      input_shape: (height, width, 3); spatial dims may be None.
      weights: None, a TF-Hub handle / SavedModel directory, or an `.npz` path
        (see the module docstring).
      include_top: False returns float32 pooled features (layer "features")
        instead of logits.
      self_check: for hub weights, compare module and native features (keep True).
      dtype: dtype policy for the backbone layers; None uses the global policy.
        The head is float32 in every case.
      name: model name.
      drop_path_rate: stochastic depth of the last unit (linear from 0 at the
        first; 0 adds no layer, so weights load into the same model as ever).

    Returns:
      keras.Model from float32 [0, 1] images to float32 logits (or features).

    Raises:
      ValueError: bad depths/width; `WeightsError` (a ValueError) for weights
        that cannot be obtained, do not match the architecture, or fail the
        self-check.
    """
    depths = _check_depths(depths)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"BiT takes RGB images: input_shape must be (H, W, 3), got {input_shape}.")
    kwargs = dict(depths=depths, width=width, num_classes=num_classes,
                  input_shape=tuple(input_shape), include_top=include_top, name=name,
                  drop_path_rate=drop_path_rate)
    if weights is None:
        return _assemble(dtype=dtype, **kwargs)
    weights = read_bit_weights(weights)  # fail on bad handles before any heavy build
    policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
    # Load and self-check in float32 (weights are float32; a SavedModel computes
    # in float32), then copy into the requested precision if it differs.
    reference = _assemble(dtype="float32", **kwargs)
    load_bit_weights(reference, weights, depths=depths, self_check=self_check)
    if policy.compute_dtype == "float32" and policy.variable_dtype == "float32":
        return reference
    model = _assemble(dtype=dtype, **kwargs)
    model.set_weights(reference.get_weights())
    return model


def bit_features(model: keras.Model) -> keras.Model:
    """A model sharing `model`'s weights that returns the pooled features ("pool")."""
    return keras.Model(model.inputs[0], model.get_layer("pool").output,
                       name=f"{model.name}_features")


# --------------------------------------------------------------------------- weight mapping

def bit_weight_table(depths: Sequence[int]) -> list[tuple[str, tuple[str, ...]]]:
    """(native layer name, the authors' variable names in `layer.weights` order), backbone only.

    The authors' names are those of the `.npz` files and (with a `:0` suffix)
    of the TF-Hub modules, e.g. `resnet/block1/unit01/a/group_norm/gamma`.
    """
    depths = _check_depths(depths)
    conv = "standardized_conv2d/kernel"
    table = [("root_block_conv", (f"resnet/root_block/{conv}",))]
    for b, units in enumerate(depths, start=1):
        for u in range(1, units + 1):
            ours, theirs = _unit_name(b, u), f"resnet/block{b}/unit{u:02d}"
            for part in "abc":
                table.append((f"{ours}_{part}_gn", (f"{theirs}/{part}/group_norm/gamma",
                                                    f"{theirs}/{part}/group_norm/beta")))
                table.append((f"{ours}_{part}_conv", (f"{theirs}/{part}/{conv}",)))
            if u == 1:  # every block's first unit projects (stride 2, or 4x width in block1)
                table.append((f"{ours}_a_proj", (f"{theirs}/a/proj/{conv}",)))
    table.append(("pre_head_gn", ("resnet/group_norm/gamma", "resnet/group_norm/beta")))
    return table


def expected_tensors(model: keras.Model, depths) -> list[tuple[str, tuple]]:
    """(authors' key, shape) of every backbone tensor `model` needs, in creation order."""
    return [(key, tuple(var.shape)) for layer_name, keys in bit_weight_table(depths)
            for key, var in zip(keys, model.get_layer(layer_name).weights)]


def assign_bit_weights(model: keras.Model, arrays: dict[str, np.ndarray], *, depths,
                       source: str = "weights") -> bool:
    """Copy the authors' named tensors into `model` through `bit_weight_table`.

    Every table entry must be present with the right shape, and every tensor
    must be used (a head is optional and used only when its class count matches
    the model's "logits"). Nothing is assigned unless everything checks out.

    Returns:
      True if the pretrained head was loaded into "logits".

    Raises:
      WeightsError: missing, unmapped or mis-shaped tensors.
    """
    table = bit_weight_table(depths)
    missing, bad_shape, plan = [], [], []
    used = set()
    for layer_name, keys in table:
        layer = model.get_layer(layer_name)
        values = []
        for key, var in zip(keys, layer.weights):
            if key not in arrays:
                missing.append(key)
                continue
            used.add(key)
            value = arrays[key]
            if tuple(value.shape) != tuple(var.shape):
                bad_shape.append(f"{key} {tuple(value.shape)} vs {layer_name} {tuple(var.shape)}")
            values.append(value)
        plan.append((layer, values))

    head = None
    for kernel_key, bias_key in HEAD_KEYS:
        if kernel_key in arrays and bias_key in arrays:
            used.update((kernel_key, bias_key))
            kernel = arrays[kernel_key]
            head = (kernel.reshape(kernel.shape[-2], kernel.shape[-1]), arrays[bias_key])
    unmapped = sorted(set(arrays) - used)

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unmapped:
        problems.append(f"{len(unmapped)} unmapped (first: {', '.join(unmapped[:3])})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} with the wrong shape "
                        f"(first: {'; '.join(bad_shape[:2])})")
    if problems:
        raise hub_io.WeightsError(
            f"Weights {source!r} do not fit this BiT model (depths {tuple(depths)}, "
            f"{model.get_layer('root_block_conv').filters} root filters): "
            f"{'; '.join(problems)}; they look like {infer_arch(arrays)}.")

    for layer, values in plan:
        layer.set_weights(values)

    if head is None:
        return False
    try:
        logits = model.get_layer("logits")
    except ValueError:
        return False
    kernel, bias = head
    if tuple(kernel.shape) == tuple(logits.kernel.shape):
        logits.set_weights([kernel, bias])
        logging.info("Loaded the pretrained %d-class head from %s.", kernel.shape[1], source)
        return True
    logging.info("Pretrained head of %s has %d classes, the model %d: head stays zero-initialized.",
                 source, kernel.shape[1], logits.units)
    return False


def _probe_batch(model: keras.Model) -> np.ndarray:
    """Fixed float32 [0, 1] images at the model's resolution (64x64 if unspecified)."""
    _, height, width, channels = model.inputs[0].shape
    rng = np.random.RandomState(_PROBE_SEED)
    return rng.uniform(0.0, 1.0, size=(2, height or 64, width or 64, channels)).astype(np.float32)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), safe for zero references."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-12))


def self_check_against_module(model: keras.Model, module, *, source: str,
                              head_loaded: bool = False,
                              tolerance: float = SELF_CHECK_TOLERANCE) -> float:
    """Compare `model` with a loaded hub module on a fixed probe batch.

    Compares pooled features (or logits, for a classification module whose head
    was loaded). Returns the relative error; raises `WeightsError` above
    `tolerance` so a silently wrong mapping can never be fine-tuned.
    """
    probe = _probe_batch(model)
    expected = hub_io.call_module(module, probe, handle=source)
    features = np.asarray(bit_features(model)(probe, training=False), np.float32)
    actual = features
    if expected.shape != features.shape and head_loaded:
        actual = np.asarray(model(probe, training=False), np.float32)
    if expected.shape != actual.shape:
        raise hub_io.WeightsError(
            f"Self-check of {source!r} impossible: the module returns shape {expected.shape} "
            f"but the native features have shape {features.shape}; use a BiT feature-vector "
            f"module.")
    err = relative_error(actual, expected)
    if not np.isfinite(err) or err > tolerance:
        raise hub_io.WeightsError(
            f"Self-check failed for {source!r}: the native BiT model differs from the module by "
            f"relative error {err:.3g} (> {tolerance:g}) on a fixed probe batch, so the variable "
            f"mapping does not reproduce the module; refusing to continue.")
    logging.info("BiT self-check against %s passed: relative error %.2e.", source, err)
    return err


@dataclasses.dataclass
class BitWeights:
    """Pretrained BiT tensors read from a file or module, before they meet a model.

    Which tensor is which is decided only against a model (`load_bit_weights`),
    because a module's names may not say it and its structure is read against
    the model's shapes (`pipeline.models.bit_mapping`).

    Attributes:
      source: the handle or path, for messages.
      tensors: `hub_io.ModuleVariable`s (name, value, object-graph path) in
        the order the file or module lists them.
      module: the loaded SavedModel for hub weights (used by the self-check), else None.
    """

    source: str
    tensors: list
    module: object = None


def read_bit_weights(weights) -> BitWeights:
    """Read a TF-Hub handle, SavedModel directory or `.npz` into `BitWeights`.

    Raises:
      WeightsError: unsupported format (`.h5`), missing file, unreachable or
        unknown handle, unreadable content.
    """
    source = os.fspath(weights) if isinstance(weights, os.PathLike) else weights
    if not isinstance(source, str):
        raise hub_io.WeightsError(f"BiT weights must be a handle or a path, got {weights!r}.")
    lowered = source.lower()
    if lowered.endswith((".h5", ".hdf5", ".keras")):
        raise hub_io.WeightsError(
            f"BiT weights {source!r}: .h5 files are not supported (the authors' .h5 files are "
            f"Keras-2 save_weights dumps of their subclassed TF2 model, a layout with no public "
            f"description); pass the authors' .npz (e.g. BiT-M-R50x1.npz) or a TF-Hub handle or "
            f"SavedModel directory instead.")
    if lowered.endswith(".npz"):
        if not os.path.isfile(source):
            raise hub_io.weights_error(source, "no such .npz file")
        try:
            with np.load(source, allow_pickle=False) as data:
                tensors = [hub_io.ModuleVariable(k, data[k]) for k in data.files]
        except Exception as err:  # noqa: BLE001 - corrupt/truncated archive
            raise hub_io.weights_error(source, f"unreadable .npz: {short_reason(err)}") from None
        return BitWeights(source, tensors)
    path = hub_io.resolve_handle(source)
    module = hub_io.load_saved_model(path, handle=source)
    return BitWeights(source, hub_io.saved_model_variables(module), module)


def load_bit_weights(model: keras.Model, weights, *, depths, self_check: bool = True) -> str:
    """Load `weights` (a `BitWeights`, hub handle, SavedModel dir or `.npz`) into `model`.

    Tensors are mapped by name where the names identify them, else by
    structure (`bit_mapping.map_tensors`); hub weights are then self-checked
    against the module (see `self_check_against_module`), so neither way can
    load a wrong mapping silently.

    Returns:
      How the tensors were mapped: `bit_mapping.BY_NAME` or `BY_STRUCTURE`.

    Raises:
      WeightsError: see `build_bit`.
    """
    loaded = weights if isinstance(weights, BitWeights) else read_bit_weights(weights)
    arrays, how = map_tensors(expected_tensors(model, depths), loaded.tensors,
                              source=loaded.source)
    head_loaded = assign_bit_weights(model, arrays, depths=depths, source=loaded.source)
    if loaded.module is not None and self_check:
        self_check_against_module(model, loaded.module, source=loaded.source,
                                  head_loaded=head_loaded)
    logging.info("Loaded BiT weights from %s (%d tensors mapped %s).", loaded.source,
                 len(arrays), how)
    return how


# --------------------------------------------------------------------------- registry

def _make_builder(upstream: str, arch_key: str):
    arch = BIT_ARCHS[arch_key]
    model_name = f"bit_{upstream}_{arch_key}"

    def builder(*, num_classes, input_shape, weights=None, normalization=None, drop_path=0.0):
        del normalization  # BiT owns its input scaling ([0, 1] -> [-1, 1]).
        if weights in ("hub", "imagenet"):  # this variant's own pretrained weights
            weights = arch.hub_handle(upstream)
        return build_bit(depths=arch.depths, width=arch.width, num_classes=num_classes,
                         input_shape=input_shape, weights=weights, name=model_name,
                         drop_path_rate=drop_path)

    builder.__name__ = builder.__qualname__ = model_name
    builder.__doc__ = (
        f"BiT-{upstream.upper()}-{arch.label}: ResNet-v2 depths {arch.depths}, "
        f"width x{arch.width}, GroupNorm + Weight Standardization.\n\n"
        f"weights: None, 'hub' or 'imagenet' ({arch.hub_handle(upstream)}), a TF-Hub handle or "
        f"SavedModel dir, or {arch.npz_name(upstream)} (head loaded if num_classes == "
        f"{BIT_UPSTREAMS[upstream]}). drop_path: the last unit's stochastic-depth rate (linear from 0).")
    return model_name, builder


for _upstream in BIT_UPSTREAMS:
    for _arch_key in BIT_ARCHS:
        _name, _builder = _make_builder(_upstream, _arch_key)
        _arch = BIT_ARCHS[_arch_key]
        register_model(_name, family="bit", default_image_size=128, pretrained=True,
                       depth=3 * sum(_arch.depths) + 2, depths=_arch.depths, width=_arch.width,
                       default_weights=_arch.hub_handle(_upstream), stages=(STAGES,),
                       frozen_is_inference=True)(_builder)  # GroupNorm, no dropout but --drop_path's
        globals()[_name] = _builder
del _upstream, _arch_key, _arch, _name, _builder
