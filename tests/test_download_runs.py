"""One download run per output (the run lease), shards whose files went missing, and the
runtime env a download driver hands Ray under ``ray job submit``."""

import copy
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from pipeline import scratch, storage
from pipeline.cluster_paths import RAY_JOB_ENV
from pipeline.data import download
from pipeline.data.download import (
    LEASE_STALE_S,
    OutputInUseError,
    RunLease,
    lease_uri,
    run_download,
)
from pipeline.data.metadata import MetadataConfig
from tests.badserver import BadServer
from tests.test_download import _config, _write_metadata


@pytest.fixture(scope="module")
def server():
    srv = BadServer(n_good=15, size=64)
    with srv.running():
        yield srv


@pytest.fixture()
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lease(heartbeat_ago: float, **kw) -> dict:
    now = time.time()
    lease = {
        "run_id": "otherhost-4242-deadbeef",
        "host": "otherhost",
        "pid": 4242,
        "owner": "0badc0de",  # another host: its PID means nothing here
        "ray_job": "raysubmit_abc",
        "started": now - 3600,
        "heartbeat": now - heartbeat_ago,
    }
    lease.update(kw)
    return lease


def _hits(server, urls):
    return {u: server.hits[u.split(server.base, 1)[1]] for u in urls}


def test_a_second_run_is_refused_while_another_holds_a_fresh_lease(tmp_path):
    out = str(tmp_path / "raw")
    storage.write_json(lease_uri(out), _lease(heartbeat_ago=20))
    cfg = _config(str(tmp_path / "no-such-input.parquet"), out)
    with pytest.raises(OutputInUseError) as err:
        run_download(cfg)
    msg = str(err.value)
    assert "otherhost" in msg and "pid 4242" in msg and "refreshed 20s ago" in msg
    assert "ray job stop raysubmit_abc" in msg and lease_uri(out) in msg  # the ways out
    assert sorted(os.listdir(out)) == ["_meta"]  # refused before anything was touched
    assert os.listdir(os.path.join(out, "_meta")) == ["run_lease.json"]
    assert storage.read_json(lease_uri(out))["run_id"] == "otherhost-4242-deadbeef"
    # the CLI says it in one line, status 1, no traceback
    from pipeline.cli import report_failure

    assert report_failure(err.value) == 1


def test_a_stale_lease_is_taken_over_and_the_lease_is_removed_at_the_end(
    server, tmp_path, caplog, monkeypatch
):
    urls = server.good_urls()[:5]
    _write_metadata(str(tmp_path / "m.parquet"), urls)
    out = str(tmp_path / "raw")
    storage.write_json(lease_uri(out), _lease(heartbeat_ago=LEASE_STALE_S + 5))
    # a staging folder left by a killed run
    leftover = os.path.join(out, "_meta", "staging", "deadhost-1-abcdefgh")
    os.makedirs(leftover)
    open(os.path.join(leftover, "00000.feather"), "wb").close()

    held, staged = [], []
    real_pass = download._run_img2dataset

    def watched(cfg, input_dir, outcome=None, staging=None):
        held.append(storage.read_json(lease_uri(out)))
        staged.append(staging)
        return real_pass(cfg, input_dir, outcome, staging)

    i2d = importlib.import_module("img2dataset.main")  # the package's ``main`` is a function

    reader_class, readers = i2d.Reader, []

    def recording_reader(*args, **kwargs):
        r = reader_class(*args, **kwargs)
        readers.append(r.tmp_path)
        return r

    recording_reader.__signature__ = inspect.signature(reader_class)
    monkeypatch.setattr(download, "_run_img2dataset", watched)
    monkeypatch.setattr(i2d, "Reader", recording_reader)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        result = run_download(_config(str(tmp_path / "m.parquet"), out))
    assert result.failed_shards == [] and result.stats["by_reason"] == {"success": 5}
    assert "taking over the lease of run otherhost-4242-deadbeef" in caplog.text
    assert "not refreshed for" in caplog.text
    # during the pass the lease was this run's, with what a person needs to find it
    (lease,) = held
    assert lease["pid"] == os.getpid() and lease["run_id"] != "otherhost-4242-deadbeef"
    assert {"host", "started", "heartbeat", "owner"} <= set(lease)
    # img2dataset's reader staged its inputs in this run's own folder, not in {output}/_tmp
    want = os.path.join(os.path.abspath(out), "_meta", "staging", lease["run_id"])
    assert staged == [want] and readers == [want]
    assert not os.path.exists(lease_uri(out))
    assert not os.path.exists(os.path.join(out, "_meta", "staging", lease["run_id"]))
    assert not os.path.exists(leftover)
    assert "_tmp" not in os.listdir(out)


def test_the_lease_is_removed_when_the_run_fails(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.download import DownloadConfig

    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"url": ["ftp://h/1.jpg"], "caption": ["a"]}), meta)
    cfg = DownloadConfig(
        input=str(meta),
        output=str(tmp_path / "raw"),
        metadata=MetadataConfig(url_column="url", caption_column="caption"),
    )
    with pytest.raises(ValueError, match="gave no row to download"):
        run_download(cfg)
    assert not os.path.exists(lease_uri(cfg.output))
    assert not download._held_leases


def test_a_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(tmp_path, dead_pid):
    out = str(tmp_path / "raw")
    storage.write_json(lease_uri(out), _lease(5, owner=scratch._owner(), pid=dead_pid))
    lease = RunLease(out)
    lease.acquire()
    try:
        assert storage.read_json(lease_uri(out))["run_id"] == lease.run_id
        # this process's own, held by a run still going: refused; once released: taken
        with pytest.raises(OutputInUseError, match=f"pid {os.getpid()}"):
            RunLease(out).acquire()
    finally:
        lease.release()
    assert not os.path.exists(lease_uri(out))
    storage.write_json(lease_uri(out), {**_lease(5, owner=scratch._owner(), pid=os.getpid())})
    again = RunLease(out)
    again.acquire()  # the lease of a run of this process that no longer holds it
    again.release()


def test_the_heartbeat_refreshes_the_lease_and_notices_a_take_over(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "LEASE_HEARTBEAT_S", 0.05)
    out = str(tmp_path / "raw")
    lease = RunLease(out)
    lease.acquire()
    try:
        first = storage.read_json(lease_uri(out))["heartbeat"]
        deadline = time.monotonic() + 10
        while storage.read_json(lease_uri(out))["heartbeat"] == first:
            assert time.monotonic() < deadline, "the lease was never refreshed"
            time.sleep(0.05)
        lease.check()  # still its own
        # another run took it over (this one looked dead to it): this run stops, and leaves
        # the other's lease where it is
        # the other run heartbeats too: written again until noticed (a refresh of this run
        # that read its own lease just before the first write may overwrite it once)
        deadline = time.monotonic() + 30
        while lease.lost is None:
            assert time.monotonic() < deadline, "the take-over was never noticed"
            storage.write_json(lease_uri(out), _lease(0))
            time.sleep(0.1)
        storage.write_json(lease_uri(out), _lease(0))
        with pytest.raises(OutputInUseError, match="taken over by run otherhost"):
            lease.check()
    finally:
        lease.release()
    assert storage.read_json(lease_uri(out))["run_id"] == "otherhost-4242-deadbeef"


def test_the_lease_on_s3(s3_bucket):
    out = f"{s3_bucket}/raw"
    lease = RunLease(out)
    lease.acquire()
    try:
        assert storage.read_json(lease_uri(out))["run_id"] == lease.run_id
        with pytest.raises(OutputInUseError, match="being written by another download"):
            RunLease(out).acquire()
    finally:
        lease.release()
    assert not storage.exists(lease_uri(out))
    storage.write_json(lease_uri(out), _lease(heartbeat_ago=LEASE_STALE_S + 1))
    taker = RunLease(out)
    taker.acquire()
    taker.release()
    assert not storage.exists(lease_uri(out))


def test_a_shard_whose_tar_or_parquet_went_missing_is_downloaded_again(server, tmp_path, caplog):
    """A second run into the same output (its retry round removes the tar and parquet of a
    shard the other is finishing) left a shard with its stats file but no tar: it counted as
    done for ever, and score skipped it with a warning. It is redone, and counted."""
    urls = server.good_urls()[:15]
    _write_metadata(str(tmp_path / "m.parquet"), urls)
    cfg = _config(
        str(tmp_path / "m.parquet"), str(tmp_path / "raw"), metadata=MetadataConfig(rows_per_unit=5)
    )
    first = run_download(cfg)
    assert first.failed_shards == [] and first.shards_total == 3
    assert first.stats["shards"]["redone_missing_files"] == []
    before = copy.copy(_hits(server, urls))

    os.remove(os.path.join(cfg.output, "00001.tar"))
    os.remove(os.path.join(cfg.output, "00002.parquet"))
    assert download.incomplete_shards(cfg.output) == {1: ["00001.tar"], 2: ["00002.parquet"]}
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        again = run_download(cfg)
    assert again.failed_shards == [] and again.shards_done == 3
    assert again.stats["shards"]["redone_missing_files"] == [1, 2]
    assert again.stats["by_reason"] == first.stats["by_reason"] == {"success": 15}
    assert "00001_stats.json without 00001.tar" in caplog.text
    assert "00002_stats.json without 00002.parquet" in caplog.text
    for name in ("00001.tar", "00002.parquet"):
        assert os.path.isfile(os.path.join(cfg.output, name))
    after = _hits(server, urls)
    assert [after[u] - before[u] for u in urls] == [0] * 5 + [1] * 10  # shards 1 and 2 only
    on_disk = storage.read_json(os.path.join(cfg.output, "_meta", "download_stats.json"))
    assert on_disk["shards"]["redone_missing_files"] == [1, 2]


# --- the runtime env under ray job submit ------------------------------------------------------

OURS = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "OPENCV_IO_MAX_IMAGE_PIXELS": "100",
}


def _job(env_vars) -> str:
    return json.dumps(
        {
            "runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": env_vars},
            "metadata": {"job_submission_id": "raysubmit_x"},
        }
    )


@pytest.mark.parametrize(
    ("job_env", "merged", "override"),
    [
        ({}, OURS, False),
        # the reviewer's: the job sets one of ours (Ray refused to merge: the download died)
        ({"WANDB_MODE": "disabled"}, OURS, False),
        (
            {"WANDB_MODE": "online", "OTHER": "x"},
            {**OURS, "WANDB_MODE": "online", "OTHER": "x"},
            False,
        ),
        ({"OPENCV_IO_MAX_IMAGE_PIXELS": "100"}, OURS, False),
        # a pixel limit other than max_image_pixels: ours (it shapes the shards), with a warning
        ({"OPENCV_IO_MAX_IMAGE_PIXELS": "7", "WANDB_MODE": "x"}, {**OURS, "WANDB_MODE": "x"}, True),
    ],
)
def test_ray_init_runtime_env_merges_with_the_jobs(job_env, merged, override, monkeypatch, caplog):
    import ray
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job_runtime_env = json.loads(_job(job_env))["runtime_env"]
    if set(job_env) & set(OURS):  # what the driver asked for before: refused by Ray
        assert _merge_runtime_env(job_runtime_env, {"env_vars": OURS}) is None

    calls = []

    def fake_init(address=None, runtime_env=None, **kw):
        calls.append((runtime_env, os.environ.get("RAY_OVERRIDE_JOB_RUNTIME_ENV")))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setenv(RAY_JOB_ENV, _job(job_env))
    monkeypatch.delenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", raising=False)
    for k, v in OURS.items():
        monkeypatch.setenv(k, v)
    cfg = _config("unused", "unused", distributor="ray", ray_address="127.0.0.1:1")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        with download._ray_session(cfg):
            pass
    ((runtime_env, flag),) = calls
    assert (flag == "1") is override
    assert "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in os.environ  # only for ray.init
    # what ray.init does with it under the job (ray/_private/worker.py, Ray 2.60)
    result = _merge_runtime_env(job_runtime_env, runtime_env, override=flag == "1")
    assert result is not None and result["env_vars"] == merged
    assert result["working_dir"] == "gcs://_ray_pkg_x.zip"
    assert ("OPENCV_IO_MAX_IMAGE_PIXELS=7" in caplog.text) is override


def test_outside_a_job_the_driver_sets_every_variable(monkeypatch):
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert download._job_env_vars() is None
    assert download._driver_env_vars(OURS, None) == (OURS, False)
    monkeypatch.setenv(RAY_JOB_ENV, "not json")
    assert download._job_env_vars() == {}
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {"env_vars": None}}))
    assert download._job_env_vars() == {}
