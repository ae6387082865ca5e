"""Data locations the workers of a cluster and its driver may not share.

Under ``ray job submit`` every process starts in its own node's temporary copy of the package, so
a relative local path is refused before any work (tests/test_ray_job.py submits one for real).
The download's Ray pass checks that shards its tasks reported done have a stats file the driver
sees (tests/test_cluster_paths.py checks the same for the executor's units)."""

import contextlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cluster_paths
from pipeline.cluster_paths import OutputNotVisibleError, check_paths_for_ray_job
from pipeline.config import ConfigError
from pipeline.data import download
from pipeline.data.download import DownloadConfig, run_download
from pipeline.data.filter import ScoreConfig, run_score
from pipeline.data.metadata import MetadataConfig
from pipeline.data.pretokenize import PretokenizeConfig, run_pretokenize
from pipeline.data.select_hq import SelectHQConfig, run_select_hq

# What Ray 2.60's job supervisor puts in a `ray job submit` entrypoint's environment (seen in a
# real submission; RAY_JOB_ID is not set there)
JOB_ENV = json.dumps(
    {
        "runtime_env": {"working_dir": "gcs://_ray_pkg_6c1b03f6498fd59b.zip", "env_vars": {}},
        "metadata": {"job_submission_id": "raysubmit_x", "job_name": "raysubmit_x"},
    }
)


@pytest.fixture()
def in_ray_job(monkeypatch, tmp_path):
    monkeypatch.setenv(cluster_paths.RAY_JOB_ENV, JOB_ENV)
    monkeypatch.chdir(tmp_path)  # a relative path that slipped through would land here
    return tmp_path


def test_ray_job_submission_is_recognised(monkeypatch):
    monkeypatch.delenv(cluster_paths.RAY_JOB_ENV, raising=False)
    assert cluster_paths.ray_job_submission() is None
    monkeypatch.setenv(cluster_paths.RAY_JOB_ENV, JOB_ENV)
    assert cluster_paths.ray_job_submission() == "raysubmit_x"
    monkeypatch.setenv(cluster_paths.RAY_JOB_ENV, "not json")
    assert cluster_paths.ray_job_submission() == "unknown"


@pytest.mark.parametrize(
    ("run", "cfg", "refused"),
    [
        (run_score, ScoreConfig(input="/data/raw", output="outputs/scores"), ["output"]),
        (
            run_pretokenize,
            PretokenizeConfig(input="outputs/raw", output="s3://bkt/tok", scores="file://sc"),
            ["input", "scores"],
        ),
        (run_download, DownloadConfig(input="meta.parquet", output="raw"), ["input", "output"]),
        (
            run_select_hq,
            SelectHQConfig(input="s3://bkt/raw", scores="/data/scores", output="./hq"),
            ["output"],
        ),
    ],
)
def test_relative_paths_are_refused_under_ray_job_submit(in_ray_job, run, cfg, refused):
    with pytest.raises(ConfigError) as err:
        run(cfg)
    msg = str(err.value)
    for name in refused:
        assert f"{name}=" in msg
    for name in {"input", "output", "scores"} - set(refused):
        assert f"{name}=" not in msg
    assert "ray job submit" in msg and "temporary copy of the package" in msg
    assert "s3://" in msg and "every node mounts" in msg
    assert os.listdir(in_ray_job) == []  # refused before anything was written


def test_absolute_and_remote_paths_pass_and_nothing_is_refused_outside_a_job(monkeypatch):
    monkeypatch.setenv(cluster_paths.RAY_JOB_ENV, JOB_ENV)
    check_paths_for_ray_job(
        {"input": "/abs/raw", "output": "s3://bkt/x", "scores": "file:///abs/s", "unset": None}
    )
    monkeypatch.delenv(cluster_paths.RAY_JOB_ENV)
    check_paths_for_ray_job({"input": "raw", "output": "outputs/scores"})


# --- the download's Ray pass: tasks that report success, shards the driver does not see ---------


def _metadata(path: str, n: int) -> None:
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)]
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(n)]}), path)


def _fake_ray_pass(visible: set[int], calls: list[int]):
    """A Ray distributor whose every task reports success; only the shards in ``visible``
    leave a stats file where the driver looks (the others wrote to their own node's disk)."""

    def distributor(processes_count, downloader, reader, subjob_size, max_shard_retry):
        calls.append(1)
        for shard, _ in reader:
            if shard in visible:
                out = downloader.output_folder
                stats = {"count": 1, "successes": 1, "status_dict": {"success": 1}}
                with open(os.path.join(out, f"{shard:05d}_stats.json"), "w") as f:
                    json.dump(stats, f)
                for suffix in (".tar", ".parquet"):  # what img2dataset writes with the stats
                    open(os.path.join(out, f"{shard:05d}{suffix}"), "wb").close()
        return []

    return distributor


@pytest.fixture()
def fake_ray(monkeypatch):
    """No Ray: the session is a no-op, the distributor ours; no wait for a slow listing."""
    from pipeline.data import img2dataset_guards

    monkeypatch.setattr(download, "_ray_session", lambda cfg: contextlib.nullcontext())
    monkeypatch.setattr(cluster_paths, "VISIBLE_WAIT_S", 0.0)

    def use(distributor):
        monkeypatch.setattr(img2dataset_guards, "ray_distributor", distributor)

    return use


def _download_cfg(tmp_path, rounds: int) -> DownloadConfig:
    _metadata(str(tmp_path / "m.parquet"), 4)
    return DownloadConfig(
        input=str(tmp_path / "m.parquet"),
        output=str(tmp_path / "raw"),
        metadata=MetadataConfig(rows_per_unit=2, extra_columns=[]),
        distributor="ray",
        processes=1,
        threads=1,
        shard_retry_rounds=rounds,
        allow_loopback=True,
    )


def test_download_stops_when_no_shard_reported_done_is_visible(fake_ray, tmp_path):
    calls: list[int] = []
    fake_ray(_fake_ray_pass(visible=set(), calls=calls))
    with pytest.raises(OutputNotVisibleError) as err:
        run_download(_download_cfg(tmp_path, rounds=3))
    msg = str(err.value)
    assert "2 download tasks reported success" in msg and "00000_stats.json" in msg
    assert str(tmp_path / "raw") in msg and "own node's disk" in msg and "s3://" in msg
    assert calls == [1]  # stopped after the first pass, not after every retry round


def test_download_redoes_shards_reported_done_but_not_visible(fake_ray, tmp_path, caplog):
    calls: list[int] = []
    fake_ray(_fake_ray_pass(visible={0}, calls=calls))
    result = run_download(_download_cfg(tmp_path, rounds=1))
    assert result.shards_done == 1 and result.failed_shards == [1]
    assert calls == [1, 1]  # shard 1 went to the retry round
    assert "reported success, but this driver sees no stats file" in caplog.text
    assert "00001_stats.json" in caplog.text
