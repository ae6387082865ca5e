import dataclasses
import itertools
import os
import re
import threading

import numpy as np
import pytest
import torch

from pipeline.data.loader import (
    BatchSpec,
    LoaderConfig,
    TokenLoader,
    buffer_order,
    collate,
)
from pipeline.data.shards import done_name, list_done_shards, read_token_shard, shard_name
from pipeline.train.toy_data import write_toy_token_shards

SPEC = BatchSpec(grid_size=4, caption_dim=16, max_text_tokens=8)


@pytest.fixture()
def toy(tmp_path) -> str:
    uri = str(tmp_path / "toy")
    write_toy_token_shards(uri, num_shards=4, per_shard=10)  # 40 samples
    return uri


def _all(uri: str) -> dict[str, dict]:
    out = {}
    for i in range(100):
        path = os.path.join(uri, shard_name(i))
        if not os.path.exists(path):
            break
        out.update({s["key"]: s for s in read_token_shard(path)})
    return out


def _epoch_keys(loader: TokenLoader, epoch: int = 0) -> list[str]:
    """Keys one rank sees in ``epoch`` (batch size 1, one stream)."""
    keys = []
    for batch in loader:
        if loader.state_dict()["streams"][0]["epoch"] > epoch:
            break  # the stream finished the epoch and already took the next one's first sample
        keys.extend(batch["keys"])
    return keys


def _same(a: dict, b: dict) -> bool:
    return (
        a["keys"] == b["keys"]
        and torch.equal(a["codes"], b["codes"])
        and torch.equal(a["cond"], b["cond"])
        and torch.equal(a["cond_mask"], b["cond_mask"])
    )


@pytest.mark.parametrize("workers,split", [(0, "auto"), (2, "auto"), (2, "sample")])
def test_state_dict_gives_identical_next_batches(toy, workers, split):
    cfg = LoaderConfig(
        shards=[toy], batch_size=3, num_workers=workers, shuffle_buffer=8, split=split
    )
    loader = TokenLoader(cfg, SPEC)
    it = iter(loader)
    head = [next(it) for _ in range(5)]  # 5: not a multiple of the worker count
    state = loader.state_dict()
    tail = [next(it) for _ in range(20)]  # 75 samples: into the next epochs
    del it
    assert loader.state_dict()["streams"] != state["streams"]

    again = TokenLoader(cfg, SPEC)
    again.load_state_dict(state)
    assert again.load_state_dict(state)
    replay = list(itertools.islice(again, 20))
    assert all(_same(a, b) for a, b in zip(tail, replay, strict=True))
    assert again.epoch >= 1  # the replay crossed an epoch boundary
    # and a fresh loader repeats the whole sequence
    fresh = list(itertools.islice(TokenLoader(cfg, SPEC), 25))
    assert all(_same(a, b) for a, b in zip(head + tail, fresh, strict=True))


def _consume(loader: TokenLoader, n: int) -> list[str]:
    return [k for b in itertools.islice(iter(loader), n) for k in b["keys"]]


def test_a_place_that_no_longer_applies_is_not_loaded(toy, tmp_path):
    """Another worker count, shard set or shuffle: the saved cursor would index another order
    (repeating samples, never reaching others), so the state is refused and nothing changes."""
    cfg = LoaderConfig(shards=[toy], batch_size=2, num_workers=0, shuffle_buffer=4)
    loader = TokenLoader(cfg, SPEC)
    _consume(loader, 7)
    state = loader.state_dict()
    assert TokenLoader(cfg, SPEC).load_state_dict(state)  # the same setting: taken

    other_workers = TokenLoader(LoaderConfig(shards=[toy], num_workers=2), SPEC)
    before = other_workers.state_dict()
    assert not other_workers.load_state_dict(state)
    assert other_workers.state_dict() == before
    for field, value in [("seed", 1), ("shuffle_buffer", 8), ("split", "sample")]:
        changed = TokenLoader(LoaderConfig(**{**vars(cfg), field: value}), SPEC)
        assert not changed.load_state_dict(state), field
        assert changed.state_dict()["streams"][0] == {"epoch": 0, "cursor": 0}
    # a shard more (pretokenize finished another one)
    write_toy_token_shards(toy, num_shards=1, per_shard=10, first_index=4)
    assert not TokenLoader(cfg, SPEC).load_state_dict(state)


def test_the_same_shards_elsewhere_continue_the_saved_order(toy, tmp_path):
    """The saved place names the shard set by content and order, not location: the same
    folder spelled another way, or copied to another place, resumes exactly."""
    import shutil

    cfg = LoaderConfig(shards=[toy], batch_size=2, num_workers=0, shuffle_buffer=4)
    loader = TokenLoader(cfg, SPEC)
    _consume(loader, 7)
    state = loader.state_dict()
    want = _consume(loader, 5)
    moved = str(tmp_path / "moved")
    shutil.copytree(toy, moved)
    for where in (toy + "/", "file://" + toy, os.path.relpath(toy), moved):
        again = TokenLoader(dataclasses.replace(cfg, shards=[where]), SPEC)
        assert again.load_state_dict(state), where
        assert _consume(again, 5) == want, where
    # a state saved before (fingerprint by URI) still continues where the shards are
    import hashlib

    h = hashlib.sha256()
    for s in list_done_shards(toy):
        h.update(f"{s.uri}:{s.num_samples}:{s.sha256}\n".encode())
    older = {**state, "fingerprint": h.hexdigest()[:16]}
    again = TokenLoader(cfg, SPEC)
    assert again.load_state_dict(older) and _consume(again, 5) == want


def test_shards_without_samples_are_left_out_and_a_split_that_starves_a_stream_is_refused(
    tmp_path,
):
    """Pretokenize writes a shard of 0 samples when a raw shard had nothing usable. It is left
    out of the plan (a stream dealt only it would never fill a batch). A split that leaves a
    stream nothing is refused when the loader is made, naming the setting to change."""
    from pipeline.data.shards import TokenShardWriter

    uri = str(tmp_path / "some_empty")
    write_toy_token_shards(uri, num_shards=3, per_shard=10)
    with TokenShardWriter(uri, 3) as w:  # every raw sample of shard 3 was filtered out
        w.close({})
    assert [s.num_samples for s in list_done_shards(uri)] == [10, 10, 10, 0]
    for shuffle in (False, True):
        cfg = LoaderConfig(shards=[uri], batch_size=2, num_workers=0, shuffle=shuffle)
        seen = set()
        for rank in range(3):  # 3 shards with samples, 3 ranks: one each, every epoch
            loader = TokenLoader(cfg, SPEC, rank=rank, world=3)
            assert len(loader.shards) == 3
            seen.update(_consume(loader, 5))  # all of the rank's 10 samples
            assert loader.counters() == dict.fromkeys(loader.counters(), 0)
        assert len(seen) == 30
    # 4 streams: 3 shards cannot go one a stream, so "auto" splits by sample
    assert len(_consume(TokenLoader(cfg, SPEC, rank=3, world=4), 8)) == 16
    with pytest.raises(
        ValueError, match=r"split=shard deals whole shards to 4 streams .* 3 shards"
    ):
        TokenLoader(dataclasses.replace(cfg, split="shard"), SPEC, rank=0, world=2 * 2)
    with pytest.raises(ValueError, match=r"30 samples cannot be split among 32 streams"):
        TokenLoader(dataclasses.replace(cfg, num_workers=2), SPEC, rank=0, world=16)
    none = str(tmp_path / "none")
    with TokenShardWriter(none, 0) as w:
        w.close({})
    with pytest.raises(ValueError, match="hold no samples"):
        TokenLoader(dataclasses.replace(cfg, shards=[none]), SPEC)


def test_renumbered_shards_are_found_by_their_marker_names(tmp_path):
    """Shards renumbered after they were written (two folders merged: 00001.* renamed to
    00007.*): the listing takes the index from the marker's name, not the one inside it."""
    uri = str(tmp_path / "renumbered")
    write_toy_token_shards(uri, num_shards=2, per_shard=5)
    for ext in (".tar", ".done.json"):
        os.rename(os.path.join(uri, "00001" + ext), os.path.join(uri, "00007" + ext))
    listed = list_done_shards(uri)
    assert [(s.index, os.path.basename(s.uri)) for s in listed] == [
        (0, "00000.tar"),
        (7, "00007.tar"),
    ]
    loader = TokenLoader(LoaderConfig(shards=[uri], batch_size=1, num_workers=0), SPEC)
    assert len(set(_consume(loader, 10))) == 10 and loader.counters()["bad_shards"] == 0


def test_a_fresh_order_does_not_replay_the_first_epoch(tmp_path):
    """A run resumed on another number of ranks starts a salted order: not epoch 0's again,
    whose first samples the run has already trained on."""
    uri = str(tmp_path / "d")
    write_toy_token_shards(uri, num_shards=16, per_shard=5)  # 80 samples
    cfg = LoaderConfig(shards=[uri], batch_size=4, num_workers=0, shuffle_buffer=4)
    # 4 ranks took 4 batches of 4 each (64 of the 80 samples), then the run moved to 2 ranks
    seen = {k for r in range(4) for k in _consume(TokenLoader(cfg, SPEC, rank=r, world=4), 4)}
    assert len(seen) == 64
    again = [TokenLoader(cfg, SPEC, rank=r, world=2) for r in range(2)]
    replay = {k for ld in again for k in _consume(ld, 4)}  # what epoch 0 on 2 ranks gives first
    for ld in again:
        ld.start_afresh(salt=40)
    fresh = [k for ld in again for k in _consume(ld, 4)]
    assert len(replay & seen) >= 28  # the unsalted order re-reads the same first shards
    assert len(set(fresh) & seen) < len(replay & seen)
    assert len(set(fresh)) == 32
    # a salted order is an order of its own, and covers every sample in its epoch
    one = TokenLoader(dataclasses.replace(cfg, batch_size=1), SPEC)
    one.start_afresh(salt=40)
    epoch = _epoch_keys(one)
    assert sorted(epoch) == sorted(_all(uri))
    plain = _epoch_keys(TokenLoader(dataclasses.replace(cfg, batch_size=1), SPEC))
    assert epoch != plain


def test_resume_at_the_end_of_an_epoch_is_not_an_empty_epoch(tmp_path, caplog):
    uri = str(tmp_path / "one")
    write_toy_token_shards(uri, num_shards=1, per_shard=6)
    cfg = LoaderConfig(shards=[uri], batch_size=3, num_workers=0)
    loader = TokenLoader(cfg, SPEC)
    _consume(loader, 2)  # the epoch's last sample
    state = loader.state_dict()
    assert state["streams"][0]["cursor"] == 6
    again = TokenLoader(cfg, SPEC)
    assert again.load_state_dict(state)
    with caplog.at_level("WARNING"):
        _consume(again, 2)
    assert "gave none" not in caplog.text
    assert "empty_epochs" not in again.state_dict()["streams"][0]
    assert again.epoch == 1


@pytest.mark.parametrize("split,n_shards", [("auto", 4), ("sample", 4), ("auto", 1)])
def test_split_by_rank_is_disjoint_and_covers_the_set(tmp_path, split, n_shards):
    uri = str(tmp_path / "d")
    write_toy_token_shards(uri, num_shards=n_shards, per_shard=12)
    cfg = LoaderConfig(shards=[uri], batch_size=1, num_workers=0, shuffle_buffer=5, split=split)
    per_rank = [_epoch_keys(TokenLoader(cfg, SPEC, rank=r, world=2)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(_all(uri))
    if split == "sample" or n_shards == 1:  # split by sample: every shard feeds both ranks
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    # the next epoch covers the set again, in another order
    nxt = []
    for r in range(2):
        loader = TokenLoader(cfg, SPEC, rank=r, world=2)
        assert loader.load_state_dict(
            {**loader.state_dict(), "streams": [{"epoch": 1, "cursor": 0}]}
        )
        nxt.append(_epoch_keys(loader, 1))
    assert sorted(nxt[0] + nxt[1]) == sorted(_all(uri))
    assert nxt[0] != per_rank[0]


def test_split_by_worker_covers_the_set(toy):
    cfg = LoaderConfig(shards=[toy], batch_size=1, num_workers=2, shuffle_buffer=4)
    loader = TokenLoader(cfg, SPEC)
    keys = [b["keys"][0] for b in itertools.islice(loader, 40)]
    # two streams of two shards each (20 samples), interleaved one batch at a time
    assert sorted(keys) == sorted(_all(toy))
    shard_of = [k.split("_")[0] for k in keys]
    assert set(shard_of[0::2]).isdisjoint(shard_of[1::2])


def test_damaged_shards_are_counted_and_skipped(tmp_path):
    uri = str(tmp_path / "bad")
    write_toy_token_shards(uri, num_shards=4, per_shard=10)
    everything = _all(uri)
    # shard 1: not a tar at all; shard 2: cut off in the middle of its 6th sample
    with open(os.path.join(uri, shard_name(1)), "wb") as f:
        f.write(os.urandom(5000))
    path2 = os.path.join(uri, shard_name(2))
    with open(path2, "rb") as f:
        data = f.read()
    intact = list(read_token_shard_prefix(data, 5))
    with open(path2, "wb") as f:
        f.write(data[: intact[-1] + 700])

    cfg = LoaderConfig(shards=[uri], batch_size=1, num_workers=0, shuffle_buffer=6)
    loader = TokenLoader(cfg, SPEC)
    keys = _epoch_keys(loader)
    want = {k for k in everything if k.startswith(("s00000", "s00003"))}
    want |= {f"s00002_{j:05d}" for j in range(5)}
    assert set(keys) == want and len(keys) == len(want)
    counters = loader.counters()
    assert counters["bad_shards"] == 2
    assert counters["missing_samples"] == 10 + 5

    # a resume re-reads up to a buffer behind: the damage is not counted twice
    cfg5 = dataclasses.replace(cfg, batch_size=5)
    whole = TokenLoader(cfg5, SPEC)
    part = TokenLoader(cfg5, SPEC)
    _consume(part, 3)
    resumed = TokenLoader(cfg5, SPEC)
    assert resumed.load_state_dict(part.state_dict())
    assert _consume(whole, 5)[15:] == _consume(resumed, 2)
    assert resumed.counters() == whole.counters()

    with pytest.raises(RuntimeError, match="damaged token shard"):
        list(
            itertools.islice(
                TokenLoader(LoaderConfig(shards=[uri], num_workers=0, on_error="fail"), SPEC), 10
            )
        )


def _member_ends(data: bytes) -> dict[str, int]:
    """Each member's name -> the byte offset where its (block-padded) data ends."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return {m.name: m.offset_data + (m.size + 511) // 512 * 512 for m in tar}


@pytest.mark.parametrize("which", [5, 9])
def test_a_shard_cut_between_a_samples_members_is_a_counted_skip(tmp_path, which):
    """Cut right after a sample's json (a kill, a partial copy): webdataset's grouping yielded
    that sample without its t5 and txt, read as "token shards made without text", which
    stopped the run with on_error=skip and again at every resume; cut in the last sample the
    shard was not even counted as damaged. Now the partial sample is dropped and counted."""
    uri = str(tmp_path / "cut")
    write_toy_token_shards(uri, num_shards=2, per_shard=10)
    path = os.path.join(uri, shard_name(1))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: _member_ends(data)[f"s00001_{which:05d}.json"]])
    loader = TokenLoader(LoaderConfig(shards=[uri], batch_size=1, num_workers=0), SPEC)
    keys = _epoch_keys(loader)
    want = {f"s00000_{j:05d}" for j in range(10)} | {f"s00001_{j:05d}" for j in range(which)}
    assert set(keys) == want and len(keys) == len(want)
    counters = loader.counters()
    assert counters["bad_shards"] == 1 and counters["missing_samples"] == 10 - which


def test_extra_samples_are_counted_once_across_a_resume(tmp_path):
    """Shards with more samples than their markers say: a run resumed from any state counts
    the extras as an uninterrupted one does (it re-reads up to a buffer behind its state and
    counted the extras it read again)."""
    import json

    uri = str(tmp_path / "extra")
    write_toy_token_shards(uri, num_shards=3, per_shard=10)
    for i in range(3):
        marker = os.path.join(uri, done_name(i))
        with open(marker) as f:
            info = json.load(f)
        info["num_samples"] = 8
        with open(marker, "w") as f:
            json.dump(info, f)
    cfg = LoaderConfig(shards=[uri], batch_size=1, num_workers=0, shuffle_buffer=8)
    whole = TokenLoader(cfg, SPEC)
    _consume(whole, 40)
    want = whole.counters()
    assert want["extra_samples"] >= 4  # two shards a epoch at least (2 extras each)
    for cut in range(2, 38, 3):
        part = TokenLoader(cfg, SPEC)
        _consume(part, cut)
        resumed = TokenLoader(cfg, SPEC)
        assert resumed.load_state_dict(part.state_dict())
        _consume(resumed, 40 - cut)
        assert resumed.counters() == want, cut


def test_a_transient_read_error_reopens_with_backoff_and_an_outage_stops_the_run(
    tmp_path, monkeypatch
):
    """Reads failing with a transient storage error: the shard is reopened after a growing
    delay (the reopens came within microseconds, inside a short outage, and then the shard's
    samples were skipped as damage). An outage that outlasts the retries stops the run with
    a storage error, not a silent skip of shard after shard."""
    import time

    from pipeline.data import loader as loader_mod

    uri = str(tmp_path / "flaky")
    write_toy_token_shards(uri, num_shards=2, per_shard=10)
    real = loader_mod.iter_shard_raw
    sleeps: list[float] = []
    outage = {"left": 2}  # failed opens of shard 1 still to come

    def flaky(u):
        if u.endswith(shard_name(1)) and outage["left"] > 0:
            outage["left"] -= 1
            raise ConnectionResetError("Connection reset by peer")
        return real(u)

    monkeypatch.setattr(loader_mod, "iter_shard_raw", flaky)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    loader = TokenLoader(LoaderConfig(shards=[uri], batch_size=1, num_workers=0), SPEC)
    assert len(set(_epoch_keys(loader))) == 20
    assert loader.counters()["bad_shards"] == 0 and len(sleeps) == 2
    assert 0.1 <= sleeps[0] <= 0.3 and sleeps[1] > sleeps[0]
    outage["left"] = 100
    sleeps.clear()
    loader = TokenLoader(LoaderConfig(shards=[uri], batch_size=1, num_workers=0), SPEC)
    with pytest.raises(RuntimeError, match=r"reading token shard .*00001.tar failed 6 times"):
        _epoch_keys(loader)
    assert len(sleeps) == 5


def test_an_epoch_with_no_readable_shard_is_an_error_not_a_hang(tmp_path):
    """Every shard damaged (or refused by the store): no batch can ever be filled, so the
    loader says so after one epoch instead of spinning over empty epochs forever."""
    uri = str(tmp_path / "allbad")
    write_toy_token_shards(uri, num_shards=2, per_shard=5)
    for i in range(2):
        with open(os.path.join(uri, shard_name(i)), "wb") as f:
            f.write(os.urandom(3000))
    loader = TokenLoader(LoaderConfig(shards=[uri], batch_size=2, num_workers=0), SPEC)
    outcome: list = []

    def first_batch():
        try:
            outcome.append(next(iter(loader)))
        except Exception as exc:  # noqa: BLE001 - the outcome is checked below
            outcome.append(exc)

    t = threading.Thread(target=first_batch, daemon=True)  # a regression hangs: fail instead
    t.start()
    t.join(timeout=120)
    assert outcome, "the loader is still looking for a readable sample"
    assert isinstance(outcome[0], RuntimeError)
    assert re.search(
        r"10 samples in 2 shards gave none .*, 3 epochs in a row .*bad_shards", str(outcome[0])
    )


def test_a_stream_whose_one_shard_is_damaged_goes_on_with_the_next_epoch(tmp_path):
    """3 shards, 3 streams: each stream reads one shard an epoch. The stream dealt the damaged
    one gets nothing readable that epoch; it goes on (the next epoch deals it another) instead
    of stopping the run, and the damage is counted."""
    from pipeline.data.loader import plan_epoch

    uri = str(tmp_path / "onebad")
    write_toy_token_shards(uri, num_shards=3, per_shard=4)
    with open(os.path.join(uri, shard_name(1)), "wb") as f:
        f.write(os.urandom(3000))
    cfg = LoaderConfig(shards=[uri], batch_size=2, num_workers=0)
    shards = list_done_shards(uri)
    rank = next(r for r in range(3) if plan_epoch(shards, cfg, 0, r, 3).reads[0].index == 1)
    loader = TokenLoader(cfg, SPEC, rank=rank, world=3)
    batches = list(itertools.islice(iter(loader), 4))
    assert len(batches) == 4 and loader.epoch >= 1
    assert all(not k.startswith("s00001_") for b in batches for k in b["keys"])
    assert loader.counters()["bad_shards"] >= 1


def read_token_shard_prefix(data: bytes, n: int):
    """Byte offsets where each of the first ``n`` samples of a tar ends (5 members each)."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        members = 0
        for m in tar:
            members += 1
            if members % 5 == 0:
                yield m.offset_data + m.size
                if members // 5 == n:
                    return


def test_bad_sample_is_counted(tmp_path):
    """A sample whose codes do not parse (inside an intact tar) is counted and skipped."""
    import tarfile

    uri = str(tmp_path / "mixed")
    write_toy_token_shards(uri, num_shards=1, per_shard=6, grid_size=4)
    path = os.path.join(uri, shard_name(0))
    with tarfile.open(path) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith("00002.codes.npy"))
    with open(path, "r+b") as f:  # same length, garbage bytes: the tar stays readable
        f.seek(m.offset_data)
        f.write(b"\x00" * m.size)
    cfg = LoaderConfig(shards=[uri], batch_size=1, num_workers=0, shuffle=False)
    loader = TokenLoader(cfg, SPEC)
    assert _consume(loader, 5) == [f"s00000_{j:05d}" for j in (0, 1, 3, 4, 5)]
    assert loader.counters()["bad_samples"] == 1


def test_shards_for_another_model_stop_the_run(tmp_path):
    """Another grid, caption width or codebook is a config error, not damage: it stops at the
    first sample whatever on_error says, instead of skipping every sample of the run."""
    from pipeline.data.loader import DataMismatch

    uri = str(tmp_path / "g3")
    write_toy_token_shards(uri, num_shards=1, per_shard=4, grid_size=3)
    cfg = LoaderConfig(shards=[uri], batch_size=1, num_workers=0, on_error="skip")
    with pytest.raises(DataMismatch, match="grid 3x3, the model's grid is 4x4"):
        next(iter(TokenLoader(cfg, SPEC)))
    uri4 = str(tmp_path / "g4")
    write_toy_token_shards(uri4, num_shards=1, per_shard=4, grid_size=4)
    cfg4 = dataclasses.replace(cfg, shards=[uri4])
    with pytest.raises(DataMismatch, match="features are 16-d, the model takes 32-d"):
        next(iter(TokenLoader(cfg4, dataclasses.replace(SPEC, caption_dim=32))))
    top = max(int(s["codes"].max()) for s in _all(uri4).values())
    with pytest.raises(DataMismatch, match=f"code {top} is outside the model's codebook of {top}"):
        next(iter(TokenLoader(cfg4, dataclasses.replace(SPEC, vocab_size=top))))
    assert next(iter(TokenLoader(cfg4, dataclasses.replace(SPEC, vocab_size=top + 1))))
    # class labels: label num_classes is the null class (it silently trained CFG's
    # unconditional embedding on real images), one beyond failed in the embedding mid-run
    classes = dataclasses.replace(SPEC, cond="class")
    top = max(int(s["json"]["label"]) for s in _all(uri4).values())
    for n in (top, top - 1):
        with pytest.raises(DataMismatch, match=rf"class label \d+ is outside .*0\.\.{n - 1} "):
            _consume(TokenLoader(cfg4, dataclasses.replace(classes, num_classes=n)), 4)
    assert len(_consume(TokenLoader(cfg4, dataclasses.replace(classes, num_classes=top + 1)), 4))


def test_padding_mask_and_truncation():
    rng = np.random.default_rng(0)
    spec = BatchSpec(grid_size=2, caption_dim=4, max_text_tokens=5)
    samples = [
        {
            "key": f"k{n}",
            "codes": np.arange(4, dtype=np.uint16),
            "t5": rng.standard_normal((n, 4)).astype(np.float16),
        }
        for n in (1, 3, 5)
    ]
    b = collate(samples, spec)
    assert b["cond"].shape == (3, 5, 4) and b["cond"].dtype == torch.float16
    assert b["codes"].dtype == torch.long and b["codes"].shape == (3, 4)
    for i, n in enumerate((1, 3, 5)):
        assert b["cond_mask"][i].tolist() == [False] * (5 - n) + [True] * n  # left-padded
        assert torch.equal(b["cond"][i, 5 - n :], torch.from_numpy(samples[i]["t5"]))
        assert not b["cond"][i, : 5 - n].any()


def test_long_captions_truncated_and_counted(tmp_path):
    uri = str(tmp_path / "long")
    write_toy_token_shards(uri, num_shards=1, per_shard=8, max_len=12)
    spec = BatchSpec(grid_size=4, caption_dim=16, max_text_tokens=6)
    loader = TokenLoader(LoaderConfig(shards=[uri], batch_size=8, num_workers=0), spec)
    batch = next(iter(loader))
    assert batch["cond"].shape == (8, 6, 16)
    ref = _all(uri)
    lengths = [len(s["t5"]) for s in ref.values()]
    assert loader.counters()["truncated_captions"] == sum(n > 6 for n in lengths) > 0
    for key, cond in zip(batch["keys"], batch["cond"]):
        t5 = torch.from_numpy(ref[key]["t5"]).to(cond.dtype)
        if len(t5) > 6:  # the first 5 tokens and the last (EOS) row
            assert torch.equal(cond, torch.cat([t5[:5], t5[-1:]]))


def test_flip_is_seeded_and_class_labels(toy):
    ref = _all(toy)
    spec = BatchSpec(grid_size=4, cond="class")

    def flips(cfg):
        out = []
        for b in itertools.islice(TokenLoader(cfg, spec), 10):
            for key, codes, label in zip(b["keys"], b["codes"], b["cond"]):
                s = ref[key]
                assert label == s["json"]["label"]
                flipped = np.array_equal(codes.numpy(), s["codes_flip"].reshape(-1))
                assert flipped or np.array_equal(codes.numpy(), s["codes"].reshape(-1))
                out.append(flipped)
        return out

    cfg = LoaderConfig(shards=[toy], batch_size=4, num_workers=0)
    a = flips(cfg)
    assert a == flips(cfg) and 8 <= sum(a) <= 32  # seeded; about half
    assert not any(flips(LoaderConfig(shards=[toy], batch_size=4, num_workers=0, flip=False)))


def test_buffer_order_is_a_seeded_permutation():
    rng = np.random.default_rng
    o = buffer_order(1000, 50, rng(1))
    assert sorted(o.tolist()) == list(range(1000))
    assert np.array_equal(o, buffer_order(1000, 50, rng(1)))
    assert not np.array_equal(o, buffer_order(1000, 50, rng(2)))
    assert (o[:500] < 600).all()  # a buffer, not a global shuffle: early outputs come early
    assert np.array_equal(buffer_order(10, 1, rng(0)), np.arange(10))


def test_reads_s3_with_workers_like_local(toy, s3_bucket):
    from pipeline import storage

    remote = f"{s3_bucket}/tokens"
    for name in sorted(os.listdir(toy)):
        storage.put_file(os.path.join(toy, name), f"{remote}/{name}")
    cfg = dict(batch_size=4, num_workers=2, shuffle_buffer=8)
    a = list(itertools.islice(TokenLoader(LoaderConfig(shards=[remote], **cfg), SPEC), 6))
    b = list(itertools.islice(TokenLoader(LoaderConfig(shards=[toy], **cfg), SPEC), 6))
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))


def test_a_resume_after_empty_epochs_goes_on_as_the_uninterrupted_run(tmp_path):
    """Five of six shards damaged, three streams of two shards: a stream may read nothing for
    an epoch or two. A state saved after such epochs, in an epoch whose rest reads nothing (or
    at its very end), kept the count of empty epochs the uninterrupted run cleared with the
    samples before the checkpoint: the resumed run gave up ("3 epochs in a row") where the
    uninterrupted one went on. Every resume from such a state now gives the same batches."""
    from pipeline.data.shards import shard_name

    root = str(tmp_path / "tok")
    write_toy_token_shards(root, num_shards=6, per_shard=4)
    for i in (1, 2, 3, 4, 5):
        (tmp_path / "tok" / shard_name(i)).write_bytes(os.urandom(3000))
    checked = 0
    for seed in range(30):
        cfg = LoaderConfig(shards=[root], batch_size=1, num_workers=0, shuffle_buffer=2, seed=seed)
        ref = TokenLoader(cfg, SPEC, rank=0, world=3)
        it, states, keys = iter(ref), [], []
        try:
            for _ in range(12):
                keys.append(next(it)["keys"][0])
                states.append(ref.state_dict())
        except RuntimeError:
            continue  # this order starves the stream for good, uninterrupted too
        for i, state in enumerate(states[:-1]):
            if not state["streams"][0].get("empty_epochs"):
                continue
            resumed = TokenLoader(cfg, SPEC, rank=0, world=3)
            assert resumed.load_state_dict(state)
            got = [b["keys"][0] for b in itertools.islice(iter(resumed), len(keys) - i - 1)]
            assert got == keys[i + 1 :], (seed, i)
            checked += 1
    assert checked >= 5, checked


def test_fewer_shards_than_streams_warns_that_each_stream_reads_them_all(toy, caplog):
    """``split: auto`` with fewer shards than streams splits by sample: every stream reads every
    shard and keeps its share, the data's bytes times the stream count an epoch (16x with 8
    GPUs x 2 workers), without a word. Now rank 0 says so, with the fix."""
    import logging

    cfg = LoaderConfig(shards=[toy], batch_size=1, num_workers=0)
    n = len(list_done_shards(toy))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        TokenLoader(cfg, SPEC, rank=0, world=n)  # one shard a stream: read once
        assert "every stream reads every shard" not in caplog.text
        TokenLoader(cfg, SPEC, rank=1, world=2 * n)  # not rank 0: quiet
        assert "every stream reads every shard" not in caplog.text
        TokenLoader(cfg, SPEC, rank=0, world=2 * n)
    assert f"{n} shards split by sample among {2 * n} streams" in caplog.text
    assert f"{2 * n}x the data's bytes an epoch (at least as many shards" in caplog.text


def _short_caption_shards(uri: str, num_shards: int = 4, per_shard: int = 50) -> dict[str, dict]:
    """Token shards whose samples have 5 caption tokens and a 2-token first sentence of their
    own, every seventh marked as one-sentence (its ``t5`` serves): the batch's mask says
    which one a sample trained on. Returns the written features by key."""
    from pipeline.data.shards import TokenShardWriter, encode_token_sample

    rng = np.random.default_rng(7)
    out = {}
    for index in range(num_shards):
        with TokenShardWriter(uri, index) as w:
            for j in range(per_shard):
                key = f"s{index}_{j:03d}"
                t5 = rng.standard_normal((5, 16)).astype(np.float16)
                short = "t5" if j % 7 == 0 else rng.standard_normal((2, 16)).astype(np.float16)
                codes = rng.integers(0, 64, (4, 4))
                w.write(encode_token_sample(key, codes, t5, "c. d", {}, codes, t5_short=short))
                out[key] = {"t5": t5, "t5_short": t5 if isinstance(short, str) else short}
            w.close({"short_captions": per_shard})
    return out


def _short_draws(batches: list[dict], ref: dict[str, dict]) -> list[tuple[str, bool]]:
    """(key, trained on the short caption) per sample, checked against the stored features."""
    out = []
    for b in batches:
        for i, key in enumerate(b["keys"]):
            n = int(b["cond_mask"][i].sum())
            want = ref[key]["t5_short"] if n == 2 else ref[key]["t5"]
            assert n in (2, 5) and np.array_equal(b["cond"][i, -n:].numpy(), want)
            out.append((key, n == 2))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_short_captions_drawn_at_their_rate_seeded_and_the_same_on_resume(tmp_path, workers):
    """``short_caption_p`` 0.3: about 30% of the samples train on their first sentence's
    features (as LlamaGen's stage 2), drawn from the loader's seeded per-sample coins, so a
    resumed run makes the same choices mid-epoch and another seed makes others."""
    uri = str(tmp_path / "short")
    ref = _short_caption_shards(uri)
    cfg = LoaderConfig(
        shards=[uri], batch_size=4, num_workers=workers, shuffle_buffer=16, short_caption_p=0.3
    )
    loader = TokenLoader(cfg, SPEC)
    it = iter(loader)
    head = [next(it) for _ in range(37)]  # 148 of the epoch's 200 samples: mid-epoch
    state = loader.state_dict()
    tail = [next(it) for _ in range(113)]  # into the third epoch: 600 draws in all
    del it
    draws = _short_draws(head + tail, ref)
    marked = {k for k in ref if ref[k]["t5_short"] is ref[k]["t5"]}
    drawable = [short for key, short in draws if key not in marked]
    assert len(drawable) > 450 and 0.24 < np.mean(drawable) < 0.36, np.mean(drawable)
    assert not any(short for key, short in draws if key in marked)  # its t5 is its short one
    assert loader.counters()["no_short_caption"] == 0

    again = TokenLoader(cfg, SPEC)
    assert again.load_state_dict(state)
    replay = list(itertools.islice(again, 113))
    assert all(_same(a, b) for a, b in zip(tail, replay, strict=True))
    assert _short_draws(replay, ref) == draws[len(head) * 4 :]

    def epoch0(seed: int) -> set[str]:
        c = dataclasses.replace(cfg, seed=seed, num_workers=0)
        return {
            k
            for k, short in _short_draws(list(itertools.islice(TokenLoader(c, SPEC), 50)), ref)
            if short
        }

    assert epoch0(0) == epoch0(0) and epoch0(0) != epoch0(1)


def test_the_short_caption_coin_leaves_order_and_flips_as_they_were(toy):
    """The coin has its own random stream: the order and the flips of every epoch are drawn
    exactly as before it existed (the same seeds, the same draws), and a state saved without
    it (its plan settings are unchanged) resumes with the same samples and flips."""
    from pipeline.data.loader import plan_epoch

    shards_ = list_done_shards(toy)
    for p in (0.0, 0.3, 1.0):
        cfg = LoaderConfig(shards=[toy], shuffle_buffer=8, short_caption_p=p)
        for epoch, stream, n_streams in ((0, 0, 1), (3, 1, 2), (1, 2, 3)):
            plan = plan_epoch(shards_, cfg, epoch, stream, n_streams)
            n, seed = plan.size, [0, epoch, stream]
            assert np.array_equal(plan.order, buffer_order(n, 8, np.random.default_rng([*seed, 1])))
            assert np.array_equal(plan.flips, np.random.default_rng([*seed, 2]).random(n) < 0.5)
            coin = np.random.default_rng([*seed, 3]).random(n) < p  # a stream of its own
            assert np.array_equal(plan.shorts, coin) and plan.shorts.dtype == bool

    cfg = LoaderConfig(shards=[toy], batch_size=3, num_workers=0, shuffle_buffer=8)
    loader = TokenLoader(cfg, SPEC)
    _consume(loader, 5)
    state = loader.state_dict()
    assert state["plan"] == {"seed": 0, "shuffle": True, "buffer": 8, "split": "auto"}
    want = list(itertools.islice(loader, 10))
    later = TokenLoader(dataclasses.replace(cfg, short_caption_p=0.3), SPEC)
    assert later.load_state_dict(state)
    got = list(itertools.islice(later, 10))
    # toy shards have no short captions: the same keys, flips (codes) and features
    assert all(_same(a, b) for a, b in zip(want, got, strict=True))


def test_shards_without_short_captions_use_t5_counted_with_one_warning(toy, caplog):
    """Shards pretokenized without short captions (older ones too) under short_caption_p > 0:
    a sample drawn for its short caption trains on its whole caption, counted as
    no_short_caption; rank 0 says so once, when the loader starts, not per sample or worker."""
    import logging

    ref = _all(toy)
    base = LoaderConfig(shards=[toy], batch_size=4, num_workers=2, shuffle_buffer=8)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        plain = list(itertools.islice(TokenLoader(base, SPEC), 20))
        assert "short_caption_p" not in caplog.text
        loader = TokenLoader(dataclasses.replace(base, short_caption_p=0.3), SPEC)
        got = list(itertools.islice(loader, 20))
        TokenLoader(dataclasses.replace(base, short_caption_p=0.3), SPEC, rank=1, world=2)
    assert all(_same(a, b) for a, b in zip(plain, got, strict=True))
    assert caplog.text.count("were made without short captions") == 1
    assert "4 of 4 token shards were made without short captions (pretokenize" in caplog.text
    # counted per draw: 80 samples are two whole epochs of each of the two streams (two shards
    # of 10 each), and the plans' coins say how many of them drew their short caption
    from pipeline.data.loader import plan_epoch

    assert len(ref) == 40
    drawn = sum(
        int(plan_epoch(loader.shards, loader.cfg, epoch, stream, 2).shorts.sum())
        for epoch in (0, 1)
        for stream in (0, 1)
    )
    assert loader.counters()["no_short_caption"] == drawn > 0


def test_stage2_trains_on_short_captions_30_percent_of_the_time():
    """As LlamaGen's stage 2 (dataset/t2i.py: ``torch.rand(1) < 0.3``); stage 1 never."""
    from pipeline.config import load_config
    from pipeline.train.trainer import TrainConfig

    bucket = ["run_dir=s3://b/t2i/runs/x", "init_from=s3://b/t2i/e", "data.shards=[s3://b/t]"]
    s1 = load_config(TrainConfig, "configs/train/stage1.yaml", bucket)
    s2 = load_config(TrainConfig, "configs/train/stage2.yaml", bucket)
    assert (s1.data.short_caption_p, s2.data.short_caption_p) == (0.0, 0.3)
    with pytest.raises(ValueError, match="short_caption_p is 1.5"):
        LoaderConfig(short_caption_p=1.5)


def test_class_model_on_shards_without_labels_stops_at_once(tmp_path, caplog):
    """Token shards pretokenized without label_field hold no class labels: a class-conditional
    model reading them is a config error naming the fix, at the first sample whatever on_error
    says. It was a KeyError skipped per sample: a warning for every sample, then after three
    empty epochs "gave none that could be read"."""
    import logging

    from pipeline.data.loader import DataMismatch
    from pipeline.data.shards import TokenShardWriter, encode_token_sample

    uri = str(tmp_path / "t2i")
    rng = np.random.default_rng(0)
    with TokenShardWriter(uri, 0) as w:
        for j in range(6):
            meta = {"url": f"http://x/{j}", "width": 64, "height": 64, "source_shard": 0}
            w.write(
                encode_token_sample(
                    f"k{j}", rng.integers(0, 64, (4, 4)), rng.standard_normal((3, 16)), "x", meta
                )
            )
        w.close({})
    spec = BatchSpec(grid_size=4, cond="class", num_classes=8)
    cfg = LoaderConfig(shards=[uri], batch_size=2, num_workers=0, on_error="skip")
    loader = TokenLoader(cfg, spec)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        with pytest.raises(DataMismatch, match=r"without class labels .* label_field="):
            next(iter(loader))
    assert "skipping sample" not in caplog.text and not loader.counters().get("bad_samples")
    # the same shards serve a text-conditional model as before
    assert next(iter(TokenLoader(cfg, SPEC)))["cond"].shape == (2, 8, 16)


def test_a_text_model_on_shards_made_without_text_is_told_the_fix(tmp_path, caplog):
    """Shards pretokenized with text: null (class-conditional) hold no t5.npy: a text-conditional
    model reading them is a DataMismatch naming the fix at the first sample, whatever on_error
    says, not a skipped sample each (before, the shard format could not even hold them)."""
    import logging

    from pipeline.data.loader import DataMismatch
    from pipeline.data.shards import TokenShardWriter, encode_token_sample

    uri = str(tmp_path / "c2i")
    rng = np.random.default_rng(0)
    with TokenShardWriter(uri, 0) as w:
        for j in range(6):
            meta = {"url": f"http://x/{j}", "source_shard": 0, "label": j}
            w.write(encode_token_sample(f"k{j}", rng.integers(0, 64, (4, 4)), None, "", meta))
        w.close({})
    cfg = LoaderConfig(shards=[uri], batch_size=2, num_workers=0, on_error="skip")
    loader = TokenLoader(cfg, SPEC)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        with pytest.raises(DataMismatch, match=r"made without text .* with a text section"):
            next(iter(loader))
    assert "skipping sample" not in caplog.text and not loader.counters().get("bad_samples")
    # the class-conditional model they were made for reads them
    spec = BatchSpec(grid_size=4, cond="class", num_classes=8)
    batch = next(iter(TokenLoader(cfg, spec)))
    assert [int(k[1:]) for k in batch["keys"]] == batch["cond"].tolist()
