"""The executor and a pretokenize job on a real Ray head on loopback, with S3 on loopback."""

import os
import sys
import threading
import time

import pytest
import ray.cloudpickle

from pipeline import storage
from pipeline.data import shards
from pipeline.executor import ExecutorConfig, run_units
from tests.rawshards import build_tiny_models, raw_key, write_raw_shards
from tests.raycluster import RayHead

# The workers below live in this test module, which Ray's workers cannot import: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_head():
    with RayHead(num_cpus=2) as head:
        yield head


class _FlakyWorker:
    """Unit 1 kills its process on the first try; unit 2 always raises; the rest succeed."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.pid = os.getpid()
        open(os.path.join(root, f"init-{self.pid}"), "w").close()

    def __call__(self, unit: int) -> dict:
        if unit == 1 and not os.path.exists(os.path.join(self.root, "died-once")):
            open(os.path.join(self.root, "died-once"), "w").close()
            os._exit(1)
        if unit == 2:
            raise ValueError("unit 2 is broken")
        return {"unit": unit, "pid": self.pid}


def _make_flaky(root):
    return lambda: _FlakyWorker(root)


class _OneBadStart(_FlakyWorker):
    """The first actor to start fails at once (a bad GPU); the others load slowly, then work."""

    def __init__(self, root: str) -> None:
        try:
            os.close(os.open(os.path.join(root, "bad"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(1.0)
            super().__init__(root)
            return
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")


def _make_one_bad(root):
    return lambda: _OneBadStart(root)


class _PoisonedWorker:
    """Unit 3's first try leaves the worker broken (a CUDA context after an illegal memory
    access): every unit it gets afterwards fails with a CUDA error too."""

    def __init__(self, root: str) -> None:
        self.root, self.broken, self.pid = root, False, os.getpid()

    def __call__(self, unit: int) -> dict:
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if unit == 3 and not os.path.exists(os.path.join(self.root, "poisoned-once")):
            open(os.path.join(self.root, "poisoned-once"), "w").close()
            self.broken = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"unit": unit, "pid": self.pid}


def _make_poisoned(root):
    return lambda: _PoisonedWorker(root)


class _HangingWorker:
    """Unit 1's first try never returns (a GPU hang); everything else is quick."""

    def __init__(self, root: str) -> None:
        self.root, self.pid = root, os.getpid()

    def __call__(self, unit: int) -> dict:
        if unit == 1 and not os.path.exists(os.path.join(self.root, "hung-once")):
            with open(os.path.join(self.root, "hung-once"), "w") as f:
                f.write(str(self.pid))
            time.sleep(3600)
        return {"unit": unit, "pid": self.pid}


def _make_hanging(root):
    return lambda: _HangingWorker(root)


def _broken_factory():
    raise RuntimeError("model weights cannot load")


def test_executor_skips_retries_and_replaces_dead_workers(ray_head, tmp_path):
    cfg = ExecutorConfig(address=ray_head.gcs_address, num_actors=2, max_retries=1)
    report = run_units(range(6), _make_flaky(str(tmp_path)), cfg, is_done=lambda u: u == 0)
    assert report.skipped == [0]
    assert sorted(report.results) == [1, 3, 4, 5]
    assert list(report.failed) == [2] and "unit 2 is broken" in report.failed[2]
    assert report.attempts[1] == 2 and report.attempts[2] == 2  # max_retries=1: two tries
    # models load once per actor: two actors, plus the fresh one started for the one that died
    # when it is ready before the other actor has finished the rest (then it takes work)
    inits = sorted(n for n in os.listdir(tmp_path) if n.startswith("init-"))
    assert len(inits) in (2, 3)
    assert {f"init-{r['pid']}" for r in report.results.values()} <= set(inits)

    with pytest.raises(Exception, match="model weights cannot load"):
        run_units([0], _broken_factory, cfg)  # every actor fails: a configuration problem
    # one actor failing to start while another can: the run goes on with that one (it stopped)
    bad = tmp_path / "one_bad"
    bad.mkdir()
    report = run_units([0, 3, 4], _make_one_bad(str(bad)), cfg)
    assert sorted(report.results) == [0, 3, 4] and not report.failed
    # an actor the cluster can never place (a GPU on a CPU-only head): a clear error, no hang
    no_gpu = ExecutorConfig(address=ray_head.gcs_address, gpus_per_actor=1, start_timeout_s=3)
    with pytest.raises(TimeoutError, match="GPUs free"):
        run_units([0], _make_flaky(str(tmp_path)), no_gpu)


def test_an_actor_left_broken_by_a_cuda_error_is_replaced(ray_head, tmp_path):
    """One actor: after unit 3's CUDA error it would fail units 4 and 5 and unit 3's retry
    as well; a fresh actor takes them instead."""
    cfg = ExecutorConfig(address=ray_head.gcs_address, num_actors=1, max_retries=1)
    report = run_units([3, 4, 5], _make_poisoned(str(tmp_path)), cfg)
    assert sorted(report.results) == [3, 4, 5] and not report.failed
    assert report.attempts == {3: 2, 4: 1, 5: 1}
    assert len({r["pid"] for r in report.results.values()}) == 1  # all on the fresh actor


def test_actors_the_cluster_cannot_place_hold_no_work(ray_head, tmp_path):
    """Four actors of one CPU each on a 2-CPU head: two start, two stay pending for good. The
    units go to the started ones only, and the run ends (before: each pending actor held a unit
    and the run waited for them forever)."""
    cfg = ExecutorConfig(address=ray_head.gcs_address, num_actors=4, start_timeout_s=60)
    units = [0, 3, 4, 5, 6, 7]
    outcome: list = []

    def run():
        try:
            outcome.append(run_units(units, _make_flaky(str(tmp_path)), cfg))
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)  # a regression hangs: fail instead
    t.start()
    t.join(timeout=240)
    assert outcome, "the run is still waiting for actors that cannot be placed"
    report = outcome[0]
    assert not isinstance(report, Exception), report
    assert sorted(report.results) == units and not report.failed
    assert len({r["pid"] for r in report.results.values()}) <= 2  # only the two placed actors


def test_pretokenize_job_submitted_to_cluster_with_s3(ray_head, s3_bucket, tmp_path):
    raw, out, models_root = f"{s3_bucket}/raw", f"{s3_bucket}/tokens", f"{s3_bucket}/models"
    keys = write_raw_shards(raw, 3, 4, broken={(2, 1)})
    models = build_tiny_models(models_root)
    env_vars = {
        k: os.environ[k]
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED",
        )
    }
    env_vars.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        T2I_CACHE=str(tmp_path / "cache"),  # where actors copy the s3:// models
        HF_HUB_OFFLINE="1",
    )
    result = ray_head.submit(
        [
            sys.executable,
            "jobs/pretokenize.py",
            "--config",
            "configs/data/pretokenize_tiny.yaml",
            f"input={raw}",
            f"output={out}",
            f"vq.uri={models['vq']}",
            f"text.uri={models['t5']}",
            "executor.num_actors=1",
        ],
        env_vars,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "succeeded" in output
    assert "connecting to Ray at" in output  # the job used the cluster, not a local Ray

    done = shards.list_done_shards(out)
    assert [d.index for d in done] == [0, 1, 2]
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["num_samples"] == 11 and manifest["dropped"] == {"undecodable_image": 1}
    got = [s for d in done for s in shards.read_token_shard(d.uri)]
    assert [g["key"] for g in got] == [k for i in range(3) for k in keys[i] if k != raw_key(2, 1)]
    assert all(g["codes"].shape == (8, 8) and g["codes_flip"].shape == (8, 8) for g in got)
    assert storage.exists(f"{out}/pretokenize_config.yaml")


def test_a_submitted_job_refuses_relative_data_paths(ray_head):
    """The shipped score config's ``outputs/...`` paths under ``ray job submit``: each process
    would use its own node's temporary copy of the package, the driver merging none of the
    workers' shards (before: "0/0 samples kept over 0 shards", exit 0). Refused up front."""
    result = ray_head.submit(
        [sys.executable, "jobs/score.py", "--config", "configs/data/score.yaml"], {}
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-5000:]
    assert "config error: input='outputs/raw', output='outputs/scores'" in output, output[-5000:]
    assert "ray job submit" in output and "_ray_pkg_" in output  # names Ray's package copy
    assert "every node mounts" in output and "samples kept" not in output


def test_a_unit_past_its_time_limit_is_retried_on_a_fresh_actor(ray_head, tmp_path):
    """unit_timeout_s: a hung unit does not stall the stage; its actor is replaced and the
    unit's retry succeeds, the other units are unaffected."""
    cfg = ExecutorConfig(
        address=ray_head.gcs_address, num_actors=1, max_retries=1, unit_timeout_s=8
    )
    t0 = time.monotonic()
    report = run_units([1, 2, 3], _make_hanging(str(tmp_path)), cfg)
    assert time.monotonic() - t0 < 300
    assert sorted(report.results) == [1, 2, 3] and not report.failed
    assert report.attempts == {1: 2, 2: 1, 3: 1}
    # the hung actor was replaced: the retry ran in another process
    hung_pid = int((tmp_path / "hung-once").read_text())
    assert report.results[1]["pid"] != hung_pid
    with pytest.raises(ValueError, match="unit_timeout_s must be > 0"):
        ExecutorConfig(unit_timeout_s=0)
