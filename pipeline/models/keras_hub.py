"""keras-hub backbones as pipeline models: `--model=keras_hub:<preset>`.

`<preset>` is anything keras-hub's `Backbone.from_preset` accepts: a preset
name (`resnet_18_imagenet`), a `kaggle://` or `hf://` handle (keras-hub
converts timm checkpoints such as `hf://timm/resnet50.tv2_in1k` on the fly), or
a local directory in keras-hub's `save_to_preset` format or the Hugging Face
timm layout. `keras_hub_source` resolves it offline-first and records its
provenance.

The model keeps the pipeline's contracts: it takes float32 RGB in [0, 1] and
owns the preset's preprocessing. keras-hub's image converters expect 0..255
and sit outside keras-hub's models, so ours applies, in its graph, what the
converter does: x * 255, resize (only when the backbone needs a fixed size),
then the converter's per-channel scale and offset (its mean/std), as one
float32 `Rescaling` "preprocess". Then the keras-hub backbone, ONE layer
"backbone" (what `--freeze_epochs` freezes); the family's own pooling "pool"
(the pooling its keras-hub `ImageClassifier` uses by default: a CNN's global
average, a ViT's class token, Swin's token mean; families without a
classifier, such as DINOv2, take their class token); and our float32
zero-initialized Dense "logits".

keras_hub is imported only when such a model is built (~1 s, ~900 Keras
registrations); a saved `.keras` file re-imports it by itself (Keras imports
`keras_hub` modules named in a config when deserializing).
"""
from __future__ import annotations

import inspect
from typing import Optional

import keras
import numpy as np
from absl import logging

from pipeline.errors import short_reason
from pipeline.models import keras_hub_source as source_lib
from pipeline.models.hub_io import WeightsError
from pipeline.models.pretrained import BACKBONE, POOL, zero_head
from pipeline.models.registry import register_model
from pipeline.models.stages import table

# `--weights` value (and `ModelSpec.default_weights`) meaning "the preset's own weights".
PRESET_WEIGHTS = "preset"
# Resolution when the preset's image converter does not name one.
FALLBACK_IMAGE_SIZE = 224
# Stages for --layer_decay (`pipeline.models.stages`), one table per keras-hub backbone class
# (the layer "backbone" says which): ResNet's input convs and pool, its stacks, and the
# pre-activation variant's final `post_bn` as a stage of its own (presets have 2 to 4 stacks).
BACKBONE_STAGES = (
    table(("stem", ("conv1", "conv2", "conv3", "pool1")),
          *((f"stage{i + 1}", f"stack{i}") for i in range(4)), ("post", "post"),
          backbone_class="ResNetBackbone"),
)


def _keras_hub():
    import keras_hub  # lazy: see the module docstring
    return keras_hub


@keras.saving.register_keras_serializable(package="pipeline")
class ClassToken(keras.layers.Layer):
    """The first token of a [batch, tokens, features] sequence (a ViT's class token)."""

    def call(self, inputs):
        return inputs[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


# --------------------------------------------------------------------------- preset parts

def _load_weights_flag(argument: str, weights: Optional[str]) -> bool:
    if weights is None:
        return False
    if weights == PRESET_WEIGHTS:
        return True
    raise WeightsError(
        f"keras_hub:{argument} takes its weights from the preset: --weights={PRESET_WEIGHTS} "
        f"(pipeline.finetune's default) loads them, no weights (pipeline.train's default, or "
        f"pipeline.finetune --weights=none) builds the architecture with random ones; got "
        f"--weights={weights}.")


def load_image_converter(source: source_lib.PresetSource):
    """The preset's keras-hub image converter, or None where it has none.

    Raises:
      WeightsError: the converter is a subclass that changes what converting
        means (its `call` is overridden), so it cannot be rebuilt in our graph.
    """
    keras_hub = _keras_hub()
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(source.location)
    except (FileNotFoundError, ValueError) as err:
        logging.warning("keras_hub:%s has no image converter (%s): the backbone gets 0..255 "
                        "images, as keras-hub's own pipeline would give it.", source.preset,
                        short_reason(err))
        return None
    except Exception as err:  # noqa: BLE001 - download/cache failures alike
        raise source_lib.preset_error(source.preset, short_reason(err), source.kind) from None
    if converter is not None and type(converter).call is not keras_hub.layers.ImageConverter.call:
        raise source_lib.preset_error(
            source.preset, f"its image converter {type(converter).__name__} is not a plain "
                           f"resize + rescale, which the model cannot reproduce")
    return converter


def load_backbone(source: source_lib.PresetSource, *, load_weights: bool):
    """`keras_hub.models.Backbone.from_preset` as the layer "backbone" (random weights unless `load_weights`).

    Raises:
      WeightsError: keras-hub cannot load it, or it is not a single-image backbone.
    """
    keras_hub = _keras_hub()
    try:
        backbone = keras_hub.models.Backbone.from_preset(source.location, load_weights=load_weights,
                                                         name=BACKBONE)
    except Exception as err:  # noqa: BLE001 - keras-hub raises many types for one meaning
        raise source_lib.preset_error(source.preset, short_reason(err), source.kind) from None
    inputs, outputs = backbone.inputs, backbone.outputs
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1:
        raise source_lib.preset_error(
            source.preset, f"{type(backbone).__name__} is not an image backbone (one image "
                           f"input, one output)")
    if backbone.name != BACKBONE:  # pragma: no cover - keras-hub stopped forwarding `name`
        raise source_lib.preset_error(source.preset, "keras-hub ignored the backbone's name")
    return backbone


def pooling_of(backbone) -> str:
    """"avg", "max" or "token": the pooling the backbone's own keras-hub ImageClassifier defaults to.

    Read from the classifier class's signature (`pooling=`); a classifier with
    no such argument averages (Swin). Without a classifier (DINOv2), sequence
    backbones give their class token and feature maps are averaged.
    """
    keras_hub = _keras_hub()
    pending, classifiers = [keras_hub.models.ImageClassifier], []
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if getattr(cls, "backbone_cls", None) is type(backbone):
            classifiers.append(cls)
    if not classifiers:
        return "token" if len(backbone.outputs[0].shape) == 3 else "avg"
    parameter = inspect.signature(classifiers[0].__init__).parameters.get("pooling")
    pooling = parameter.default if parameter is not None else "avg"
    return pooling if pooling in ("token", "max") else "avg"


def _pool_layer(pooling: str, rank: int):
    if rank == 2:
        return keras.layers.Identity(name=POOL)
    layers = {(4, "avg"): keras.layers.GlobalAveragePooling2D,
              (4, "max"): keras.layers.GlobalMaxPooling2D,
              (3, "avg"): keras.layers.GlobalAveragePooling1D,
              (3, "max"): keras.layers.GlobalMaxPooling1D,
              (3, "token"): ClassToken}
    return layers[(rank, pooling)](name=POOL)


def preprocessing_layer(converter) -> keras.layers.Layer:
    """What `converter` does after resizing, on [0, 1] input: (255 x) * scale + offset, float32."""
    scale = getattr(converter, "scale", None)
    offset = getattr(converter, "offset", None)
    scale = 255.0 * np.broadcast_to(np.asarray(1.0 if scale is None else scale, "float64"), (3,))
    offset = np.broadcast_to(np.asarray(0.0 if offset is None else offset, "float64"), (3,))
    return keras.layers.Rescaling([float(v) for v in scale], offset=[float(v) for v in offset],
                                  name="preprocess", dtype="float32")


def image_size_of(converter) -> int:
    """The converter's (square) image size, else FALLBACK_IMAGE_SIZE."""
    size = getattr(converter, "image_size", None)
    return int(size[0]) if size and size[0] else FALLBACK_IMAGE_SIZE


def default_image_size(argument: str) -> int:
    """The resolution a `keras_hub:<argument>` model is meant for: its converter's, else 224."""
    return image_size_of(load_image_converter(source_lib.resolve(argument)))


def _resize_for(backbone, converter, input_shape):
    """A Resizing to the backbone's fixed input size (a ViT's), None when it takes any size."""
    fixed = tuple(backbone.inputs[0].shape[1:3])
    if None in fixed or fixed == tuple(input_shape[:2]):
        return None
    logging.info("The backbone takes %sx%s images only: the model resizes its %sx%s input.",
                 *fixed, *input_shape[:2])
    return keras.layers.Resizing(
        *fixed, interpolation=getattr(converter, "interpolation", "bilinear"),
        crop_to_aspect_ratio=getattr(converter, "crop_to_aspect_ratio", False),
        antialias=getattr(converter, "antialias", False), name="resize", dtype="float32")


# --------------------------------------------------------------------------- the model

@register_model("keras_hub:", family="keras_hub", prefix=True, pretrained=True,
                default_image_size=FALLBACK_IMAGE_SIZE, default_weights=PRESET_WEIGHTS,
                provenance=source_lib.provenance, image_size_for=default_image_size,
                stages=BACKBONE_STAGES)
def keras_hub_model(*, num_classes, input_shape, weights=None, normalization=None, argument):
    """A keras-hub backbone (`keras_hub:<preset>`) with its preset's preprocessing and our head.

    Args:
      num_classes: head size.
      input_shape: (H, W, 3); fixed-size backbones (ViT) get a resize inside.
      weights: "preset" loads the preset's weights; None builds the same
        architecture with random weights (the "with vs without pretrained"
        comparison). The preset's config is needed either way.
      normalization: ignored (the preset's image converter normalizes).
      argument: the preset: a name, `kaggle://...`, `hf://...` or a local directory.

    Raises:
      WeightsError: the preset cannot be resolved or loaded (one sentence).
    """
    del normalization
    load_weights = _load_weights_flag(argument, weights)
    source = source_lib.resolve(argument)
    converter = load_image_converter(source)
    backbone = load_backbone(source, load_weights=load_weights)
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    x = inputs
    resize = _resize_for(backbone, converter, input_shape)
    if resize is not None:
        x = resize(x)
    x = backbone(preprocessing_layer(converter)(x))
    if isinstance(x, dict):  # pragma: no cover - checked by load_backbone
        raise source_lib.preset_error(argument, "the backbone returns a dict")
    features = _pool_layer(pooling_of(backbone), len(x.shape))(x)
    logits = zero_head(features, num_classes)
    return keras.Model(inputs, logits, name="keras_hub")
