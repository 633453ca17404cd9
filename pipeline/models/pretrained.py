"""The backbone convention every pretrained family shares, and `hub:` TF-Hub image modules.

Backbone convention (what the trainer freezes for `--freeze_epochs` and scales
with the backbone learning-rate multiplier), shared by every pretrained family:
  * Keras Applications and `hub:` models hold their backbone in ONE layer named
    "backbone" (a nested keras.Model, or a `keras.layers.TFSMLayer`);
  * BiT models (`pipeline.models.bit`) are flat: every layer except "logits";
  * every model ends in a float32 Dense layer "logits", fed by a layer "pool"
    whose output is the pooled feature vector.
Use `backbone_layers(model)` / `head_layers(model)` rather than relying on the
names directly.

Inputs are float32 RGB in [0, 1] for every model; each model owns its
preprocessing (Keras Applications' own, as serializable layers: see
`pipeline.models.keras_apps`; TF-Hub image modules take [0, 1] as-is by the
TF-Hub image convention).
"""
from __future__ import annotations

import keras
from absl import logging

from pipeline.errors import short_reason
from pipeline.models import hub_io
from pipeline.models.hub_io import WeightsError
from pipeline.models.registry import register_model

BACKBONE = "backbone"
HEAD = "logits"
POOL = "pool"


# --------------------------------------------------------------------------- conventions

def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of `model` that form its pretrained backbone (see module docstring)."""
    names = {layer.name for layer in model.layers}
    if BACKBONE in names:
        return [model.get_layer(BACKBONE)]
    return [layer for layer in model.layers if layer.name != HEAD and layer.weights]


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The freshly initialized classification head ("logits")."""
    return [model.get_layer(HEAD)]


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) the backbone; recompile the model afterwards."""
    for layer in backbone_layers(model):
        layer.trainable = trainable


def zero_head(features, num_classes: int):
    """The head "logits": float32 even under mixed precision, zero-initialized (BiT's rule) so
    fine-tuning starts from the backbone's features with every class equally likely."""
    return keras.layers.Dense(num_classes, kernel_initializer="zeros", bias_initializer="zeros",
                              name=HEAD, dtype="float32")(features)


# --------------------------------------------------------------------------- TF-Hub modules

@keras.saving.register_keras_serializable(package="pipeline")
class HubModuleLayer(keras.layers.TFSMLayer):
    """TFSMLayer whose tracked variables get valid Keras names (the one adapter over TFSMLayer internals).

    Keras 3.15's TFSMLayer keeps the `:0` of TensorFlow variable names, and an
    optimizer with slot variables (SGD momentum, Adam) then fails with "is not
    a valid scope name". Keras offers no public hook to name the variables it
    tracks, so this overrides the private `_add_existing_weight` that
    TFSMLayer's constructor calls for each module variable: the same tracking,
    with ':' replaced. `tests/test_pretrained.py` fails loudly if TFSMLayer
    stops calling it or its tracking changes.
    """

    def _add_existing_weight(self, weight):
        variable = keras.Variable(initializer=weight, trainable=weight.trainable, dtype=weight.dtype,
                                  shape=weight.shape,
                                  name=weight.name.replace("/", "_").replace(":", "_"))
        self._track_variable(variable)


@register_model("hub:", family="hub", prefix=True, pretrained=True, default_image_size=224)
def hub_model(*, num_classes, input_shape, weights=None, normalization=None, argument,
              trainable: bool = True):
    """Any TF-Hub image feature-vector module (`hub:<handle or SavedModel dir>`) + a head.

    The module (a TF2 SavedModel whose `__call__` maps float32 [0, 1] images to
    features) is wrapped in `keras.layers.TFSMLayer` named "backbone"; 4-D
    outputs are average-pooled. The module computes in float32 whatever the
    precision policy (a SavedModel keeps the dtypes it was saved with).

    Args:
      num_classes: head size.
      input_shape: (H, W, 3).
      weights: must be None: the handle is the weights.
      normalization: ignored (TF-Hub image modules take [0, 1] as-is).
      argument: the handle, e.g. `https://tfhub.dev/google/bit/m-r50x1/1` or a directory.
      trainable: fine-tune the module's variables (True) or keep them fixed.

    Raises:
      WeightsError: the handle cannot be resolved or is not a usable module.
    """
    del normalization
    if weights is not None:
        raise WeightsError(f"hub:{argument} takes its weights from the handle; drop "
                           f"--weights={weights}.")
    path = hub_io.resolve_handle(argument)
    try:
        backbone = HubModuleLayer(path, call_endpoint="__call__", trainable=trainable,
                                          dtype="float32", name=BACKBONE)
    except Exception as err:  # noqa: BLE001 - any failure means "not a usable module"
        raise hub_io.weights_error(argument, f"not a TF-Hub image module with a __call__: "
                                             f"{short_reason(err)}") from None
    logging.warning("hub:%s computes in float32 whatever the precision policy (%s): a SavedModel "
                 "keeps the dtypes it was saved with.", argument,
                 keras.config.dtype_policy().name)
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    features = backbone(inputs)
    if isinstance(features, dict):
        raise hub_io.weights_error(argument, f"the module returns a dict {sorted(features)}, "
                                             f"not a feature tensor")
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name=POOL, dtype="float32")(features)
    elif len(features.shape) == 2:
        features = keras.layers.Identity(name=POOL, dtype="float32")(features)
    else:
        raise hub_io.weights_error(argument, f"the module returns shape {features.shape}, "
                                             f"not [batch, features]")
    return keras.Model(inputs, zero_head(features, num_classes), name="hub")
