"""Fault tolerance: storage (and the stages built on it) under injected S3 faults.

A seeded proxy (``tests/s3faults.py``) sits between the client and the loopback S3 server and
answers a fraction of requests with 503 SlowDown, 500 InternalError, or a connection reset after
S3 has applied the request. Every test checks the result against S3 itself (bypassing the
proxy): every object present, with the right bytes, and nothing extra (no duplicates, no stray
temporary objects, no unfinished multipart uploads).
"""

from __future__ import annotations

import hashlib
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
    n = 12
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

    storage.remove(storage.join(root, "objs", "011.bin"))
    del expected["data/objs/011.bin"]

    # faults were really injected, of every kind, on reads and writes
    assert proxy.total_faults >= 8, dict(proxy.faults)
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
