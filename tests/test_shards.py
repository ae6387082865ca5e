import hashlib
import io
import json
import os
import pickle
import random
import re

import numpy as np
import pytest
import webdataset as wds

from pipeline import storage
from pipeline.data import shards


def _samples(n: int, seed: int = 0, flip: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(1, 121))
        out.append(
            dict(
                key=f"{i:09d}",
                codes=rng.integers(0, 16384, size=(16, 16)),
                codes_flip=rng.integers(0, 16384, size=(16, 16)) if flip else None,
                t5=rng.standard_normal((L, 32)).astype(np.float32),
                caption=f"a red circle number {i} ü",
                meta={"url": f"http://x/{i}.jpg", "width": 256, "score": np.float32(0.5)},
            )
        )
    return out


def _write(out_uri: str, index: int, samples: list[dict]) -> shards.ShardInfo:
    with shards.TokenShardWriter(out_uri, index) as w:
        for s in samples:
            w.write(shards.encode_token_sample(**s))
        return w.close({"dropped": {"undecodable_image": 1}})


def test_deterministic_bytes_and_roundtrip_with_plain_webdataset(tmp_path):
    samples = _samples(12)
    a = _write(str(tmp_path / "a"), 3, samples)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    b = _write(str(tmp_path / "b"), 3, shuffled)
    raw_a = (tmp_path / "a" / "00003.tar").read_bytes()
    assert raw_a == (tmp_path / "b" / "00003.tar").read_bytes()
    assert a.sha256 == b.sha256 == hashlib.sha256(raw_a).hexdigest()
    assert a.num_bytes == len(raw_a) and a.num_samples == 12

    # plain webdataset, no decoder: raw bytes per member, decoded by our safe reader
    got = [
        shards.decode_token_sample(s, strict=True)
        for s in wds.WebDataset(str(tmp_path / "a" / "00003.tar"), shardshuffle=False)
    ]
    assert [g["key"] for g in got] == sorted(s["key"] for s in samples)
    by_key = {s["key"]: s for s in samples}
    for g in got:
        s = by_key[g["key"]]
        assert g["codes"].dtype == np.uint16 and g["t5"].dtype == np.float16
        np.testing.assert_array_equal(g["codes"], s["codes"].astype(np.uint16))
        np.testing.assert_array_equal(g["codes_flip"], s["codes_flip"].astype(np.uint16))
        np.testing.assert_array_equal(g["t5"], s["t5"].astype(np.float16))
        assert g["txt"] == s["caption"]
        assert g["json"] == {"url": s["meta"]["url"], "width": 256, "score": 0.5}
    assert [g["key"] for g in shards.read_token_shard(a.uri)] == [g["key"] for g in got]


def test_done_markers_and_manifest_on_s3(s3_bucket):
    out = f"{s3_bucket}/tokens"
    _write(out, 0, _samples(3, flip=False))
    _write(out, 2, _samples(5, seed=1, flip=False))
    # a tar without its marker (a worker killed between the two writes) is not done
    storage.write_bytes(storage.join(out, shards.shard_name(1)), b"half a shard")
    done = shards.list_done_shards(out)
    assert [d.index for d in done] == [0, 2]
    assert shards.list_done_shards(out, threads=1) == done  # markers read in parallel or not
    assert shards.is_done(out, 2) and not shards.is_done(out, 1)
    m = shards.merge_manifest(out)
    assert (m["num_shards"], m["num_samples"]) == (2, 8)
    assert m["dropped"] == {"undecodable_image": 2}
    assert storage.read_json(storage.join(out, shards.MANIFEST))["num_bytes"] == sum(
        d.num_bytes for d in done
    )
    got = list(shards.read_token_shard(done[1].uri))
    assert len(got) == 5 and "codes_flip" not in got[0]
    assert hashlib.sha256(storage.read_bytes(done[1].uri)).hexdigest() == done[1].sha256


def test_failed_block_commits_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.TokenShardWriter(str(tmp_path), 0) as w:
            w.write(shards.encode_token_sample(**_samples(1)[0]))
            raise RuntimeError("killed")
    assert storage.list_dir(str(tmp_path)) == []


def test_rejects_bad_input(tmp_path):
    s = _samples(1)[0]
    with pytest.raises(ValueError, match="key"):
        shards.encode_token_sample(**{**s, "key": "a.b"})
    with pytest.raises(ValueError, match="t5"):
        shards.encode_token_sample(**{**s, "t5": np.zeros((121, 4))})
    w = shards.TokenShardWriter(str(tmp_path), 0)
    w.write(shards.encode_token_sample(**s))
    with pytest.raises(ValueError, match="duplicate"):
        w.write(shards.encode_token_sample(**s))
    with pytest.raises(ValueError, match="unknown member"):
        w.write({**shards.encode_token_sample(**{**s, "key": "k2"}), "x.pkl": b""})


def _explode():
    raise AssertionError("a shard member was unpickled")


class _Boom:
    def __reduce__(self):  # unpickling this calls _explode
        return (_explode, ())


def test_decode_never_unpickles():
    good = shards.encode_token_sample(**_samples(1)[0])
    evil = {**good, "extra.pkl": pickle.dumps(_Boom())}
    assert "extra" not in shards.decode_token_sample(evil)  # ignored, not loaded
    with pytest.raises(ValueError, match="unexpected member"):
        shards.decode_token_sample(evil, strict=True)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        shards.decode_token_sample({**good, "t5.npy": buf.getvalue()})
    with pytest.raises(ValueError, match="uint16"):
        shards.decode_token_sample({**good, "codes.npy": shards.npy_bytes(np.zeros((2, 2)))})
    assert json.loads(good["json"])["score"] == 0.5


def test_a_refused_raw_shard_is_raised_not_counted_as_damage(tmp_path, monkeypatch):
    """Access denied, expired credentials, an archived object: s3fs raises PermissionError (an
    OSError). Counted as a damaged tar, the shard would be marked done with its samples lost."""
    (tmp_path / "00000.tar").write_bytes(b"not a tar at all" * 64)
    stats: dict = {}
    assert list(shards.iter_raw_shard(str(tmp_path), 0, stats)) == []
    assert stats["corrupt_tar"] == 1  # real damage: counted, the shard ends

    def refused(uri):
        raise PermissionError(f"Access Denied: {uri}")

    monkeypatch.setattr(shards.storage, "open_read", refused)
    stats = {}
    with pytest.raises(PermissionError, match="Access Denied"):
        list(shards.iter_raw_shard(str(tmp_path), 0, stats))
    assert "corrupt_tar" not in stats and "raw_samples" not in stats

    # s3fs turns an S3 error code it does not know into OSError(EIO), an expired token into
    # OSError(EINVAL): at open they are the store's too (they were counted as a damaged tar, and
    # the shard marked done with 0 samples)
    import errno

    def eio(uri):
        raise OSError(errno.EIO, f"KMS.DisabledException: {uri}")

    monkeypatch.setattr(shards.storage, "open_read", eio)
    stats = {}
    with pytest.raises(OSError, match="KMS"):
        list(shards.iter_raw_shard(str(tmp_path), 0, stats))
    assert "corrupt_tar" not in stats and "raw_samples" not in stats


def test_a_read_error_mid_shard_is_raised_not_counted_as_damage(tmp_path, monkeypatch):
    """The store failing mid-read (s3fs turns InvalidToken into OSError(EINVAL), unknown codes
    into EIO) is raised as the store raised it: the shard is retried, never marked done short.
    A tar cut off in the middle of a member is damage: counted, the intact samples kept."""
    import errno
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            add(tar, f"{i:05d}.jpg", bytes(3000))
            add(tar, f"{i:05d}.txt", b"a caption")
    data = buf.getvalue()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    stats: dict = {}
    got = list(shards.iter_raw_shard(str(tmp_path), 0, stats))
    assert 0 < len(got) < 4 and stats["corrupt_tar"] == 1 and stats["raw_samples"] == len(got)

    (tmp_path / "00000.tar").write_bytes(data)

    class Expiring(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 5000:
                raise OSError(errno.EINVAL, "The provided token has expired (InvalidToken)")
            return super().read(n)

    monkeypatch.setattr(shards.storage, "open_read", lambda uri: Expiring(data))
    stats = {}
    with pytest.raises(OSError, match="InvalidToken") as info:
        list(shards.iter_raw_shard(str(tmp_path), 0, stats))
    assert info.value.errno == errno.EINVAL
    assert "corrupt_tar" not in stats and "raw_samples" not in stats


@pytest.mark.parametrize(
    "cut",
    [
        "after_a_whole_sample",
        "after_a_whole_sample_but_one_member",
        "inside_a_sample",
        "in_the_end_block",
    ],
)
def test_a_tar_cut_exactly_after_a_member_is_damage_not_a_short_shard(tmp_path, cut):
    """A stream tarfile ends quietly when the bytes stop right after a member (no header left to
    read), as on a real end: the sample cut in two was yielded with members missing (its image
    without its caption passed for an empty caption) and the shard was not counted as damaged.
    Only the end-of-archive block ends a tar; before it, the tar is counted as corrupt and the
    last sample is kept only with every member its predecessor had (the samples of a shard
    share one layout): a whole sample is not lost with the end block, a partial one is dropped."""
    import tarfile

    buf = io.BytesIO()
    offsets = []  # the end of each member's data (padded to a block): a cut there is silent
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            for ext, data in (("jpg", bytes(700)), ("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                offsets.append(tar.offset)
    data = buf.getvalue()
    stats: dict = {}
    (tmp_path / "00000.tar").write_bytes(data)
    assert len(list(shards.iter_raw_shard(str(tmp_path), 0, stats))) == 3
    assert "corrupt_tar" not in stats
    end = {
        "after_a_whole_sample": offsets[5],  # samples 0 and 1 whole, nothing of 2
        "after_a_whole_sample_but_one_member": offsets[4],  # sample 1 lacks its json
        "inside_a_sample": offsets[6],  # sample 2 has its jpg only
        "in_the_end_block": offsets[8] + 300,  # every member, a partial end block
    }[cut]
    (tmp_path / "00000.tar").write_bytes(data[:end])
    stats = {}
    got = list(shards.iter_raw_shard(str(tmp_path), 0, stats))
    assert stats["corrupt_tar"] == 1 and "end-of-archive" in stats["tar_error"]
    want = {
        "after_a_whole_sample": 2,
        "after_a_whole_sample_but_one_member": 1,
        "inside_a_sample": 2,
        "in_the_end_block": 3,
    }[cut]
    assert [s["__key__"] for s in got] == [f"{i:05d}" for i in range(want)]
    assert all(set(s) == {"__key__", "jpg", "txt", "json"} for s in got)
    assert stats["raw_samples"] == want


def test_manifest_t5_tokens_mean_is_over_samples_not_a_sum_of_shard_means(tmp_path):
    """Each shard stores its caption-token sum; the manifest's mean is sum / samples (it was the
    sum of the shards' means). A marker from before the sums were kept counts mean x samples."""
    out = str(tmp_path)
    for index, n, tokens in ((0, 3, 30), (1, 1, 2)):
        with shards.TokenShardWriter(out, index) as w:
            for s in _samples(n, seed=index):
                w.write(shards.encode_token_sample(**s))
            w.close({"written": n, "t5_tokens_sum": tokens, "t5_tokens_mean": tokens / n})
    m = shards.merge_manifest(out)
    assert m["t5_tokens_mean"] == pytest.approx(32 / 4)
    assert "t5_tokens_mean" not in m["stats_sum"] and m["stats_sum"]["t5_tokens_sum"] == 32
    marker = storage.join(out, shards.done_name(1))
    old = storage.read_json(marker)
    old["stats"] = {"written": 1, "t5_tokens_mean": 2.0}  # as written before
    storage.write_json(marker, old)
    assert shards.merge_manifest(out)["t5_tokens_mean"] == pytest.approx(32 / 4)


def _raw_tars(root, n=2, per=4):
    from tests.rawshards import write_raw_shards

    write_raw_shards(str(root), n, per, size=16)
    return [str(root / f"{i:05d}.tar") for i in range(n)]


def test_tokenizer_stream_raises_store_errors_instead_of_dropping_the_shard(
    tmp_path, monkeypatch, s3_bucket
):
    """The tokenizer-training stream read shards through a webdataset handler that swallowed
    every error: a missing object or a failing read lost the shard for the epoch (and put its
    size in the resumable state as 0). The store's errors are raised now, as for the score and
    pretokenize stages; a tar that breaks off gives what was intact and is counted."""
    from pipeline.data import raw

    tars = _raw_tars(tmp_path)
    storage.put_dir(str(tmp_path), f"{s3_bucket}/raw")
    remote = [f"{s3_bucket}/raw/{i:05d}.tar" for i in range(2)]
    storage.remove(remote[1])  # vanished (or an archived, refused object)
    got = []
    with pytest.raises(FileNotFoundError):
        for s in raw.iter_raw_samples(remote):
            got.append(s["__key__"])
    assert len(got) == 4  # the first shard, then the error
    stream = raw.RawImageStream(remote, image_size=8, batch_size=2, shuffle_buffer=2)
    with pytest.raises(FileNotFoundError):
        list(stream.epoch_samples(0))

    class Expiring(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 2000:
                raise OSError(5, "The provided token has expired (InvalidToken)")
            return super().read(n)

    monkeypatch.setattr(shards.storage, "open_read", lambda uri: Expiring(open(uri, "rb").read()))
    with pytest.raises(OSError, match="InvalidToken"):
        list(raw.iter_raw_samples(tars[:1]))

    monkeypatch.undo()
    data = open(tars[1], "rb").read()
    open(tars[1], "wb").write(data[: len(data) // 2])  # broken off mid-way: damage
    damaged: set[str] = set()
    keys = [s["__key__"] for s in raw.iter_raw_samples(tars, damaged)]
    assert 4 < len(keys) < 8 and damaged == {tars[1]}
    stream = raw.RawImageStream(tars, image_size=8, batch_size=2, shuffle_buffer=2)
    assert len(list(stream.epoch_samples(0))) == len(keys)
    assert stream.state_dict()["damaged_shards"] == [tars[1]]
    again = raw.RawImageStream(tars, image_size=8, batch_size=2, shuffle_buffer=2)
    again.load_state_dict(stream.state_dict())
    list(again.epoch_samples(1))  # read again in another epoch: still one damaged shard
    assert again.state_dict()["damaged_shards"] == [tars[1]]


def test_t5_short_round_trip_with_and_without_it(tmp_path):
    """A sample may carry the T5 features of its caption's first sentence (``t5_short.npy``), or
    be marked in its json as having none of its own (the first sentence is the whole caption:
    ``t5`` serves, not stored twice), or have neither (made without short captions; every
    older shard). All three round-trip, read back by our reader from a plain WebDataset, and
    the one without is byte for byte the sample it was before the member existed."""
    rng = np.random.default_rng(3)
    base = _samples(3, flip=False)
    own = rng.standard_normal((4, 32)).astype(np.float32)
    with_short = [
        {**base[0], "t5_short": own},
        {**base[1], "t5_short": "t5"},
        {**base[2], "t5_short": None},
    ]
    info = _write(str(tmp_path / "a"), 0, with_short)
    raw = {s["__key__"]: s for s in wds.WebDataset(info.uri, shardshuffle=False)}
    got = {g["key"]: g for g in (shards.decode_token_sample(s, strict=True) for s in raw.values())}
    k0, k1, k2 = (s["key"] for s in base)
    assert got[k0]["t5_short"].dtype == np.float16
    np.testing.assert_array_equal(got[k0]["t5_short"], own.astype(np.float16))
    assert got[k0]["json"]["url"] == base[0]["meta"]["url"]
    # the first sentence is the whole caption: no member, the reader hands out t5 itself
    assert "t5_short.npy" not in raw[k1] and got[k1]["json"]["t5_short"] == "t5"
    assert got[k1]["t5_short"] is got[k1]["t5"]
    assert "t5_short" not in got[k2] and "t5_short" not in got[k2]["json"]
    assert [g["key"] for g in shards.read_token_shard(info.uri, strict=True)] == [k0, k1, k2]
    # without t5_short: the same bytes as a shard written without the argument at all
    plain = _write(str(tmp_path / "b"), 0, [{**s, "t5_short": None} for s in base])
    before = _write(str(tmp_path / "c"), 0, base)
    assert plain.sha256 == before.sha256

    for bad in (
        rng.standard_normal((4, 16)),  # another width than t5's
        rng.standard_normal((121, 32)),  # more tokens than a shard holds
        np.zeros((0, 32)),
        "t5_full",
    ):
        with pytest.raises(ValueError, match="t5_short"):
            shards.encode_token_sample(**{**base[0], "t5_short": bad})
    with pytest.raises(ValueError, match="t5_short.npy: expected a 2D float16"):
        shards.decode_token_sample({**raw[k0], "t5_short.npy": shards.npy_bytes(own)})


def test_samples_without_t5_round_trip():
    """Class-conditional shards (pretokenize's text: null) hold no caption features: a sample
    without t5 is written and read back without one. Before, encoding required t5 and decoding
    refused a sample lacking t5.npy."""
    s = _samples(1)[0]
    sample = shards.encode_token_sample(**{**s, "t5": None, "caption": ""})
    assert "t5.npy" not in sample and sample["txt"] == b""
    got = shards.decode_token_sample(sample, strict=True)
    assert "t5" not in got and "t5_short" not in got and got["txt"] == ""
    assert np.array_equal(got["codes"], s["codes"])
    assert np.array_equal(got["codes_flip"], s["codes_flip"])
    with pytest.raises(ValueError, match="t5_short without t5"):
        shards.encode_token_sample(**{**s, "t5": None}, t5_short="t5")
    with pytest.raises(ValueError, match="lacks codes.npy"):
        shards.decode_token_sample({k: v for k, v in sample.items() if k != "codes.npy"})


@pytest.mark.parametrize("store", ["local", "s3"])
def test_raw_shard_identities_come_with_the_listing(tmp_path, request, store):
    """Every complete raw shard's identity from one listing (the tars' sizes) and the stats
    reads that find the complete ones: the identity a pretokenize worker records
    (``raw_shard_identity``: a read and a HEAD each), so a run start checks its done shards
    without a request each. A stats file that does not read, or without its tar, leaves the
    shard out; a shard downloaded again gets another identity."""
    from tests.rawshards import write_raw_shards

    root = f"{request.getfixturevalue('s3_bucket')}/raw" if store == "s3" else str(tmp_path)
    write_raw_shards(root, 4, 2, size=16)
    storage.write_bytes(shards.raw_stats_uri(root, 1), b'{"count": 2, "succ')  # cut short
    storage.remove(shards.raw_tar_uri(root, 2))
    got = shards.raw_shard_identities(root)
    assert got == {i: shards.raw_shard_identity(root, i) for i in (0, 3)}
    assert shards.raw_shard_indices(root) == [0, 3]
    stats = storage.read_json(shards.raw_stats_uri(root, 0))
    storage.write_json(shards.raw_stats_uri(root, 0), {**stats, "end_time": 2000.0})
    again = shards.raw_shard_identities(root)
    assert again[0] != got[0] and again[3] == got[3]
    assert again[0] == shards.raw_shard_identity(root, 0)


def test_an_unreadable_done_marker_is_named(tmp_path):
    """One marker of thousands that is not JSON stopped every training start with a bare
    JSONDecodeError naming no file."""
    from pipeline.train.toy_data import write_toy_token_shards

    uri = str(tmp_path / "tok")
    write_toy_token_shards(uri, num_shards=3, per_shard=2)
    marker = os.path.join(uri, shards.done_name(1))
    with open(marker, "w") as f:
        f.write('{"index": 1, "num_sa')
    with pytest.raises(ValueError, match=rf"done marker {re.escape(marker)} is unreadable"):
        shards.list_done_shards(uri)
