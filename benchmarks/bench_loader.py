"""Token-shard loader throughput against what the trainer consumes.

Writes stage-1-shaped token shards (16x16 codes + flipped codes, FLAN-T5-XL-sized 2048-d fp16
features of 8..64 tokens), then reads batches of 32 through ``TokenLoader`` (shuffle buffer,
flips, left-padding to 120 tokens, DataLoader workers) from a local folder and from a loopback S3
server. Reported: samples/s, and that rate over two consumption rates: one rank training GPT-B
on this CPU (its bare training step timed in the same run: bf16 where the CPU has it natively,
else fp32) and one A100 training GPT-XL at an assumed 40% MFU (the production case; no GPU is
measured here). Goal: >= 20x. The S3 rows read from a loopback server (no network latency), the
local rows from freshly written files (the page cache): both are upper bounds for a cluster.

    python benchmarks/bench_loader.py [--samples 1024]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.loader import BatchSpec, LoaderConfig, TokenLoader  # noqa: E402
from pipeline.data.shards import TokenShardWriter, encode_token_sample  # noqa: E402
from pipeline.models.gpt import GPTConfig, train_flops_per_sample  # noqa: E402

BATCH = 32
A100_FLOPS = 312e12 * 0.40


def cpu_gpt_b_samples_per_s() -> tuple[float, str]:
    """What one CPU rank training GPT-B consumes: its bare step (bench_train), best of 3."""
    from bench_train import BATCH as TRAIN_BATCH
    from bench_train import bare_step

    from pipeline.hostmem import keep_freed_host_memory
    from pipeline.precision import fast_dtypes

    keep_freed_host_memory()  # as training does (engine.init_distributed): no page faults a step
    dtype = "bf16" if "bf16" in fast_dtypes(("fp32", "bf16")) else "fp32"
    step = bare_step(GPTConfig.from_name("B"), dtype)
    step()  # the optimizer state and the heap
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return TRAIN_BATCH / best, dtype


def write_shards(out: str, n_shards: int, per_shard: int) -> int:
    rng = np.random.default_rng(0)
    nbytes = 0
    for i in range(n_shards):
        with TokenShardWriter(out, i) as w:
            for j in range(per_shard):
                codes = rng.integers(0, 16384, (16, 16))
                w.write(
                    encode_token_sample(
                        f"k{i:03d}_{j:05d}",
                        codes,
                        rng.standard_normal((int(rng.integers(8, 65)), 2048)).astype(np.float16),
                        "a caption",
                        {"label": 0},
                        codes_flip=codes[:, ::-1],
                    )
                )
            nbytes += w.close().num_bytes
    return nbytes


def samples_per_s(uri: str, workers: int, n_batches: int) -> float:
    spec = BatchSpec(grid_size=16, max_text_tokens=120, caption_dim=2048)
    loader = TokenLoader(
        LoaderConfig(shards=[uri], batch_size=BATCH, num_workers=workers, shuffle_buffer=256), spec
    )
    it = iter(loader)
    # worker start-up and the first buffer fill are not the steady state, and the batches the
    # workers prefetched meanwhile would come free: take them all before the clock starts
    for _ in range(1 + workers * loader.cfg.prefetch_factor):
        next(it)
    t0 = time.perf_counter()
    for _ in itertools.islice(it, n_batches):
        pass
    return n_batches * BATCH / (time.perf_counter() - t0)


def run(samples: int = 1024, s3: bool = True) -> list[dict]:
    global _SERVER
    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    saved_env = {k: os.environ.get(k) for k in _AWS_ENV}
    rows: list[dict] = []
    cpu_need, cpu_dtype = cpu_gpt_b_samples_per_s()
    gpu_need = A100_FLOPS / train_flops_per_sample(GPTConfig.from_name("XL"))
    try:
        local = os.path.join(tmp, "tokens")
        nbytes = write_shards(local, 4, samples // 4)
        sources = [("local", local)]
        if s3:
            sources.append(("s3 (loopback moto)", _s3_copy(local)))
        n_batches = 2 * samples // BATCH  # two epochs
        for where, uri in sources:
            for workers in (0, 1, 2):
                rate = samples_per_s(uri, workers, n_batches)
                rows.append(
                    {
                        "source": where,
                        "workers": workers,
                        "samples_per_s": rate,
                        "MB_per_s": rate * nbytes / samples / 1e6,
                        "x_cpu_GPT-B_rank": rate / cpu_need,
                        "x_A100_GPT-XL": rate / gpu_need,
                    }
                )
    finally:
        if _SERVER is not None:
            _SERVER.stop()
            _SERVER = None
        for k, v in saved_env.items():  # later benchmarks must not talk to a stopped server
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    rows.append(
        {
            "source": "consumption",
            "workers": "",
            "samples_per_s": f"CPU GPT-B {cpu_dtype} {cpu_need:.2f} (measured), "
            f"A100 GPT-XL {gpu_need:.0f} (40% MFU assumed)",
        }
    )
    return rows


_SERVER = None
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


def _s3_copy(local: str) -> str:
    """Serve a copy of ``local`` from a loopback S3 server (moto); returns its s3:// URI."""
    global _SERVER
    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline import storage

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _SERVER = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    _SERVER.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    for name in sorted(os.listdir(local)):
        storage.put_file(os.path.join(local, name), f"s3://bench/tokens/{name}")
    return "s3://bench/tokens"


def format_table(rows: list[dict]) -> str:
    cols = ["source", "workers", "samples_per_s", "MB_per_s", "x_cpu_GPT-B_rank", "x_A100_GPT-XL"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append(
            "| "
            + " | ".join(
                f"{r[c]:,.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols
            )
            + " |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--no-s3", action="store_true")
    a = ap.parse_args()
    print(format_table(run(a.samples, s3=not a.no_s3)))
