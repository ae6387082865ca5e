"""pipeline.precision: dtype names, and the warning for dtypes this CPU only emulates."""

from __future__ import annotations

import logging
import os
import platform

import pytest
import torch

from pipeline import precision
from pipeline.models.text_encoder import TextEncoder, build_tiny_text_encoder


def test_dtype_names():
    assert precision.torch_dtype("float32") is torch.float32
    assert precision.torch_dtype("bf16") is torch.bfloat16
    assert precision.torch_dtype("fp16") is torch.float16
    assert precision.torch_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*float32, bfloat16, float16"):
        precision.torch_dtype("float8")


def _cpu_flags() -> set[str] | None:
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        return None
    with open("/proc/cpuinfo") as f:
        line = next((ln for ln in f if ln.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def test_native_bf16_follows_the_instruction_set():
    """oneDNN takes bf16 matmuls on x86 from AVX-512 (BW, VL, DQ) up (or AVX2 with the newer
    AVX-NE-CONVERT); an AVX2-only CPU such as the AMD EPYC of some of our sessions emulates them
    at about 1 GFLOP/s."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("not an x86 Linux machine: no /proc/cpuinfo flags to compare with")
    if {"avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert precision.cpu_has_native_bf16()
    elif "avx_ne_convert" not in flags:
        assert not precision.cpu_has_native_bf16()
    else:
        pytest.skip("AVX2 with AVX-NE-CONVERT: oneDNN's own choice, nothing to compare with")


def test_slow_dtypes():
    native = precision.cpu_has_native_bf16()
    assert precision.is_slow_on(torch.bfloat16, "cpu") is (not native)
    assert precision.is_slow_on(torch.float16, "cpu")
    assert not precision.is_slow_on(torch.float32, "cpu")
    assert not precision.is_slow_on(torch.float16, torch.device("cuda", 0))
    assert not precision.is_slow_on(torch.bfloat16, "cuda")
    assert precision.fast_dtypes(("fp32", "bf16", "fp16")) == ["fp32"] + (
        ["bf16"] if native else []
    )
    assert precision.fast_dtypes((torch.bfloat16, torch.float16), "cuda") == [
        torch.bfloat16,
        torch.float16,
    ]


@pytest.mark.parametrize("native", [False, True])
def test_warns_once_where_bf16_is_emulated(monkeypatch, caplog, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="pipeline.precision"):
        for _ in range(3):
            assert precision.warn_if_slow(torch.bfloat16, "cpu", "training") is (not native)
        assert not precision.warn_if_slow(torch.float32, "cpu", "training")
        assert not precision.warn_if_slow(torch.bfloat16, "cuda", "training")
    warnings = [r for r in caplog.records if "no native bfloat16 matmul" in r.getMessage()]
    assert len(warnings) == (0 if native else 1)
    if not native:
        assert warnings[0].getMessage().startswith("training runs in bfloat16 on a CPU")


def test_a_model_loaded_in_bf16_on_such_a_cpu_says_so(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "_warned", set())
    tiny = build_tiny_text_encoder(str(tmp_path / "t5"), d_model=32)
    with caplog.at_level(logging.WARNING):
        enc = TextEncoder.from_pretrained(tiny, dtype="bfloat16")
    assert next(enc.model.parameters()).dtype == torch.bfloat16  # it still does what was asked
    assert "the text encoder (T5) runs in bfloat16" in caplog.text
