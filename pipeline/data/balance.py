"""`--balanced_sampling`: every class drawn equally often, epochs as long as before.

Why: with a 10:1 imbalance the smallest class is one batch element in eleven
and the network learns to ignore it. Sampling the per-class datasets with
equal weights (`tf.data.Dataset.sample_from_datasets`) shows every class as
often; minority images repeat (under fresh augmentation), majority ones are
drawn from a reshuffled stream. An epoch keeps the unbalanced epoch's number
of examples, so the step budget, the schedules and `--epochs` mean what they
meant. The alternative is weighting the loss instead (`--class_weight`).

Items are any split's raw elements whose second component is the label
(`(path, label)`, `(path, label, orientation)`, `(image, label)`), so it works
for every source, cached or not, before decoding.
"""
from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from pipeline.config import DataConfig


def balanced_pass(elements: tf.data.Dataset, num_classes: int, size: int, seed, shuffle_buffer: int
                  ) -> tf.data.Dataset:
    """`size` items drawn class by class with equal probability, a pure function of `seed`.

    Args:
      elements: the split's items; `item[1]` is the int label.
      num_classes: labels are 0..num_classes-1 (an absent class is skipped).
      size: items in the pass (the split's size: the unbalanced epoch's length).
      seed: int or int64 tensor (the pass seed), so each pass draws anew and reproducibly.
      shuffle_buffer: per-class shuffle buffer.
    """
    seed = tf.cast(seed, tf.int64)
    per_class = []
    for c in range(num_classes):
        only = elements.filter(lambda *item, c=c: tf.equal(tf.cast(item[1], tf.int64), c))
        per_class.append(only.shuffle(max(1, shuffle_buffer), seed=seed * 1009 + c,
                                      reshuffle_each_iteration=True).repeat())
    mixed = tf.data.Dataset.sample_from_datasets(per_class, weights=[1.0 / num_classes] * num_classes,
                                                 seed=seed, stop_on_empty_dataset=False)
    return mixed.take(size)


def sampler_for(config: DataConfig, num_classes: int, size: int
                ) -> Optional[Callable[[tf.data.Dataset, tf.Tensor], tf.data.Dataset]]:
    """`sampler(elements, pass_seed)` for the training stream, or None when sampling is not balanced."""
    if not config.balanced_sampling:
        return None
    buffer = max(1, min(config.shuffle_buffer, size))
    return lambda elements, seed: balanced_pass(elements, num_classes, size, seed, buffer)
