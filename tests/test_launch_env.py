"""Launchers other than deepspeed/torchrun (mpirun, srun): each rank finds its place in the job.

The unit tests read the variables each launcher sets; the last tests start two processes with
only Open MPI's (as ``mpirun -n 2`` and ``deepspeed --launcher openmpi`` give them) or only
Slurm's (as ``srun -n 2``) and check that ``engine.init_distributed`` joins them into one gloo
group of two, where it used to make two groups of one, both rank 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.launch_env import (
    DEFAULT_PORT,
    LaunchError,
    cuda_index,
    discover,
    expand_hostlist,
    export,
    tasks_on_node,
)

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_and_deepspeed_variables_are_taken_as_they_are():
    torchrun = {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "10.0.0.2",
        "MASTER_PORT": "29400",
    }
    le = discover(torchrun)
    assert (le.launcher, le.rank, le.world, le.local_rank, le.local_world) == ("env", 5, 16, 1, 4)
    assert (le.master_addr, le.master_port, le.multi_node) == ("10.0.0.2", 29400, True)
    deepspeed = {**torchrun, "LOCAL_SIZE": "8"}
    del deepspeed["LOCAL_WORLD_SIZE"]
    assert discover(deepspeed).local_world == 8
    # one node: no local size from the launcher means all ranks are here
    one_node = {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2"}
    le = discover(one_node)
    assert (le.local_world, le.master_addr, le.multi_node) == (3, "127.0.0.1", False)
    assert le.master_port == DEFAULT_PORT  # every rank must agree: not a random free port


def test_no_launcher_is_a_job_of_one_on_a_free_port():
    le = discover({})
    assert (le.launcher, le.rank, le.world, le.local_rank, le.local_world) == ("none", 0, 1, 0, 1)
    assert le.master_addr == "127.0.0.1"
    with socket.socket() as s:  # the port was free when chosen
        s.bind(("127.0.0.1", le.master_port))


@pytest.mark.parametrize(
    "launcher, env",
    [
        (
            "openmpi",
            {
                "OMPI_COMM_WORLD_RANK": "9",
                "OMPI_COMM_WORLD_SIZE": "16",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
            },
        ),
        (
            "mvapich",
            {
                "MV2_COMM_WORLD_RANK": "9",
                "MV2_COMM_WORLD_SIZE": "16",
                "MV2_COMM_WORLD_LOCAL_RANK": "1",
                "MV2_COMM_WORLD_LOCAL_SIZE": "8",
            },
        ),
        (
            "mpich",
            {"PMI_RANK": "9", "PMI_SIZE": "16", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "8"},
        ),
    ],
)
def test_mpi_launchers(launcher, env):
    le = discover({**env, "MASTER_ADDR": "gpu-a"})
    assert (le.launcher, le.rank, le.world, le.local_rank, le.local_world) == (
        launcher,
        9,
        16,
        1,
        8,
    )
    assert (le.master_addr, le.master_port) == ("gpu-a", DEFAULT_PORT)
    # several nodes and nothing says where rank 0 is: a clear error, not 127.0.0.1 on every node
    with pytest.raises(LaunchError, match="no MASTER_ADDR: set it to rank 0's host"):
        discover(env)


def test_mpi_on_one_node_needs_no_address():
    le = discover(
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        }
    )
    assert (le.rank, le.world, le.master_addr, le.master_port) == (1, 2, "127.0.0.1", 29500)


SRUN = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "6",
    "SLURM_STEP_NUM_TASKS": "12",
    "SLURM_NTASKS": "12",
    "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "4(x3)",
    "SLURM_STEP_NODELIST": "gpu[07-09]",
    "SLURM_JOB_NODELIST": "gpu[01-09]",
}


def test_srun_task_finds_rank_node_size_and_the_first_host():
    le = discover(SRUN)
    assert (le.launcher, le.rank, le.world, le.local_rank, le.local_world) == ("slurm", 6, 12, 2, 4)
    # the step's first node (task 0 runs there), not the allocation's
    assert le.master_addr == "gpu07"
    assert le.master_port == 20000 + 4242 % 20000  # the same on every task of the job
    assert discover({**SRUN, "MASTER_ADDR": "x", "MASTER_PORT": "1234"}).master_port == 1234


def test_an_sbatch_script_without_srun_is_a_job_of_one():
    """The batch script has its allocation's SLURM_NTASKS and SLURM_PROCID=0 but is one
    process: taking 12 ranks from it would wait forever for 11 that never start."""
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    batch["SLURM_PROCID"] = "0"
    assert discover(batch).world == 1


def test_mixed_tasks_per_node():
    assert tasks_on_node("2(x3),1", 0) == 2
    assert tasks_on_node("2(x3),1", 3) == 1
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(LaunchError, match="lists 4 nodes"):
        tasks_on_node("2(x3),1", 4)
    with pytest.raises(LaunchError, match="cannot read"):
        tasks_on_node("2x3", 0)


def test_slurm_host_lists():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("a[1-2]b[08-09]") == ["a1b08", "a1b09", "a2b08", "a2b09"]
    assert expand_hostlist("node9") == ["node9"]
    assert expand_hostlist("n[8-11]") == ["n8", "n9", "n10", "n11"]
    for bad in ("gpu[01-03", "gpu01]", "gpu[a-b]"):
        with pytest.raises(LaunchError):
            expand_hostlist(bad)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "set WORLD_SIZE but not RANK"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "rank 2 is not in a world of 2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a whole number"),
        (
            {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h"},
            "no LOCAL_RANK",
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "0",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            "OMPI_COMM_WORLD_LOCAL_SIZE is set but OMPI_COMM_WORLD_LOCAL_RANK is not",
        ),  # fmt: skip
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
            "local rank 3 of 2",
        ),
    ],
)
def test_inconsistent_launcher_variables_are_named(env, message):
    with pytest.raises(LaunchError, match=message):
        discover(env)


def test_export_fills_what_env_rendezvous_reads_and_keeps_the_launchers_values():
    env = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MASTER_PORT": "31000",
    }
    export(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
    }
    assert "LOCAL_WORLD_SIZE" not in env  # it would pass to the ranks of a later launch
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "31000")
    assert discover(env).launcher == "env"  # a second look agrees with the first
    assert discover(env).rank == 1


def test_cuda_device_of_a_rank():
    assert cuda_index(3, 8) == 3  # all the node's GPUs visible
    assert cuda_index(3, 1) == 0  # one GPU per process (srun --gpus-per-task=1)
    with pytest.raises(LaunchError, match="local rank 5 but 4 CUDA devices"):
        cuda_index(5, 4)
    with pytest.raises(LaunchError, match="no CUDA device"):
        cuda_index(0, 0)


_RANK_SCRIPT = """
import json, torch, torch.distributed as dist
from pipeline.train import engine
info = engine.init_distributed()
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(json.dumps({"rank": info.rank, "world": info.world, "local_rank": info.local_rank,
                  "local_world": info.local_world, "sum": t.item()}), flush=True)
engine.shutdown(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_job_with_a_free_port() -> str:
    """A job id whose port (20000 + id % 20000) is free here."""
    for job in range(4000 + os.getpid() % 10000, 20000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job))
            except OSError:
                continue
            return str(job)
    raise RuntimeError("no free port in 24000-40000")


def _launcher_env(kind: str, rank: int, job: str = "") -> dict[str, str]:
    if kind == "openmpi":  # what mpirun -n 2 sets on one node
        return {
            "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "PMIX_RANK": str(rank),
        }
    return {  # srun -n 2 on one node
        "SLURM_JOB_ID": job,
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_STEP_NODELIST": "localhost",
    }


@pytest.mark.parametrize("kind", ["openmpi", "slurm"])
def test_two_processes_from_mpirun_or_srun_form_one_group(kind):
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
        and not k.startswith(("OMPI_", "SLURM_", "PMI", "MV2_", "MASTER_"))
    }
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if kind == "openmpi":  # mpirun has no port variable: the one given as -x MASTER_PORT=...
        base["MASTER_PORT"] = str(_free_port())
    job = _slurm_job_with_a_free_port() if kind == "slurm" else ""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT],
            env={**base, **_launcher_env(kind, r, job)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    seen = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        seen.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["rank"] for r in seen) == [0, 1]
    for r in seen:
        assert (r["world"], r["local_world"], r["local_rank"]) == (2, 2, r["rank"])
        assert r["sum"] == 3.0  # 1 + 2: both ranks took part in the all-reduce


@dataclass(frozen=True)
class Job:
    """What parts_from_launcher/run_in_parts read of a sampling or evaluation config."""

    num_parts: int = 1
    part: int = 0
    device: str = "cpu"


def test_parts_come_from_the_launchers_ranks(monkeypatch):
    from pipeline.launch_env import parts_from_launcher

    ranks = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ranks["MASTER_ADDR"] = "h0"
    assert parts_from_launcher(Job(), {})[0] == Job()  # no launcher: as given
    cfg, le = parts_from_launcher(Job(), ranks)
    assert (cfg, le.rank) == (Job(4, 3, "cpu"), 3)
    assert parts_from_launcher(Job(4, 3), ranks)[0] == Job(4, 3)  # the same, spelled out
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert parts_from_launcher(Job(device="cuda"), ranks)[0].device == "cuda:1"
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)  # one GPU per task
    assert parts_from_launcher(Job(device="cuda"), ranks)[0].device == "cuda:0"
    assert parts_from_launcher(Job(device="cuda:0"), ranks)[0].device == "cuda:0"  # as chosen
    with pytest.raises(LaunchError, match="num_parts=2 part=0, but the launcher"):
        parts_from_launcher(Job(2, 0), ranks)


def test_srun_with_pmi2_is_read_as_slurm_not_as_hydra():
    """``srun --mpi=pmi2`` adds PMI_RANK/PMI_SIZE but none of Hydra's local variables: taken
    as MPICH it would make every rank local (world = node size) and rendezvous on loopback."""
    le = discover({**SRUN, "PMI_RANK": "6", "PMI_SIZE": "12"})
    assert (le.launcher, le.local_rank, le.local_world, le.master_addr) == ("slurm", 2, 4, "gpu07")


def test_one_gpu_per_process_gives_deepspeed_device_zero():
    from pipeline.launch_env import use_device_for_deepspeed

    le = discover(SRUN)  # local rank 2
    env = {"LOCAL_RANK": "2"}
    use_device_for_deepspeed(le, cuda_index(le.local_rank, 1), env)
    assert env["LOCAL_RANK"] == "0"  # what DeepSpeed sets the device from
    env = {"LOCAL_RANK": "2"}
    use_device_for_deepspeed(le, cuda_index(le.local_rank, 4), env)
    assert env["LOCAL_RANK"] == "2"
    # Open MPI: DeepSpeed asserts its local rank equals LOCAL_RANK, so it follows
    env = {"LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    use_device_for_deepspeed(le, cuda_index(le.local_rank, 1), env)
    assert env == {"LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}


def test_nothing_to_split_runs_on_rank_0_alone(monkeypatch):
    from pipeline.launch_env import run_in_parts

    runs = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("MASTER_PORT", "29500")
        out = run_in_parts(Job(), lambda c, r=rank: runs.append((r, c)) or "report", split=False)
        assert out == ("report" if rank == "0" else None)
    assert runs == [("0", Job(1, 0, "cpu"))]  # no process group, no parts
