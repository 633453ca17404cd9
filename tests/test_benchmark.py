"""`python -m pipeline.benchmark` runs and prints parseable JSON lines (not how fast)."""
import json

import pytest

from tests.helpers import run_cli

TINY = ["--batch_size=4", "--steps=2", "--warmup_steps=1", "--input_images=8"]
STAMP_KEYS = {"peak_rss_mb", "load_1min"}
THROUGHPUT_KEYS = {"images_per_second", "images_per_second_median_step", "step_ms_median",
                   "timed_steps", "seconds"} | STAMP_KEYS


def _lines(stdout):
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout
    return lines


def test_all_prints_machine_train_input_predict_lines():
    proc = run_cli("benchmark", "--what=all", "--model=resnet20", "--image_size=16", *TINY,
                   timeout=300)
    lines = _lines(proc.stdout)
    by_what = {}
    for line in lines:
        by_what.setdefault(line["what"], []).append(line)
    assert set(by_what) == {"machine", "train", "input", "input_over_train", "predict"}

    machine = by_what["machine"][0]
    assert {"cpu", "cpu_flags", "cores", "tensorflow", "keras", "native_bf16"} <= set(machine)

    train = by_what["train"][0]
    assert THROUGHPUT_KEYS <= set(train)
    assert train["model"] == "resnet20" and train["batch_size"] == 4 and train["image_size"] == 16
    assert train["precision"] in ("float32", "mixed_bfloat16", "mixed_float16")
    assert train["images_per_second"] > 0 and train["peak_rss_mb"] > 0

    inputs = by_what["input"]
    assert [(r["augment"], r.get("cache")) for r in inputs] == [("cifar", None), ("bit", False),
                                                                 ("bit", True)]
    for r in inputs:
        assert THROUGHPUT_KEYS <= set(r) and r["images_per_second"] > 0
    assert inputs[1]["image_size"] == 128 and inputs[1]["resize_size"] == 160

    assert by_what["input_over_train"][0]["ratio"] > 0

    predict = by_what["predict"][0]
    assert {"latency_p50_ms", "latency_p99_ms", "images_per_second", "batch1_p50_ms",
            "batch64_images_per_second"} | STAMP_KEYS <= set(predict)
    assert predict["latency_p99_ms"] >= predict["latency_p50_ms"] > 0


def test_unknown_model_is_a_one_line_error():
    proc = run_cli("benchmark", "--model=resnet21", check=False, timeout=120)
    assert proc.returncode != 0
    assert "resnet21" in proc.stderr


def test_random_source_and_summaries():
    from pipeline import config as cfg
    from pipeline import data
    from pipeline.perf import benchmarks as bench
    from pipeline.perf import synthetic

    ds = data.load_dataset(cfg.DataConfig(dataset=synthetic.random_spec(10, 8, 3), batch_size=4,
                                          augment="cifar", drop_remainder=True))
    assert ds.num_train == 10 and ds.image_size == 8 and len(ds.class_names) == 3
    images, labels = next(iter(ds.train))
    assert images.shape == (4, 8, 8, 3) and labels.shape == (4,)
    with pytest.raises(data.DataError, match="random:<examples>x<size>"):
        data.load_dataset(cfg.DataConfig(dataset="random:abc"))

    s = bench.summarize_steps(10, 2.0, [0.2] * 9 + [0.5], 8)
    assert s["images_per_second"] == 40.0 and s["images_per_second_median_step"] == 40.0
    assert synthetic.stored_size("bit", 128) == 160 and synthetic.stored_size("cifar", 32) == 32
    assert synthetic.default_augment("bit_m_r50x1", 128) == "bit"
    assert synthetic.default_augment("resnet20", 32) == "cifar"
