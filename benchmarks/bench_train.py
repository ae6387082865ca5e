"""Training step speed on CPU: the real DeepSpeed engine against the bare model.

For the debug and B presets (text-to-image, batch 2, 120 text + 256 image tokens), one process
(a gloo group of one), ZeRO-2 from ``configs/deepspeed/zero2.json``:

- bare: ``GPT`` + PyTorch AdamW (fused, the same param groups, gradients set to None after
  each step, PyTorch's default) + grad clipping, fp32 or bf16 autocast;
- deepspeed: the engine of ``pipeline.train.engine`` (fp32, or DeepSpeed bf16: bf16 weights and
  activations, fp32 master weights in the optimizer);

each with and without activation checkpointing. The fp32 rows compare the same work; in bf16
the two differ (autocast casts the fp32 weights every step, DeepSpeed keeps bf16 weights and
updates fp32 master copies), so a bf16 ``ds_over_bare`` compares the two ways of training in
bf16, not DeepSpeed's overhead alone. Both run in one process after
``engine.init_distributed``, which on CPU makes glibc keep freed memory for reuse (without it
ZeRO's per-step gradient buffers are page-faulted in anew every step: 1.45-1.6x the bare step at
GPT-B fp32 instead of about 1.05-1.08x). Reported: seconds per step (the best of a few
after a warm-up, bare and engine steps taken in turns), image tokens/s, MFU against the measured 2048^3 matmul rate of the same dtype,
and the engine's step time over the bare model's (goal: within 10%), in wall and in process CPU
seconds (on a shared machine the second is the steadier comparison).

    python benchmarks/bench_train.py [--presets debug,B] [--repeat 3] [--batches 2,8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.models.gpt import GPT, GPTConfig, train_flops_per_sample  # noqa: E402
from pipeline.precision import fast_dtypes, torch_dtype  # noqa: E402
from pipeline.train import engine  # noqa: E402
from pipeline.train.optim import OptimConfig, param_groups  # noqa: E402

BATCH = 2


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _batch(cfg: GPTConfig, batch: int = BATCH, device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.image_tokens), generator=g)
    feats = torch.randn(batch, cfg.max_text_tokens, cfg.caption_dim, generator=g)
    mask = torch.ones(batch, cfg.max_text_tokens, dtype=torch.bool)
    # padded captions, as in real batches: every row (and the steps drop none for CFG, whose
    # null caption is whole: _NO_DROP), so our model never gets a mask-free, causal-only batch
    # that the reference (which keeps the caption's mask) does not get
    mask[:, : cfg.max_text_tokens // 2] = False
    mask[1:, : (3 * cfg.max_text_tokens) // 4] = False
    return codes.to(device), feats.to(device), mask.to(device)


def _best_alternating(
    steps: list, repeat: int, warmup: int = 3, min_seconds: float = 4.0, max_repeat: int = 50
) -> tuple[list[float], list[float]]:
    """Best wall and process-CPU seconds of each step function, run in turns so that a busy
    machine slows all alike (CPU time is what contention from other processes distorts least).

    The warm-up steps create the optimizer state and grow the malloc heap to its steady size
    (``pipeline.hostmem.keep_freed_host_memory``: after that a step reuses freed memory, no page
    faults). Short steps are repeated until the timed rounds take ``min_seconds`` (at most
    ``max_repeat`` rounds): the debug preset's best of 5 varied by 10% between runs on a shared
    machine, its best of 40 by 3-4%."""
    round_s = float("inf")  # no warm-up: no estimate, ``repeat`` rounds
    for _ in range(warmup):
        t0 = time.perf_counter()
        for step in steps:
            step()
        round_s = time.perf_counter() - t0
    repeat = max(repeat, min(max_repeat, int(min_seconds / round_s)))
    wall = [float("inf")] * len(steps)
    cpu = [float("inf")] * len(steps)
    for _ in range(repeat):
        for i, step in enumerate(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[i] = min(wall[i], time.perf_counter() - t0)
            cpu[i] = min(cpu[i], time.process_time() - c0)
    return wall, cpu


# No row's caption dropped for CFG, always: when the 10% draw dropped every row of a batch (1%
# of steps at batch 2), no padded caption was left and the step took the causal-only attention
# path, which the reference (keeping its caption mask, as LlamaGen does) never takes; a lucky
# best-of-N would have shown it. Caption dropout itself is a per-row select: no work to match.
_NO_DROP = torch.zeros(1024, dtype=torch.bool)


def bare_step(
    cfg: GPTConfig, dtype: str, compiled: bool = False, mask: bool = True, batch: int = BATCH
):
    """The bare model's training step; ``compiled``: its forward under ``torch.compile``;
    ``mask=False``: no padded caption (causal attention only)."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    fwd = torch.compile(model) if compiled else model
    groups = [
        {k: v for k, v in g.items() if k != "names"} for g in param_groups(model, OptimConfig())
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    codes, feats, cap_mask = _batch(cfg, batch)
    cap_mask = cap_mask if mask else None
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    )

    def step():
        with ctx:
            logits = fwd(codes, feats, cap_mask, drop=_NO_DROP[: codes.size(0)])
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # PyTorch's default. With freed memory kept (run() calls engine.init_distributed) a fresh
        # gradient costs no page faults, and it beats accumulating into zeroed buffers: GPT-B
        # bf16 0.895 against 0.934 s a step (keeping the buffers was faster before the malloc
        # change, and the earlier runs in RESULTS.md used it)
        opt.zero_grad(set_to_none=True)

    return step


def zero2_engine(model: torch.nn.Module, dtype: str, batch: int = BATCH):
    """The real engine over ``model``: ZeRO-2 from ``configs/deepspeed/zero2.json``, a group
    of one, AdamW with the training defaults, a constant learning rate."""
    optim = OptimConfig()
    ds = engine.build_ds_config(
        "configs/deepspeed/zero2.json",
        micro_batch=batch,
        grad_accum=1,
        world=1,
        precision=dtype,
        optim=optim,
        lr=1e-4,
    )
    return engine.create_engine(model, param_groups(model, optim), ds, lambda s: 1.0)


def engine_step(cfg: GPTConfig, dtype: str, batch: int = BATCH, compile: bool = False):
    """One training step of the real engine (ZeRO-2, a group of one) on its device; on a GPU
    the step ends with a synchronize, so that wall time measures it."""
    torch.manual_seed(0)
    eng = zero2_engine(GPT(cfg), dtype, batch)
    if compile:
        engine.compile_engine(eng)
    eng.train()
    codes, feats, mask = _batch(cfg, batch, eng.device)
    feats = feats.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    cuda = eng.device.type == "cuda"

    def step():
        logits = eng(codes, feats, mask, drop=_NO_DROP[: codes.size(0)].to(eng.device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        eng.backward(loss)
        eng.step()
        if cuda:
            torch.cuda.synchronize(eng.device)

    return step


def run(
    presets: tuple[str, ...] = ("debug", "B"), repeat: int = 4, batches: tuple[int, ...] = (BATCH,)
) -> list[dict]:
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    engine.init_distributed()
    # bf16 only where this CPU has it natively (emulated, a GPT-B step takes many minutes)
    dtypes = fast_dtypes(("fp32", "bf16"))
    peak = {d: matmul_rate(torch_dtype(d)) for d in dtypes}
    rows: list[dict] = []
    try:
        for name, batch, ckpt in (
            (n, b, c) for n in presets for b in batches for c in (False, True)
        ):
            cfg = GPTConfig.from_name(name, grad_checkpointing=ckpt)
            flops = batch * train_flops_per_sample(cfg)
            for dtype in dtypes:
                (bare, ds), (bare_cpu, ds_cpu) = _best_alternating(
                    [bare_step(cfg, dtype, batch=batch), engine_step(cfg, dtype, batch)],
                    repeat,
                )
                for what, t, c in (("bare", bare, bare_cpu), ("deepspeed", ds, ds_cpu)):
                    rows.append(
                        {
                            "preset": name,
                            "batch": batch,
                            "act_ckpt": ckpt,
                            "dtype": dtype,
                            "path": what,
                            "s_per_step": t,
                            "cpu_s_per_step": c,
                            "tokens_per_s": batch * cfg.image_tokens / t,
                            "mfu": flops / t / peak[dtype],
                            "ds_over_bare": ds / bare if what == "deepspeed" else None,
                            "ds_over_bare_cpu": ds_cpu / bare_cpu if what == "deepspeed" else None,
                        }
                    )
    finally:
        engine.remove_shm_buffers(os.environ.get("MASTER_PORT"))
    rows.append(
        {
            "preset": "peak",
            "path": "matmul 2048^3",
            "dtype": "/".join(dtypes),
            "s_per_step": None,
            "tokens_per_s": None,
            "mfu": "/".join(f"{peak[d] / 1e9:.0f}" for d in dtypes)
            + " GFLOP/s"
            + ("" if "bf16" in dtypes else " (no bf16 rows: this CPU emulates bf16 matmul)"),
        }
    )
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [
        "preset",
        "batch",
        "act_ckpt",
        "dtype",
        "path",
        "s_per_step",
        "cpu_s_per_step",
        "tokens_per_s",
        "mfu",
        "ds_over_bare",
        "ds_over_bare_cpu",
    ]
    return markdown_table(rows, cols)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """Rows as a markdown table: floats to 3 decimals (thousands grouped from 100), columns whose
    name ends in ``mfu`` as percentages, None as an empty cell."""
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("")
            elif c.endswith("mfu") and isinstance(v, float):
                cells.append(f"{v:.1%}")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if v < 100 else f"{v:,.0f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="debug,B")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument(
        "--batches", default=str(BATCH), help="e.g. 2,8: the engine's cost is fixed per step"
    )
    a = ap.parse_args()
    batches = tuple(int(b) for b in a.batches.split(","))
    rows = run(tuple(a.presets.split(",")), a.repeat, batches)
    print(format_table(rows))
    sys.stdout.flush()
    engine.shutdown(0)
