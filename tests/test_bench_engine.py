"""benchmarks/bench_engine.py on the debug preset: the table it prints is consistent with itself
and the engine's fp32 gradient norm is the fp64 norm to fp32 rounding."""

import os
import subprocess
import sys

from tests.test_gpt import llamagen_param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_engine_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(DS_ACCELERATOR="cpu")
    cmd = [
        sys.executable,
        "benchmarks/bench_engine.py",
        "--presets",
        "debug",
        "--repeat",
        "1",
        "--dtypes",
        "fp32",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    cols = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {}
    for ln in lines[1:]:
        r = dict(zip(cols, (c.strip() for c in ln.split("|")[1:-1])))
        rows[r["path"]] = r
    assert set(rows) == {"bare", "deepspeed", "deepspeed defaults"}
    # the debug preset (2 layers, dim 64, SwiGLU hidden a multiple of 32), counted independently
    # and printed as the table prints it (3 significant figures)
    debug_params = llamagen_param_count(2, 64, "text", multiple_of=32)
    assert rows["bare"]["params_M"] == f"{debug_params / 1e6:.3g}"
    bare = float(rows["bare"]["backward_ms"]) + float(rows["bare"]["step_ms"])
    for path in ("deepspeed", "deepspeed defaults"):
        r = rows[path]
        total = float(r["backward_ms"]) + float(r["step_ms"])
        # printed to 3 significant figures
        assert abs(float(r["fixed_ms"]) - (total - bare)) <= 0.01 * max(total, bare)
    err = float(rows["deepspeed"]["norm_rel_err"])
    assert 0 < err < 1e-4  # 0 would mean the fp64 path did not run
