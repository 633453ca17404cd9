"""Keras Applications backbones as `keras_<name>` models, one table row per application.

Every image classification application Keras 3.15 ships is registered (family
`keras_apps`): its backbone (`include_top=False`) is ONE layer named "backbone"
(the convention of `pipeline.models.pretrained`), fed by the application's own
preprocessing as a serializable layer "preprocess", followed by global average
pooling "pool" and a zero-initialized float32 head "logits".

Our models take float32 RGB in [0, 1]; each application expects what its own
`keras.applications.<module>.preprocess_input` prepares from 0-255 RGB:
  * "caffe" (ResNet, VGG): RGB -> BGR, minus the ImageNet BGR means;
  * "tf" (ResNetV2, Inception, Xception, MobileNet/V2, NASNet): x / 127.5 - 1;
  * "torch" (DenseNet): x / 255, minus the ImageNet RGB mean, over its std;
  * "builtin" (EfficientNet/V2, ConvNeXt, MobileNetV3): the preprocessing is
    inside the application (its `include_preprocessing` layers, fed 0-255) and
    its `preprocess_input` is the identity, so we only scale [0, 1] by 255.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import keras
from keras import ops

from pipeline.errors import short_reason
from pipeline.models.hub_io import WeightsError
from pipeline.models.pretrained import BACKBONE, POOL, zero_head
from pipeline.models.registry import register_model
from pipeline.models.stages import numbered, table

# ImageNet channel statistics of keras.applications.imagenet_utils' "caffe" and "torch" modes.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
STYLES = ("caffe", "tf", "torch", "builtin")


@keras.saving.register_keras_serializable(package="pipeline")
class CaffePreprocessing(keras.layers.Layer):
    """`keras.applications.resnet.preprocess_input` for [0, 1] RGB inputs, as a layer.

    Scales to 0..255, reorders RGB to BGR and subtracts the ImageNet BGR means
    (Keras' "caffe" mode). Runs in float32. Registered as
    `pipeline>CaffePreprocessing`, the name saved `.keras` checkpoints refer to.
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


def preprocessing_layer(style: str) -> keras.layers.Layer:
    """The layer "preprocess" mapping [0, 1] RGB to what an application of `style` expects."""
    if style == "caffe":
        return CaffePreprocessing(name="preprocess")
    if style == "tf":  # x / 127.5 - 1 on 0..255 == 2x - 1 on [0, 1]
        return keras.layers.Rescaling(2.0, offset=-1.0, name="preprocess", dtype="float32")
    if style == "torch":  # (x / 255 - mean) / std on 0..255 == (x - mean) / std on [0, 1]
        return keras.layers.Normalization(mean=TORCH_MEAN_RGB, variance=[s * s for s in TORCH_STD_RGB],
                                          name="preprocess", dtype="float32")
    if style == "builtin":
        return keras.layers.Rescaling(255.0, name="preprocess", dtype="float32")
    raise ValueError(f"preprocessing style must be one of {', '.join(STYLES)}, got {style!r}.")


class KerasApp(NamedTuple):
    """One application: `keras.applications.<constructor>`, whose `preprocess_input` lives in
    `keras.applications.<module>`; `style` is that function's mode (see module docstring);
    `image_size` is the application's own default input size; `depth` the one in its name."""

    constructor: str
    module: str
    style: str
    image_size: int
    depth: Optional[int] = None


KERAS_APPS = {
    "keras_resnet50": KerasApp("ResNet50", "resnet", "caffe", 224, 50),
    "keras_resnet101": KerasApp("ResNet101", "resnet", "caffe", 224, 101),
    "keras_resnet152": KerasApp("ResNet152", "resnet", "caffe", 224, 152),
    "keras_resnet50v2": KerasApp("ResNet50V2", "resnet_v2", "tf", 224, 50),
    "keras_resnet101v2": KerasApp("ResNet101V2", "resnet_v2", "tf", 224, 101),
    "keras_resnet152v2": KerasApp("ResNet152V2", "resnet_v2", "tf", 224, 152),
    "keras_vgg16": KerasApp("VGG16", "vgg16", "caffe", 224, 16),
    "keras_vgg19": KerasApp("VGG19", "vgg19", "caffe", 224, 19),
    "keras_xception": KerasApp("Xception", "xception", "tf", 299),
    "keras_inceptionv3": KerasApp("InceptionV3", "inception_v3", "tf", 299),
    "keras_inceptionresnetv2": KerasApp("InceptionResNetV2", "inception_resnet_v2", "tf", 299),
    "keras_mobilenet": KerasApp("MobileNet", "mobilenet", "tf", 224),
    "keras_mobilenetv2": KerasApp("MobileNetV2", "mobilenet_v2", "tf", 224),
    "keras_mobilenetv3small": KerasApp("MobileNetV3Small", "mobilenet_v3", "builtin", 224),
    "keras_mobilenetv3large": KerasApp("MobileNetV3Large", "mobilenet_v3", "builtin", 224),
    "keras_nasnetmobile": KerasApp("NASNetMobile", "nasnet", "tf", 224),
    "keras_nasnetlarge": KerasApp("NASNetLarge", "nasnet", "tf", 331),
    "keras_densenet121": KerasApp("DenseNet121", "densenet", "torch", 224, 121),
    "keras_densenet169": KerasApp("DenseNet169", "densenet", "torch", 224, 169),
    "keras_densenet201": KerasApp("DenseNet201", "densenet", "torch", 224, 201),
    **{f"keras_efficientnetb{i}": KerasApp(f"EfficientNetB{i}", "efficientnet", "builtin", size)
       for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))},
    **{f"keras_efficientnetv2{v.lower()}": KerasApp(f"EfficientNetV2{v}", "efficientnet_v2", "builtin", size)
       for v, size in (("B0", 224), ("B1", 240), ("B2", 260), ("B3", 300), ("S", 384), ("M", 480),
                       ("L", 480))},
    **{f"keras_convnext_{v.lower()}": KerasApp(f"ConvNeXt{v}", "convnext", "builtin", 224)
       for v in ("Tiny", "Small", "Base", "Large", "XLarge")},
}


def _blocks(template: str, first: int, last: int) -> tuple:
    """Layer-name roots `template.format(i)` for blocks first..last (one stage of an application)."""
    return tuple(template.format(i) for i in range(first, last + 1))


def _lettered(stage: int) -> tuple:
    """EfficientNet's roots of stage `stage`: its blocks `block<stage>a`, `block<stage>b`, ..."""
    return tuple(f"block{stage}{letter}" for letter in "abcdefghijklmnopqrstuvwxyz")


def _mobilenet_v3(stage_blocks) -> object:
    """MobileNetV3 stages: the stem conv and block 0, then `(first, last)` blocks per stage, the
    final 1x1 conv `conv_1` with the last (the longest root wins: `conv_1_bn` is not `conv`)."""
    *middle, (first, last) = stage_blocks
    stages = [("stem", ("conv", "expanded_conv"))]
    stages += [(f"stage{i}", _blocks("expanded_conv_{}", a, b)) for i, (a, b) in enumerate(middle, start=1)]
    stages.append((f"stage{len(stage_blocks)}", _blocks("expanded_conv_{}", first, last) + ("conv_1",)))
    return table(*stages)


# Stages for --layer_decay (`pipeline.models.stages`), by `keras.applications` module, or by
# constructor where one module's variants differ. The stage boundaries are where the
# application halves the resolution. Xception, Inception-v3, Inception-ResNet-v2, NASNet and
# ConvNeXt have none here: some of their trained layers get generated names (`conv2d_3`,
# `layer_normalization`) that depend on what the process built before, so no table can name them.
_RESNET = (("stem", "conv1"), *numbered("conv", 2, 4))
APP_STAGES = {
    "resnet": table(*_RESNET, ("stage4", "conv5")),
    "resnet_v2": table(*_RESNET, ("stage4", ("conv5", "post"))),
    "vgg16": table(*numbered("block", 1, 5)),
    "vgg19": table(*numbered("block", 1, 5)),
    "mobilenet": table(("stem", ("conv1", "conv_dw_1", "conv_pw_1")),
                       *((f"stage{i}", _blocks("conv_dw_{}", a, b) + _blocks("conv_pw_{}", a, b))
                         for i, (a, b) in enumerate(((2, 3), (4, 5), (6, 11), (12, 13)), start=1))),
    "mobilenet_v2": table(("stem", ("Conv1", "bn_Conv1", "expanded_conv")),
                          *((f"stage{i}", _blocks("block_{}", a, b))
                            for i, (a, b) in enumerate(((1, 2), (3, 5), (6, 12)), start=1)),
                          ("stage4", _blocks("block_{}", 13, 16) + ("Conv_1",))),
    "MobileNetV3Small": _mobilenet_v3(((1, 2), (3, 7), (8, 10))),
    "MobileNetV3Large": _mobilenet_v3(((1, 2), (3, 5), (6, 11), (12, 14))),
    "densenet": table(("stem", "conv1"), ("stage1", ("conv2", "pool2")), ("stage2", ("conv3", "pool3")),
                      ("stage3", ("conv4", "pool4")), ("stage4", ("conv5", "bn"))),
    "efficientnet": table(("stem", "stem"), *((f"stage{i}", _lettered(i)) for i in range(1, 8)),
                          ("top", "top")),
    "efficientnet_v2": table(("stem", "stem"), *((f"stage{i}", _lettered(i)) for i in range(1, 8)),
                             ("top", "top")),
}


def app_stages(app: KerasApp) -> tuple:
    """The application's stage tables for `ModelSpec.stages`, () where it has none."""
    found = APP_STAGES.get(app.constructor) or APP_STAGES.get(app.module)
    return (found,) if found else ()


def _imagenet_error(model_name: str, err: BaseException) -> WeightsError:
    return WeightsError(
        f"Cannot get the ImageNet weights of {model_name} from Keras Applications "
        f"({short_reason(err)}); connect to the network once (Keras caches them in "
        f"~/.keras/models), or pass --weights=<path to a weights file> (a .weights.h5 saved "
        f"from the backbone, or the Keras Applications .h5).")


def _application(app: KerasApp, model_name: str, weights, input_shape) -> keras.Model:
    constructor = getattr(keras.applications, app.constructor)
    common = dict(include_top=False, input_shape=tuple(input_shape))
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
    return constructor(weights=None, **common)


def _keras_backbone(app: KerasApp, model_name: str, weights, input_shape) -> keras.Model:
    """The application without its top, as one model named "backbone".

    The application keeps its own name while it is built: EfficientNetV2 picks
    its blocks and ConvNeXt and EfficientNetV2 their weight files by it. The
    same layer graph is then wrapped as a model named "backbone" (public
    `keras.Model(input, output)`), so every application follows the backbone
    convention whatever its constructor does with names.
    """
    application = _application(app, model_name, weights, input_shape)
    backbone = keras.Model(application.input, application.output, name=BACKBONE)
    if weights is None or weights == "imagenet":
        return backbone
    try:
        backbone.load_weights(os.fspath(weights))
    except Exception as err:  # noqa: BLE001 - wrong file / topology
        raise WeightsError(f"Cannot load {os.fspath(weights)!r} into the {model_name} backbone "
                           f"({short_reason(err)}); the file must hold weights of "
                           f"keras.applications.{app.constructor}(include_top=False).") from None
    return backbone


def build_keras_app(model_name: str, *, num_classes, input_shape, weights=None) -> keras.Model:
    """The registered application `model_name` (a KERAS_APPS key) with its preprocessing and our head."""
    app = KERAS_APPS[model_name]
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    x = preprocessing_layer(app.style)(inputs)
    x = _keras_backbone(app, model_name, weights, input_shape)(x)
    x = keras.layers.GlobalAveragePooling2D(name=POOL)(x)
    return keras.Model(inputs, zero_head(x, num_classes), name=model_name)


def _make_keras_builder(model_name: str, app: KerasApp):
    def builder(*, num_classes, input_shape, weights=None, normalization=None):
        del normalization  # the model applies the application's own preprocessing
        return build_keras_app(model_name, num_classes=num_classes, input_shape=input_shape,
                               weights=weights)

    builder.__name__ = builder.__qualname__ = model_name
    builder.__doc__ = (
        f"keras.applications.{app.constructor} backbone (layer 'backbone', include_top=False), "
        f"its own '{app.style}' preprocessing inside, average pooling 'pool', float32 head "
        f"'logits'.\n\nweights: None, 'imagenet' (downloaded by Keras) or a local weights file "
        f"of the backbone.")
    return builder


for _name, _app in KERAS_APPS.items():
    _builder = _make_keras_builder(_name, _app)
    register_model(_name, family="keras_apps", default_image_size=_app.image_size, pretrained=True,
                   depth=_app.depth, default_weights="imagenet", stages=app_stages(_app))(_builder)
    globals()[_name] = _builder
del _name, _app, _builder
