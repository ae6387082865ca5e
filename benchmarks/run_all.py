"""Run every benchmark, print a table per benchmark, and write them to benchmarks/RESULTS-latest.md.

Each ``benchmarks/bench_*.py`` module exposes ``run() -> list[dict]``; every dict is one row.
Benchmarks run one after another in this process (never in parallel: they measure the machine).

    python benchmarks/run_all.py [--only model,decode] [--out benchmarks/RESULTS-latest.md]

The output file is replaced whole. benchmarks/RESULTS.md is kept by hand (the goals, the history
of each figure, the GPU sections): copy into it what a run here shows.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pipeline.precision import cpu_has_native_bf16  # noqa: E402

ORDER = [
    "model",
    "reference",
    "train",
    "engine",
    "loader",
    "decode",
    "vq",
    "pretokenize",
    "shards",
    "dedup",
    "download",
]


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:.3e}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = "native" if cpu_has_native_bf16() else "emulated (bf16 rows skipped)"
    return (
        f"{cpu} ({isa}, bf16 matmul {bf16}), {os.cpu_count()} cores, torch {torch.__version__} "
        f"threads {torch.get_num_threads()}, {gpu}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated names, e.g. model,decode")
    ap.add_argument(
        "--out",
        default=os.path.join(HERE, "RESULTS-latest.md"),
        help="markdown file for the tables, replaced whole (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    names = [n for n in ORDER if os.path.exists(os.path.join(HERE, f"bench_{n}.py"))]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    sections = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today()} on: {machine()}.",
        "Produced by `make bench` (`python benchmarks/run_all.py`); every ratio in a table was "
        "measured side by side in the same run.",
    ]
    failed = 0
    for name in names:
        t0 = time.time()
        mod = importlib.import_module(f"bench_{name}")
        try:
            rows = mod.run()
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            failed += 1
            err = traceback.format_exc(limit=3)
            print(f"## {name}: FAILED\n{err}", flush=True)
            sections += ["", f"## {name}", "", f"FAILED:\n```\n{err}\n```"]
            continue
        doc = (mod.__doc__ or "").strip().splitlines()[0]
        text = f"## {name} ({time.time() - t0:.0f} s)\n\n{doc}\n\n{table(rows)}"
        print(text + "\n", flush=True)
        sections += ["", text]
    with open(args.out, "w") as f:
        f.write("\n".join(sections) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    raise SystemExit(main())
