"""A run's network as the pictures see it: loading it, listing its layers, naming one.

Layers are named by name or by index in `model.layers` (`list_layers`). A
layer inside a nested sub-model (Keras Applications keep theirs in one layer
"backbone") is named `backbone/<inner name>`; `layer_model` reaches it (the
outer layers before the sub-model are applied first). Grad-CAM takes
outer-level layers only (default: the input of "pool", which for those models
is the backbone's last feature map). Layers inside a `TFSMLayer` (TF-Hub
SavedModels) cannot be reached.

Keras is imported inside the functions: reading a run's numbers must not pay
for importing it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Optional, Union

from pipeline import rundir
from pipeline.reporting.plots import require_run

POOL_LAYER = "pool"
LayerRef = Union[str, int]


def load_run_model(model_dir: str, checkpoint: str = "best"):
    """The run's `best` (or `last`) checkpoint as a Keras model (not compiled).

    Raises:
      rundir.RunDirError: not a run directory, or it has no such checkpoint.
    """
    import keras

    import pipeline.models  # noqa: F401  (registers custom layers for loading)

    require_run(model_dir)
    return keras.saving.load_model(rundir.require_checkpoint(model_dir, checkpoint), compile=False)


def _is_model(layer) -> bool:
    import keras
    return isinstance(layer, keras.Model)


def _shape(layer) -> Optional[tuple]:
    """The layer's output shape; None when it has none (never called, or several outputs)."""
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError, RuntimeError):
        return None


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    index: str      # "12" or "3/45" for nested layers
    name: str       # "stem_conv" or "backbone/conv1_conv"
    kind: str       # class name
    output_shape: str


def list_layers(model, *, nested: bool = True) -> list[LayerInfo]:
    """Every layer with its index, name, class and output shape (nested models expanded)."""
    out = []

    def visit(m, prefix_index, prefix_name):
        for i, layer in enumerate(m.layers):
            shape = _shape(layer)
            out.append(LayerInfo(f"{prefix_index}{i}", f"{prefix_name}{layer.name}",
                                 type(layer).__name__, "?" if shape is None else str(shape)))
            if nested and _is_model(layer):
                visit(layer, f"{prefix_index}{i}/", f"{prefix_name}{layer.name}/")

    visit(model, "", "")
    return out


def format_layers(model) -> str:
    """`list_layers` as an aligned text table (what `--list_layers` prints)."""
    rows = list_layers(model)
    width = max(len(r.name) for r in rows)
    kind_width = max(len(r.kind) for r in rows)
    lines = [f"{'index':>7}  {'name':<{width}}  {'layer':<{kind_width}}  output shape"]
    lines += [f"{r.index:>7}  {r.name:<{width}}  {r.kind:<{kind_width}}  {r.output_shape}" for r in rows]
    return "\n".join(lines)


def _all_names(model) -> list[str]:
    return [info.name for info in list_layers(model)]


def resolve_layer(model, ref: LayerRef) -> tuple[list, str]:
    """The chain [outer layer, ..., target layer] for a name, path (`a/b`) or index.

    Raises:
      ValueError: no such layer; the message lists close names.
    """
    if isinstance(ref, int) or (isinstance(ref, str) and re.fullmatch(r"-?\d+", ref.strip())):
        index = int(ref)
        try:
            layer = model.layers[index]
        except IndexError:
            raise ValueError(f"layer index {index} is out of range: the model has "
                             f"{len(model.layers)} layers (0..{len(model.layers) - 1}); see "
                             "--list_layers.") from None
        return [layer], layer.name
    ref = str(ref).strip()
    chain, current = [], model
    for part in ref.split("/"):
        if not _is_model(current) or part not in [layer.name for layer in current.layers]:
            close = difflib.get_close_matches(ref, _all_names(model), n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"no layer named {ref!r} in model {model.name!r}{hint} "
                             "(see --list_layers).")
        current = current.get_layer(part)
        chain.append(current)
    return chain, ref


def graph_tensor(layer, which: str):
    """The tensor `layer` was first called on (`which="input"`) or gave (`"output"`) in its parent graph.

    For a plain layer that is `layer.input` / `layer.output`. A nested
    functional Model overrides both properties to return its own inner
    graph's tensors, and Keras has no public way to ask for the outer ones.
    The properties of `keras.layers.Layer` (Keras 3: `Operation.input` /
    `.output`, which read the first inbound node) still answer it, so this
    calls them explicitly. The one place the project relies on that;
    tests/test_visualize.py fails if a Keras release changes it.
    """
    import keras

    prop = getattr(keras.layers.Layer, which)
    if not isinstance(prop, property):
        raise RuntimeError(f"keras.layers.Layer.{which} is no longer a property (Keras "
                           f"{keras.__version__}): update pipeline.reporting.network.graph_tensor.")
    return prop.fget(layer)


def layer_model(model, ref: LayerRef):
    """(a model from model.inputs to the layer's output, display name)."""
    import keras

    chain, name = resolve_layer(model, ref)
    if len(chain) == 1:
        return keras.Model(model_input(model), graph_tensor(chain[0], "output"), name="features"), name
    # Nested: outer graph up to the sub-model's input, then the sub-model's inner graph.
    outer = model
    fns = []
    for parent in chain[:-1]:
        fns.append(keras.Model(model_input(outer), graph_tensor(parent, "input")))
        outer = parent
    fns.append(keras.Model(model_input(outer), chain[-1].output))
    x = keras.Input(shape=tuple(model.inputs[0].shape[1:]), dtype="float32")
    y = x
    for fn in fns:
        y = fn(y)
    return keras.Model(x, y, name="features"), name


def model_input(model):
    """The model's single image input (models here take one tensor)."""
    if len(model.inputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs; plots need one image input.")
    return model.inputs[0]


def input_size(model, default: int = 224) -> tuple[int, int]:
    """(height, width) the model takes; `default` for a dimension it leaves open."""
    shape = tuple(model.inputs[0].shape)
    h, w = shape[1], shape[2]
    return (int(h or default), int(w or default))


def first_conv(model):
    """(layer, path) of the first Conv2D taking 3 input channels (nested models searched too)."""
    import keras

    def visit(m, prefix):
        for layer in m.layers:
            if _is_model(layer):
                found = visit(layer, f"{prefix}{layer.name}/")
                if found is not None:
                    return found
            elif isinstance(layer, keras.layers.Conv2D) and layer.built:
                if len(layer.kernel.shape) == 4 and layer.kernel.shape[2] == 3:
                    return layer, prefix + layer.name
        return None

    found = visit(model, "")
    if found is None:
        raise ValueError(f"model {model.name!r} has no Conv2D layer on 3 input channels (a TF-Hub "
                         "SavedModel backbone hides its layers).")
    return found


def gradcam_layer_name(model) -> str:
    """Name of the last 4-D activation before "pool" (default Grad-CAM/feature layer)."""
    return gradcam_target(model, None)[1]


def gradcam_target(model, ref: Optional[LayerRef]):
    """(KerasTensor of a 4-D activation in the outer graph, its display name)."""
    if ref is not None:
        chain, name = resolve_layer(model, ref)
        if len(chain) > 1:
            raise ValueError(f"Grad-CAM needs a layer of the outer model, not {name!r} inside "
                             f"{chain[0].name!r}; use {chain[0].name!r} itself.")
        tensor = graph_tensor(chain[0], "output")
    else:
        names = [layer.name for layer in model.layers]
        if POOL_LAYER in names:
            pool = model.get_layer(POOL_LAYER)
            tensor = graph_tensor(pool, "input")
            name = next((layer.name for layer in model.layers
                         if layer is not pool and _produces(layer, tensor)), "input of pool")
        else:
            candidates = [layer for layer in model.layers if len(_shape(layer) or ()) == 4]
            if not candidates:
                raise ValueError(f"model {model.name!r} has no 4-D activation for Grad-CAM.")
            tensor, name = graph_tensor(candidates[-1], "output"), candidates[-1].name
    if len(tensor.shape) != 4:
        raise ValueError(f"Grad-CAM needs a 4-D [batch, height, width, channels] activation; "
                         f"{name!r} has shape {tuple(tensor.shape)} (a TF-Hub backbone returning "
                         "pooled features has none).")
    return tensor, name


def _produces(layer, tensor) -> bool:
    try:
        return graph_tensor(layer, "output") is tensor
    except (AttributeError, ValueError, RuntimeError):
        return False


def default_feature_layers(model) -> list[str]:
    """First convolution and the last 4-D activation before "pool" (those that exist)."""
    names = []
    for pick in (lambda: first_conv(model)[1], lambda: gradcam_layer_name(model)):
        try:
            name = pick()
        except ValueError:
            continue
        if name not in names:
            names.append(name)
    return names


def default_activation_layers(model) -> list[str]:
    """The last Conv2D of the model (nested models searched): its filters are the most telling."""
    convs = [info.name for info in list_layers(model) if info.kind in ("Conv2D", "StandardizedConv2D")]
    return convs[-1:] if convs else default_feature_layers(model)[-1:]
