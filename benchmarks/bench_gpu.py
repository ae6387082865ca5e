"""GPU figures for the real presets on one device: the checks only a GPU can do.

On one CUDA device (``--device cpu`` runs the same code with small settings; the tests do):

- limits: the bf16 matmul rate (8192^3 on a GPU) and the device memory copy bandwidth;
- training through the real engine (``pipeline.train.engine``: ZeRO-2 from
  ``configs/deepspeed/zero2.json``, DeepSpeed bf16, a group of one), text-to-image with 120
  caption tokens (one padded) at 256 px (16x16 grid) for each preset, and for the last preset
  also at 512 px (32x32, stage 2) and under ``torch.compile``: seconds per step (the best of
  ``--steps`` after warm-up), image tokens/s, MFU against the measured matmul rate and against
  the device's nominal dense bf16 peak, peak memory (the row's own: above what was allocated
  when it started);
- decode: the last preset in bf16 with CFG (batch 1 and 8, each doubled), the static-cache
  sampler eager and compiled (``reduce-overhead``: CUDA graphs), ms per token against the time
  to read every weight once at the copy's bandwidth (reads + writes per second).

    python benchmarks/bench_gpu.py [--presets B,L,XL] [--batch 16] [--out benchmarks/RESULTS.md]

First run on an H200 on 2026-12-04 (``benchmarks/device_run.sh``; RESULTS.md). Each row is printed as soon as it is
measured, and ``--out`` appends it to that file at once (after a section header naming the
device), so a run cut short still leaves a valid partial table. ``--budget-s`` (default 720 s,
for a 15-minute device slot with the machine's start) skips a row when the time so far plus a
rough estimate of the row would pass it, and says so; later, cheaper rows still run.
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
from run_all import _fmt  # noqa: E402

from pipeline.models.gpt import GPT, GPTConfig, decode_bytes_per_token, train_flops_per_sample  # noqa: E402
from pipeline.sample import Sampler, SamplingParams  # noqa: E402
from pipeline.train import engine  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), FLOP/s
# dense bf16 peaks by device name, the first match winning (the PCIe and NVL cards before their
# SXM namesakes, A100 before A10)
NOMINAL_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "A10": 125e12,
}


# first guesses of a row's seconds on a GPU (setup, warm-up and timing together) by kind, for a
# kind not measured yet in this run; later rows scale the last measured one of their kind. From
# the first H200 run (2026-12-04): eager GPT-XL rows took 13-20 s, the compiled one about 165 s
# (about 150 s of it compiling). On a CPU (small settings) only the measured times count.
FIRST_GUESS_S = {"train": 30.0, "train compiled": 180.0, "decode": 30.0, "decode compiled": 120.0}

# the columns of each table, in order: a row is written the moment it is measured, so they are
# fixed up front rather than gathered from every row
COLUMNS = {
    "limits": ("what", "value", "unit", "nominal"),
    "train": (
        "what",
        "batch",
        "s_per_step",
        "image_tokens_per_s",
        "mfu_measured",
        "mfu_nominal",
        "peak_mem_GiB",
        "setup_s",
    ),
    "decode": ("what", "batch", "ms_per_token", "x_weight_read"),
}


class Budget:
    """Whether the next row still fits in ``budget_s`` seconds from the start of the run.

    A row's estimate is the last measured row of its kind, scaled by how much more work this row
    is (``work``: e.g. FLOPs per step), or ``FIRST_GUESS_S`` on a GPU before any such row.
    """

    def __init__(self, budget_s: float | None, device: torch.device, note) -> None:
        self.budget_s = budget_s
        self.gpu = device.type == "cuda"
        self.note = note
        self.start = time.monotonic()
        self.last: dict[str, tuple[float, float]] = {}  # kind -> (seconds, work)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def estimate(self, kind: str, work: float = 1.0) -> float:
        if kind in self.last:
            seconds, done = self.last[kind]
            return seconds * work / done
        return FIRST_GUESS_S[kind] if self.gpu else 0.0

    def fits(self, what: str, kind: str, work: float = 1.0) -> bool:
        """True to measure the row; else say that it is skipped, and why."""
        if self.budget_s is None:
            return True
        est, used = self.estimate(kind, work), self.elapsed()
        if used + est <= self.budget_s:
            return True
        self.note(
            f"skipped {what}: {used:.0f} s used + about {est:.0f} s for it > --budget-s "
            f"{self.budget_s:g}"
        )
        return False

    def measured(self, kind: str, seconds: float, work: float = 1.0) -> None:
        self.last[kind] = (seconds, work)


class Report:
    """Prints each row as a markdown table line the moment it is measured (flushed), and appends
    it to ``out`` at once as well: a run killed at the end of its device slot leaves the rows it
    measured as a valid partial table. A row of another kind starts a new table."""

    def __init__(self, out: str | None = None, header: str | None = None, echo: bool = True):
        self.out = os.path.abspath(out) if out else None  # run() changes the directory
        self.echo = echo
        self.kind: str | None = None
        self.rows: list[dict] = []
        self.notes: list[str] = []
        if header is not None:
            self._emit(header)

    def _emit(self, text: str) -> None:
        if self.out:  # the file first: a line printed is already on disk
            with open(self.out, "a") as f:
                f.write(text + "\n")
        if self.echo:
            print(text, flush=True)

    def row(self, kind: str, row: dict) -> None:
        cols = COLUMNS[kind]
        if set(row) - set(cols):
            raise ValueError(f"row {row['what']!r}: columns not in the {kind} table's {cols}")
        self.rows.append(row)
        if kind != self.kind:
            self.kind = kind
            self._emit("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        cells = [_cell(c, row.get(c, "")) for c in cols]
        self._emit("| " + " | ".join(cells) + " |")

    def note(self, text: str) -> None:
        """A line outside the tables (a skipped row): printed now, written to ``out`` once the
        tables are done (``close``), so that it never splits one."""
        self.notes.append(text)
        if self.echo:
            print(text, flush=True)

    def close(self) -> None:
        if self.notes and self.out:
            with open(self.out, "a") as f:
                f.write("\n" + "".join(f"- {n}\n" for n in self.notes))


def _cell(col: str, value) -> str:
    """``run_all``'s number format, MFU columns as percentages."""
    if col.startswith("mfu") and value is not None:
        return f"{value:.1%}"
    return _fmt(value)


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return nominal_for(torch.cuda.get_device_name(device))


def nominal_for(name: str) -> float | None:
    """The dense bf16 peak of the device named ``name`` (None: not in the table)."""
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
    # the peak counter restarts at what is still allocated (the limits' buffers, caches): the
    # row's own peak is the growth over that
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    step = engine_step(cfg, "bf16", batch=batch, compile=compile)
    # warm-up: optimizer state, and a compiled model compiles again once that state exists
    t = _best(step, device, repeat=steps, warmup=3)
    warm = time.perf_counter() - t0 - steps * t
    flops = batch * train_flops_per_sample(cfg)
    mem = None
    if device.type == "cuda":
        mem = (torch.cuda.max_memory_allocated(device) - base) / 2**30
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


def decode_rows(name: str, batches: tuple[int, ...], compile: bool, device, bandwidth, budget):
    """Rows of the decode table, each yielded once measured; a row ``budget`` has no time for
    is skipped (the model is built only for a row that runs)."""
    cfg = GPTConfig.from_name(name)
    model = None
    params = SamplingParams(cfg_scale=4.0, top_k=1000)
    for batch in batches:
        modes = [None] + (
            ["reduce-overhead" if device.type == "cuda" else "default"] if compile else []
        )
        for mode in modes:
            what = f"decode GPT-{name} bf16 CFG " + (f"compiled ({mode})" if mode else "eager")
            kind = "decode compiled" if mode else "decode"
            if not budget.fits(f"{what}, batch {batch}", kind):
                continue
            t0 = time.monotonic()
            if model is None:
                torch.manual_seed(0)
                model = GPT(cfg).eval()
                torch.nn.init.normal_(model.head.weight, std=0.02)  # a non-degenerate head
                model = model.to(device=device, dtype=torch.bfloat16)
                # the copy's reads + writes per second
                read_s = decode_bytes_per_token(model) / bandwidth
            cond = torch.randn(batch, cfg.max_text_tokens, cfg.caption_dim, device=device)
            seeds = list(range(batch))
            sampler = Sampler(model, batch, cfg.grid_size, cfg=True, compile_mode=mode)
            if mode and not sampler.compile_mode:
                continue  # torch.compile unavailable here (the sampler said why)
            t = _best(
                lambda s=sampler, c=cond, r=seeds: s.sample(c, None, params, r), device, repeat=2
            )
            del sampler
            budget.measured(kind, time.monotonic() - t0)
            per_token = t / cfg.image_tokens
            yield {
                "what": what,
                "batch": batch,
                "ms_per_token": per_token * 1e3,
                "x_weight_read": per_token / read_s,
            }
    del model
    _free(device)


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
    budget_s: float | None = None,
    report: Report | None = None,
) -> list[dict]:
    """Measure the rows, handing each to ``report`` as it comes; returns them all. The limits
    always run (the other rows are figured against them); a later row runs while ``budget_s``
    (seconds from here) leaves room for it."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (use --device cpu for a small run of the same code)")
    report = report if report is not None else Report(echo=False)
    budget = Budget(budget_s, dev, report.note)
    os.chdir(os.path.dirname(HERE))  # the engine reads configs/deepspeed/ relative to the repo
    engine.init_distributed()
    peak = matmul_rate(dev, matmul_n)
    nominal = nominal_peak(dev)
    report.row(
        "limits",
        {
            "what": f"matmul {matmul_n}^3 bf16",
            "value": peak / 1e12,
            "unit": "TFLOP/s",
            "nominal": nominal / 1e12 if nominal else None,
        },
    )
    bw = copy_bandwidth(dev, copy_mb)
    report.row("limits", {"what": "device copy (read + write)", "value": bw / 1e9, "unit": "GB/s"})
    last = presets[-1]
    train = [(name, 16, batch, False) for name in presets] + [(last, 32, batch_512, False)]
    train += [(last, 16, batch, True)] if compile else []
    try:
        for name, grid, b, compiled in train:
            kind = "train compiled" if compiled else "train"
            work = b * train_flops_per_sample(GPTConfig.from_name(name, grid_size=grid))
            what = f"train GPT-{name} {grid * 16}px" + (", torch.compile" if compiled else "")
            if not budget.fits(f"{what}, batch {b}", kind, work):
                continue
            t0 = time.monotonic()
            row = train_row(name, grid, b, steps, compiled, dev, peak, nominal)
            budget.measured(kind, time.monotonic() - t0, work)
            report.row("train", row)
        for row in decode_rows(last, tuple(decode_batches), compile, dev, bw, budget):
            report.row("decode", row)
    finally:
        engine.remove_shm_buffers(os.environ.get("MASTER_PORT"))
    return report.rows


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
    ap.add_argument(
        "--budget-s",
        type=float,
        default=720.0,
        help="skip a row once the time so far plus its rough estimate would pass this (0: none)",
    )
    ap.add_argument("--out", default=None, help="append the tables to this markdown file")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    if gpu and not torch.cuda.is_available():  # before a header goes to --out
        raise SystemExit("no CUDA device here (use --device cpu for a small run of the same code)")
    name = torch.cuda.get_device_name(dev) if gpu else "CPU"
    header = (
        f"\n## gpu ({datetime.date.today()}, {name}, torch {torch.__version__})\n\n"
        f"`python benchmarks/bench_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    report = Report(a.out, header)
    try:
        run(
            tuple(a.presets.split(",")),
            a.batch,
            a.batch_512,
            a.steps,
            tuple(int(b) for b in a.decode_batches.split(",")),
            not a.no_compile,
            a.device,
            a.matmul_n or (8192 if gpu else 1024),
            a.copy_mb or (1024 if gpu else 64),
            a.budget_s or None,
            report,
        )
    finally:
        report.close()
    engine.shutdown(0)


if __name__ == "__main__":
    main()
