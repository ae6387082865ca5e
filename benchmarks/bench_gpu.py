"""GPU figures for the real presets on one device: the checks only a GPU can do.

On one CUDA device (``--device cpu`` runs the same code with small settings; the tests do):

- limits: the bf16 matmul rate (8192^3 on a GPU) and the device memory copy bandwidth;
- training through the real engine (``pipeline.train.engine``: ZeRO-2 from
  ``configs/deepspeed/zero2.json``, DeepSpeed bf16, a group of one), text-to-image with 120
  caption tokens (one padded) at 256 px (16x16 grid) for each preset, and for the last preset
  also at 512 px (32x32, stage 2) and under ``torch.compile``: seconds per step (the best of
  ``--steps`` after warm-up), image tokens/s, MFU against the measured matmul rate and against
  the device's nominal dense bf16 peak, peak memory;
- decode: the last preset in bf16 with CFG (batch 1 and 8, each doubled), the static-cache
  sampler eager and compiled (``reduce-overhead``: CUDA graphs), ms per token against the time
  to read every weight once at the copy's bandwidth (reads + writes per second).

    python benchmarks/bench_gpu.py [--presets B,L,XL] [--batch 16] [--out benchmarks/RESULTS.md]

Not yet run on a GPU (none has been lent to us so far); the defaults are meant to fit a
15-minute device slot, most of it compiling. ``--out`` appends the tables to that file as a
section naming the device.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_model import _timeit  # noqa: E402
from bench_train import engine_step  # noqa: E402
from run_all import table  # noqa: E402

from pipeline.models.gpt import GPT, GPTConfig, decode_bytes_per_token, train_flops_per_sample  # noqa: E402
from pipeline.sample import Sampler, SamplingParams  # noqa: E402
from pipeline.train import engine  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), FLOP/s
NOMINAL_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10": 125e12}


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_BF16.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, repeat: int, warmup: int = 1) -> float:
    """``bench_model._timeit`` of ``fn`` followed by a device synchronize."""

    def synced():
        fn()
        _sync(device)

    return _timeit(synced, repeat=repeat, warmup=warmup)


def matmul_rate(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / _best(lambda: a @ b, device, repeat=10, warmup=3)


def copy_bandwidth(device: torch.device, mb: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    x = torch.empty(mb << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / _best(lambda: y.copy_(x), device, repeat=10, warmup=3)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_row(name: str, grid: int, batch: int, steps: int, compile: bool, device, peak, nominal):
    cfg = GPTConfig.from_name(name, grid_size=grid)
    _free(device)
    t0 = time.perf_counter()
    step = engine_step(cfg, "bf16", batch=batch, compile=compile)
    # warm-up: optimizer state, and a compiled model compiles again once that state exists
    t = _best(step, device, repeat=steps, warmup=3)
    warm = time.perf_counter() - t0 - steps * t
    flops = batch * train_flops_per_sample(cfg)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del step
    _free(device)
    return {
        "what": f"train GPT-{name} {grid * 16}px bf16 ZeRO-2"
        + (" torch.compile" if compile else ""),
        "batch": batch,
        "s_per_step": t,
        "image_tokens_per_s": batch * cfg.image_tokens / t,
        "mfu_measured": flops / t / peak,
        "mfu_nominal": flops / t / nominal if nominal else None,
        "peak_mem_GiB": mem,
        "setup_s": warm,
    }


def decode_rows(
    name: str, batches: tuple[int, ...], compile: bool, device, bandwidth
) -> list[dict]:
    cfg = GPTConfig.from_name(name)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a non-degenerate head
    model = model.to(device=device, dtype=torch.bfloat16)
    read_s = decode_bytes_per_token(model) / bandwidth  # the copy's reads + writes per second
    params = SamplingParams(cfg_scale=4.0, top_k=1000)
    rows = []
    for batch in batches:
        cond = torch.randn(batch, cfg.max_text_tokens, cfg.caption_dim, device=device)
        seeds = list(range(batch))
        modes = [None] + (
            ["reduce-overhead" if device.type == "cuda" else "default"] if compile else []
        )
        for mode in modes:
            sampler = Sampler(model, batch, cfg.grid_size, cfg=True, compile_mode=mode)
            if mode and not sampler.compile_mode:
                continue  # torch.compile unavailable here (the sampler said why)
            t = _best(
                lambda s=sampler, c=cond, r=seeds: s.sample(c, None, params, r), device, repeat=2
            )
            per_token = t / cfg.image_tokens
            rows.append(
                {
                    "what": f"decode GPT-{name} bf16 CFG "
                    + (f"compiled ({mode})" if mode else "eager"),
                    "batch": batch,
                    "ms_per_token": per_token * 1e3,
                    "x_weight_read": per_token / read_s,
                }
            )
    del model
    _free(device)
    return rows


def run(
    presets=("B", "L", "XL"),
    batch: int = 16,
    batch_512: int = 4,
    steps: int = 5,
    decode_batches=(1, 8),
    compile: bool = True,
    device: str = "cuda",
    matmul_n: int = 8192,
    copy_mb: int = 1024,
) -> list[dict]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (use --device cpu for a small run of the same code)")
    os.chdir(os.path.dirname(HERE))  # the engine reads configs/deepspeed/ relative to the repo
    engine.init_distributed()
    peak, bw, nominal = matmul_rate(dev, matmul_n), copy_bandwidth(dev, copy_mb), nominal_peak(dev)
    rows: list[dict] = [
        {
            "what": f"matmul {matmul_n}^3 bf16",
            "value": peak / 1e12,
            "unit": "TFLOP/s",
            "nominal": nominal / 1e12 if nominal else None,
        },
        {"what": "device copy (read + write)", "value": bw / 1e9, "unit": "GB/s"},
    ]
    try:
        for name in presets:
            rows.append(train_row(name, 16, batch, steps, False, dev, peak, nominal))
        last = presets[-1]
        rows.append(train_row(last, 32, batch_512, steps, False, dev, peak, nominal))
        if compile:
            rows.append(train_row(last, 16, batch, steps, True, dev, peak, nominal))
        rows += decode_rows(last, tuple(decode_batches), compile, dev, bw)
    finally:
        engine.remove_shm_buffers(os.environ.get("MASTER_PORT"))
    return rows


def format_table(rows: list[dict]) -> str:
    """``run_all.table`` with MFU columns as percentages."""
    return table(
        [
            {k: f"{v:.1%}" if k.startswith("mfu") and v is not None else v for k, v in r.items()}
            for r in rows
        ]
    )


def _groups(rows: list[dict]) -> list[list[dict]]:
    """Limits, training and decode rows, one table each."""
    keys = ("value", "s_per_step", "ms_per_token")
    return [g for g in ([r for r in rows if k in r] for k in keys) if g]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="B,L,XL")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch at 256 px")
    ap.add_argument("--batch-512", type=int, default=4, help="micro-batch at 512 px")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--matmul-n", type=int, default=None, help="default 8192 on a GPU, 1024 on CPU")
    ap.add_argument("--copy-mb", type=int, default=None, help="default 1024 on a GPU, 64 on CPU")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    a = ap.parse_args(argv)
    gpu = a.device.startswith("cuda")
    rows = run(
        tuple(a.presets.split(",")),
        a.batch,
        a.batch_512,
        a.steps,
        tuple(int(b) for b in a.decode_batches.split(",")),
        not a.no_compile,
        a.device,
        a.matmul_n or (8192 if gpu else 1024),
        a.copy_mb or (1024 if gpu else 64),
    )
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    text = (
        f"## gpu ({datetime.date.today()}, {name}, torch {torch.__version__})\n\n"
        f"`python benchmarks/bench_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        + "\n\n".join(format_table(g) for g in _groups(rows))
        + "\n"
    )
    print(text, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)
    engine.shutdown(0)


if __name__ == "__main__":
    main()
