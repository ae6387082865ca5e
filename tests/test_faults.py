"""Fault tolerance: storage (and the stages built on it) under injected S3 faults.

A seeded proxy (``tests/s3faults.py``) sits between the client and the loopback S3 server and
answers a fraction of requests with 503 SlowDown, 500 InternalError, or a connection reset after
S3 has applied the request. Every test checks the result against S3 itself (bypassing the
proxy): every object present, with the right bytes, and nothing extra (no duplicates, no stray
temporary objects, no unfinished multipart uploads).
"""

from __future__ import annotations

import hashlib
import json
import os

import boto3
import pytest
import s3fs

from pipeline import storage
from tests.s3faults import FAULT_KINDS, FaultProxy

FAULT_RATE = 0.25


@pytest.fixture()
def direct(s3_server):
    """A boto3 client that talks to S3 without the proxy (the ground truth)."""
    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture()
def through_proxy(s3_server, monkeypatch):
    """Yields a factory: ``through_proxy(**FaultProxy kwargs)`` -> a started proxy in use."""
    proxies: list[FaultProxy] = []

    def start(**kw) -> FaultProxy:
        proxy = FaultProxy(s3_server, **kw).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        return proxy

    yield start
    for p in proxies:
        p.close()


def objects(client, bucket_uri: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` with its bytes, read straight from S3."""
    bucket = bucket_uri.removeprefix("s3://")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def unfinished_uploads(client, bucket_uri: str) -> list:
    bucket = bucket_uri.removeprefix("s3://")
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def blob(i: int, n: int = 4096) -> bytes:
    """Distinct, checkable content for object ``i``."""
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


def test_storage_operations_survive_faults(s3_bucket, direct, through_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    proxy = through_proxy(fault_rate=FAULT_RATE, seed=7)
    root = f"{s3_bucket}/data"
    n = 6
    expected: dict[str, bytes] = {}

    for i in range(n):  # write_bytes / write_json
        storage.write_bytes(storage.join(root, "objs", f"{i:03d}.bin"), blob(i))
        expected[f"data/objs/{i:03d}.bin"] = blob(i)
    storage.write_json(storage.join(root, "meta.json"), {"n": n})
    expected["data/meta.json"] = storage.read_bytes(storage.join(root, "meta.json"))

    big = tmp_path / "big.bin"  # put_file / get_file of a file bigger than one read block
    big.write_bytes(blob(999, 3 << 20))
    storage.put_file(big, storage.join(root, "big.bin"))
    expected["data/big.bin"] = big.read_bytes()
    storage.get_file(storage.join(root, "big.bin"), tmp_path / "big.copy")
    assert (tmp_path / "big.copy").read_bytes() == big.read_bytes()

    with storage.open_write(storage.join(root, "stream.bin")) as f:  # open_write / open_read
        for i in range(4):
            f.write(blob(100 + i, 256 << 10))
    expected["data/stream.bin"] = b"".join(blob(100 + i, 256 << 10) for i in range(4))
    with storage.open_read(storage.join(root, "stream.bin")) as f:
        assert f.read() == expected["data/stream.bin"]

    # list / read / exists / size
    assert storage.list_dir(storage.join(root, "objs")) == [f"{i:03d}.bin" for i in range(n)]
    for i in range(n):
        uri = storage.join(root, "objs", f"{i:03d}.bin")
        assert storage.read_bytes(uri) == blob(i)
    assert storage.exists(storage.join(root, "objs", "000.bin"))
    assert storage.size(storage.join(root, "big.bin")) == 3 << 20
    assert storage.read_json(storage.join(root, "meta.json")) == {"n": n}

    # a directory through the local cache
    local = storage.local_copy(storage.join(root, "objs"))
    assert sorted(os.listdir(local)) == [f"{i:03d}.bin" for i in range(n)]
    assert open(os.path.join(local, "005.bin"), "rb").read() == blob(5)

    storage.remove(storage.join(root, "objs", "005.bin"))
    del expected["data/objs/005.bin"]

    # faults were really injected, of every kind, on reads and writes
    assert proxy.total_faults >= 5, dict(proxy.faults)
    assert all(proxy.faults[k] >= 1 for k in FAULT_KINDS), dict(proxy.faults)
    assert (
        proxy.faults["reset:PUT"] + proxy.faults["slowdown:PUT"] + proxy.faults["internal:PUT"] >= 1
    )
    # nothing lost, nothing duplicated, nothing extra
    assert objects(direct, s3_bucket) == expected
    assert unfinished_uploads(direct, s3_bucket) == []


def test_multipart_upload_survives_faults_on_parts_and_complete(
    s3_bucket, direct, through_proxy, tmp_path
):
    # s3fs switches to a multipart upload from 2 x 50 MiB; faults only on the parts and on the
    # final CompleteMultipartUpload (a reset there means S3 finished it but the client never heard)
    big = tmp_path / "ckpt.bin"
    data = blob(5, 101 << 20)
    big.write_bytes(data)
    proxy = through_proxy(
        fault_rate=0.5,
        seed=3,
        target=lambda method, path: "uploadId=" in path and method in ("PUT", "POST"),
        max_faults=4,
    )
    storage.put_file(big, f"{s3_bucket}/runs/ckpt.bin")
    assert proxy.total_faults >= 2, dict(proxy.faults)
    got = objects(direct, s3_bucket)
    assert list(got) == ["runs/ckpt.bin"]
    assert hashlib.sha256(got["runs/ckpt.bin"]).digest() == hashlib.sha256(data).digest()
    assert unfinished_uploads(direct, s3_bucket) == []


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_errors_left_by_the_client_are_retried_by_storage(s3_bucket, through_proxy, kind):
    """When botocore and s3fs give up, what they raise must still be classed as retryable."""
    proxy = through_proxy(fault_rate=1.0, seed=0, kinds=(kind,))
    fs = s3fs.S3FileSystem(
        endpoint_url=proxy.endpoint,
        config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}},
        skip_instance_cache=True,
    )
    fs.retries = 1  # s3fs's own retry loop, off
    bucket = s3_bucket.removeprefix("s3://")
    for op in (
        lambda: fs.pipe_file(f"{bucket}/x.bin", b"payload"),
        lambda: fs.cat_file(f"{bucket}/x.bin"),
    ):
        with pytest.raises(Exception) as info:
            op()
        assert storage.is_retryable(info.value), (
            f"{kind}: {type(info.value).__name__}: {info.value}"
        )
    assert proxy.faults[kind] >= 2
    # and a plain missing object is not (retrying it would only waste time)
    proxy.enabled = False
    with pytest.raises(FileNotFoundError) as info:
        fs.cat_file(f"{bucket}/missing.bin")
    assert not storage.is_retryable(info.value)


# --- a real stage through the faults: pretokenize reading raw shards from and writing token
# shards to S3 --------------------------------------------------------------------------------


def test_pretokenize_through_s3_faults_loses_and_duplicates_nothing(
    s3_bucket, direct, through_proxy, tmp_path, monkeypatch
):
    from pipeline.config import load_config
    from pipeline.data import shards
    from pipeline.data.pretokenize import PretokenizeConfig, run_pretokenize
    from tests.rawshards import build_tiny_models, write_raw_shards

    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    tiny = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "data",
                        "pretokenize_tiny.yaml")  # fmt: skip
    models = build_tiny_models(str(tmp_path / "models"))
    raw = f"{s3_bucket}/raw"
    write_raw_shards(raw, 2, 3)

    def run(output: str) -> dict:
        cfg = load_config(PretokenizeConfig, tiny, [
            f"input={raw}", f"output={output}", f"vq.uri={models['vq']}",
            f"text.uri={models['t5']}", "executor.backend=inline",
        ])  # fmt: skip
        return run_pretokenize(cfg)

    reference = run(str(tmp_path / "reference"))  # no proxy: the fault-free result
    assert reference["num_shards"] == 2 and not reference["failed_shards"]

    # a lower rate than above keeps botocore's backoff sleeps (about 0.8 s a fault) affordable
    proxy = through_proxy(fault_rate=0.2, seed=1)
    faulty = run(f"{s3_bucket}/tokens")
    assert proxy.total_faults >= 4, dict(proxy.faults)
    assert (
        proxy.faults["reset:PUT"] + proxy.faults["slowdown:PUT"] + proxy.faults["internal:PUT"] >= 1
    ), dict(proxy.faults)
    assert not faulty["failed_shards"]
    for k in ("num_shards", "num_samples", "num_bytes", "dropped"):
        assert faulty[k] == reference[k], k

    # what S3 holds, read without the proxy: exactly the expected objects, each shard
    # byte-identical to the fault-free run's (no lost or repeated samples, no stray objects)
    got = objects(direct, s3_bucket, "tokens/")
    names = {
        *(f"tokens/{shards.shard_name(i)}" for i in range(2)),
        *(f"tokens/{shards.done_name(i)}" for i in range(2)),
        "tokens/manifest.json",
        "tokens/pretokenize_config.yaml",
        "tokens/pretokenize_inputs.json",  # the model weights' fingerprints
    }
    assert set(got) == names
    for entry in reference["shards"]:
        data = got[f"tokens/{entry['uri']}"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    manifest = json.loads(got["tokens/manifest.json"])
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert unfinished_uploads(direct, s3_bucket) == []


# --- a real stage through the faults: training checkpoints mirrored to S3 and resumed from it ---

_TRAIN_DRIVER = """
import json, sys
from pipeline.config import load_config
from pipeline.log import setup_logging
from pipeline.train import engine
from pipeline.train.trainer import TrainConfig, train

setup_logging()
for overrides in json.loads(sys.argv[1]):
    train(load_config(TrainConfig, "configs/train/tiny.yaml", overrides))
engine.shutdown(0)
"""


def test_training_checkpoints_through_s3_faults_are_complete_and_resumable(
    s3_bucket, direct, through_proxy, tmp_path
):
    import glob
    import subprocess
    import sys

    from pipeline.train.toy_data import write_toy_token_shards
    from tests.conftest import free_port

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = str(tmp_path / "toy")  # local: the faults stay on the checkpoint path
    write_toy_token_shards(data, num_shards=2, per_shard=16, grid_size=4, caption_dim=16,
                           vocab_size=64)  # fmt: skip
    run_dir = f"{s3_bucket}/runs/tiny"
    common = [f"run_dir={run_dir}", f"data.shards=[{data}]", "ckpt_every=10", "keep_last=5",
              "tensorboard=false", "data.num_workers=0", "optim.schedule=cosine"]  # fmt: skip
    runs = [  # a run to step 20; then from an empty local dir, so step 20 comes back from S3
        [*common, f"local_dir={tmp_path / 'a'}", "steps=20", "export=false"],
        # extended to 25 steps: its cosine schedule is another from the first step on
        [*common, f"local_dir={tmp_path / 'b'}", "steps=25"],
    ]
    driver = tmp_path / "driver.py"
    driver.write_text(_TRAIN_DRIVER)
    proxy = through_proxy(fault_rate=0.2, seed=2)  # AWS_ENDPOINT_URL now names the proxy
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "T2I_PROGRESS": "0"}
    try:
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(port), str(driver),
             json.dumps(runs)],
            cwd=repo, env=env, timeout=300, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    finally:
        for p in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            os.remove(p)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert proxy.total_faults >= 4, dict(proxy.faults)
    assert (
        proxy.faults["reset:PUT"] + proxy.faults["slowdown:PUT"] + proxy.faults["internal:PUT"] >= 1
    ), dict(proxy.faults)
    assert "resumed from checkpoint step_00000020" in out
    assert "downloading checkpoint" in out
    # the extended run's first step trains at its own schedule's LR, not the checkpoint's
    from pipeline.config import load_config
    from pipeline.train.optim import lr_lambda
    from pipeline.train.trainer import TrainConfig

    assert "the LR schedule differs from the checkpoint's" in out
    cfg = load_config(TrainConfig, "configs/train/tiny.yaml", runs[1])
    steps = [json.loads(x) for x in (tmp_path / "b" / "metrics" / "steps.jsonl").open()]
    peak = steps[1]["lr"]  # the end of the 2-step warmup (the first run's record, kept)
    for r in steps[20:]:
        want = peak * lr_lambda(cfg.optim, 25)(r["step"] - 1)
        assert r["lr"] == pytest.approx(want, rel=1e-6), r["step"]

    # S3 (read without the proxy) holds each checkpoint exactly as written locally: every file,
    # byte for byte, nothing else, and the completion marker
    got = objects(direct, s3_bucket, "runs/tiny/checkpoints/")
    for local_root, tags in ((tmp_path / "a", ("step_00000010", "step_00000020")),
                             (tmp_path / "b", ("step_00000025",))):  # fmt: skip
        for tag in tags:
            folder = local_root / "checkpoints" / tag
            files = {
                str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            }
            assert "COMPLETE.json" in files and "rank_state_00001.pt" in files
            remote = {k.split(f"{tag}/", 1)[1]: v for k, v in got.items() if f"/{tag}/" in k}
            assert remote == files, f"{tag}: S3 differs from the local checkpoint"
    tags = {k.split("/")[3] for k in got}
    assert tags == {"step_00000010", "step_00000020", "step_00000025"}
    assert {"model.safetensors", "gpt_config.json"} <= {
        k.rsplit("/", 1)[1] for k in objects(direct, s3_bucket, "runs/tiny/export/")
    }
    assert unfinished_uploads(direct, s3_bucket) == []
