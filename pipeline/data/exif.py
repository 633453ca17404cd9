"""EXIF orientation: phone photos stored sideways, turned upright as the camera meant.

Why: a phone writes the sensor's pixels as they came and an EXIF Orientation
tag (0x0112, values 1-8) saying how to turn them; `tf.io.decode_image` ignores
the tag, so portrait photos reached the model on their side. The tag is read
once per file when the folder is scanned (PIL reads only the header), and the
decode map turns the pixels with `tf.transpose` / `tf.image.rot90`, which costs
nothing for the (usual) files without a rotation.

Every orientation is written as (transpose first?, then k quarter turns
counter-clockwise); `tests/test_inspect_data.py` checks all eight against
PIL's `ImageOps.exif_transpose`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import tensorflow as tf

ORIENTATION_TAG = 0x0112
# EXIF orientation -> (transpose, counter-clockwise quarter turns) that make the stored pixels upright.
UPRIGHT: Dict[int, Tuple[bool, int]] = {
    1: (False, 0),  # as stored
    2: (True, 3),   # mirrored left-right
    3: (False, 2),  # upside down
    4: (True, 1),   # mirrored top-bottom
    5: (True, 0),   # transposed
    6: (False, 3),  # turned 90 degrees (needs a clockwise turn)
    7: (True, 2),   # transversed
    8: (False, 1),  # turned 270 degrees (needs a counter-clockwise turn)
}


def orientation_of(exif_value) -> int:
    """The tag's value as 1-8 (a missing or invalid tag counts as 1: as stored)."""
    return exif_value if isinstance(exif_value, int) and exif_value in UPRIGHT else 1


def upright_array(image: np.ndarray, orientation: int) -> np.ndarray:
    """numpy: the [H, W, ...] image turned upright for `orientation` (used by the image hashes)."""
    transpose, turns = UPRIGHT[orientation_of(orientation)]
    if transpose:
        image = np.swapaxes(image, 0, 1)
    return np.rot90(image, turns)


def upright(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """tf: the [H, W, C] image turned upright for an int `orientation` tensor (1-8) inside a map."""
    table = np.array([UPRIGHT.get(o, (False, 0)) for o in range(9)], dtype=np.int32)
    index = tf.clip_by_value(tf.cast(orientation, tf.int32), 0, 8)
    transpose = tf.gather(tf.constant(table[:, 0]), index) > 0
    turns = tf.gather(tf.constant(table[:, 1]), index)
    image = tf.cond(transpose, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    return tf.image.rot90(image, turns)
