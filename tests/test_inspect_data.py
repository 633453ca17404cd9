"""Data checks (`pipeline.inspect_data`, the folder check at the start of training) and balanced sampling.

Generated folders: a photo copied from train into test is found exactly, a
resized JPEG re-encoding of another is found as a near duplicate (and noise
images are not), a 10:1 imbalance is reported with the --class_weight hint,
an EXIF-rotated JPEG is decoded upright (PIL's exif_transpose as the oracle),
the scan cache is used by the next run, and balanced sampling draws classes
equally with the unbalanced epoch's length.
"""
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import data
from pipeline.config import DataConfig
from pipeline.data import exif, inspect_scan, inspection
from tests.helpers import make_image_folder, run_cli


@pytest.fixture(autouse=True)
def _fresh_process_memo():
    """Each test sees what a new process sees (only the disk cache it names survives)."""
    inspection.clear_memo()
    yield
    inspection.clear_memo()


def _photo(size, seed):
    """A smooth, photo-like RGB image (a low-resolution random field, bilinearly enlarged)."""
    low = np.random.default_rng(seed).integers(0, 256, (5, 5, 3)).astype("uint8")
    return Image.fromarray(low).resize((size, size), Image.BILINEAR)


def _leaky_folder(tmp_path):
    """train/ and test/ of noise images, plus a copied file and a resized re-encoded photo in test."""
    root = tmp_path / "photos"
    make_image_folder(root / "train", per_class=8, size=16, seed=0)
    make_image_folder(root / "test", per_class=3, size=16, seed=1)
    shutil.copy(root / "train" / "red" / "0.png", root / "test" / "blue" / "copied.png")
    _photo(48, seed=7).save(root / "train" / "green" / "photo.png")
    _photo(48, seed=7).resize((30, 30), Image.LANCZOS).save(root / "test" / "green" / "photo_small.jpg",
                                                            quality=80)
    return root


def test_duplicates_across_splits_exact_and_near(tmp_path):
    root = _leaky_folder(tmp_path)
    config = DataConfig(dataset=f"folder:{root}")
    report = inspection.inspect_dataset(config, str(tmp_path / "out"), progress=False)
    across = report["exact_duplicates"]["across"]
    assert across["groups"] == 1
    assert sorted(across["listed"][0]["files"]) == ["test: test/blue/copied.png", "train: train/red/0.png"]
    near = report["near_duplicates"]
    assert near["pairs"] == 1 and near["max_bits"] == 6  # the photo, and none of the 33 x 9 noise pairs
    pair = near["listed"][0]
    assert {pair["a"], pair["b"]} == {"train: train/green/photo.png", "test: test/green/photo_small.jpg"}
    assert pair["distance"] <= 6
    assert any("train/red/0.png" in w and "test/blue/copied.png" in w for w in report["warnings"])
    assert report["splits"]["test"]["formats"] == {"PNG": 10, "JPEG": 1}
    assert report["splits"]["train"]["width"] == {"min": 16, "median": 16, "max": 48}
    on_disk = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert on_disk["exact_duplicates"] == report["exact_duplicates"]
    assert "test/blue/copied.png" in (tmp_path / "out" / "data_report.md").read_text()
    # 0 bits: only identical hashes count, and the re-encoded photo is no longer a pair.
    strict = inspection.inspect_dataset(DataConfig(dataset=f"folder:{root}", near_duplicate_bits=0),
                                        progress=False)
    assert strict["near_duplicates"]["pairs"] == 0 or strict["near_duplicates"]["listed"][0]["distance"] == 0


def test_strict_data_makes_leakage_an_error_naming_the_files(tmp_path):
    root = _leaky_folder(tmp_path)
    out = tmp_path / "out"
    proc = run_cli("inspect_data", f"--dataset=folder:{root}", f"--output_dir={out}", "--strict_data",
                   f"--data_cache_dir={tmp_path / 'cache'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --strict_data") and "test/blue/copied.png" in error
    assert (out / "data_report.md").exists() and (out / "class_counts.png").exists()


def test_ten_to_one_imbalance_is_reported_with_the_class_weight_hint(tmp_path):
    root = tmp_path / "skewed"
    make_image_folder(root, classes=("many",), per_class=30, size=8, seed=0)
    make_image_folder(root, classes=("few",), per_class=3, size=8, seed=1)
    report = inspection.inspect_dataset(DataConfig(dataset=f"folder:{root}", val_fraction=0.0,
                                                   test_fraction=0.0), str(tmp_path / "out"), progress=False)
    assert report["splits"]["train"]["class_counts"] == {"few": 3, "many": 30}
    assert report["imbalance"] == {"largest": ["many", 30], "smallest": ["few", 3], "ratio": 10.0}
    assert any("10:1" in w and "--class_weight=balanced" in w for w in report["warnings"])
    png = Image.open(tmp_path / "out" / "class_counts.png")
    assert png.width > 100 and png.height > 100


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_pils_exif_transpose(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3)).astype("uint8")
    im = Image.fromarray(stored)
    tags = im.getexif()
    tags[exif.ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=tags.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(exif.upright_array(stored, orientation), expected)
    np.testing.assert_array_equal(exif.upright(stored, orientation).numpy(), expected)
    assert inspect_scan.describe_bytes(buf.getvalue()).orientation == orientation


def test_exif_rotated_phone_photo_is_decoded_upright_and_counted(tmp_path):
    root = tmp_path / "phone"
    upright = np.zeros((16, 16, 3), "uint8")
    upright[:8, :, 0] = 255  # red sky on top
    upright[8:, :, 2] = 255  # blue sea below
    im = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # stored turned, as a phone does
    tags = im.getexif()
    tags[exif.ORIENTATION_TAG] = 6  # "turn 90 degrees clockwise to show"
    os.makedirs(root / "sea")
    im.save(root / "sea" / "portrait.jpg", quality=95, exif=tags.tobytes())
    make_image_folder(root, classes=("grass",), per_class=2, size=16)
    oracle = np.asarray(ImageOps.exif_transpose(Image.open(root / "sea" / "portrait.jpg")), np.float32) / 255
    assert oracle[:8, :, 0].mean() > 0.9 and oracle[8:, :, 2].mean() > 0.9

    ds = data.load_dataset(DataConfig(dataset=f"folder:{root}", image_size=16, augment="none",
                                      val_fraction=0.0, test_fraction=0.0, batch_size=8))
    x, y = next(iter(ds.train.as_numpy_iterator()))
    photo = x[list(y).index(ds.class_names.index("sea"))]
    np.testing.assert_allclose(photo, oracle, atol=0.06)  # JPEG noise only: not sideways
    report = inspection.inspect_dataset(DataConfig(dataset=f"folder:{root}", val_fraction=0.0,
                                                   test_fraction=0.0), progress=False)
    assert report["exif_rotated"] == 1


def test_the_scan_cache_is_used_by_the_next_run(tmp_path):
    root = tmp_path / "cached"
    make_image_folder(root, per_class=5, size=8)
    config = DataConfig(dataset=f"folder:{root}", data_cache_dir=str(tmp_path / "cache"))
    first = inspection.inspect_dataset(config, progress=False)
    assert first["scan"]["scanned"] == 15 and not first["scan"].get("report_from_cache")
    inspection.clear_memo()  # a new process: only the disk cache is left
    second = inspection.inspect_dataset(config, progress=False)
    assert second["scan"]["scanned"] == 0 and second["scan"]["report_from_cache"]
    assert second["splits"] == first["splits"]
    inspection.clear_memo()
    changed = root / "red" / "0.png"
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    third = inspection.inspect_dataset(config, progress=False)
    assert third["scan"]["scanned"] == 1 and not third["scan"].get("report_from_cache")


def test_digits_are_inspected_from_their_decoded_images():
    report = inspection.inspect_dataset(DataConfig(dataset="digits"), progress=False)
    assert {s: v["images"] for s, v in report["splits"].items()} == {"train": 1257, "val": 180, "test": 360}
    assert report["splits"]["train"]["width"]["median"] == 32
    assert report["splits"]["train"]["channels"] == {"3": 1257}
    assert report["imbalance"]["ratio"] < 1.2


def test_balanced_sampling_draws_classes_equally_with_the_usual_epoch_length(tmp_path):
    root = tmp_path / "skewed"
    make_image_folder(root, classes=("many",), per_class=30, size=8, seed=0)
    make_image_folder(root, classes=("few",), per_class=3, size=8, seed=1)
    config = DataConfig(dataset=f"folder:{root}", image_size=8, augment="none", val_fraction=0.0,
                        test_fraction=0.0, batch_size=11, balanced_sampling=True)
    ds = data.load_dataset(config)
    labels = []
    for epoch in range(20):
        epoch_labels = np.concatenate([y for _, y in ds.stream.epoch(epoch).as_numpy_iterator()])
        assert len(epoch_labels) == 33  # the unbalanced epoch's 3 batches of 11
        labels.append(epoch_labels)
    few = float(np.mean(np.concatenate(labels) == ds.class_names.index("few")))
    assert abs(few - 0.5) < 0.08, few  # 660 draws: 4 standard deviations is 0.078
    assert any((a != b).any() for a, b in zip(labels, labels[1:]))  # every epoch draws anew
    again = np.concatenate([y for _, y in data.load_dataset(config).stream.epoch(3).as_numpy_iterator()])
    np.testing.assert_array_equal(again, labels[3])  # and reproducibly (a pure function of seed, epoch)
    plain = data.load_dataset(DataConfig(**{**config.__dict__, "balanced_sampling": False}))
    plain_labels = np.concatenate([y for _, y in plain.stream.epoch(0).as_numpy_iterator()])
    assert np.mean(plain_labels == ds.class_names.index("few")) == pytest.approx(3 / 33)


def test_training_on_a_folder_writes_and_links_the_data_report(tmp_path):
    from pipeline import config as cfg
    from pipeline import training
    from pipeline.reporting.run_report import write_run_report

    root = _leaky_folder(tmp_path)
    model_dir = tmp_path / "run"
    run = cfg.RunConfig(
        model_dir=str(model_dir),
        data=cfg.DataConfig(dataset=f"folder:{root}", image_size=8, batch_size=16, augment="none",
                            data_cache_dir=str(tmp_path / "cache")),
        model=cfg.ModelConfig(name="resnet20", width_multiplier=0.25),
        train=cfg.TrainConfig(epochs=1, steps_per_epoch=1, tensorboard=False, verbose=0))
    training.train(run)
    report = json.loads((model_dir / "data_report" / "data_report.json").read_text())
    assert report["exact_duplicates"]["across"]["groups"] == 1
    assert (model_dir / "data_report" / "class_counts.png").exists()
    md, _ = write_run_report(str(model_dir), evaluate=False, load_model=False, read_signatures=False)
    assert "[data_report.md](data_report/data_report.md)" in open(md, encoding="utf-8").read()
    assert os.listdir(tmp_path / "cache")  # the scan is cached for the next training
    strict = cfg.DataConfig(**{**run.data.__dict__, "strict_data": True})  # the hook, without a 2nd run
    with pytest.raises(data.DataError, match=r"--strict_data.*test/blue/copied\.png"):
        inspection.check_before_training(strict, str(tmp_path / "strict"))
    assert inspection.check_before_training(run.data, str(tmp_path / "again"), resume=True) is None
