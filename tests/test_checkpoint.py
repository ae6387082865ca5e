"""Checkpoint saving, finding and fetching (pipeline/train/checkpoint.py and the tokenizer's):
leftovers of an aborted save, the marker's file list, multi-node copies, a local folder shared
by nodes, durability before the marker, S3 as the one record of a remote run, explicit tags."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.tokenizer import checkpoint as tok_ckpt
from pipeline.train import checkpoint as ckpt_mod
from pipeline.train.checkpoint import (
    MARKER,
    CheckpointManager,
    complete_tags,
    export_checkpoint,
    tag_for,
)
from pipeline.train.engine import DistInfo
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _dist(rank: int = 0, world: int = 1, local_world: int | None = None) -> DistInfo:
    """A rank that is its node's first (``local_rank`` 0); no process group behind it."""
    return DistInfo(rank, world, 0, local_world or world, CPU)


def _rank_files(ranks) -> dict[str, bytes]:
    """What DeepSpeed ZeRO-2 and the trainer write for ``ranks`` (distinct sizes per file)."""
    files = {}
    for r in ranks:
        files[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = b"o" * (10 + r)
        files[f"rank_state_{r:05d}.pt"] = b"r" * (20 + r)
        if r == 0:
            files["mp_rank_00_model_states.pt"] = b"model"
    return files


def _marker(tag: str, world: int, files: dict[str, bytes]) -> dict:
    """A marker as CheckpointManager.save writes it: the same on every node and on S3."""
    sizes = {n: len(d) for n, d in sorted(files.items())}
    return {"tag": tag, "step": 20, "world_size": world, "time": 1.5, "files": sizes}


def _write(folder: str, files: dict[str, bytes], marker: dict | None) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
    if marker is not None:
        storage.write_json(storage.join(folder, MARKER), marker)


def _as_two_nodes(work, run_dir: str, local_dir: str) -> list:
    """``work(manager)`` at once in two threads acting as the first ranks of two 2-rank nodes
    that share ``local_dir``; returns their answers, node 0's first (raises the first error)."""
    answers, errors = {}, []

    def node(k: int) -> None:
        try:
            answers[k] = work(CheckpointManager(run_dir, local_dir, 2, _dist(2 * k, 4, 2)))
        except Exception as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [answers[0], answers[1]]


class FakeEngine:
    """Writes what DeepSpeed's one-rank ZeRO save writes, as it does: plain writes, no fsync."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = os.path.join(root, tag)
        os.makedirs(folder, exist_ok=True)
        torch.save(client_state, os.path.join(folder, "mp_rank_00_model_states.pt"))
        torch.save(
            {"m": torch.zeros(3)}, os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        )


# --- a real DeepSpeed save over the leftovers of an aborted 2-rank attempt -------------------------

_SAVE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pipeline.train import engine
    from pipeline.train.checkpoint import CheckpointManager
    from pipeline.train.optim import OptimConfig
    dist = engine.init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    ds = engine.build_ds_config("configs/deepspeed/zero2.json", micro_batch=2, grad_accum=1,
                                world=1, precision="fp32", optim=OptimConfig(), lr=1e-3)
    eng = engine.create_engine(model, [{"params": list(model.parameters()), "names": []}], ds,
                               lambda s: 1.0)
    for _ in range(2):
        eng.backward(eng(torch.randn(2, 8)).pow(2).mean())
        eng.step()
    ck = CheckpointManager(sys.argv[1], sys.argv[2], 2, dist)
    ck.save(eng, 20, {"step": 20, "samples_seen": 40}, {"rng": None}, meta={"model": {}})
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sys.argv[3])
    print(json.dumps({"ok": True}))
    engine.shutdown(0)
    """
)


@pytest.fixture(scope="module")
def resaved(s3_server, tmp_path_factory) -> dict:
    """Step 20 of a 1-rank ZeRO-2 run saved where a 2-rank attempt at step 20 was killed
    mid-upload: rank 1's partition and state are on S3 and in the local folder, no marker."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    run_dir, tmp = f"s3://{bucket}/run", tmp_path_factory.mktemp("resaved")
    local_dir, tag = str(tmp / "node"), tag_for(20)
    stale = {k: b"stale" for k in _rank_files([1])}
    _write(f"{run_dir}/checkpoints/{tag}", stale, None)
    _write(os.path.join(local_dir, "checkpoints", tag), stale, None)
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1")
    weights = str(tmp / "weights.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE_SCRIPT, run_dir, local_dir, weights],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run_dir": run_dir, "local_dir": local_dir, "tag": tag, "tmp": tmp, "weights": weights}


def test_a_step_saved_again_holds_only_its_own_files(resaved):
    """The marker lists exactly the checkpoint's files; the old attempt's rank-1 files are gone
    from S3 and the local folder, so the export sees one rank, as written."""
    remote = f"{resaved['run_dir']}/checkpoints/{resaved['tag']}"
    local = os.path.join(resaved["local_dir"], "checkpoints", resaved["tag"])
    old = set(_rank_files([1]))
    assert old & set(storage.list_dir(remote)) == set() and old & set(os.listdir(local)) == set()
    out = str(resaved["tmp"] / "export")
    export_checkpoint(resaved["run_dir"], out)
    exported, saved = load_file(f"{out}/model.safetensors"), torch.load(resaved["weights"])
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    marker = storage.read_json(f"{remote}/{MARKER}")
    assert marker["world_size"] == 1
    listed = marker["files"]
    assert "rank_state_00000.pt" in listed and "meta.json" in listed
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in listed
    assert set(storage.list_dir(remote)) == set(listed) | {MARKER}
    assert {n: storage.size(f"{remote}/{n}") for n in listed} == listed
    assert set(os.listdir(local)) == set(listed) | {MARKER}
    assert storage.read_json(os.path.join(local, MARKER)) == marker  # the same on every node


def test_nodes_sharing_a_local_dir_convert_to_universal_at_once(resaved, tmp_path, monkeypatch):
    """Two nodes' first ranks on one (NFS-like) folder convert the same checkpoint at the same
    moment: each converts in a folder of its own and one result is kept, whole."""
    shared = tmp_path / "shared"
    shutil.copytree(
        os.path.join(resaved["local_dir"], "checkpoints", resaved["tag"]),
        shared / "checkpoints" / resaved["tag"],
    )
    run = subprocess.run
    both_started = threading.Barrier(2, timeout=120)

    def run_together(*args, **kwargs):  # both conversions run at once
        both_started.wait()
        return run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run_together)
    roots = _as_two_nodes(
        lambda ck: ck.universal_root(resaved["tag"]), resaved["run_dir"], str(shared)
    )
    assert roots == [str(shared / "universal")] * 2
    out = shared / "universal" / resaved["tag"]
    assert (out / "mp_rank_00_model_states.pt").exists()
    assert (out / "zero" / "0.weight" / "fp32.pt").exists()
    assert not (out / "tmp").exists()
    assert [p.name for p in (shared / "universal").iterdir() if p.name.startswith(".")] == []
    source = storage.read_json(str(shared / "checkpoints" / resaved["tag"] / MARKER))
    assert json.loads((out / ckpt_mod.CONVERTED).read_text()) == {"source": source}


# --- durability -----------------------------------------------------------------------------------


@pytest.fixture()
def fsynced(monkeypatch) -> list[tuple[int, str]]:
    """Every os.fsync, in order, as (inode, path of the file or folder)."""
    seen: list[tuple[int, str]] = []
    real = os.fsync

    def record(fd):
        seen.append((os.fstat(fd).st_ino, os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_every_checkpoint_file_is_on_disk_before_the_marker(tmp_path, fsynced):
    ck = CheckpointManager(str(tmp_path / "run"), str(tmp_path / "run"), 2, _dist())
    tag = ck.save(FakeEngine(), 10, {"step": 10}, {"rng": None}, meta={"model": {}})
    folder = tmp_path / "run" / "checkpoints" / tag
    marker_ino = (folder / MARKER).stat().st_ino
    order = [ino for ino, _ in fsynced]
    # the marker's own fsync comes from its atomic write (a temporary file renamed onto it)
    at_marker = order.index(marker_ino) if marker_ino in order else len(order)
    before = set(order[:at_marker])
    files = [p for p in folder.iterdir() if p.name != MARKER]
    assert {p.name for p in files} == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rank_state_00000.pt",
        "meta.json",
    }
    for p in [*files, folder, folder.parent]:
        assert p.stat().st_ino in before, p


def test_tokenizer_state_is_on_disk_before_its_marker(tmp_path, fsynced):
    root = tmp_path / "checkpoints"
    folder = tok_ckpt.save_checkpoint({"w": torch.ones(2)}, 3, str(root), None, keep=2)
    state = Path(folder) / tok_ckpt.STATE
    inos = [ino for ino, _ in fsynced]
    marker_writes = [i for i, (_, path) in enumerate(fsynced) if "/COMPLETE" in path]
    first_marker = marker_writes[0] if marker_writes else len(inos)
    assert state.stat().st_ino in inos[:first_marker]  # its data, before it is renamed in
    assert Path(folder).stat().st_ino in inos[:first_marker]  # the rename itself
    assert torch.equal(tok_ckpt.load_checkpoint(3, str(root), None)["w"], torch.ones(2))


# --- the marker's file list, and the files a node lacks -----------------------------------------


def test_a_download_takes_the_markers_files_and_checks_their_sizes(s3_bucket, tmp_path):
    run_dir, tag = f"{s3_bucket}/run", tag_for(20)
    remote = f"{run_dir}/checkpoints/{tag}"
    files = _rank_files([0, 1])
    marker = _marker(tag, 2, files)
    # a leftover the marker does not list (an old attempt's, written before the fix)
    _write(remote, {**files, "zero_pp_rank_2_mp_rank_00_optim_states.pt": b"old"}, marker)
    ck = CheckpointManager(run_dir, str(tmp_path / "a"), 2, _dist(0, 2))
    local = Path(ck.ensure_local(tag))
    assert {p.name for p in local.iterdir()} == set(files) | {MARKER}
    assert storage.read_json(str(local / MARKER)) == marker
    assert [p.name for p in local.parent.iterdir()] == [tag]  # no staging folder left
    # an object of another size than listed (a damaged upload) is refused, by name
    storage.write_bytes(f"{remote}/rank_state_00001.pt", b"short")
    fresh = CheckpointManager(run_dir, str(tmp_path / "b"), 2, _dist(0, 2))
    with pytest.raises(FileNotFoundError, match=r"rank_state_00001\.pt"):
        fresh.ensure_local(tag)
    assert not (tmp_path / "b" / "checkpoints" / tag).exists()


@pytest.mark.parametrize("listed", [True, False], ids=["marker-lists-files", "old-marker"])
def test_one_node_resuming_a_two_node_checkpoint_fetches_the_other_nodes_files(
    s3_bucket, tmp_path, listed
):
    """A 2x2 checkpoint resumed on node 0 alone with 2 ranks (world == local world): node 1's
    partitions come from S3, so the universal conversion sees all 4 ranks."""
    run_dir, tag = f"{s3_bucket}/run", tag_for(20)
    everything, mine = _rank_files(range(4)), _rank_files([0, 1])
    marker = _marker(tag, 4, everything) if listed else {"tag": tag, "world_size": 4}
    _write(f"{run_dir}/checkpoints/{tag}", everything, marker)
    local = tmp_path / "node" / "checkpoints" / tag
    _write(str(local), mine, marker)
    ck = CheckpointManager(run_dir, str(tmp_path / "node"), 2, _dist(0, 2, 2))
    assert ck.ensure_local(tag) == str(local)
    assert {p.name for p in local.iterdir()} == set(everything) | {MARKER}
    assert all((local / n).read_bytes() == d for n, d in everything.items())
    assert ck.written_world(tag) == 4 and ck.needs_universal(tag)


def test_the_export_fetches_a_checkpoint_on_rank_0s_node_only(s3_bucket, tmp_path):
    """The end-of-run export reads the checkpoint on rank 0 alone: every other node made its copy
    whole too (each downloading every other node's partitions, GPT-XL's ~9 GB of optimizer
    state per node, for nothing)."""
    run_dir, tag = f"{s3_bucket}/run", tag_for(20)
    everything = _rank_files(range(4))
    marker = _marker(tag, 4, everything)
    _write(f"{run_dir}/checkpoints/{tag}", everything, marker)
    for node, ranks in ((0, [0, 1]), (1, [2, 3])):
        _write(str(tmp_path / f"node{node}" / "checkpoints" / tag), _rank_files(ranks), marker)
    # node 1's first rank (rank 2 of 4): waits, fetches nothing
    ck1 = CheckpointManager(run_dir, str(tmp_path / "node1"), 2, _dist(2, 4, 2))
    ck1.ensure_local(tag, main_only=True)
    node1 = tmp_path / "node1" / "checkpoints" / tag
    assert {p.name for p in node1.iterdir()} == set(_rank_files([2, 3])) | {MARKER}
    # rank 0: its node's copy is made whole
    ck0 = CheckpointManager(run_dir, str(tmp_path / "node0"), 2, _dist(0, 4, 2))
    node0 = ck0.ensure_local(tag, main_only=True)
    assert {p.name for p in Path(node0).iterdir()} == set(everything) | {MARKER}
    # a resume (every node loads) still completes node 1's copy
    ck1.ensure_local(tag)
    assert {p.name for p in node1.iterdir()} == set(everything) | {MARKER}


def test_a_local_checkpoint_without_the_other_nodes_files_is_refused_by_name(tmp_path):
    """Without an s3:// run dir nothing can complete a node's copy: the error says so, instead
    of DeepSpeed failing later on the partitions it does not find."""
    tag = tag_for(20)
    _write(
        str(tmp_path / "checkpoints" / tag),
        _rank_files([0, 1]),
        _marker(tag, 4, _rank_files(range(4))),
    )
    ck = CheckpointManager(str(tmp_path), str(tmp_path), 2, _dist(0, 2, 2))
    with pytest.raises(FileNotFoundError, match=r"lacks 4 of the files.*s3:// run dir"):
        ck.ensure_local(tag)


def test_nodes_sharing_a_local_dir_download_a_checkpoint_at_once(s3_bucket, tmp_path, monkeypatch):
    """Two nodes' first ranks on one folder (an NFS home) find the checkpoint missing and
    download it at the same moment: both succeed, one whole copy stays, no staging is left."""
    run_dir, tag = f"{s3_bucket}/run", tag_for(20)
    files = _rank_files(range(4))
    marker = _marker(tag, 4, files)
    _write(f"{run_dir}/checkpoints/{tag}", files, marker)
    get_file, both_downloading = storage.get_file, threading.Barrier(2, timeout=60)
    first_call = threading.local()

    def get_file_together(uri, path):  # both have decided to download before either finishes
        if not getattr(first_call, "done", False):
            first_call.done = True
            both_downloading.wait()
        return get_file(uri, path)

    monkeypatch.setattr(storage, "get_file", get_file_together)
    _as_two_nodes(lambda ck: ck.ensure_local(tag), run_dir, str(tmp_path / "shared"))
    root = tmp_path / "shared" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [tag]
    assert {p.name for p in (root / tag).iterdir()} == set(files) | {MARKER}
    assert storage.read_json(str(root / tag / MARKER)) == marker


# --- with an s3:// run dir, S3 decides; explicit tags -----------------------------------------


def test_an_s3_run_dir_without_checkpoints_refuses_a_cache_that_holds_some(s3_bucket, tmp_path):
    """The run dir was emptied (or expired, or is another endpoint's, or a local run moved to
    S3 with local_dir=<its old dir>); the local cache still holds complete checkpoints. The run
    trained from step 0 and its first save pruned them all. Now any start is refused, naming
    them and the two ways out; a save (defence in depth) never prunes a cached checkpoint the
    run dir has no trace of, nor counts it among the kept ones."""
    run_dir, local_dir = f"{s3_bucket}/run", str(tmp_path / "cache")
    stale = _rank_files([0])
    for step in (5000, 6000):
        _write(
            os.path.join(local_dir, "checkpoints", tag_for(step)),
            stale,
            _marker(tag_for(step), 1, stale),
        )
    ck = CheckpointManager(run_dir, local_dir, 2, _dist())
    for resume in ("auto", "none", tag_for(5000)):
        with pytest.raises(ConfigError) as err:
            ck.find(resume)
        said = str(err.value)
        assert (
            f"the run dir {run_dir}/checkpoints has no checkpoint, but the local cache "
            f"{local_dir}/checkpoints holds complete checkpoints that it has no trace of: "
            f"{tag_for(5000)}, {tag_for(6000)}" in said
        ), said
        assert f"aws s3 sync {local_dir}/checkpoints {run_dir}/checkpoints" in said
        assert "or give another local_dir" in said
    # saved anyway (no find): the cached ones stay, and keep_last counts this run's alone
    for step in (10, 20, 30):
        assert ck.save(FakeEngine(), step, {"step": step}, {"rng": None}) == tag_for(step)
    assert complete_tags(ck.local_root) == [tag_for(s) for s in (20, 30, 5000, 6000)]
    assert complete_tags(ck.remote_root) == [tag_for(20), tag_for(30)]
    with pytest.raises(ConfigError, match=rf"has none newer than {tag_for(30)}, .*{tag_for(5000)}"):
        ck.find("auto")  # they would be overwritten when the run reaches their steps


def test_older_cached_checkpoints_the_run_dir_lacks_are_said_and_pruned(
    s3_bucket, tmp_path, caplog
):
    """A cache that holds an older checkpoint than the run dir's, which the run dir has no trace
    of (this run's, pruned from S3 while the run trained elsewhere): the run resumes the run
    dir's newest, says so, and keep_last prunes it (kept, such copies piled up for ever)."""
    run_dir, local_dir = f"{s3_bucket}/run", str(tmp_path / "cache")
    files = _rank_files([0])
    _write(f"{run_dir}/checkpoints/{tag_for(30)}", files, _marker(tag_for(30), 1, files))
    _write(f"{local_dir}/checkpoints/{tag_for(10)}", files, _marker(tag_for(10), 1, files))
    ck = CheckpointManager(run_dir, local_dir, 2, _dist())
    assert ck.find("auto") == tag_for(30)
    assert f"older than {tag_for(30)} that the run dir" in caplog.text
    assert f"has no trace of ({tag_for(10)}): not resumed; keep_last prunes" in caplog.text
    for step in (40, 50):
        ck.save(FakeEngine(), step, {"step": step}, {"rng": None})
    assert complete_tags(ck.local_root) == [tag_for(40), tag_for(50)]
    assert complete_tags(ck.remote_root) == [tag_for(40), tag_for(50)]


def test_resuming_an_older_checkpoint_says_to_move_the_cached_copies_too(s3_bucket, tmp_path):
    """resume_conflict says to move the newer checkpoints aside; in the run dir alone, the
    cache's complete copy of them was then refused as one the run dir has no trace of."""
    run_dir, local_dir = f"{s3_bucket}/run", str(tmp_path / "cache")
    files = _rank_files([0])
    for root in (f"{run_dir}/checkpoints", f"{local_dir}/checkpoints"):
        for step in (10, 20):
            _write(storage.join(root, tag_for(step)), files, _marker(tag_for(step), 1, files))
    ck = CheckpointManager(run_dir, local_dir, 2, _dist())
    with pytest.raises(ConfigError, match=rf"cached copies in {re.escape(ck.local_root)} too"):
        ck.find(tag_for(10))
    storage.remove(f"{run_dir}/checkpoints/{tag_for(20)}", recursive=True)
    shutil.rmtree(f"{local_dir}/checkpoints/{tag_for(20)}")
    assert ck.find(tag_for(10)) == tag_for(10)


def test_a_cached_checkpoint_whose_upload_did_not_complete_is_still_pruned(s3_bucket, tmp_path):
    """A save killed between the local marker and the run dir's: the run dir holds the step
    without its marker, the cache holds it complete. By design the run dir decides: the run
    resumes the step before, and the next save removes that cached copy."""
    run_dir, local_dir = f"{s3_bucket}/run", str(tmp_path / "cache")
    files = _rank_files([0])
    for root in (f"{run_dir}/checkpoints", f"{local_dir}/checkpoints"):
        _write(storage.join(root, tag_for(10)), files, _marker(tag_for(10), 1, files))
    _write(f"{run_dir}/checkpoints/{tag_for(20)}", files, None)
    _write(f"{local_dir}/checkpoints/{tag_for(20)}", files, _marker(tag_for(20), 1, files))
    ck = CheckpointManager(run_dir, local_dir, 2, _dist())
    assert ck.find("auto") == tag_for(10)
    ck.save(FakeEngine(), 15, {"step": 15}, {"rng": None})
    assert complete_tags(ck.local_root) == [tag_for(10), tag_for(15)]
    assert ckpt_mod._tags(ck.local_root) == [tag_for(10), tag_for(15)]


def test_a_node_prunes_by_the_run_dirs_listing_from_before_the_save(s3_bucket, tmp_path):
    """Another node's first rank prunes its cache while rank 0 prunes the run dir: what the run
    dir held when the save began decides, so a step rank 0 has just removed there still goes
    from the node's cache (else every node but rank 0's would keep it for ever)."""
    run_dir, local_dir = f"{s3_bucket}/run", str(tmp_path / "node1")
    files = _rank_files([2])
    for step in (10, 20, 30):
        tag = tag_for(step)
        _write(f"{local_dir}/checkpoints/{tag}", files, _marker(tag, 4, files))
    ck = CheckpointManager(run_dir, local_dir, 2, _dist(2, 4, 2))  # rank 2: node 1's first
    # the run dir holds nothing now (rank 0 has pruned it); before the save it held 10 and 20
    ck._prune(tag_for(30), {tag_for(10), tag_for(20)})
    assert complete_tags(ck.local_root) == [tag_for(20), tag_for(30)]


def test_a_prune_killed_midway_leaves_no_marker_over_missing_files(tmp_path, monkeypatch):
    """The marker goes first: a prune killed inside the folder's removal left COMPLETE.json
    over a half-deleted checkpoint, which then counted as complete."""
    files = _rank_files([0])
    root = str(tmp_path / "run" / "checkpoints")
    for step in (10, 20, 30):
        _write(f"{root}/{tag_for(step)}", files, _marker(tag_for(step), 1, files))
    ck = CheckpointManager(str(tmp_path / "run"), str(tmp_path / "run"), 1, _dist())

    def killed(path, ignore_errors=False):  # dies after removing one file of the folder
        os.remove(os.path.join(path, sorted(os.listdir(path))[-1]))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck._prune(tag_for(30), None)
    assert complete_tags(ck.local_root) == [tag_for(20), tag_for(30)]


def test_a_file_the_marker_lists_but_s3_lacks_names_the_checkpoint(s3_bucket, tmp_path):
    """The newest complete checkpoint lost a file (deleted by hand, an expiry rule): the run
    said only "not found: The specified key does not exist"."""
    run_dir, tag = f"{s3_bucket}/run", tag_for(20)
    files = _rank_files([0])
    _write(f"{run_dir}/checkpoints/{tag}", files, _marker(tag, 1, files))
    storage.remove(f"{run_dir}/checkpoints/{tag}/rank_state_00000.pt")
    ck = CheckpointManager(run_dir, str(tmp_path), 2, _dist())
    with pytest.raises(FileNotFoundError) as err:
        ck.ensure_local(tag)
    assert (
        f"checkpoint {run_dir}/checkpoints/{tag} lacks rank_state_00000.pt, which its "
        f"{MARKER} lists: it cannot be resumed. Move that checkpoint aside (out of "
        f"{run_dir}/checkpoints) to resume from the one before it" in str(err.value)
    )


def test_a_cached_copy_of_another_runs_step_is_replaced_by_the_run_dirs(s3_bucket, tmp_path):
    run_dir, tag = f"{s3_bucket}/run", tag_for(20)
    new, old = _rank_files([0]), {k: b"x" * 99 for k in _rank_files([0])}
    _write(f"{run_dir}/checkpoints/{tag}", new, _marker(tag, 1, new))
    old_marker = {**_marker(tag, 1, old), "time": 0.5}
    _write(str(tmp_path / "checkpoints" / tag), old, old_marker)
    ck = CheckpointManager(run_dir, str(tmp_path), 2, _dist())
    local = Path(ck.ensure_local(tag))
    assert all((local / n).read_bytes() == d for n, d in new.items())
    assert storage.read_json(str(local / MARKER)) == _marker(tag, 1, new)


def test_the_tokenizer_resumes_only_what_its_s3_mirror_has(s3_bucket, tmp_path):
    local, remote = str(tmp_path / "checkpoints"), f"{s3_bucket}/tok/checkpoints"
    tok_ckpt.save_checkpoint({"run": torch.tensor(1)}, 500, local, None, keep=2)  # stale cache
    assert tok_ckpt.newest_step(local, remote) is None  # the mirror is empty: start afresh
    # a new run reaches step 500 on another machine: this cache's step 500 is another run's
    other = str(tmp_path / "elsewhere")
    tok_ckpt.save_checkpoint({"run": torch.tensor(2)}, 500, other, remote, keep=2)
    assert tok_ckpt.newest_step(local, remote) == 500
    assert int(tok_ckpt.load_checkpoint(500, local, remote)["run"]) == 2
    assert int(tok_ckpt.load_checkpoint(500, local, None)["run"]) == 2  # now cached


def test_an_explicit_resume_must_name_a_complete_checkpoint_of_this_run(s3_bucket, tmp_path):
    run_dir = f"{s3_bucket}/run"
    _write(f"{run_dir}/checkpoints/{tag_for(10)}", {}, {"step": 10})
    _write(f"{run_dir}/checkpoints/{tag_for(20)}", {"x.pt": b"x"}, None)  # killed mid-save
    ck = CheckpointManager(run_dir, str(tmp_path), 2, _dist())
    assert ck.find(tag_for(10)) == tag_for(10)
    with pytest.raises(
        ValueError,
        match=r"has no complete checkpoint step_00000020 \(complete ones: step_00000010\)",
    ):
        ck.find(tag_for(20))
    with pytest.raises(ConfigError, match="has no complete checkpoint step_00000050"):
        ck.find(tag_for(50))
    for path in (
        f"s3://elsewhere/run/checkpoints/{tag_for(10)}",
        f"{tag_for(10)}/",
        "other/step_00000010",
    ):
        with pytest.raises(ConfigError, match=r"not a path.*init_from"):
            ck.find(path)
    # a config error: the job says it in one line and exits 2, no traceback
    with pytest.raises(ConfigError, match="neither auto, none nor a checkpoint tag"):
        ck.find("latest")


# --- an error on one node reaches every rank --------------------------------------------------------

_NODE_SCRIPT = textwrap.dedent(
    """
    import datetime, json, os, sys
    import torch, torch.distributed as dist
    from pipeline.train.checkpoint import CheckpointManager
    from pipeline.train.engine import DistInfo
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(sys.argv[3])))
    ck = CheckpointManager(sys.argv[1], sys.argv[2] + str(rank), 2,
                           DistInfo(rank, 2, 0, 1, torch.device("cpu")))
    try:
        ck.ensure_local("step_00000020")
        print(json.dumps({"rank": rank, "ok": True}))
    except Exception as exc:
        print(json.dumps({"rank": rank, "error": f"{type(exc).__name__}: {exc}"}))
    os._exit(0)
    """
)


def _two_ranks(script: str, *args: str, one_node: bool = False) -> list[dict | None]:
    """``script`` run as ranks 0 and 1 of a 2-rank gloo group on 127.0.0.1: two one-rank nodes,
    or with ``one_node`` one node of two. Each rank's last JSON line of output (None: it printed
    none)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(WORLD_SIZE="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    procs = []
    for r in (0, 1):
        local = {"LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"} if one_node else {"LOCAL_RANK": "0"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *args],
                env={**env, "RANK": str(r), **local},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    lines = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        printed = [line for line in out.splitlines() if line.startswith("{")]
        lines.append(json.loads(printed[-1]) if printed else None)
    return lines


def test_a_failure_on_one_nodes_first_rank_is_raised_on_every_rank(tmp_path):
    """Two one-rank nodes without a shared disk or S3: node 1 lacks the checkpoint. Both raise
    at once, node 0 naming node 1's error, instead of waiting in a barrier until the timeout."""
    tag = tag_for(20)
    _write(str(tmp_path / "node0" / "checkpoints" / tag), _rank_files([0]), {"world_size": 1})
    lines = _two_ranks(_NODE_SCRIPT, str(tmp_path / "node0"), str(tmp_path / "node"), "60")
    results = {r["rank"]: r.get("error") for r in lines}
    assert results[1].startswith("FileNotFoundError: no complete checkpoint step_00000020")
    assert "failed on rank 1: FileNotFoundError: no complete checkpoint" in results[0]


_SAVE_ON_OWN_DISKS = textwrap.dedent(
    """
    import datetime, json, os, sys
    import torch, torch.distributed as dist
    from pipeline.train import checkpoint
    from pipeline.train.checkpoint import CheckpointManager
    from pipeline.train.engine import DistInfo
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    checkpoint.SHARED_FS_WAITS_S = (0.1,)

    class RankFiles:  # what DeepSpeed ZeRO-2 writes on one rank: its own optimizer partition
        def save_checkpoint(self, root, tag, client_state, save_latest):
            os.makedirs(os.path.join(root, tag), exist_ok=True)
            name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            torch.save({"m": torch.zeros(3)}, os.path.join(root, tag, name))

    shared = sys.argv[2] == "shared"
    run_dir = sys.argv[1] if shared else sys.argv[1] + str(rank)  # one disk, or one a node
    ck = CheckpointManager(run_dir, run_dir, 2, DistInfo(rank, 2, 0, 1, torch.device("cpu")))
    try:
        ck.save(RankFiles(), 20, {"step": 20}, {"rng": None})
        print(json.dumps({"rank": rank, "complete": checkpoint.complete_tags(ck.local_root)}))
    except Exception as exc:
        print(json.dumps({"rank": rank, "error": f"{type(exc).__name__}: {exc}"}))
    os._exit(0)
    """
)


@pytest.mark.parametrize("disks", ["own", "shared"])
def test_a_local_run_dir_on_each_nodes_own_disk_is_refused_at_the_first_checkpoint(tmp_path, disks):
    """Two one-rank nodes, a local run_dir and no S3: on node-local disks each node held only its
    own rank's files, yet both wrote a complete marker listing all of them, and the run failed
    only when it resumed or exported. Both ranks now stop at the first save, naming the fix; on
    a folder the nodes share the same save completes."""
    results = _two_ranks(_SAVE_ON_OWN_DISKS, str(tmp_path / "run"), disks)
    if disks == "shared":
        assert [r.get("complete") for r in results] == [[tag_for(20)]] * 2, results
        return
    for r in results:
        assert "the node of rank 0 lacks 2 of the checkpoint's 4 files" in r["error"], r
        assert "s3:// run_dir" in r["error"] and "shares" in r["error"]
    for k in (0, 1):
        assert complete_tags(str(tmp_path / f"run{k}" / "checkpoints")) == []  # no marker


def test_local_dir_is_refused_beside_a_local_run_dir(tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.train.trainer import TrainConfig

    with pytest.raises(ConfigError, match="local_dir is the working copy of an s3:// run_dir"):
        load_config(TrainConfig, None, [f"run_dir={tmp_path}/a", f"local_dir={tmp_path}/b"])
    same = load_config(TrainConfig, None, [f"run_dir={tmp_path}/a", f"local_dir={tmp_path}/a"])
    assert same.local_dir == f"{tmp_path}/a"
    remote = load_config(TrainConfig, None, ["run_dir=s3://b/run", f"local_dir={tmp_path}/b"])
    assert remote.local_dir == f"{tmp_path}/b"


_ZERO3_EXPORT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    import torch.nn.functional as F
    from pipeline.config import to_dict
    from pipeline.models.gpt import GPT, GPTConfig
    from pipeline.train import engine
    from pipeline.train.checkpoint import CheckpointManager, export_checkpoint, load_export
    from pipeline.train.optim import OptimConfig, param_groups
    dist = engine.init_distributed()
    torch.set_num_threads(1)
    cfg = GPTConfig.from_name("debug", vocab_size=64, caption_dim=16, max_text_tokens=8,
                              grid_size=4)
    torch.manual_seed(0)
    model = GPT(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = param_groups(model, OptimConfig())
    ds = engine.build_ds_config("configs/deepspeed/zero3.json", micro_batch=2, grad_accum=1,
                                world=2, precision="fp32", optim=OptimConfig(), lr=1e-2)
    eng = engine.create_engine(model, groups, ds, lambda s: 1.0)
    torch.manual_seed(1 + dist.rank)
    for _ in range(2):
        codes = torch.randint(0, 64, (2, 16))
        logits = eng(codes, torch.randn(2, 8, 16), None)
        eng.backward(F.cross_entropy(logits.flatten(0, 1), codes.flatten()))
        eng.step()
    # the live master weights, gathered from both ranks' partitions (a collective)
    live = {n: deepspeed.utils.safe_get_full_fp32_param(p).clone()
            for n, p in eng.module.named_parameters()}
    run_dir, out = sys.argv[1], sys.argv[2]
    ck = CheckpointManager(run_dir, run_dir, 2, dist)
    ck.save(eng, 2, {"step": 2}, {"rng": None},
            meta={"model": to_dict(cfg), "param_groups": [g["names"] for g in groups]})
    if dist.is_main:
        export_checkpoint(run_dir, out)
        state, _ = load_export(out)
        print(json.dumps({
            "missing": sorted(set(live) - set(state)),
            "max_diff": max(float((state[n] - live[n]).abs().max()) for n in live),
            "shapes": all(state[n].shape == live[n].shape for n in live),
            "moved": max(float((state[n] - init[n]).abs().max()) for n in live),
        }))
    engine.shutdown(0)
    """
)


def test_a_zero3_export_holds_the_live_engines_gathered_weights(tmp_path):
    """The export of a 2-rank ZeRO-3 checkpoint against an independent record: the engine's own
    fp32 master weights gathered with ``safe_get_full_fp32_param`` before the save (the end-of-
    run export and the export job share one consolidation path, so comparing those two proves
    nothing about it)."""
    got, _ = _two_ranks(
        _ZERO3_EXPORT_SCRIPT, str(tmp_path / "run"), str(tmp_path / "export"), one_node=True
    )
    assert got["missing"] == [] and got["shapes"], got
    assert got["max_diff"] == 0.0 and got["moved"] > 1e-3, got  # trained, and exported exactly
    assert (tmp_path / "run" / "checkpoints" / tag_for(2) / "COMPLETE.json").exists()


def test_a_save_removes_staging_leftovers_and_older_universal_copies(tmp_path):
    """A download or conversion killed mid-way leaves its staging folder, and each resume on
    another number of ranks a universal-format copy of the whole checkpoint (GPT-XL: ~12 GB).
    Nothing removed them. Once a newer checkpoint is complete, the first rank of each node
    removes them; newer staging folders and other files stay."""
    run = tmp_path / "run"
    ck = CheckpointManager(str(run), str(run), 2, _dist())
    local, universal = run / "checkpoints", run / "universal"
    leftovers = [
        local / ".step_00000010-a1b2",
        universal / ".step_00000010-c3d4",
        universal / "step_00000010",
        local / ".step_00000020-e5f6",
    ]
    kept = [local / ".step_00000030-x", universal / "step_00000020", universal / "notes"]
    for d in leftovers + kept:
        d.mkdir(parents=True)
        (d / "f.bin").write_bytes(b"x" * 10)
    assert ck.save(FakeEngine(), 20, {"step": 20}, {"rng": None}) == tag_for(20)
    assert [d for d in leftovers if d.exists()] == []
    assert all(d.exists() for d in kept)
    assert complete_tags(str(local)) == [tag_for(20)]


def test_a_save_removes_older_checkpoints_whose_save_never_completed(s3_bucket, tmp_path):
    """A save killed mid-way leaves a folder without a marker; the resumed run saves other steps
    (another ``save_every``). That folder (GPT-XL: ~12 GB) stayed, locally and on S3, until
    ``keep_last`` newer complete ones existed. Now the next complete save removes it; a newer
    unmarked folder (not older than what was saved) stays."""
    run_dir, local_dir = f"{s3_bucket}/run", str(tmp_path / "node")
    partial = _rank_files([0])
    for root in (f"{run_dir}/checkpoints", os.path.join(local_dir, "checkpoints")):
        _write(storage.join(root, tag_for(15)), partial, None)
        _write(storage.join(root, tag_for(40)), partial, None)
    ck = CheckpointManager(run_dir, local_dir, 3, _dist())
    assert ck.save(FakeEngine(), 20, {"step": 20}, {"rng": None}) == tag_for(20)
    for root in (ck.remote_root, ck.local_root):
        assert ckpt_mod._tags(root) == [tag_for(20), tag_for(40)], root
        assert complete_tags(root) == [tag_for(20)], root


def test_the_tokenizer_removes_older_steps_whose_save_never_completed(s3_bucket, tmp_path):
    local, remote = str(tmp_path / "checkpoints"), f"{s3_bucket}/tok/checkpoints"
    for root in (local, remote):
        storage.write_bytes(storage.join(root, tok_ckpt.step_dir_name(300), "state.pt"), b"x")
        storage.write_bytes(storage.join(root, tok_ckpt.step_dir_name(900), "state.pt"), b"x")
    tok_ckpt.save_checkpoint({"w": torch.ones(2)}, 500, local, remote, keep=3)
    for root in (local, remote):
        names = sorted(n for n in storage.list_dir(root) if n.startswith("step_"))
        assert names == [tok_ckpt.step_dir_name(500), tok_ckpt.step_dir_name(900)], root
        assert tok_ckpt.complete_steps(root) == [500], root
