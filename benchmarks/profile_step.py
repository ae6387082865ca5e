"""Where one training step of the real engine spends its time: ``torch.profiler`` over a few
steps of ``bench_train.engine_step`` (ZeRO-2 bf16, a group of one), the top operators by
device time (CPU time on a CPU), and the step time at each ``--batches`` to show how much of a
step is fixed cost.

    python benchmarks/profile_step.py [--preset XL] [--batches 16,32] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_train import engine_step  # noqa: E402

from pipeline.models.gpt import GPTConfig, train_flops_per_sample  # noqa: E402
from pipeline.train import engine  # noqa: E402


def _time(step, steps: int) -> float:
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


def run(preset: str, batches: list[int], steps: int, rows: int, compile: bool) -> str:
    os.chdir(os.path.dirname(HERE))  # the engine reads configs/deepspeed/ relative to the repo
    engine.init_distributed()
    cfg = GPTConfig.from_name(preset)
    cuda = torch.cuda.is_available()
    lines = ["| batch | s_per_step | TFLOP/s |", "|---|---|---|"]
    table = ""
    try:
        for i, batch in enumerate(batches):
            step = engine_step(cfg, "bf16", batch=batch, compile=compile)
            for _ in range(3):  # optimizer state, allocator, compile
                step()
            t = _time(step, steps)
            flops = batch * train_flops_per_sample(cfg)
            lines.append(f"| {batch} | {t:.4f} | {flops / t / 1e12:.1f} |")
            print(lines[-1], flush=True)
            if i == 0:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=acts) as prof:
                    for _ in range(2):
                        step()
                key = "cuda_time_total" if cuda else "cpu_time_total"
                table = prof.key_averages().table(
                    sort_by=key, row_limit=rows, max_name_column_width=60
                )
            del step
    finally:
        engine.remove_shm_buffers(os.environ.get("MASTER_PORT"))
    return "\n".join(lines) + f"\n\nprofile of 2 steps at batch {batches[0]}:\n{table}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="XL")
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args(argv)
    print(run(a.preset, [int(b) for b in a.batches.split(",")], a.steps, a.rows, a.compile))
    engine.shutdown(0)


if __name__ == "__main__":
    main()
