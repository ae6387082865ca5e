"""DeepSpeed's fixed cost per training step at each preset's full size: backward and optimizer step of the ZeRO-2 engine against the bare model's, on an 8-token sequence.

What the engine adds to a step does not depend on the sequence: ZeRO's per-parameter gradient
hooks, its copies into the reduction bucket and the flat partition, the all-reduce of a group
of one, the gradient norm, the flat optimizer step and the copy back to the model's weights (in
bf16 also the fp32 master weights). With a 4 + 4 token sequence the forward and backward do
almost no arithmetic, so the table shows that cost alone, at the full parameter count. On a CPU
that only emulates bf16 matmul (``--dtypes fp32,bf16`` asks for the rows there) the bf16
``step_ms`` still measures the optimizer step, which has no matmul; the backward does not.

Paths, run in turns in one process (a gloo group of one, ``configs/deepspeed/zero2.json``):

- bare: ``loss.backward()``; step = ``clip_grad_norm_(1.0)`` + fused AdamW + ``zero_grad``
  (bf16: autocast, fp32 weights);
- deepspeed: ``engine.backward`` / ``engine.step`` as training runs them (on CPU gradient norms
  in fp32, :func:`pipeline.train.engine.fp32_grad_norms`, and in bf16 no inf/NaN scan besides
  the norm, :func:`pipeline.train.engine.skip_bf16_steps_by_norm`);
- deepspeed defaults: the same engine with DeepSpeed's own choices (fp64 norms, the scan).

``fixed_ms`` is (backward + step) minus the bare model's; ``norm_rel_err`` the engine's gradient
norm against DeepSpeed's fp64 norm of the same gradients.

    python benchmarks/bench_engine.py [--presets debug,B] [--repeat 5] [--dtypes fp32,bf16]
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

from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.precision import fast_dtypes  # noqa: E402
from pipeline.train import engine  # noqa: E402
from pipeline.train.optim import OptimConfig, param_groups  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import zero2_engine  # noqa: E402

TOKENS = dict(grid_size=2, max_text_tokens=4)  # 4 text + 4 image tokens


def _batch(cfg: GPTConfig):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.vocab_size, (1, cfg.image_tokens), generator=g)
    feats = torch.randn(1, cfg.max_text_tokens, cfg.caption_dim, generator=g)
    return codes, feats, torch.ones(1, cfg.max_text_tokens, dtype=torch.bool)


def _loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())


def _model(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg).train()
    with torch.no_grad():  # the head starts at zero; a non-zero one gives every weight a gradient
        model.head.weight.normal_(0, cfg.initializer_range)
    return model


def bare_path(cfg: GPTConfig, dtype: str):
    """(backward, step, grad norm) callables of the bare model."""
    model = _model(cfg)
    groups = [
        {k: v for k, v in g.items() if k != "names"} for g in param_groups(model, OptimConfig())
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    codes, feats, mask = _batch(cfg)
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    )
    norm = [float("nan")]

    def backward():
        with ctx:
            logits = model(codes, feats, mask)
        _loss(logits, codes).backward()

    def step():
        norm[0] = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return backward, step, lambda: norm[0]


def engine_path(cfg: GPTConfig, dtype: str, ours: bool):
    """(backward, step, grad norm) callables of the ZeRO-2 engine, with our CPU settings or
    DeepSpeed's defaults; the norm dtype is module-wide, so it is set around each call and both
    engines can run in turns in one process."""
    eng = zero2_engine(_model(cfg), dtype, batch=1)
    if not ours and "check_overflow" in vars(eng.optimizer):
        del eng.optimizer.check_overflow  # DeepSpeed's own inf/NaN scan again
    eng.train()
    codes, feats, mask = _batch(cfg)
    feats = feats.to(torch.bfloat16 if dtype == "bf16" else torch.float32)

    def backward():
        engine.fp32_grad_norms(ours)
        eng.backward(_loss(eng(codes, feats, mask), codes))

    def step():
        engine.fp32_grad_norms(ours)
        eng.step()

    return backward, step, lambda: engine.grad_norm(eng)


def _phases(paths: list, repeat: int, warmup: int = 2) -> list[tuple[float, float]]:
    """Best backward and step seconds of each path, the paths run in turns."""
    best = [[float("inf"), float("inf")] for _ in paths]
    for i in range(warmup + repeat):
        for k, (backward, step, _) in enumerate(paths):
            t0 = time.perf_counter()
            backward()
            t1 = time.perf_counter()
            step()
            t2 = time.perf_counter()
            if i >= warmup:
                best[k] = [min(best[k][0], t1 - t0), min(best[k][1], t2 - t1)]
    return [tuple(b) for b in best]


def _norm_rel_err(cfg: GPTConfig, dtype: str) -> float:
    """One step of each engine from the same weights and batch: our norm against fp64's."""
    norms = []
    for ours in (True, False):
        backward, step, norm = engine_path(cfg, dtype, ours)
        backward()
        step()
        norms.append(norm())
    return abs(norms[0] - norms[1]) / norms[1]


def run(
    presets: tuple[str, ...] = ("debug", "B"), repeat: int = 5, dtypes: tuple[str, ...] = ()
) -> list[dict]:
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    engine.init_distributed()
    # by default bf16 rows only where this CPU has bf16 natively: the 8-token step has few
    # matmuls, but emulated even those take about a second for GPT-B (--dtypes fp32,bf16 asks)
    dtypes = dtypes or fast_dtypes(("fp32", "bf16"))
    rows: list[dict] = []
    try:
        for name in presets:
            cfg = GPTConfig.from_name(name, **TOKENS)
            n_params = sum(p.numel() for p in GPT(cfg).parameters())
            for dtype in dtypes:
                paths = {
                    "bare": bare_path(cfg, dtype),
                    "deepspeed": engine_path(cfg, dtype, True),
                    "deepspeed defaults": engine_path(cfg, dtype, False),
                }
                timed = dict(zip(paths, _phases(list(paths.values()), repeat)))
                err = _norm_rel_err(cfg, dtype)
                base = sum(timed["bare"])
                for path, (bwd, stp) in timed.items():
                    rows.append(
                        {
                            "preset": name,
                            "params_M": n_params / 1e6,
                            "dtype": dtype,
                            "path": path,
                            "backward_ms": bwd * 1e3,
                            "step_ms": stp * 1e3,
                            "fixed_ms": None if path == "bare" else (bwd + stp - base) * 1e3,
                            "norm_rel_err": err if path == "deepspeed" else None,
                        }
                    )
                del paths
    finally:
        engine.remove_shm_buffers(os.environ.get("MASTER_PORT"))
    return rows


if __name__ == "__main__":
    from run_all import table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="debug,B")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtypes", default="", help="e.g. fp32,bf16 (default: bf16 where native)")
    a = ap.parse_args()
    dtypes = tuple(d for d in a.dtypes.split(",") if d)
    print(table(run(tuple(a.presets.split(",")), a.repeat, dtypes)))
    sys.stdout.flush()
    engine.shutdown(0)
