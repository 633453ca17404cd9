"""What every export computes after the network: temperature, TTA, softmax, class ids, "unknown".

One function for every format (the SavedModel's signatures and the Keras
wrapper that the ONNX and LiteRT files are converted from), so the formats
cannot drift apart: `outputs(model, images, options)` returns
`probabilities` (float32 [batch, classes]), `class_ids` (int64 [batch], the
argmax: calibration never changes it) and, with `options.reject_below`,
`is_unknown` (bool [batch], top probability below the threshold).

The ONNX and LiteRT graphs must contain TFLite builtin operations only, so
their resize is a plain bilinear one (`builtin_resize`); the SavedModel keeps
its antialiased resize for inputs larger than the model's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from pipeline import tta as tta_lib

OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASS_IDS = "class_ids"
OUTPUT_UNKNOWN = "is_unknown"
UNKNOWN_CLASS = "unknown"


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    """How an export turns logits into answers.

    Attributes:
      tta: a `pipeline.tta.TTA_MODES` mode, averaged inside the graph.
      temperature: divides the logits before the softmax (1.0: raw softmax).
      reject_below: the top-class probability under which an image is "unknown"; None: never.
    """
    tta: str = "none"
    temperature: float = 1.0
    reject_below: Optional[float] = None

    def __post_init__(self):
        tta_lib.view_count(self.tta)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.reject_below is not None and not 0.0 < self.reject_below < 1.0:
            raise ValueError(f"reject_below must be in (0, 1), got {self.reject_below}")

    def output_names(self) -> list[str]:
        names = [OUTPUT_PROBABILITIES, OUTPUT_CLASS_IDS]
        return names + [OUTPUT_UNKNOWN] if self.reject_below is not None else names

    def as_card(self) -> dict:
        return dataclasses.asdict(self)


def builtin_resize(images, height: int, width: int):
    """Bilinear resize without antialiasing (TFLite's RESIZE_BILINEAR); identity at the same size."""
    import tensorflow as tf
    return tf.image.resize(images, [height, width], method="bilinear")


def outputs(model, images, options: DeployOptions) -> dict:
    """The export outputs of `model` (images at its own size -> logits) on `images`."""
    import tensorflow as tf

    def logits_fn(x):
        return tf.cast(model(x, training=False), tf.float32)

    probabilities = tta_lib.tta_probabilities(logits_fn, images, options.tta,
                                              temperature=options.temperature)
    result = {OUTPUT_PROBABILITIES: probabilities,
              OUTPUT_CLASS_IDS: tf.argmax(probabilities, axis=-1, output_type=tf.int64)}
    if options.reject_below is not None:
        result[OUTPUT_UNKNOWN] = tf.reduce_max(probabilities, axis=-1) < options.reject_below
    return result


def class_names(table, result: dict):
    """String class names of `result`'s class ids (`table`: id -> name), "unknown" where rejected."""
    import tensorflow as tf
    names = table.lookup(result[OUTPUT_CLASS_IDS])
    if OUTPUT_UNKNOWN in result:
        names = tf.where(result[OUTPUT_UNKNOWN], tf.constant(UNKNOWN_CLASS), names)
    return names


def compute_policy(model) -> str:
    """The model's dtype policy: a mixed policy if any weighted layer computes under one."""
    names = {getattr(getattr(layer, "dtype_policy", None), "name", "float32")
             for layer in model.layers if layer.weights}
    mixed = sorted(n for n in names if n.startswith("mixed"))
    return mixed[0] if mixed else "float32"
