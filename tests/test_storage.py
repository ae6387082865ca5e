import os

import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_remove(root):
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_json(storage.join(root, "a", "y.json"), {"k": 1})
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.read_json(storage.join(root, "a", "y.json")) == {"k": 1}
    assert storage.list_dir(storage.join(root, "a")) == ["x.bin", "y.json"]
    assert storage.list_dir(storage.join(root, "a"), suffix=".json") == ["y.json"]
    assert storage.list_dir(storage.join(root, "missing")) == []
    assert storage.size(storage.join(root, "a", "x.bin")) == 5
    storage.remove(storage.join(root, "a", "x.bin"))
    assert not storage.exists(storage.join(root, "a", "x.bin"))


def test_open_write_is_atomic(root):
    target = storage.join(root, "b.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(target) as f:
            f.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(target)
    with storage.open_write(target) as f:
        f.write(b"complete")
    assert storage.read_bytes(target) == b"complete"


def test_local_copy_of_directory(root, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    storage.put_dir(src, storage.join(root, "model"))
    local = storage.local_copy(storage.join(root, "model"))
    assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"\x00\x01"
    assert open(os.path.join(local, "config.json")).read() == "{}"
    if storage.is_remote(root):  # a download into the cache, which a second call reuses
        assert local.startswith(str(tmp_path / "cache"))
        storage.write_bytes(storage.join(root, "model", "config.json"), b"{}")  # unchanged
        assert storage.local_copy(storage.join(root, "model")) == local
    else:  # a local folder is used where it is: no copy
        assert os.path.samefile(local, storage.join(root, "model"))
        assert not (tmp_path / "cache").exists()


def test_retry_classification():
    class FakeClientError(Exception):
        def __init__(self, code):
            self.response = {"Error": {"Code": code}}

    assert storage.is_retryable(FakeClientError("SlowDown"))
    assert storage.is_retryable(ConnectionResetError("Connection reset by peer"))
    assert not storage.is_retryable(FakeClientError("NoSuchKey"))
    for transient in (
        "An error occurred (503) when calling the GetObject operation: Slow Down",
        "503 Service Unavailable",
        "server returned HTTP 503",
        "Status code 503",
    ):
        assert storage.is_retryable(OSError(transient)), transient
    for damage in ("ends after 503 of 1000 samples", "s3://b/raw/00503.tar: not a gzip file"):
        assert not storage.is_retryable(EOFError(damage)), damage
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise FakeClientError("SlowDown")
        return "ok"

    assert storage.with_retries(flaky, "test", base_delay=0.001) == "ok"
    assert len(calls) == 3


class _SlowDown(Exception):
    response = {"Error": {"Code": "SlowDown"}}


def test_with_retries_gives_up_after_attempts():
    calls = []

    def always_slow():
        calls.append(1)
        raise _SlowDown(f"attempt {len(calls)}")

    with pytest.raises(_SlowDown, match="attempt 4"):  # the last attempt's error
        storage.with_retries(always_slow, "test", attempts=4, base_delay=0.001)
    assert len(calls) == 4


def test_with_retries_raises_a_non_retryable_error_at_once():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/missing.bin")

    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.with_retries(missing, "test", attempts=6, base_delay=0.001)
    assert len(calls) == 1


def test_get_dir_missing_only_keeps_what_is_there(root, tmp_path):
    for name, data in (("a.bin", b"remote a"), ("sub/b.bin", b"remote b"), ("c.bin", b"remote c")):
        storage.write_bytes(storage.join(root, *name.split("/")), data)
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "a.bin").write_bytes(b"local a")
    assert storage.get_dir(root, str(local), missing_only=True) == 2
    assert (local / "a.bin").read_bytes() == b"local a"  # not overwritten
    assert (local / "sub" / "b.bin").read_bytes() == b"remote b"
    assert (local / "c.bin").read_bytes() == b"remote c"
    assert storage.get_dir(root, str(local), missing_only=True) == 0
    assert storage.get_dir(root, str(local)) == 3  # by default every file
    assert (local / "a.bin").read_bytes() == b"remote a"


def test_local_copy_is_made_once_by_concurrent_threads(s3_bucket, tmp_path, monkeypatch):
    """The actors of one node share the cache: one copies, the others wait and reuse it (before,
    each copied, and one's rmtree could delete the copy another was loading). Threads stand in
    for the actors' processes: ``flock`` locks belong to an open file, so two threads that open
    the lock file contend for it as two processes do. The copy waits until every caller has
    reached the lock, so all of them overlap it for certain."""
    import fcntl
    import threading

    n_callers = 6
    uri = f"{s3_bucket}/models/t5"
    for name in ("config.json", "weights.bin", "tok/spiece.model"):
        storage.write_bytes(storage.join(uri, *name.split("/")), name.encode() * 100)
    copies = []
    arrived = threading.Condition()
    at_lock = [0]
    real_flock, real_get_dir = fcntl.flock, storage.get_dir

    def counting_flock(fd, op):
        if op == fcntl.LOCK_EX:
            with arrived:
                at_lock[0] += 1
                arrived.notify_all()
        return real_flock(fd, op)

    def copy_when_all_wait(*a, **kw):
        copies.append(1)
        with arrived:  # every caller passed the cache check before the copy exists
            everyone = arrived.wait_for(lambda: at_lock[0] == n_callers, timeout=60)
        assert everyone, f"only {at_lock[0]} of {n_callers} callers reached the lock"
        return real_get_dir(*a, **kw)

    monkeypatch.setattr(storage.fcntl, "flock", counting_flock)
    monkeypatch.setattr(storage, "get_dir", copy_when_all_wait)
    results, errors = [], []

    def worker():
        try:
            results.append(storage.local_copy(uri, tmp_path / "cache"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n_callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(copies) == 1
    assert len(results) == n_callers and len(set(results)) == 1
    assert (
        open(os.path.join(results[0], "tok", "spiece.model"), "rb").read()
        == b"tok/spiece.model" * 100
    )


def test_local_copy_is_copied_again_when_the_source_changes(s3_bucket, tmp_path, monkeypatch):
    uri = f"{s3_bucket}/models/vq"
    storage.write_bytes(f"{uri}/weights.bin", b"version 1")
    storage.write_bytes(f"{uri}/config.json", b"{}")
    single = f"{s3_bucket}/models/head.pth"
    storage.write_bytes(single, b"head 1")
    copies = []
    real_get_dir, real_get_file = storage.get_dir, storage.get_file
    monkeypatch.setattr(
        storage, "get_dir", lambda *a, **k: copies.append(a[0]) or real_get_dir(*a, **k)
    )
    monkeypatch.setattr(
        storage, "get_file", lambda *a, **k: copies.append(a[0]) or real_get_file(*a, **k)
    )
    cache = tmp_path / "cache"

    local = storage.local_copy(uri, cache)
    assert storage.local_copy(uri, cache) == local and copies.count(uri) == 1  # reused
    storage.write_bytes(f"{uri}/weights.bin", b"version 2 (retrained)")
    local2 = storage.local_copy(uri, cache)
    assert local2 == local and copies.count(uri) == 2
    assert open(os.path.join(local, "weights.bin"), "rb").read() == b"version 2 (retrained)"

    path = storage.local_copy(single, cache)
    storage.write_bytes(single, b"head 2")
    assert open(storage.local_copy(single, cache), "rb").read() == b"head 2"
    assert path.endswith("head.pth") and copies.count(single) == 2


def test_local_fingerprint_follows_content_not_times(tmp_path):
    """The same bytes written again keep their fingerprint (a model exported again unchanged);
    other bytes of the same size change it, in a small file and in a large one (sampled)."""
    d = tmp_path / "model"
    d.mkdir()
    small, big = d / "config.json", d / "weights.bin"
    small.write_bytes(b'{"dim": 64}')
    data = bytearray(os.urandom(8 << 20))
    big.write_bytes(bytes(data))
    first = storage.fingerprint(str(d))
    os.utime(big, ns=(1, 1))
    small.write_bytes(b'{"dim": 64}')  # rewritten, same content
    assert storage.fingerprint(str(d)) == first
    small.write_bytes(b'{"dim": 65}')
    assert storage.fingerprint(str(d)) != first
    small.write_bytes(b'{"dim": 64}')
    step = ((8 << 20) - storage._SAMPLE_BYTES) // (storage._SAMPLE_BLOCKS - 1)
    data[8 * step + 10] ^= 0xFF  # one byte inside a sampled block of the large file
    big.write_bytes(bytes(data))
    assert storage.fingerprint(str(d)) != first
    assert storage.fingerprint(str(tmp_path / "absent")) is None


def test_fingerprint_of_a_folder_ignores_a_trailing_slash(root):
    """``model/`` and ``model`` are one source: a resume that spells the model's URI with a
    slash must not read as other weights. On S3 the digest of the plain spelling is the one
    earlier runs stored (names relative to the folder, with their leading slash)."""
    import hashlib

    storage.write_bytes(storage.join(root, "model", "config.json"), b"{}")
    storage.write_bytes(storage.join(root, "model", "sub", "w.bin"), b"weights")
    plain = storage.fingerprint(storage.join(root, "model"))
    assert plain is not None and storage.fingerprint(storage.join(root, "model") + "/") == plain
    storage.write_bytes(storage.join(root, "model", "sub", "w.bin"), b"other weights")
    assert storage.fingerprint(storage.join(root, "model") + "/") != plain
    if storage.is_remote(root):
        fs, path = storage._fresh(storage.join(root, "model"))
        entries = fs.find(path, detail=True).values()
        old = sorted(
            (e["name"].removeprefix(path), e["size"], str(e.get("ETag") or "")) for e in entries
        )
        assert {n for n, _, _ in old} == {"/config.json", "/sub/w.bin"}
        want = hashlib.sha256(repr(old).encode()).hexdigest()[:20]
        assert storage.fingerprint(storage.join(root, "model")) == want


def test_remote_checks_see_what_another_process_wrote_after_a_listing(s3_server, s3_bucket):
    """s3fs caches a listing: after ``list_dir``, an object another client wrote since must
    still be seen by ``exists``, ``size``, ``fingerprint`` and ``open_read`` (done markers,
    replaced models, shards)."""
    import boto3

    root = f"{s3_bucket}/d"
    storage.write_bytes(f"{root}/a.txt", b"a")
    assert storage.list_dir(root) == ["a.txt"]  # fills the listing cache
    other = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    other.put_object(Bucket=bucket, Key="d/b.txt", Body=b"bbb")
    other.put_object(Bucket=bucket, Key="d/a.txt", Body=b"aaaa")
    assert storage.exists(f"{root}/b.txt")
    assert storage.size(f"{root}/a.txt") == 4
    assert storage.fingerprint(f"{root}/b.txt") is not None
    assert storage.list_dir(root) == ["a.txt", "b.txt"]
    other.put_object(Bucket=bucket, Key="d/c.txt", Body=b"cc")
    other.put_object(Bucket=bucket, Key="d/a.txt", Body=b"aaaaa")
    with storage.open_read(f"{root}/c.txt") as f:  # written after the listing
        assert f.read() == b"cc"
    with storage.open_read(f"{root}/a.txt") as f:  # rewritten after it
        assert f.read() == b"aaaaa"


def test_get_dir_copies_local_symlinked_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"abc")
    os.symlink("../a.bin", src / "sub" / "link.bin")
    assert storage.get_dir(str(src), str(tmp_path / "dst")) == 2
    assert (tmp_path / "dst" / "sub" / "link.bin").read_bytes() == b"abc"


def test_get_dir_skips_s3_folder_markers(s3_server, s3_bucket, tmp_path):
    """Zero-byte "folder" keys ending in "/" (the AWS console's "Create folder") are no files:
    a model uploaded into such a folder copies and loads."""
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for key, body in [
        ("models/t5/", b""),
        ("models/t5/sub/", b""),
        ("models/t5/config.json", b"{}"),
        ("models/t5/sub/w.bin", b"123"),
    ]:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    assert storage.get_dir(f"{s3_bucket}/models/t5", tmp_path / "t5") == 2
    assert (tmp_path / "t5" / "config.json").read_bytes() == b"{}"
    assert (tmp_path / "t5" / "sub" / "w.bin").read_bytes() == b"123"
    local = storage.local_copy(f"{s3_bucket}/models/t5/")
    assert sorted(os.listdir(local)) == ["config.json", "sub"]


def test_local_copy_of_a_source_replaced_mid_copy_is_made_again(s3_bucket, tmp_path, monkeypatch):
    """s3fs fetches a large object as several range requests, none pinned to one version: an
    export saved again at the same URI while a sampler copied it gave a cached file of both
    versions, loaded without an error. The source is listed again after the copy; a change
    means copy again (and, changing every time, a clear error with nothing cached)."""
    uri = f"{s3_bucket}/runs/stage1/export/model.safetensors"
    storage.write_bytes(uri, b"A" * 1000)
    real_get_file, versions = storage.get_file, [v * 1000 for v in (b"B", b"C", b"D")]

    def get_file_then_replaced(src, dst):
        real_get_file(src, dst)
        if versions:  # the writer saves a new version while this copy is being made
            storage.write_bytes(uri, versions.pop(0))

    monkeypatch.setattr(storage, "get_file", get_file_then_replaced)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"changed while it was being copied, 3 times"):
        storage.local_copy(uri, cache)
    leftovers = sorted(
        p.name for p in (cache / "s3" / s3_bucket[5:] / "runs/stage1/export").iterdir()
    )
    assert leftovers == ["model.safetensors.lock"], leftovers  # no copy, no marker
    versions[:] = [b"E" * 1000]  # one change during the next copy: copied again, then taken
    local = storage.local_copy(uri, cache)
    assert open(local, "rb").read() == b"E" * 1000
    assert storage.local_copy(uri, cache) == local  # and reused, its marker the final version


def test_local_copy_removes_what_killed_copies_left(s3_bucket, tmp_path):
    """A copy killed mid-way (an actor stopped) left its staging folder or temporary file in the
    cache for good (FLAN-T5-XL: ~11 GB each time). The next copy, holding the lock, removes
    them; another model's files stay."""
    uri = f"{s3_bucket}/models/t5"
    storage.write_bytes(f"{uri}/config.json", b"{}")
    storage.write_bytes(f"{s3_bucket}/models/head.pth", b"head")
    folder = tmp_path / "cache" / "s3" / s3_bucket[5:] / "models"
    stale = [folder / "t5.partial-dead0001", folder / "t5.partial-dead0002"]
    for d in stale:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "w.bin").write_bytes(b"x" * 100)
    stale += [folder / "head.pth.tmp-dead0003", folder / "t5.complete.tmp-dead0004"]
    for f in stale[2:]:
        f.write_bytes(b"partial")
    kept = folder / "t5-large.partial-other"  # another model's copy, perhaps in progress
    kept.mkdir()
    storage.local_copy(uri, tmp_path / "cache")
    storage.local_copy(f"{s3_bucket}/models/head.pth", tmp_path / "cache")
    assert [p for p in stale if p.exists()] == [] and kept.exists()


def test_failed_writes_and_downloads_leave_no_temporary_file(s3_bucket, tmp_path, monkeypatch):
    """A full disk mid-write, or a download that fails, left ``x.tmp-NNNN`` beside the target
    (keeping the disk full for the retry)."""
    import errno

    def full(tmp, uri):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(storage, "_durable_replace", full)
        with pytest.raises(OSError, match="No space"):
            storage.write_bytes(str(tmp_path / "a" / "x.bin"), b"data")
        (tmp_path / "src.bin").write_bytes(b"data")
        with pytest.raises(OSError, match="No space"):
            storage.put_file(str(tmp_path / "src.bin"), str(tmp_path / "a" / "y.bin"))
    assert os.listdir(tmp_path / "a") == []

    storage.write_bytes(f"{s3_bucket}/obj.bin", b"z" * 100)
    fs, _ = storage.filesystem(f"{s3_bucket}/obj.bin")

    def half_then_fail(path, local, **kw):
        with open(local, "wb") as f:
            f.write(b"z" * 50)
        raise PermissionError("access denied mid-way")

    monkeypatch.setattr(fs, "get_file", half_then_fail)  # the instance filesystem() caches
    with pytest.raises(PermissionError):
        storage.get_file(f"{s3_bucket}/obj.bin", str(tmp_path / "b" / "obj.bin"))
    assert os.listdir(tmp_path / "b") == []


def test_local_fingerprint_reads_whole_files_once_and_accepts_older_sampled_ones(
    tmp_path, monkeypatch
):
    """Weights changed between the 16 sampled blocks (a few layers fine-tuned in place) kept
    the fingerprint, so pretokenize added shards of another encoder to an output. The whole
    file is digested now, remembered by path, size, mtime and inode (an unchanged model is
    read once); fingerprints saved the sampled way still match unchanged content."""
    import hashlib

    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "vq"
    d.mkdir()
    data = bytearray(os.urandom(8 << 20))
    (d / "w.bin").write_bytes(bytes(data))
    old = storage._local_fingerprint(str(d), storage._sampled_digest)  # as saved before
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, h: reads.append(1) or real(f, h))
    first = storage.fingerprint(str(d))
    assert storage.fingerprint(str(d)) == first and len(reads) == 1  # remembered
    assert storage.same_content(old, str(d), first)  # an output saved before: still its weights
    data[(1 << 20) + 12345] ^= 0xFF  # between the sampled blocks
    (d / "w.bin").write_bytes(bytes(data))
    assert storage._local_fingerprint(str(d), storage._sampled_digest) == old  # missed it
    now = storage.fingerprint(str(d))
    assert now != first and len(reads) == 2
    assert not storage.same_content(first, str(d), now)
    assert not storage.same_content(None, str(d), now)


def test_read_tail_gives_the_last_bytes_and_the_entry_a_listing_shows(root):
    uri = f"{root}/blob.bin"
    data = bytes(range(256)) * 4
    storage.write_bytes(uri, data)
    tail, entry = storage.read_tail(uri, 100)
    assert tail == data[-100:]
    assert entry == storage.list_files(root)["blob.bin"]  # size and version (ETag on S3)
    whole, entry = storage.read_tail(uri, 10_000)  # longer than the file: all of it
    assert whole == data and entry.size == len(data)
    storage.write_bytes(uri, b"other")  # replaced: the new version's bytes and entry
    tail, entry2 = storage.read_tail(uri, 3)
    assert tail == b"her" and entry2 == storage.list_files(root)["blob.bin"] != entry
