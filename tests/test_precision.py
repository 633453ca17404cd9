"""--precision=auto decision rule, and the policy actually applied."""
import keras
import pytest

from pipeline.training import precision


@pytest.mark.parametrize("caps,bf16,expected", [
    ([], False, "float32"),
    ([], True, "mixed_bfloat16"),
    ([(8, 0)], False, "mixed_float16"),
    ([(7, 0), (8, 6)], True, "mixed_float16"),
    ([(6, 1)], True, "float32"),
])
def test_auto_rule(caps, bf16, expected):
    assert precision.choose_precision("auto", gpu_caps=caps, has_bf16_cpu=bf16) == expected


def test_explicit_choice_is_kept_and_unknown_rejected():
    assert precision.choose_precision("float32", gpu_caps=[(8, 0)], has_bf16_cpu=True) == "float32"
    with pytest.raises(ValueError, match="Unknown precision"):
        precision.choose_precision("fp8", gpu_caps=[], has_bf16_cpu=False)


def test_cpu_flags_detection(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nmodel name\t: Some CPU 9000\n"
                    "flags\t\t: fpu sse2 avx512f avx512_bf16\nvmx flags\t: ept\n"
                    "processor: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    cpu = precision.read_cpuinfo(str(info))
    flags = cpu.flags
    assert precision.cpu_has_bf16(flags)
    assert cpu.model == "Some CPU 9000" and "ept" not in flags
    assert precision.read_cpuinfo(str(tmp_path / "missing")) == precision.CpuInfo(None, frozenset())
    assert not precision.cpu_has_bf16(frozenset({"avx2"}))


def test_apply_sets_the_global_policy():
    try:
        assert precision.apply_precision("mixed_float16") == "mixed_float16"
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
