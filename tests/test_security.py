"""Security: credentials only from the AWS chain and never logged or sent; nothing from a shard or
a checkpoint is ever unpickled; unsafe tar members are not followed; the download address guard
sees through encoded addresses."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import pickle
import tarfile
import uuid

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.data import netguard, shards
from tests.s3faults import FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = [
    os.path.join(d, f)
    for top in ("pipeline", "jobs")
    for d, _, files in os.walk(os.path.join(ROOT, top))
    for f in files
    if f.endswith(".py")
]


class Boom:
    """A pickle payload: unpickling it creates the directory ``marker`` (a harmless "exploit")."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# --- credentials ---------------------------------------------------------------------------------


@pytest.fixture()
def all_debug_logs():
    """Every logger at DEBUG (botocore, s3fs, urllib3 included); yields the captured records."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    names = ["", "botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "fsspec", "pipeline"]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


def _log_text(records: list[logging.LogRecord]) -> str:
    fmt = logging.Formatter("%(name)s %(message)s")
    return "\n".join(fmt.format(r) for r in records)


def test_secret_key_is_never_logged_nor_sent(s3_server, s3_bucket, monkeypatch, all_debug_logs):
    secret = f"t2iSECRET{uuid.uuid4().hex}"
    key_id = "AKIDT2ISECURITYTEST"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    errors = []
    # faults too: the retry path logs the errors it meets
    with FaultProxy(s3_server, fault_rate=0.3, seed=11, record=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        root = f"{s3_bucket}/sec"
        for i in range(4):
            storage.write_bytes(f"{root}/{i}.bin", b"x" * 100)
        storage.write_json(f"{root}/meta.json", {"ok": True})
        assert storage.list_dir(root) == ["0.bin", "1.bin", "2.bin", "3.bin", "meta.json"]
        assert storage.read_json(f"{root}/meta.json") == {"ok": True}
        with storage.open_write(f"{root}/stream.bin") as f:
            f.write(b"y" * 1000)
        with pytest.raises(FileNotFoundError) as missing:
            storage.read_bytes(f"{root}/missing.bin")
        errors.append(f"{missing.value!r} {missing.value}")
    assert proxy.total_faults >= 1
    text = _log_text(all_debug_logs)
    assert any(r.name.startswith("botocore") for r in all_debug_logs), "DEBUG logs not captured"
    assert secret not in text
    assert all(secret not in e for e in errors)
    wire = b"".join(
        f"{m} {p} {h}".encode() + body for m, p, h, body in proxy.recorded
    )  # SigV4 signs with the secret but never sends it
    assert secret.encode() not in wire
    # the credentials of the standard chain (here: the environment) were the ones used
    auth = [h.get("Authorization", "") for _, _, h, _ in proxy.recorded]
    assert auth and all(f"Credential={key_id}/" in a for a in auth)


def test_credentials_come_from_the_standard_chain(s3_server, s3_bucket, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "config"
    config.write_text("")
    creds = tmp_path / "credentials"
    creds.write_text("[t2i]\naws_access_key_id = AKIDFROMPROFILE\naws_secret_access_key = s3cr3t\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup here

    # a named profile of the shared credentials file
    with FaultProxy(s3_server, fault_rate=0.0, record=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_PROFILE", "t2i")
        storage.write_bytes(f"{s3_bucket}/p.bin", b"from a profile")
        assert storage.read_bytes(f"{s3_bucket}/p.bin") == b"from a profile"
    auth = [h.get("Authorization", "") for _, _, h, _ in proxy.recorded]
    assert auth and all("Credential=AKIDFROMPROFILE/" in a for a in auth)

    # no credentials anywhere: a clear error, not an anonymous request and not endless retries
    with FaultProxy(s3_server, fault_rate=0.0, record=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.delenv("AWS_PROFILE")
        with pytest.raises(Exception, match="(?i)credentials"):
            storage.read_bytes(f"{s3_bucket}/p.bin")
    assert proxy.recorded == []


def test_library_never_handles_keys_itself():
    """No code path passes keys to boto3/s3fs or reads them from the environment by hand."""
    needles = ("aws_secret_access_key", "aws_access_key_id", "AWS_SECRET_ACCESS_KEY", "secret=")
    for path in LIBRARY:
        text = open(path).read()
        for n in needles:
            assert n not in text, f"{os.path.relpath(path, ROOT)} mentions {n}"


# --- no unpickling from shards -------------------------------------------------------------------


def _tar(path: str, members: list[tuple[str, bytes | None, str | None]]) -> None:
    """A tar of (name, data, symlink target) members, written as given (no checks)."""
    with tarfile.open(path, "w") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(key: str, grid: int = 2, dim: int = 8) -> list[tuple[str, bytes, None]]:
    s = shards.encode_token_sample(
        key, np.arange(grid * grid).reshape(grid, grid), np.ones((3, dim)), f"caption {key}", {}
    )
    return [
        (f"{key}.{ext}", v if isinstance(v, bytes) else v.encode(), None)
        for ext, v in sorted(s.items())
        if ext != "__key__"
    ]


def _object_npy(marker: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Boom(marker), 1], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.fixture()
def hostile_shard(tmp_path):
    """A token shard (with its done marker) whose members try to run code when read."""
    marker = str(tmp_path / "PWNED")
    out = tmp_path / "tokens"
    out.mkdir()
    members = (
        _good("a")
        + [("a.pkl", pickle.dumps(Boom(marker)), None), ("a.pyd", pickle.dumps(Boom(marker)), None)]
        + _good("b")
        + [("c.codes.npy", _object_npy(marker), None)]  # an object array: pickled payload
        + _good("c")[1:]  # c's other members (json, t5.npy, txt) are fine
    )
    _tar(str(out / shards.shard_name(0)), members)
    info = shards.ShardInfo(0, str(out / "00000.tar"), 3, 0, "0" * 64)
    (out / shards.done_name(0)).write_text(json.dumps(info.to_dict()))
    return out, marker


def test_shard_reader_never_unpickles(hostile_shard):
    out, marker = hostile_shard
    decoded, refused = [], []
    with open(out / "00000.tar", "rb") as f:
        for raw in shards.iter_tar_samples(f):
            try:
                decoded.append(shards.decode_token_sample(raw))
            except ValueError as e:
                refused.append((raw["__key__"], str(e)))
    assert [s["key"] for s in decoded] == ["a", "b"]
    assert "pkl" not in decoded[0] and "pyd" not in decoded[0]
    assert [k for k, _ in refused] == ["c"] and "pickle" in refused[0][1].lower()
    with open(out / "00000.tar", "rb") as f:
        with pytest.raises(ValueError, match="unexpected member"):
            shards.decode_token_sample(next(shards.iter_tar_samples(f)), strict=True)
    assert not os.path.exists(marker)
    # the payloads are live: unpickling them the unsafe way does run them
    np.load(io.BytesIO(_object_npy(marker)), allow_pickle=True)
    assert os.path.exists(marker)


def test_training_loader_never_unpickles(hostile_shard):
    from pipeline.data.loader import BatchSpec, LoaderConfig, TokenLoader

    out, marker = hostile_shard
    cfg = LoaderConfig(shards=[str(out)], batch_size=1, num_workers=0, shuffle=False, flip=False)
    loader = TokenLoader(cfg, BatchSpec(grid_size=2, max_text_tokens=4, caption_dim=8))
    it = iter(loader)
    keys = [next(it)["keys"][0] for _ in range(3)]
    assert keys == ["a", "b", "a"]  # c was refused, then the next epoch began
    assert loader.counters()["bad_samples"] == 1
    assert not os.path.exists(marker)


# --- torch.load only with weights_only=True ------------------------------------------------------


def test_every_torch_load_uses_weights_only():
    calls = []
    for path in LIBRARY:
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and (
                    kw["weights_only"].value is True
                )
                calls.append((os.path.relpath(path, ROOT), node.lineno, ok))
    assert calls, "no torch.load found: is the scan looking in the right place?"
    unsafe = [(p, n) for p, n, ok in calls if not ok]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    text = "\n".join(open(p).read() for p in LIBRARY)
    assert "pickle.load" not in text and "pickle.loads" not in text
    assert "allow_pickle=True" not in text


@pytest.fixture()
def hostile_checkpoint(tmp_path):
    marker = str(tmp_path / "PWNED")
    path = str(tmp_path / "evil.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Boom(marker)}, path)
    return path, marker


def test_model_loaders_refuse_a_pickle_checkpoint(hostile_checkpoint):
    from pipeline.models.aesthetic import load_head
    from pipeline.models.gpt import GPTConfig
    from pipeline.models.gpt_import import load_llamagen_gpt
    from pipeline.models.vq import load_vq_state_dict

    path, marker = hostile_checkpoint
    loaders = {
        "vq": lambda: load_vq_state_dict(path),
        "aesthetic": lambda: load_head(path),
        "llamagen_gpt": lambda: load_llamagen_gpt(path, GPTConfig.from_name("debug")),
    }
    for name, load in loaders.items():
        with pytest.raises(pickle.UnpicklingError, match="(?i)weights_only|unsupported global"):
            load()
        assert not os.path.exists(marker), f"{name} ran the checkpoint's code"
    # and the payload is live: the unsafe load runs it
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


# --- unsafe tar members --------------------------------------------------------------------------


def test_symlink_members_are_not_followed(tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_text("private file outside the shard")
    tar = tmp_path / "links.tar"
    _tar(str(tar), _good("a")[:-1] + [("a.txt", None, str(secret))] + _good("b"))
    with open(tar, "rb") as f:
        samples = [shards.decode_token_sample(raw) for raw in shards.iter_tar_samples(f)]
    assert [s["key"] for s in samples] == ["a", "b"]
    assert "txt" not in samples[0]  # the link was skipped, not read through
    assert samples[1]["txt"] == "caption b"


@pytest.mark.parametrize("prefix", ["../", "/tmp/", "sub/../../"])
def test_members_with_unsafe_paths_are_refused(tmp_path, prefix):
    tar = tmp_path / "paths.tar"
    evil = [(prefix + n, d, link) for n, d, link in _good("evil")]
    _tar(str(tar), _good("a") + evil + _good("b"))
    got, refused = [], []
    with open(tar, "rb") as f:
        for raw in shards.iter_tar_samples(f):
            try:
                got.append(shards.decode_token_sample(raw)["key"])
            except ValueError:
                refused.append(raw["__key__"])
    assert got == ["a", "b"], f"a member named {prefix}evil.* was accepted as a sample"
    assert refused == [prefix + "evil"]
    # raw shards: pretokenize drops such keys as "bad_key" before they reach a token shard
    assert not shards.valid_key(prefix + "evil")
    # nothing was written anywhere by reading
    assert sorted(os.listdir(tmp_path)) == ["paths.tar"]


# --- the download address guard: encoded addresses -------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://0x7f000001/",  # ... in hex
        "http://0177.0.0.1/",  # ... with an octal first part
        "http://127.1/",  # ... short form
        "http://example.com@127.0.0.1/",  # userinfo: the host is 127.0.0.1
        "http://[::ffff:169.254.169.254]/latest/meta-data/",  # IPv4-mapped metadata address
        "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
        "http://[2002:a00:1::]/",  # 6to4 of 10.0.0.1
        "HTTP://10.0.0.1/",  # scheme case
        "  http://10.0.0.1/  ",  # surrounding blanks
        "http://0/",  # 0.0.0.0
    ],
)
def test_address_guard_sees_through_encodings(url):
    # numeric host forms resolve without DNS (the C library parses them)
    reason = netguard.AddressGuard().check(url)
    assert reason is not None, f"{url!r} was allowed"
