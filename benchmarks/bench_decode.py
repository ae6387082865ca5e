"""Decode speed: our static-cache sampler against no cache and against the simplest KV cache.

Text-to-image, 120 caption tokens + 256 image tokens (16x16), CFG (each batch doubled), top-k
1000, for the debug and B presets in fp32 and bf16, one image or ``--batches`` images at a time.
Variants, side by side:

- ``no cache``: ``generate(use_cache=False)``, the whole sequence recomputed at every step. At
  preset B a full run takes minutes, so by default it is extrapolated: one step is timed at a few
  sequence lengths and the 256 steps are summed by linear interpolation (``--full-no-cache`` runs
  it; the debug rows show both, which checks the extrapolation).
- ``naive cat cache``: the simplest cached decoder, kept here on purpose as a reference: each
  layer's keys/values grow by ``torch.cat`` every step, masks are rebuilt every step, and tokens are
  drawn with ``filter_logits`` + per-row ``torch.multinomial`` over the whole vocabulary.
- ``gpt.py cache``: the model's own static cache (``setup_cache`` / ``prefill`` / ``decode_step``)
  with the same simple sampling: what ``generate`` did before ``pipeline.decode`` existed.
- ``ours eager`` / ``ours compiled``: ``pipeline.sample.Sampler`` (``StaticDecoder``: buffers
  sized once, static shapes, inverse-CDF sampling over the top-k), without and with
  ``torch.compile``.

Times are the best of ``--repeat`` interleaved runs, on ``--threads`` threads (default 1: on a
shared 2-core machine, two OpenMP threads stall whenever another process holds a core, and times
then swing by 10x). Figures from a busy machine are noisy: compare rows of one run.

    python benchmarks/bench_decode.py [--presets debug,B] [--dtypes fp32,bf16] [--batches 1,8]
        [--repeat 2] [--threads 1] [--compile-mode default] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.decode import compile_available
from pipeline.models.gpt import GPT, GPTConfig, apply_rope
from pipeline.precision import fast_dtypes
from pipeline.sample import Sampler, SamplingParams, cfg_mix, draw, filter_logits, generate

PARAMS = SamplingParams(cfg_scale=4.0, temperature=1.0, top_k=1000, top_p=1.0)


# --- the simple references ------------------------------------------------------------------


def draw_multinomial(
    logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]
) -> torch.Tensor:
    """The plain sampler: mask to top-k/top-p over all V logits, then multinomial row by row."""
    probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(
        -1
    )
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)])


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@torch.no_grad()
def naive_cached_generate(
    model: GPT, cond: torch.Tensor, params: SamplingParams, seeds: list[int], grid: int
) -> torch.Tensor:
    """The simplest cached decoder: K/V concatenated per step, masks rebuilt per step (not
    LlamaGen's: its static KVCache indexed by position is closer to the "gpt.py cache" row)."""
    B, P, N = cond.size(0), model.cfg.prefix_len, grid * grid
    cond2 = torch.cat([cond, cond])
    drop = torch.tensor([False] * B + [True] * B)
    prefix, pmask = model.embed_condition(cond2, None, drop)
    rope = model.rope(grid, cond.device)
    past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.blocks)

    def run(x: torch.Tensor, start: int) -> torch.Tensor:
        R, T, C = x.shape
        end = start + T
        if pmask is None:
            mask = None
        elif T > 1:
            mask = model.attention_mask(pmask, T, x.device)
        else:
            mask = torch.cat([pmask, pmask.new_ones(R, end - P)], 1)[:, None, None, :]
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            q, k, v = a.qkv(blk.attn_norm(x)).split(
                [a.n_head * a.hd, a.n_kv * a.hd, a.n_kv * a.hd], -1
            )
            q = apply_rope(q.view(R, T, a.n_head, a.hd), rope[start:end]).transpose(1, 2)
            k = apply_rope(k.view(R, T, a.n_kv, a.hd), rope[start:end]).transpose(1, 2)
            v = v.view(R, T, a.n_kv, a.hd).transpose(1, 2)
            if past[i] is not None:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            past[i] = (k, v)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1
            )
            x = x + a.proj(y.transpose(1, 2).reshape(R, T, C))
            x = x + blk.mlp(blk.mlp_norm(x))
        return model.head(model.norm(x[:, -1])).float()

    gens = _gens(seeds)
    tokens = torch.zeros(B, N, dtype=torch.long)
    logits = run(prefix.to(model.head.weight.dtype), 0)
    for i in range(N):
        tokens[:, i] = draw_multinomial(
            cfg_mix(logits[:B], logits[B:], params.cfg_scale), params, gens
        )
        if i + 1 < N:
            logits = run(model.tok_embed(torch.cat([tokens[:, i], tokens[:, i]])[:, None]), P + i)
    return tokens


@torch.no_grad()
def gpt_cache_generate(
    model: GPT, cond: torch.Tensor, params: SamplingParams, seeds: list[int], grid: int
) -> torch.Tensor:
    """The model's own static cache (growing-slice attention) with the plain sampler."""
    B, N = cond.size(0), grid * grid
    cond2 = torch.cat([cond, cond])
    drop = torch.tensor([False] * B + [True] * B)
    gens = _gens(seeds)
    tokens = torch.zeros(B, N, dtype=torch.long)
    model.setup_cache(2 * B, grid)
    try:
        logits = model.prefill(cond2, None, drop).float()
        for i in range(N):
            tokens[:, i] = draw_multinomial(
                cfg_mix(logits[:B], logits[B:], params.cfg_scale), params, gens
            )
            if i + 1 < N:
                logits = model.decode_step(torch.cat([tokens[:, i], tokens[:, i]]), i).float()
    finally:
        model.clear_cache()
    return tokens


# --- timing ---------------------------------------------------------------------------------


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def no_cache_extrapolated(
    model: GPT, cond: torch.Tensor, grid: int, lengths: tuple[int, ...] = (1, 64, 128, 192, 256)
) -> float:
    """Seconds for a full no-cache run, from one timed step at a few lengths (interpolated)."""
    N = grid * grid
    cond2 = torch.cat([cond, cond])
    drop = torch.tensor([False] * cond.size(0) + [True] * cond.size(0))
    gens = _gens(list(range(cond.size(0))))
    lengths = tuple(n for n in lengths if n <= N)

    def one_step(n: int) -> None:  # what generate(use_cache=False) does at step n - 1
        seq = torch.zeros(cond2.size(0), n, dtype=torch.long)
        logits = model(seq, cond2, None, drop=drop, grid_size=grid)[:, -1].float()
        draw(
            cfg_mix(logits[: cond.size(0)], logits[cond.size(0) :], PARAMS.cfg_scale), PARAMS, gens
        )

    one_step(lengths[0])  # warm-up
    per = [min(_time(lambda n=n: one_step(n)) for _ in range(2)) for n in lengths]
    return float(np.interp(np.arange(1, N + 1), lengths, per).sum())


def bench_preset(
    name: str, dtype: str, batch: int, repeat: int, no_cache: str, compile_mode: str | None
) -> list[dict]:
    """Rows for one preset / dtype / batch; ``no_cache`` is "full", "extrapolate" or "skip"."""
    cfg = GPTConfig.from_name(name)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a trained-like, non-degenerate head
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    cond = torch.randn(batch, cfg.max_text_tokens, cfg.caption_dim)
    g, N, seeds = cfg.grid_size, cfg.image_tokens, list(range(batch))
    ours = Sampler(model, batch, g, cfg=True)
    variants = {
        "naive cat cache": lambda: naive_cached_generate(model, cond, PARAMS, seeds, g),
        "gpt.py cache": lambda: gpt_cache_generate(model, cond, PARAMS, seeds, g),
        "ours eager": lambda: ours.sample(cond, None, PARAMS, seeds),
    }
    compile_s = None
    if compile_mode:
        compiled = Sampler(model, batch, g, cfg=True, compile_mode=compile_mode)
        compile_s = _time(lambda: compiled.sample(cond, None, PARAMS, seeds))  # compiles
        if compiled.compile_mode:
            variants[f"ours compiled ({compile_mode})"] = lambda: compiled.sample(
                cond, None, PARAMS, seeds
            )
    # one untimed warm-up of each (the compiled sampler's was its compiling run), then
    # interleaved runs, best of ``repeat``: every variant is timed warm alike
    for k, fn in variants.items():
        if not k.startswith("ours compiled"):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    out: dict[str, torch.Tensor] = {}
    for _ in range(repeat):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    # sanity: the two plain-sampler paths agree token for token, and so do ours and no cache
    checks = {
        "naive == gpt.py cache tokens": torch.equal(out["naive cat cache"], out["gpt.py cache"])
    }
    if no_cache == "full":
        t0 = time.perf_counter()
        slow = generate(model, cond, None, PARAMS, seeds, g, use_cache=False)
        best["no cache"] = time.perf_counter() - t0
        checks["ours == no cache tokens"] = torch.equal(slow, out["ours eager"])
    if no_cache != "skip":
        best["no cache (extrapolated)"] = no_cache_extrapolated(model, cond, g)
    ref = best.get("no cache", best.get("no cache (extrapolated)"))
    rows = []
    for k, t in best.items():
        rows.append(
            {
                "preset": name,
                "dtype": dtype,
                "batch": batch,
                "variant": k,
                "s_per_batch": t,
                "ms_per_step": 1e3 * t / N,
                "vs_no_cache": ref / t if ref else None,
                "vs_naive_cache": best["naive cat cache"] / t,
                "compile_s": compile_s if k.startswith("ours compiled") else None,
            }
        )
    rows[0]["checks"] = checks
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| preset | dtype | images | variant | s / batch | ms / step | vs no cache | "
        "vs naive cache |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = f"{r['vs_no_cache']:.1f}x" if r["vs_no_cache"] else "n/a"
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['batch']} | {r['variant']} | "
            f"{r['s_per_batch']:.2f} | {r['ms_per_step']:.2f} | {vs} | "
            f"{r['vs_naive_cache']:.2f}x |"
        )
    return "\n".join(lines)


def run(
    presets: tuple[str, ...] = ("debug", "B"),
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    batches: tuple[int, ...] = (1, 8),
    repeat: int = 2,
    compile_mode: str | None = "default",
) -> list[dict]:
    """Every preset x dtype x batch (for ``make bench``): debug's no-cache run in full, B's
    extrapolated at batch 1 and skipped above it; the compiled variant where compile works."""
    ok = bool(compile_mode) and compile_available()[0]
    # bf16 only where this CPU has it natively (emulated, GPT-B would take hours)
    dtypes = tuple(fast_dtypes(dtypes))
    rows: list[dict] = []
    for name in presets:
        for dtype in dtypes:
            for batch in batches:
                mode = "full" if name == "debug" else "extrapolate" if batch == 1 else "skip"
                rows += bench_preset(name, dtype, batch, repeat, mode, compile_mode if ok else None)
    for r in rows:  # one line per row in the combined table
        r["checks"] = ", ".join(f"{k}: {v}" for k, v in r.get("checks", {}).items()) or None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="debug,B")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", default="1", help="images per batch (CFG doubles the rows)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile-mode", default="default", help="'' to skip the compiled variant")
    ap.add_argument(
        "--full-no-cache",
        default="debug",
        help="presets whose no-cache run is timed in full (others extrapolated)",
    )
    ap.add_argument(
        "--no-cache-max-batch",
        type=int,
        default=1,
        help="skip the no-cache baseline above this batch at presets not run in full",
    )
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ok, why = compile_available() if a.compile_mode else (False, "skipped")
    print(
        f"torch {torch.__version__}, {a.threads} thread(s), load average {os.getloadavg()}, "
        f"compile available: {ok} {why}",
        flush=True,
    )
    rows: list[dict] = []
    dtypes = fast_dtypes(a.dtypes.split(","))
    if len(dtypes) < len(a.dtypes.split(",")):
        print("bf16 skipped: this CPU emulates bf16 matmul (no AVX-512 / AMX)", flush=True)
    for name in a.presets.split(","):
        for dtype in dtypes:
            for batch in (int(b) for b in a.batches.split(",")):
                mode = (
                    "full"
                    if name in a.full_no_cache.split(",")
                    else "extrapolate"
                    if batch <= a.no_cache_max_batch
                    else "skip"
                )
                new = bench_preset(
                    name, dtype, batch, a.repeat, mode, a.compile_mode if ok else None
                )
                rows += new
                print(format_table(new), "\nchecks:", new[0]["checks"], flush=True)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(rows, f, indent=2)
    print(f"\nload average at the end {os.getloadavg()}\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
