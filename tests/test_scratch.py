"""Owner-named scratch entries, and the removal of those left behind by killed runs."""

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from pipeline import scratch
from pipeline.data import download, shards
from pipeline.data.download import DownloadConfig

HOST = socket.gethostname()
ME = scratch._owner()  # this host and PID namespace, hashed
HOUR_AGO = time.time() - 3600  # before this process started, as a killed run's leftovers are


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(folder, name: str, size: int = 1000, is_dir: bool = False) -> str:
    """A file (or a folder holding one) of ``size`` bytes, last modified an hour ago."""
    path = os.path.join(str(folder), name)
    if is_dir:
        os.makedirs(os.path.join(path, "inner"))
        with open(os.path.join(path, "inner", "data"), "wb") as f:
            f.write(b"x" * size)
    else:
        with open(path, "wb") as f:
            f.write(b"x" * size)
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def test_entries_are_named_after_their_owner(tmp_path):
    fd, path = scratch.mkstemp("shard", suffix="-00003.tar", dir=str(tmp_path))
    os.close(fd)
    folder = scratch.mkdtemp("dl", dir=str(tmp_path))
    with scratch.temporary_directory("select_hq", dir=str(tmp_path)) as temporary:
        assert os.path.basename(temporary).startswith(f"t2i-select_hq-{ME}-{os.getpid()}-")
    assert not os.path.exists(temporary)
    assert os.path.basename(path).startswith(f"t2i-shard-{ME}-{os.getpid()}-")
    assert path.endswith("-00003.tar") and os.path.isfile(path)
    assert os.path.basename(folder).startswith(f"t2i-dl-{ME}-{os.getpid()}-")
    assert len(os.path.basename(folder)) <= 32  # a local Ray's socket paths go under it
    with pytest.raises(ValueError, match="kind"):
        scratch.prefix("select-hq")  # a "-" in a kind would make names ambiguous


def test_entries_of_dead_processes_are_removed_and_logged(tmp_path, dead_pid, caplog):
    a = _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-abc_1234-00007.tar", 1000)
    b = _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-zz9zz9zz", 500, is_dir=True)
    with caplog.at_level(logging.INFO, logger="pipeline.scratch"):
        assert scratch.remove_stale("shard", str(tmp_path)) == (2, 1500)
    assert not os.path.exists(a) and not os.path.exists(b)
    assert "removed 2 stale shard entries (1500 bytes)" in caplog.text


def test_entries_of_live_processes_are_kept(tmp_path, dead_pid):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        mine = os.path.join(str(tmp_path), f"t2i-shard-{ME}-{os.getpid()}-abcdefgh.tar")
        with open(mine, "wb") as f:  # made by this process: after it started
            f.write(b"x")
        childs = _leftover(tmp_path, f"t2i-shard-{ME}-{child.pid}-abcdefgh.tar")
        stale = _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-abcdefgh.tar")
        assert scratch.remove_stale("shard", str(tmp_path)) == (1, 1000)
    finally:
        child.communicate(b"")
    assert os.path.exists(mine) and os.path.exists(childs) and not os.path.exists(stale)


def test_an_entry_of_this_pid_from_before_this_process_is_a_predecessors(tmp_path):
    """A container's job restarted runs as the same PID (often 1) as the one that was killed:
    an entry of this PID older than this process is that one's, and goes."""
    old = _leftover(tmp_path, f"t2i-shard-{ME}-{os.getpid()}-abcdefgh.tar")
    assert scratch.remove_stale("shard", str(tmp_path)) == (1, 1000)
    assert not os.path.exists(old)


def test_entries_of_another_pid_namespace_are_kept(tmp_path, dead_pid):
    """Containers with the same host name (host networking) sharing a /tmp: a PID of another
    namespace is not visible here, and would look dead."""
    with pytest.MonkeyPatch.context() as m:  # a process of another namespace names its entry
        m.setattr(scratch, "_pid_namespace", lambda: "4026531999")
        fd, other = scratch.mkstemp("shard", dir=str(tmp_path))
        os.close(fd)
        other_owner = scratch._owner()
    assert other_owner != ME and f"-{other_owner}-{os.getpid()}-" in other
    dead = os.path.join(str(tmp_path), os.path.basename(other).replace(
        f"-{os.getpid()}-", f"-{dead_pid}-"))  # fmt: skip
    os.rename(other, dead)  # ... and that process's PID is not one alive here
    os.utime(dead, (HOUR_AGO, HOUR_AGO))
    stale = _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-abcdefgh.tar")
    assert scratch.remove_stale("shard", str(tmp_path)) == (1, 1000)
    assert os.path.exists(dead) and not os.path.exists(stale)


def test_a_pid_of_another_user_counts_as_alive(tmp_path, dead_pid, monkeypatch):
    def kill(pid: int, sig: int) -> None:  # what kill(2) says of another user's process
        if pid == dead_pid:
            raise PermissionError(1, "Operation not permitted")
        raise ProcessLookupError(3, "No such process")

    kept = _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-abcdefgh.tar")
    stale = _leftover(tmp_path, f"t2i-shard-{ME}-4000000-abcdefgh.tar")
    monkeypatch.setattr(os, "kill", kill)
    assert scratch.remove_stale("shard", str(tmp_path)) == (1, 1000)
    assert os.path.exists(kept) and not os.path.exists(stale)


def test_entries_of_other_hosts_are_kept(tmp_path, dead_pid):
    """A /tmp shared across nodes: a PID means nothing on another host."""
    kept = [
        _leftover(tmp_path, f"t2i-shard-other-node-{dead_pid}-abcdefgh.tar"),
        _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-{dead_pid}-abcdefgh.tar"),
        _leftover(tmp_path, f"t2i-shard-{HOST}x-{dead_pid}-abcdefgh.tar"),
        _leftover(tmp_path, f"t2i-shard-x{ME}-{dead_pid}-abcdefgh.tar"),
    ]
    stale = _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-abcdefgh.tar")
    assert scratch.remove_stale("shard", str(tmp_path)) == (1, 1000)
    assert all(os.path.exists(p) for p in kept) and not os.path.exists(stale)


def test_unrelated_and_recent_entries_are_kept(tmp_path, dead_pid):
    kept = [
        _leftover(tmp_path, "shard-00001-abcdefgh.tar"),  # the names made before owners
        _leftover(tmp_path, f"t2i-upload-{ME}-{dead_pid}-abcdefgh.tar"),  # another kind
        _leftover(tmp_path, f"t2i-shard_x-{ME}-{dead_pid}-abcdefgh.tar"),
        _leftover(tmp_path, f"x-t2i-shard-{ME}-{dead_pid}-abcdefgh.tar"),
        _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-abcdefg"),  # 7 random characters
        _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}"),
        _leftover(tmp_path, f"t2i-shard-{ME}-0{dead_pid}-abcdefgh"),
        _leftover(tmp_path, f"t2i-shard-{ME}-abc-abcdefgh"),
    ]
    # a dead PID, but modified after this process started: whoever writes it is not ours to judge
    recent = os.path.join(str(tmp_path), f"t2i-shard-{ME}-{dead_pid}-abcdefgh.tar")
    with open(recent, "wb") as f:
        f.write(b"x")
    stale = _leftover(tmp_path, f"t2i-shard-{ME}-{dead_pid}-stale000.tar")
    assert scratch.remove_stale("shard", str(tmp_path)) == (1, 1000)
    assert all(os.path.exists(p) for p in [*kept, recent]) and not os.path.exists(stale)


def test_a_process_sweeps_a_folder_once_per_kind(tmp_path, dead_pid):
    first = _leftover(tmp_path, f"t2i-export-{ME}-{dead_pid}-aaaaaaaa.safetensors")
    fd, _ = scratch.mkstemp("export", suffix=".safetensors", dir=str(tmp_path))
    os.close(fd)
    assert not os.path.exists(first)
    second = _leftover(tmp_path, f"t2i-export-{ME}-{dead_pid}-bbbbbbbb.safetensors")
    fd, _ = scratch.mkstemp("export", suffix=".safetensors", dir=str(tmp_path))
    os.close(fd)
    assert os.path.exists(second)  # the next process removes it: one listing per process


# --- the users -----------------------------------------------------------------------------------

# one run's upload through a staging file; "kill": SIGKILLed while the file is half written
_UPLOAD = """
import os, signal, sys
from pipeline import storage
with storage.open_write(sys.argv[1]) as f:
    f.write(b"half a file " * 1000)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_upload_staging_file_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch_dir)}
    killed = subprocess.Popen([sys.executable, "-c", _UPLOAD, str(tmp_path / "a"), "kill"], env=env)
    assert killed.wait() == -signal.SIGKILL
    (left,) = os.listdir(scratch_dir)
    assert left.startswith(f"t2i-upload-{ME}-{killed.pid}-") and left.endswith("a")
    rerun = [sys.executable, "-c", _UPLOAD, str(tmp_path / "b"), "finish"]
    subprocess.run(rerun, env=env, check=True)
    assert os.listdir(scratch_dir) == []  # the leftover, and the rerun's own staging file
    assert not (tmp_path / "a").exists() and (tmp_path / "b").stat().st_size == 12000


def test_token_shard_writer_removes_a_killed_runs_tar(tmp_path, dead_pid):
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    left = _leftover(scratch_dir, f"t2i-shard-{ME}-{dead_pid}-abcdefgh-00004.tar", 1 << 20)
    with shards.TokenShardWriter(str(tmp_path / "out"), 4, tmp_dir=str(scratch_dir)) as w:
        w.write(
            shards.encode_token_sample(
                key="000000001",
                codes=np.zeros((4, 4), np.uint16),
                t5=np.zeros((3, 8), np.float32),
                caption="a",
                meta={},
            )
        )
    assert w.info is not None and w.info.num_samples == 1
    assert not os.path.exists(left) and os.listdir(scratch_dir) == []


def test_download_scratch_folder_of_a_killed_run_is_removed(tmp_path, dead_pid, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    left = _leftover(tmp_path, f"t2i-dl-{ME}-{dead_pid}-abcdefgh", 1 << 20, is_dir=True)
    cfg = DownloadConfig(input="unused", output=str(tmp_path / "out"))
    with download._img2dataset_env(cfg) as folder:
        assert not os.path.exists(left)
        assert os.path.basename(folder).startswith(f"t2i-dl-{ME}-{os.getpid()}-")
        assert os.environ["TMPDIR"] == folder  # img2dataset and its workers write in it
    assert os.listdir(tmp_path) == []
    assert os.environ["TMPDIR"] == str(tmp_path)
