"""Pretrained backbones from Keras Applications and from any TF-Hub image module.

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
preprocessing (Keras Applications' own, as serializable layers; TF-Hub image
modules take [0, 1] as-is by the TF-Hub image convention).
"""
from __future__ import annotations

import os

import keras
from absl import logging
from keras import ops

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


def _head(features, num_classes: int):
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
                                             f"{hub_io.short_reason(err)}") from None
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
    return keras.Model(inputs, _head(features, num_classes), name="hub")


# --------------------------------------------------------------------------- Keras Applications

# ImageNet channel means (BGR) of the "caffe" preprocessing of keras.applications.resnet.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="pipeline")
class CaffePreprocessing(keras.layers.Layer):
    """`keras.applications.resnet.preprocess_input` for [0, 1] RGB inputs, as a layer.

    Scales to 0..255, reorders RGB to BGR and subtracts the ImageNet BGR means
    (Keras' "caffe" mode). Runs in float32.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype) * 255.0
        x = ops.flip(x, axis=-1)
        return x - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _preprocessing(style: str) -> keras.layers.Layer:
    if style == "caffe":
        return CaffePreprocessing(name="preprocess")
    # "tf" mode of keras.applications.resnet_v2: x / 127.5 - 1 on 0..255 == 2x - 1 on [0, 1].
    return keras.layers.Rescaling(2.0, offset=-1.0, name="preprocess", dtype="float32")


def _imagenet_error(model_name: str, err: BaseException) -> WeightsError:
    return WeightsError(
        f"Cannot get the ImageNet weights of {model_name} from Keras Applications "
        f"({hub_io.short_reason(err)}); connect to the network once (Keras caches them in "
        f"~/.keras/models), or pass --weights=<path to a weights file> (a .weights.h5 saved "
        f"from the backbone, or the Keras Applications .h5).")


def _keras_backbone(app_name: str, model_name: str, weights, input_shape):
    constructor = getattr(keras.applications, app_name)
    common = dict(include_top=False, input_shape=tuple(input_shape), name=BACKBONE)
    if weights is None:
        return constructor(weights=None, **common)
    if weights == "imagenet":
        try:
            return constructor(weights="imagenet", **common)
        except Exception as err:  # noqa: BLE001 - download/cache/HTTP failures alike
            raise _imagenet_error(model_name, err) from None
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise WeightsError(f"{model_name} weights {path!r} are neither None, 'imagenet' nor an "
                           f"existing weights file; pass --weights=<path to a weights file>.")
    backbone = constructor(weights=None, **common)
    try:
        backbone.load_weights(path)
    except Exception as err:  # noqa: BLE001 - wrong file / topology
        raise WeightsError(f"Cannot load {path!r} into the {model_name} backbone "
                           f"({hub_io.short_reason(err)}); the file must hold weights of "
                           f"keras.applications.{app_name}(include_top=False).") from None
    return backbone


def _build_keras_app(app_name: str, style: str, model_name: str, *, num_classes, input_shape,
                     weights):
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    x = _preprocessing(style)(inputs)
    backbone = _keras_backbone(app_name, model_name, weights, input_shape)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name=POOL)(x)
    return keras.Model(inputs, _head(x, num_classes), name=model_name)


# name -> (keras.applications constructor, preprocessing style of its preprocess_input, depth)
KERAS_APPS = {
    "keras_resnet50": ("ResNet50", "caffe", 50),
    "keras_resnet101": ("ResNet101", "caffe", 101),
    "keras_resnet152": ("ResNet152", "caffe", 152),
    "keras_resnet50v2": ("ResNet50V2", "tf", 50),
    "keras_resnet101v2": ("ResNet101V2", "tf", 101),
    "keras_resnet152v2": ("ResNet152V2", "tf", 152),
}


def _make_keras_builder(model_name: str, app_name: str, style: str):
    def builder(*, num_classes, input_shape, weights=None, normalization=None):
        del normalization  # the model applies the application's own preprocessing
        return _build_keras_app(app_name, style, model_name, num_classes=num_classes,
                                input_shape=input_shape, weights=weights)

    builder.__name__ = builder.__qualname__ = model_name
    builder.__doc__ = (
        f"keras.applications.{app_name} backbone (layer 'backbone', include_top=False), "
        f"its own preprocessing inside, average pooling 'pool', float32 head 'logits'.\n\n"
        f"weights: None, 'imagenet' (downloaded by Keras) or a local weights file of the "
        f"backbone.")
    return builder


for _name, (_app, _style, _depth) in KERAS_APPS.items():
    _builder = _make_keras_builder(_name, _app, _style)
    register_model(_name, family="keras_apps", default_image_size=224, pretrained=True,
                   depth=_depth, default_weights="imagenet")(_builder)
    globals()[_name] = _builder
del _name, _app, _style, _depth, _builder
