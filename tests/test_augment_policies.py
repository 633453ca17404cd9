"""Augmentation policies (RandAugment, TrivialAugment-Wide, AugMix, colour jitter, random erasing) and
batch mixing (CutMix, the MixUp/CutMix switch, --mix_off_epoch): what a user of these flags relies on.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as cfg
from pipeline import validation
from pipeline.data import augment, load_dataset, mixing, policies
from pipeline.training import inputs
from pipeline.tuning import overrides, space

SIZE = 16


def _images(n=6, size=SIZE):
    """Smooth, low-contrast images (values 0.2-0.7), so autocontrast, equalize and solarize all act."""
    ramp = np.linspace(0.2, 0.7, size, dtype=np.float32)
    base = ramp[:, None, None] * ramp[None, :, None] * np.array([1.0, 0.8, 0.6], np.float32) / 0.7
    noise = np.random.default_rng(0).uniform(0, 0.05, (n, size, size, 3)).astype(np.float32)
    return np.clip(base[None] + noise, 0, 1)


def _through_tf_data(fn, images, seeds):
    """The policy as the pipeline runs it: a parallel tf.data map, one stateless seed per example."""
    ds = tf.data.Dataset.from_tensor_slices((images, seeds))
    ds = ds.map(lambda x, s: fn(x, s), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.stack(list(ds.as_numpy_iterator()))


POLICY_NAMES = ["randaugment", "trivialaugment", "augmix", "cifar+randaugment",
                "inception_crop+trivialaugment", "bit+randaugment"]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_each_policy_changes_images_keeps_shape_dtype_range_and_is_seeded(name):
    images = _images()
    seeds = np.stack([np.arange(len(images)), np.full(len(images), 7)], 1).astype(np.int64)
    fn = augment.get_augmentation(name, SIZE, SIZE + 4 if name.startswith("bit") else None)
    # One parallel pipeline (a policy's map takes seconds to trace), read twice: the images under
    # their seeds, then under other seeds.
    ds = tf.data.Dataset.from_tensor_slices((np.concatenate([images, images]),
                                             np.concatenate([seeds, seeds + 1000])))
    ds = ds.map(lambda x, s: fn(x, s), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    (first, other), (again, _) = (np.split(np.stack(list(ds.as_numpy_iterator())), 2) for _ in range(2))
    assert first.shape == images.shape and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)  # same seed, same images, in any map order
    assert not np.array_equal(first, other)
    changed = [not np.allclose(a, b, atol=1e-6) for a, b in zip(first, images)]
    # TrivialAugment-Wide draws one op at a uniform level: identity, or level 0, leaves some images as they are.
    assert sum(changed) >= (len(images) // 2 if name == "trivialaugment" else len(images)), changed


def test_every_operation_changes_the_image_and_keeps_its_range():
    image = tf.constant(_images(1)[0])
    for index, name in enumerate(policies.RANDAUGMENT_OPS):
        out = policies.apply_one(image, policies.RANDAUGMENT_OPS, tf.constant(index), tf.constant(0.9),
                                 tf.constant([0, 1], tf.int64)).numpy()
        assert out.shape == image.shape and out.dtype == np.float32, name
        assert 0.0 <= out.min() and out.max() <= 1.0, name
        if name == "identity":
            np.testing.assert_array_equal(out, image.numpy())
        else:
            assert np.abs(out - image.numpy()).mean() > 1e-3, name


def test_color_jitter_and_random_erasing_compose_with_a_crop():
    images = _images()
    seeds = np.stack([np.arange(6), np.zeros(6)], 1).astype(np.int64)
    erase = _through_tf_data(augment.get_augmentation("none", SIZE, random_erasing=1.0), images, seeds)
    # Erasing with probability 1 replaces one box of every image (and only that box).
    for out, image in zip(erase, images):
        rows, cols = np.nonzero(np.any(out != image, axis=-1))
        assert rows.size > 0
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert rows.size == box or rows.size >= 0.95 * box  # a filled rectangle (noise may hit a value)
    jitter = _through_tf_data(augment.get_augmentation("cifar", SIZE, color_jitter=0.4), images, seeds)
    assert jitter.min() >= 0 and jitter.max() <= 1 and not np.allclose(jitter, images)
    # Everything off: exactly the crop with the example's own seed, as before these options existed.
    plain = _through_tf_data(augment.get_augmentation("cifar", SIZE), images, seeds)
    np.testing.assert_array_equal(plain, _through_tf_data(augment.CROPS["cifar"](SIZE, None), images, seeds))


def test_two_runs_with_one_seed_see_identical_batches():
    config = cfg.DataConfig(dataset="digits", augment="cifar+randaugment", randaugment_magnitude=7.0,
                            random_erasing=0.5, color_jitter=0.3, batch_size=16, seed=3)
    a, b = load_dataset(config), load_dataset(config)
    x_a, y_a = next(iter(a.stream.epoch(1)))
    x_b, y_b = next(iter(b.stream.epoch(1)))
    np.testing.assert_array_equal(x_a.numpy(), x_b.numpy())
    np.testing.assert_array_equal(y_a.numpy(), y_b.numpy())
    assert x_a.dtype == tf.float32 and 0 <= float(tf.reduce_min(x_a)) and float(tf.reduce_max(x_a)) <= 1
    plain = load_dataset(cfg.DataConfig(dataset="digits", augment="cifar", batch_size=16, seed=3))
    assert not np.array_equal(next(iter(plain.stream.epoch(1)))[0].numpy(), x_a.numpy())


def _distinct_batch(n=4, size=8, classes=4):
    """Example i is the constant image (i + 1) / 10 labelled class i: a pixel says where it came from."""
    images = tf.constant(np.stack([np.full((size, size, 3), (i + 1) / 10, np.float32) for i in range(n)]))
    return images, tf.one_hot(tf.range(n), classes)


def test_cutmix_labels_sum_to_one_and_match_the_pasted_area():
    images, labels = _distinct_batch()
    pasted_some = False
    for s in range(10):
        mixed, soft = mixing.cutmix(images, labels, 1.0, tf.constant([s, 1], tf.int64))
        mixed, soft = mixed.numpy(), soft.numpy()
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
        for i in range(len(mixed)):
            own = np.isclose(mixed[i, ..., 0], (i + 1) / 10)
            np.testing.assert_allclose(soft[i, i], own.mean(), atol=1e-6)  # own label = share not pasted over
            if not own.all():
                partner = int(round(mixed[i][~own][0, 0] * 10)) - 1
                assert np.allclose(mixed[i][~own], (partner + 1) / 10)  # one partner, pasted as is
                np.testing.assert_allclose(soft[i, partner], 1.0 - own.mean(), atol=1e-6)
                pasted_some = True
    assert pasted_some


def test_the_switch_picks_cutmix_or_mixup_per_batch():
    images, labels = _distinct_batch()

    def kinds(prob):
        out = set()
        for s in range(12):
            mixed, _ = mixing.mix_batch(images, labels, tf.constant([s, 2], tf.int64), mixup_alpha=1.0,
                                        cutmix_alpha=1.0, switch_prob=prob)
            values = np.unique(np.round(mixed.numpy()[..., 0] * 10, 4))
            pasted = np.all(np.isclose(values, np.round(values)))  # only whole source values: CutMix
            out.add("cutmix" if pasted else "mixup")
        return out

    assert kinds(1.0) == {"cutmix"}
    assert kinds(0.0) == {"mixup"}
    assert kinds(0.5) == {"cutmix", "mixup"}
    same = mixing.mix_batch(images, labels, tf.constant([0, 0], tf.int64), mixup_alpha=0.4)
    np.testing.assert_array_equal(same[0].numpy(), augment.mixup(images, labels, 0.4,
                                                                 tf.constant([0, 0], tf.int64))[0].numpy())


def test_mix_off_epoch_stops_mixing_for_the_last_epochs():
    t = cfg.TrainConfig(epochs=4, mixup_alpha=0.2, cutmix_alpha=1.0, mix_off_epoch=2)
    assert mixing.epoch_mixing(t, 0.2, 1) == {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "switch_prob": 0.5}
    images, y = _distinct_batch()
    ds = tf.data.Dataset.from_tensors((images, tf.range(4)))
    for epoch, mixed in ((1, True), (2, False), (3, False)):
        _, soft = next(iter(inputs.one_hot(ds, 4, seed=epoch, **mixing.epoch_mixing(t, 0.2, epoch))))
        assert np.array_equal(soft.numpy(), y.numpy()) != mixed, epoch


def test_bad_values_are_refused_naming_the_flag():
    run = cfg.RunConfig(model_dir="x")
    bad = [({"randaugment_magnitude": 11.0}, "randaugment_magnitude"), ({"random_erasing": 1.5}, "random_erasing"),
           ({"color_jitter": -0.1}, "color_jitter")]
    for data, flag in bad:
        with pytest.raises(ValueError, match=flag):
            validation.check_run(cfg.RunConfig(model_dir="x", data=cfg.DataConfig(**data)))
    for train, flag in [({"mix_switch_prob": 2.0}, "mix_switch_prob"), ({"cutmix_alpha": -1.0}, "cutmix_alpha"),
                        ({"mix_off_epoch": 3}, "mix_off_epoch"),
                        ({"mix_off_epoch": 40, "cutmix_alpha": 1.0}, "mix_off_epoch")]:
        with pytest.raises(ValueError, match=flag):
            validation.check_run(cfg.RunConfig(model_dir="x", train=cfg.TrainConfig(**train)))
    validation.check_run(run)


def test_new_hyperparameters_are_searchable_with_the_flag_values_as_defaults():
    base = cfg.RunConfig(model_dir="x", data=cfg.DataConfig(augment="cifar+randaugment", randaugment_magnitude=7.0),
                         train=cfg.TrainConfig(cutmix_alpha=0.5))
    names = ["randaugment_ops", "randaugment_magnitude", "random_erasing", "color_jitter", "cutmix_alpha",
             "mix_switch_prob", "mix_off_epoch"]
    search = space.make_search_space(base, tune=names)
    defaults = {p.name: p.default for p in search.params}
    assert defaults == {"randaugment_ops": 2, "randaugment_magnitude": 7.0, "random_erasing": 0.0,
                        "color_jitter": 0.0, "cutmix_alpha": 0.5, "mix_switch_prob": 0.5, "mix_off_epoch": 0}
    trial = overrides.apply_overrides(base, {"randaugment_magnitude": 5.0, "cutmix_alpha": 1.0})
    assert (trial.data.randaugment_magnitude, trial.train.cutmix_alpha) == (5.0, 1.0)
    with pytest.raises(ValueError, match="randaugment"):
        space.make_search_space(cfg.RunConfig(model_dir="x"), tune=["randaugment_magnitude"])


def test_train_with_a_policy_and_mixing_under_mirrored_records_every_setting(mirrored_recipe_run):
    """The CLI run (conftest's, shared with test_recipes_loop's recipe flags) trained and recorded each flag."""
    model_dir = mirrored_recipe_run
    with open(os.path.join(model_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and summary["replicas"] == 2
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["data"]["augment"] == "cifar+randaugment"
    assert (config["data"]["randaugment_magnitude"], config["data"]["random_erasing"],
            config["data"]["color_jitter"]) == (7.0, 0.25, 0.2)
    assert (config["train"]["cutmix_alpha"], config["train"]["mix_switch_prob"],
            config["train"]["mix_off_epoch"]) == (1.0, 0.6, 1)
    flags_cfg = open(os.path.join(model_dir, "flags.cfg")).read()
    for line in ("--augment=cifar+randaugment", "--randaugment_magnitude=7.0", "--cutmix_alpha=1.0",
                 "--mix_off_epoch=1", "--random_erasing=0.25", "--color_jitter=0.2"):
        assert line in flags_cfg, line
