"""The machine's limits, then GPT training-step and decode speed as fractions of those limits.

Limits: matmul rate (2048^3, fp32 and bf16) and memory read bandwidth (sum over a 512 MB
tensor). Then, for the debug and B presets, text-to-image, batch 2, 120 text + 255 image tokens:
one training step (forward + backward + fused AdamW; bf16 also under ``torch.compile``), and decode with CFG (batch 1 doubled, 256
tokens) with the static KV cache and without any cache.

Training figures are "achieved matmul FLOP/s / matmul peak" of the same dtype; decode figures are
"weight bytes per token / time per token" against the read bandwidth: a decode step must read
every weight once, so that ratio is the bound a cached decoder can approach.

    python benchmarks/bench_model.py [--presets debug,B] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from pipeline.decode import compile_available
from pipeline.hostmem import keep_freed_host_memory
from pipeline.models.gpt import GPT, GPTConfig, decode_bytes_per_token, train_flops_per_sample
from pipeline.precision import fast_dtypes, torch_dtype
from pipeline.sample import SamplingParams, generate


def _timeit(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = _timeit(lambda: a @ b, repeat=5, warmup=2)
    return 2 * n**3 / t


def read_bandwidth(mb: int = 512) -> float:
    x = torch.ones(mb * (1 << 20) // 4, dtype=torch.float32)
    t = _timeit(lambda: x.sum(), repeat=5, warmup=2)
    return x.numel() * 4 / t


def train_step_time(
    cfg: GPTConfig, dtype: str, batch: int = 2, repeat: int = 3, compiled: bool = False
) -> float:
    """Forward + backward + clip + AdamW (PyTorch's fused kernel, as configs/deepspeed use)."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True
    )
    fwd = torch.compile(model) if compiled else model
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.image_tokens))
    feats = torch.randn(batch, cfg.max_text_tokens, cfg.caption_dim)
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    )

    def step():
        with ctx:
            logits = fwd(codes, feats)
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # a compiled model compiles again on its 2nd call (the optimizer's state now exists)
    return _timeit(step, repeat=repeat, warmup=3 if compiled else 1)


def decode_time(cfg: GPTConfig, dtype: str, use_cache: bool, tokens: int | None = None) -> float:
    """Seconds per image token, CFG batch 1 doubled."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    feats = torch.randn(1, cfg.max_text_tokens, cfg.caption_dim).to(model.head.weight.dtype)
    params = SamplingParams(cfg_scale=4.0, top_k=1000)
    g = cfg.grid_size
    if use_cache:
        generate(model, feats, params=params, grid_size=4)  # warm-up
        t0 = time.perf_counter()
        generate(model, feats, params=params)
        return (time.perf_counter() - t0) / (g * g)
    # Without a cache every step recomputes the prefix and all tokens so far: time a sample of
    # sequence lengths and average (a full 256-step run would take minutes at preset B).
    lengths = [1, g * g // 4, g * g // 2, 3 * g * g // 4, g * g]
    cond2 = torch.cat([feats, feats])
    drop = torch.tensor([False, True])
    per = []
    with torch.no_grad():
        for n in lengths:
            seq = torch.zeros(2, n, dtype=torch.long)
            per.append(_timeit(lambda seq=seq: model(seq, cond2, None, drop=drop)[:, -1], repeat=2))
    return sum(per) / len(per)


def run(
    presets: tuple[str, ...] = ("debug", "B"), quick: bool = False, compiled: bool = True
) -> list[dict]:
    # as every training rank on CPU does (pipeline.train.engine.init_distributed): freed blocks
    # stay mapped, so a step's fresh gradients and activations cost no page faults
    keep_freed_host_memory()
    rows: list[dict] = []
    # bf16 only where this CPU has it natively: emulated, one GPT-B step would take many minutes
    dtypes = fast_dtypes(("fp32", "bf16"))
    peak = {d: matmul_rate(torch_dtype(d)) for d in dtypes}
    bw = read_bandwidth()
    for d in dtypes:
        rows.append({"what": f"matmul 2048^3 {d}", "value": peak[d] / 1e9, "unit": "GFLOP/s"})
    if "bf16" not in dtypes:
        rows.append(
            {
                "what": f"bf16 rows skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) "
                "emulates bf16 matmul",
                "value": None,
                "unit": "",
            }
        )
    rows.append({"what": "memory read", "value": bw / 1e9, "unit": "GB/s"})
    for name in presets:
        cfg = GPTConfig.from_name(name)
        flops = 2 * train_flops_per_sample(cfg)
        for dtype in dtypes:
            t = train_step_time(cfg, dtype, repeat=1 if quick else 3)
            rows.append(
                {
                    "what": f"train step GPT-{name} {dtype} (batch 2)",
                    "value": t,
                    "unit": "s/step",
                    "of_limit": flops / t / peak[dtype],
                }
            )
        if compiled and "bf16" in dtypes and compile_available()[0]:
            t = train_step_time(cfg, "bf16", repeat=1 if quick else 3, compiled=True)
            rows.append(
                {
                    "what": f"train step GPT-{name} bf16 torch.compile (batch 2)",
                    "value": t,
                    "unit": "s/step",
                    "of_limit": flops / t / peak["bf16"],
                }
            )
        for dtype in dtypes:
            model_bytes = decode_bytes_per_token(
                GPT(cfg).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
            )
            cached = decode_time(cfg, dtype, use_cache=True)
            rows.append(
                {
                    "what": f"decode GPT-{name} {dtype} cached (CFG)",
                    "value": cached * 1e3,
                    "unit": "ms/token",
                    "of_limit": model_bytes / cached / bw,
                }
            )
            if not quick:
                full = decode_time(cfg, dtype, use_cache=False)
                rows.append(
                    {
                        "what": f"decode GPT-{name} {dtype} no cache (CFG)",
                        "value": full * 1e3,
                        "unit": "ms/token",
                        "of_limit": None,
                        "speedup": full / cached,
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| what | value | unit | of limit | note |", "|---|---:|---|---:|---|"]
    for r in rows:
        lim = f"{r['of_limit']:.0%}" if r.get("of_limit") is not None else ""
        note = f"cache speed-up {r['speedup']:.1f}x" if r.get("speedup") else ""
        value = "" if r["value"] is None else f"{r['value']:.2f}"
        lines.append(f"| {r['what']} | {value} | {r['unit']} | {lim} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="debug,B")
    ap.add_argument("--quick", action="store_true", help="one repeat, no no-cache baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(format_table(run(tuple(a.presets.split(",")), a.quick, not a.no_compile)))
