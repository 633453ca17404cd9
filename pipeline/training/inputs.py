"""What the training loop reads: one-hot (and mixed) batches of the epoch it is at.

Why a module: the batches of epoch `e` are a pure function of (--seed, e)
(`pipeline.data.TrainingStream` for the images, the seeds below for the
batch-level mixing), which is what makes a resumed run see exactly the
batches an uninterrupted one would.
"""
from __future__ import annotations

import tensorflow as tf

from pipeline import config as cfg
from pipeline.data import mixing
from pipeline.data.dataset import pass_seed
from pipeline.training import phases


def one_hot(ds, num_classes, *, mixup_alpha=0.0, seed=0, first_batch=0, cutmix_alpha=0.0, switch_prob=0.5):
    """One-hot labels, then MixUp/CutMix (`mixing.mix_batch`) seeded by (`seed`, batch index from `first_batch`)."""
    if ds is None:
        return None
    ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    if mixup_alpha > 0 or cutmix_alpha > 0:
        counter = tf.data.Dataset.counter(start=first_batch)
        mix = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob)
        ds = tf.data.Dataset.zip((ds, counter)).map(
            lambda xy, i: mixing.mix_batch(xy[0], xy[1], tf.stack([tf.cast(seed, tf.int64), i]), **mix),
            num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def epoch_data(t: cfg.TrainConfig, runner, datasets, budget: phases.StepBudget):
    """`epoch -> distributed training batches`, a pure function of (--seed, epoch), so resumes are exact.

    One pass of the split per epoch, or (--steps_per_epoch) that many full
    batches of the passes laid end to end (`TrainingStream.steps`).
    """
    num_classes, stream = len(datasets.class_names), datasets.stream
    alpha = phases.mixup_alpha(t, budget, datasets.num_train)

    def data(epoch: int):
        mix = mixing.epoch_mixing(t, alpha, epoch)  # MixUp/CutMix of this epoch (off from --mix_off_epoch)
        if t.steps_per_epoch:
            batches = stream.steps(epoch, budget.steps_per_epoch)
            return runner.distribute(one_hot(batches, num_classes, seed=t.seed,
                                             first_batch=epoch * budget.steps_per_epoch, **mix))
        return runner.distribute(one_hot(stream.epoch(epoch), num_classes,
                                         seed=pass_seed(t.seed, epoch), **mix))

    return data
