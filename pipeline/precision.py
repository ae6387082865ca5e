"""Compute dtypes by name, and whether this machine runs them at speed.

On a GPU bf16 and fp16 are the fast dtypes. On a CPU it depends on the instruction set:
PyTorch hands bf16 matmuls to oneDNN only where the CPU has AVX-512 (or Arm's bf16 extension);
with AVX2 alone (many cloud VMs, AMD Zen 2/3) they take PyTorch's scalar fallback. Measured on
such a 2-core AMD EPYC: a 2048^3 fp32 matmul ran at 148 GFLOP/s, bf16 at about 1 GFLOP/s, and a
GPT-B-sized ``F.linear`` at 75 against 12.5 GFLOP/s. fp16 matmuls are emulated on every CPU here
(about 3 GFLOP/s on an AVX-512 machine). A job that is asked for such a dtype on such a CPU still
runs it, but says so once, so that nobody waits hours for what fp32 does in minutes.
"""

from __future__ import annotations

import functools

import torch

from pipeline.log import get_logger

log = get_logger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or ``fp32`` / ``bf16`` / ``fp16``) as a dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = _SHORT.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU's bf16 matmuls go through oneDNN (AVX-512, AMX, Arm bf16) rather than
    PyTorch's scalar fallback."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or stripped build: judge by the ISA
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def is_slow_on(dtype: torch.dtype, device: torch.device | str) -> bool:
    """True where ``dtype`` matmuls are emulated on ``device``: fp16 on any CPU, bf16 on a CPU
    without native bf16."""
    if torch.device(device).type != "cpu":
        return False
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not cpu_has_native_bf16()


def fast_dtypes(names, device: torch.device | str = "cpu") -> list:
    """The dtypes (names or ``torch.dtype``) of ``names`` that ``device`` runs natively, in order:
    what a benchmark can time without waiting on an emulated matmul."""
    return [n for n in names if not is_slow_on(torch_dtype(n), device)]


_warned: set[tuple[str, torch.dtype]] = set()


def warn_if_slow(dtype: torch.dtype, device: torch.device | str, what: str) -> bool:
    """Log once per (``what``, dtype) that ``dtype`` is emulated on this CPU; returns whether it is."""
    if not is_slow_on(dtype, device):
        return False
    if (what, dtype) not in _warned:
        _warned.add((what, dtype))
        isa = torch.backends.cpu.get_cpu_capability()
        log.warning(
            "%s runs in %s on a CPU (%s) that has no native %s matmul: PyTorch emulates it, "
            "10-100x slower than float32 here. Use float32 on this machine.",
            what,
            str(dtype).removeprefix("torch."),
            isa,
            str(dtype).removeprefix("torch."),
        )
    return True


def exact_fp32_on_cuda(device: str | torch.device) -> bool:
    """Turn TF32 off for this process's cuDNN convolutions and CUDA matmuls when the VQ runs on
    a GPU; returns whether it did (pretokenize workers, the tokenizer evaluation job).

    PyTorch lets cuDNN convolutions compute float32 in TF32 by default (a 10-bit mantissa), so a
    GPU worker with ``vq.dtype: float32`` would find other nearest codes than a CPU worker
    writing into the same output, and an evaluation other codes than pretokenize wrote. In bf16
    runs the last 1x1 conv and the code search stay fp32 (see ``PretokenizeWorker``) to keep
    their inputs unrounded, which TF32 would undo; bf16 convolutions themselves are not
    affected. The setting is process-wide: T5's float32 matmuls in this worker are exact too
    (CUDA matmuls already default to that). It uses the
    ``fp32_precision`` API, which torch 2.9+ prefers to the ``allow_tf32`` flags (after it,
    torch refuses to read ``torch.backends.cudnn.allow_tf32``; nothing here does).
    """
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    return True
