"""Tests for pipeline.data and pipeline.data.augment (offline, small, < 60 s)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import data
from pipeline.config import DataConfig
from pipeline.data import augment, folder
from tests.helpers import free_ports


def _collect(ds):
    """All (images, labels) of a batched dataset as numpy arrays."""
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _check_batch(x, y, size, num_classes):
    assert x.dtype == tf.float32 and y.dtype == tf.int32
    assert x.shape[1:] == (size, size, 3)
    assert x.shape[0] == y.shape[0]
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0
    assert 0 <= int(tf.reduce_min(y)) and int(tf.reduce_max(y)) < num_classes


# ------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset(DataConfig(batch_size=256, seed=0))


def test_digits_split_sizes_fixed_and_disjoint(digits):
    assert (digits.num_train, digits.num_val, digits.num_test) == (1257, 180, 360)
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.image_size == 32
    train, val, test = data.digits_arrays()[2]
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert len(set(train) | set(val) | set(test)) == 1797
    # Counted from the pipelines themselves, every class in every split.
    for ds, n in ((digits.train, 1257), (digits.val, 180), (digits.test, 360)):
        x, y = _collect(ds)
        assert len(y) == n
        assert set(y.tolist()) == set(range(10))


def test_digits_images_are_rgb_float_in_unit_range(digits):
    x, y = next(iter(digits.test))
    _check_batch(x, y, 32, 10)
    assert x.shape[0] == 256
    x = x.numpy()
    np.testing.assert_array_equal(x[..., 0], x[..., 1])  # grayscale replicated
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    assert x.max() == pytest.approx(1.0) and x.min() == 0.0  # full ink/background range
    xt, yt = next(iter(digits.train))
    _check_batch(xt, yt, 32, 10)
    # Training-set statistics: gray, so equal per channel, and plausible.
    assert digits.mean[0] == digits.mean[1] == digits.mean[2]
    assert 0.2 < digits.mean[0] < 0.4 and 0.2 < digits.std[0] < 0.45


def test_digits_split_does_not_depend_on_seed(digits):
    other = data.load_dataset(DataConfig(batch_size=256, seed=123))
    for a, b in ((digits.val, other.val), (digits.test, other.test)):
        xa, ya = _collect(a)
        xb, yb = _collect(b)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Same training examples too (order and augmentation differ): compare label counts
    # and the augmentation-free pixel sums.
    plain = [data.load_dataset(DataConfig(batch_size=2048, seed=s, augment="none")) for s in (0, 123)]
    (x0, y0), (x1, y1) = (_collect(p.train) for p in plain)
    np.testing.assert_array_equal(np.bincount(y0), np.bincount(y1))
    np.testing.assert_allclose(np.sort(x0.sum(axis=(1, 2, 3))), np.sort(x1.sum(axis=(1, 2, 3))), rtol=1e-6)
    assert not np.array_equal(y0, y1)  # shuffled by seed


def test_training_pipeline_is_repeatable_by_seed():
    def first_batch(seed):
        ds = data.load_dataset(DataConfig(batch_size=32, seed=seed))
        x, y = next(iter(ds.train))
        return x.numpy(), y.numpy()

    a, b, c = first_batch(5), first_batch(5), first_batch(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_drop_remainder_only_on_train():
    ds = data.load_dataset(DataConfig(batch_size=500, drop_remainder=True, augment="none"))
    assert [int(y.shape[0]) for _, y in ds.train] == [500, 500]  # 1257 -> 2 full batches
    assert sum(int(y.shape[0]) for _, y in ds.test) == 360  # eval keeps every example


# -------------------------------------------------------------------- TFDS


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_tfds_metadata(root, name, split_sizes, label_names=None):
    """A prepared-looking TFDS data_dir: metadata (names, split sizes), no records."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=root)
    if label_names:
        builder.info.features["label"].names = label_names
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
        for split, n in split_sizes.items()]))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
    return root


@pytest.fixture(scope="module")
def tfds_metadata(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds_meta"))
    _write_tfds_metadata(root, "cifar10", {"train": 50000, "test": 10000}, CIFAR10_NAMES)
    _write_tfds_metadata(root, "tf_flowers", {"train": 3670})
    return root


def _fake_examples(n, shapes):
    """n uint8 images (shapes cycled) with labels 0, 1, 2, ..."""
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, size=shapes[i % len(shapes)], dtype=np.uint8) for i in range(n)]


@pytest.fixture
def mocked_tfds(tfds_metadata):
    """mock_data serving 1 example per 1000 (cifar10) or per 100 (tf_flowers) of the
    requested, sliced split; yields the list of requested split strings."""
    import tensorflow_datasets as tfds

    requested = []

    def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
        del read_config, kwargs
        requested.append(split)
        if self.name == "cifar10":
            n, shapes = self.info.splits[split].num_examples // 1000, [(32, 32, 3)]
        else:
            n, shapes = self.info.splits[split].num_examples // 100, [(20, 30, 3), (41, 17, 3)]
        images = _fake_examples(n, shapes)
        assert decoders, "images are decoded by the pipeline, not by TFDS"
        encoded = [tf.io.encode_png(im).numpy() for im in images]
        return tf.data.Dataset.from_tensor_slices(
            {"image": encoded, "label": np.arange(n, dtype=np.int64) % 5, "id": [b"x"] * n})

    with tfds.testing.mock_data(data_dir=tfds_metadata, policy=tfds.testing.MockPolicy.USE_FILES,
                                as_dataset_fn=as_dataset_fn):
        yield requested


def test_tfds_cifar10_default_split(mocked_tfds):
    ds = data.load_dataset(DataConfig(dataset="cifar10", batch_size=8))
    assert sorted(mocked_tfds) == sorted(["train[:45000]", "train[45000:]", "test"])
    assert (ds.num_train, ds.num_val, ds.num_test) == (45000, 5000, 10000)  # He et al. 45k/5k
    assert ds.class_names == CIFAR10_NAMES
    assert ds.image_size == 32
    assert (ds.mean, ds.std) == data.KNOWN_STATS["cifar10"]
    x, y = next(iter(ds.train))
    _check_batch(x, y, 32, 10)
    assert x.shape[0] == 8
    # The served examples follow the slices: 45 / 5 / 10 (one per thousand).
    assert len(_collect(ds.train)[1]) == 45
    assert len(_collect(ds.val)[1]) == 5
    xt, yt = _collect(ds.test)
    assert len(yt) == 10 and yt.tolist() == [0, 1, 2, 3, 4] * 2
    # eval images are the stored pixels / 255, unchanged
    np.testing.assert_allclose(xt, np.stack(_fake_examples(10, [(32, 32, 3)])) / 255.0, atol=1e-6)


def test_tfds_custom_splits_and_prefix(mocked_tfds):
    ds = data.load_dataset(DataConfig(
        dataset="tfds:cifar10", train_split="train[:2000]", val_split="test[:3000]",
        test_split="none", batch_size=4, image_size=24, augment="inception_crop"))
    assert sorted(mocked_tfds) == ["test[:3000]", "train[:2000]"]
    assert (ds.num_train, ds.num_val, ds.num_test) == (2000, 3000, 0)
    assert ds.test is None and ds.name == "tfds:cifar10"
    x, y = next(iter(ds.train))
    _check_batch(x, y, 24, 10)
    assert len(_collect(ds.val)[1]) == 3


def test_tfds_unknown_split_is_data_error(mocked_tfds):
    with pytest.raises(data.DataError, match=r"'validation'.*cifar10.*--val_split"):
        data.load_dataset(DataConfig(dataset="cifar10", val_split="validation"))


def test_tfds_variable_size_images_default_224(mocked_tfds):
    ds = data.load_dataset(DataConfig(dataset="tf_flowers", batch_size=16, augment="bit"))
    assert sorted(mocked_tfds) == ["train[80%:90%]", "train[90%:]", "train[:80%]"]
    assert (ds.num_train, ds.num_val, ds.num_test) == (2936, 367, 367)
    assert ds.image_size == 224 and len(ds.class_names) == 5
    # statistics of the (uniform random) training pixels as the pipeline serves them,
    # i.e. upscaled (smoothed) so the shorter side is 256 (bit's resize size)
    assert all(0.45 < m < 0.55 for m in ds.mean) and all(0.1 < s < 0.29 for s in ds.std)
    x, y = next(iter(ds.train))
    _check_batch(x, y, 224, 5)
    xv, yv = _collect(ds.val)
    assert xv.shape == (3, 224, 224, 3)


def test_tfds_absent_and_not_downloadable(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def no_network(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError) as info:
        data.load_dataset(DataConfig(dataset="tfds:cifar10", data_dir=str(empty)))
    message = str(info.value)
    assert "'cifar10'" in message and f"--data_dir={empty}" in message
    assert "tfds build cifar10" in message and "ConnectionError" in message
    assert "\n" not in message
    assert isinstance(info.value.__cause__, ConnectionError)
    assert isinstance(info.value, ValueError)


def _tfds_missing_module():
    return ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")


def _tfds_http_404():
    from tensorflow_datasets.core.download import util

    return util.DownloadError("Failed to get url https://example.org/cifar-10-binary.tar.gz. HTTP code: 404.")


@pytest.mark.parametrize("make_error, reason", [
    (_tfds_missing_module, "the Python module 'importlib_resources' it needs is not installed"),
    (_tfds_http_404, "its download URL was not found (HTTP 404"),
    (lambda: OSError("[Errno 28] No space left on device"), "the download or preparation failed"),
])
def test_tfds_download_failure_names_the_reason(tmp_path, monkeypatch, make_error, reason):
    """Each kind of failure says which fix applies, still in one line with the offline way."""
    import tensorflow_datasets as tfds

    error = make_error()

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(data.DataError) as info:
        data.load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    message = str(info.value)
    assert reason in message and type(error).__name__ in message and "\n" not in message
    assert "'cifar10'" in message and f"--data_dir={tmp_path}" in message and "tfds build cifar10" in message
    assert info.value.__cause__ is error


def test_tfds_download_gets_as_far_as_the_network(tmp_path, monkeypatch):
    """A real `download_and_prepare` (mnist) imports all it needs and fails only on connecting.

    Every proxy variable points at a closed localhost port, so the first
    connection is refused at once with or without network and nothing is
    fetched; the bounded retries make that a few seconds, not tfds's ~204 s.
    """
    import requests
    from tensorflow_datasets.core.download import downloader

    assert isinstance(downloader.MAX_RETRIES, int), "tfds changed: update sources.tfds_download_retries"
    retries_before = downloader.MAX_RETRIES
    (port,) = free_ports(1)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(data.DataError) as info:
        data.load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    seconds = time.monotonic() - start
    message = str(info.value)
    assert "no network connection" in message and "through the proxy" in message, message
    assert "'mnist'" in message and f"--data_dir={tmp_path}" in message and "tfds build mnist" in message
    assert "\n" not in message
    cause = info.value.__cause__
    assert isinstance(cause, requests.exceptions.ConnectionError) and f"port={port}" in str(cause)
    link = cause
    while link is not None:  # requests and urllib3 wrap the refused connection: no import error inside
        assert not isinstance(link, ImportError)
        link = link.__cause__ or link.__context__
    assert seconds < 20, f"an unreachable download took {seconds:.0f}s to fail"
    assert downloader.MAX_RETRIES == retries_before
    assert not os.path.exists(tmp_path / "mnist" / "3.0.1")


def test_unknown_tfds_name_is_data_error():
    with pytest.raises(data.DataError, match=r"Unknown dataset 'cifar11'.*cifar10"):
        data.load_dataset(DataConfig(dataset="cifar11"))


# ----------------------------------------------------------------- folders


def _save(path, fmt, size=(20, 14), color=(200, 30, 90), frames=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    if fmt == "GIF" and frames > 1:
        im.save(path, format=fmt, save_all=True,
                append_images=[Image.new("RGB", size, (0, 0, 0))] * (frames - 1))
    else:
        im.save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 5 images (PNG/JPEG/BMP/GIF, mixed case, mixed sizes) + 2 bad files."""
    root = tmp_path / "imgs"
    formats = [("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.BMP", "BMP"), ("d.gif", "GIF"), ("e.JPEG", "JPEG")]
    for k, cls in enumerate(["cat", "dog", "fish"]):
        for i, (name, fmt) in enumerate(formats):
            _save(root / cls / name, fmt, size=(16 + 8 * i, 30 - 2 * i), color=(80 * k, 20 * i, 100),
                  frames=2 if fmt == "GIF" else 1)
    (root / "dog" / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_folder_skips_bad_files_and_splits(image_folder, caplog):
    config = DataConfig(dataset=f"folder:{image_folder}", image_size=16, batch_size=4,
                        val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        ds = data.load_dataset(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    skipped = [w for w in warnings if "Skipping" in w]
    assert len(skipped) == 1
    assert "2 unreadable or non-image" in skipped[0]
    assert os.path.join("dog", "broken.jpg") in skipped[0] and os.path.join("cat", "notes.txt") in skipped[0]
    assert ds.num_skipped == 2
    assert ds.class_names == ["cat", "dog", "fish"]
    assert (ds.num_train, ds.num_val, ds.num_test) == (9, 3, 3)
    assert ds.image_size == 16
    seen = []
    for split, n in ((ds.train, 9), (ds.val, 3), (ds.test, 3)):
        x, y = _collect(split)
        assert x.shape == (n, 16, 16, 3) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        seen.extend(y.tolist())
    assert sorted(seen) == [0] * 5 + [1] * 5 + [2] * 5  # every good file exactly once
    # val/test are stratified: 3 classes, 3 examples -> one of each
    assert sorted(_collect(ds.val)[1].tolist()) == [0, 1, 2]
    assert sorted(_collect(ds.test)[1].tolist()) == [0, 1, 2]
    assert all(0.0 <= m <= 1.0 for m in ds.mean) and all(s >= 0.0 for s in ds.std)
    # Another seed gives the same (exact, stratified) split sizes.
    other = data.load_dataset(dataclasses.replace(config, seed=1))
    assert (other.num_train, other.num_val, other.num_test) == (9, 3, 3)
    assert sorted(_collect(other.val)[1].tolist()) == [0, 1, 2]


def test_folder_first_gif_frame_and_colors(tmp_path):
    root = tmp_path / "gifs"
    _save(root / "red" / "x.gif", "GIF", size=(8, 8), color=(255, 0, 0), frames=3)
    _save(root / "blue" / "y.png", "PNG", size=(8, 8), color=(0, 0, 255))
    ds = data.load_dataset(DataConfig(dataset=f"folder:{root}", image_size=8, augment="none",
                                      val_fraction=0.0, test_fraction=0.0, batch_size=2))
    x, y = _collect(ds.train)
    assert ds.val is None and ds.test is None
    red = x[list(y).index(ds.class_names.index("red"))]
    np.testing.assert_allclose(red.mean(axis=(0, 1)), [1.0, 0.0, 0.0], atol=0.02)  # frame 0, not black


def test_folder_strict_images_raises_naming_files(image_folder):
    with pytest.raises(data.DataError, match=r"broken\.jpg") as info:
        data.load_dataset(DataConfig(dataset=f"folder:{image_folder}", strict_images=True))
    assert "notes.txt" in str(info.value) and "2 unreadable" in str(info.value)


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_folder_presplit(tmp_path, val_name):
    root = tmp_path / "split"
    counts = {"train": 4, val_name: 2, "test": 3}
    for split, n in counts.items():
        for cls in ("ants", "bees"):
            for i in range(n):
                _save(root / split / cls / f"{i}.png", "PNG", size=(10 + i, 12))
    ds = data.load_dataset(DataConfig(dataset=f"folder:{root}", image_size=12, batch_size=3))
    assert ds.class_names == ["ants", "bees"]
    assert (ds.num_train, ds.num_val, ds.num_test) == (8, 4, 6)
    assert ds.num_skipped == 0
    for split, n in ((ds.train, 8), (ds.val, 4), (ds.test, 6)):
        x, y = _collect(split)
        assert x.shape == (n, 12, 12, 3)
        assert np.bincount(y).tolist() == [n // 2, n // 2]


def test_folder_empty_class_is_data_error(image_folder):
    (image_folder / "zebra").mkdir()
    with pytest.raises(data.DataError, match=r"zebra.*empty"):
        data.load_dataset(DataConfig(dataset=f"folder:{image_folder}"))


def test_folder_class_with_only_bad_files_is_data_error(tmp_path):
    _save(tmp_path / "ok" / "a.png", "PNG")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\x00" * 64)
    with pytest.raises(data.DataError, match=r"bad has no readable images"):
        data.load_dataset(DataConfig(dataset=f"folder:{tmp_path}"))


def test_folder_missing_or_without_classes_is_data_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(data.DataError, match=r"nope does not exist"):
        data.load_dataset(DataConfig(dataset=f"folder:{missing}"))
    with pytest.raises(data.DataError, match=r"no class subfolders"):
        data.load_dataset(DataConfig(dataset=f"folder:{tmp_path}"))


def test_stratified_split_exact_sizes_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    test, val, train = folder.stratified_split(labels, [0.1, 0.2], seed=3)
    assert (len(test), len(val), len(train)) == (10, 20, 70)
    assert len(set(test) | set(val) | set(train)) == 100
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [2, 4, 6, 8])
    again = folder.stratified_split(labels, [0.1, 0.2], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((test, val, train), again))


# ----------------------------------------------------------- augmentations


def _image(h=40, w=30, seed=0):
    return tf.constant(np.random.default_rng(seed).random((h, w, 3)), tf.float32)


@pytest.mark.parametrize("name", sorted(augment.AUGMENTATIONS))
@pytest.mark.parametrize("hw", [(40, 30), (32, 32)])
def test_augmentation_shape_range_determinism(name, hw):
    fn = augment.AUGMENTATIONS[name](32, 36)
    image = _image(*hw)
    seeds = [tf.constant([i, 7], tf.int64) for i in range(6)]
    outs = [fn(image, s).numpy() for s in seeds]
    for out in outs:
        assert out.shape == (32, 32, 3) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(outs[0], fn(image, seeds[0]).numpy())
    distinct = len({o.tobytes() for o in outs})
    assert distinct == 1 if name == "none" else distinct > 1


def test_cifar_augmentation_is_a_padded_crop_maybe_flipped():
    image = _image(32, 32).numpy()
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
    candidates = [padded[i:i + 32, j:j + 32] for i, j in itertools.product(range(9), range(9))]
    candidates += [c[:, ::-1] for c in candidates]
    fn = augment.cifar(32)
    for s in range(5):
        out = fn(tf.constant(image), tf.constant([s, 1], tf.int64)).numpy()
        assert any(np.array_equal(out, c) for c in candidates)


def test_eval_transform_center_crop_and_resize():
    image = _image(40, 40)
    out = augment.eval_transform(32, 40)(image).numpy()
    np.testing.assert_array_equal(out, image.numpy()[4:36, 4:36])
    out = augment.eval_transform(24)(_image(40, 30)).numpy()
    assert out.shape == (24, 24, 3)
    flat = augment.eval_transform(32, 48)(tf.fill([40, 40, 3], 0.25)).numpy()
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)
    assert flat.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="smaller than image_size"):
        augment.eval_transform(32, 16)


def test_get_augmentation_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="inception_crop"):
        augment.get_augmentation("autoaugment", 32)


def test_mixup_blends_batch_deterministically():
    images = tf.constant(np.random.default_rng(0).random((8, 4, 4, 3)), tf.float32)
    labels = tf.one_hot(tf.range(8) % 4, 4)
    seed = tf.constant([1, 2], tf.int64)
    mx, my = augment.mixup(images, labels, 0.4, seed)
    mx2, my2 = augment.mixup(images, labels, 0.4, seed)
    np.testing.assert_array_equal(mx.numpy(), mx2.numpy())
    np.testing.assert_array_equal(my.numpy(), my2.numpy())
    np.testing.assert_allclose(my.numpy().sum(-1), 1.0, atol=1e-6)
    assert mx.shape == images.shape and my.shape == labels.shape
    assert not np.allclose(mx.numpy(), images.numpy())
    # every mixed label has at most two classes, weights lam and 1 - lam shared by the batch
    lam = np.sort(my.numpy(), axis=-1)[:, -1]
    assert np.all(lam >= 0.5 - 1e-6)
    same, _ = augment.mixup(images, labels, 0.0, seed)
    assert same is images
