"""benchmarks/bench_gpu.py, the script a session with a lent GPU runs, on CPU with small settings:
the same engine, compile and decode code paths, so that it works the first time a GPU is there."""

import os
import re
import subprocess
import sys

from pipeline.models.gpt import GPTConfig, train_flops_per_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "results.md"
    cmd = [
        sys.executable,
        "benchmarks/bench_gpu.py",
        "--device",
        "cpu",
        "--presets",
        "debug",
        "--batch",
        "2",
        "--batch-512",
        "1",
        "--steps",
        "1",
        "--decode-batches",
        "1",
        "--no-compile",
        "--matmul-n",
        "256",
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # the script picks one
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("\n## gpu (") and "CPU" in text.splitlines()[1]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| what")
    }
    assert set(rows) == {
        "matmul 256^3 bf16",
        "device copy (read + write)",
        "train GPT-debug 256px bf16 ZeRO-2",
        "train GPT-debug 512px bf16 ZeRO-2",
        "decode GPT-debug bf16 CFG eager",
    }
    peak = float(rows["matmul 256^3 bf16"][0]) * 1e12  # printed in TFLOP/s
    assert peak > 0
    for name in ("train GPT-debug 256px bf16 ZeRO-2", "train GPT-debug 512px bf16 ZeRO-2"):
        batch, s_per_step, tokens_per_s, mfu = rows[name][:4]
        assert float(s_per_step) > 0
        # image tokens per second = batch x grid^2 / step time, as printed
        grid = 16 if "256px" in name else 32
        tps = float(tokens_per_s.replace(",", ""))
        assert abs(tps - int(batch) * grid**2 / float(s_per_step)) <= 0.02 * tps
        # MFU against the measured matmul rate, from the printed figures. Not bounded by 100%
        # here: on a CPU without native bf16 (AVX2 only) a square bf16 matmul takes PyTorch's
        # scalar fallback, slower than the model's own (transposed-weight) matmuls
        flops = int(batch) * train_flops_per_sample(GPTConfig.from_name("debug", grid_size=grid))
        expected = flops / float(s_per_step) / peak
        assert abs(float(mfu.rstrip("%")) / 100 - expected) <= 0.02 * expected
    ms, x_read = rows["decode GPT-debug bf16 CFG eager"][1:3]
    assert float(ms) > 0 and float(x_read) > 0
    assert re.search(r"\| train GPT-debug 256px bf16 ZeRO-2 \| 2 \|", text)
