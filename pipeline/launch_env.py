"""Where this process sits in a distributed job, from whichever launcher started it.

PyTorch's ``env://`` rendezvous (what DeepSpeed and our tokenizer trainer use) reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The ``deepspeed`` launcher
(pdsh, the default), torchrun and DeepSpeed's MPICH/Intel MPI helpers set them. Its other
launchers do not: ``deepspeed --launcher openmpi`` and ``--launcher mvapich`` run ``mpirun``,
``--launcher slurm`` runs ``srun``, and each process gets only that launcher's own variables
(DeepSpeed then asks ``mpi4py``, which is not installed here). The same holds for a job script
that calls ``srun python jobs/train.py`` or ``mpirun python jobs/train.py`` itself. Without them
every process used to take the defaults of a job of one: N copies of rank 0, each training alone
and writing the same checkpoint.

:func:`discover` reads, in this order:

- ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (deepspeed, torchrun, DeepSpeed's MPI helpers);
- Open MPI's ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``;
- MVAPICH2's ``MV2_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``;
- MPICH and Intel MPI (Hydra): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``,
  ``MPI_LOCALNRANKS`` (only with the last: Slurm's ``srun --mpi=pmi2`` sets ``PMI_RANK`` and
  ``PMI_SIZE`` alone, and is read as Slurm below);
- Slurm's ``srun`` (a job step: ``SLURM_STEP_NUM_TASKS`` is set, which an ``sbatch`` script
  alone does not have): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, this
  node's count in ``SLURM_STEP_TASKS_PER_NODE``;
- none of these: a job of one.

Rank 0's address: ``MASTER_ADDR`` if set; on one node, loopback; under Slurm, the first host of
the step's node list (where task 0 runs); otherwise an error that says to set it (an MPI
launcher has no such variable: ``mpirun -x MASTER_ADDR=...``, or a line in ``.deepspeed_env``).
The port: ``MASTER_PORT`` if set; a free one for a job of one; under Slurm ``20000 + job id %
20000`` (the same on every task; two jobs sharing a node seldom meet there, but a port in use,
or two steps of one job at once, need ``MASTER_PORT``); otherwise 29500, PyTorch's default.
Under Slurm rank 0 runs on the step's first node with the usual block or cyclic distributions;
with ``--distribution=arbitrary`` set ``MASTER_ADDR``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
from collections.abc import Callable, Mapping, MutableMapping
from typing import TypeVar

# (launcher, rank, size, local rank, local size): the first whose rank and size are both set wins
_MPI_VARS = (
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    (
        "mvapich",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
# where a local size may come from when the launcher sets RANK/WORLD_SIZE (torchrun, deepspeed)
_LOCAL_SIZE_VARS = (
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
)
DEFAULT_PORT = 29500


class LaunchError(RuntimeError):
    """The launcher's variables do not describe a job this process can join."""


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "env" (RANK/WORLD_SIZE), "openmpi", "mvapich", "mpich", "slurm" or "none"
    rank: int
    world: int
    local_rank: int
    local_world: int
    master_addr: str
    master_port: int

    @property
    def multi_node(self) -> bool:
        return self.world > self.local_world


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"{key}={env[key]!r} is not a whole number") from None


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list as names: ``gpu[01-03,07],login1`` -> gpu01, gpu02, gpu03,
    gpu07, login1 (zero padding kept; several bracket groups in one name multiply out)."""
    hosts: list[str] = []
    for item in _split_top(spec.strip()):
        if not item:
            continue
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            options = [literal]
            if ranges:
                options = [literal + n for n in _expand_ranges(ranges, item)]
            names = [a + b for a in names for b in options]
        hosts.extend(names)
    return hosts


def _split_top(spec: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in the host list {spec!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"unbalanced '[' in the host list {spec!r}")
    parts.append("".join(cur))
    return parts


def _expand_ranges(ranges: str, item: str) -> list[str]:
    out = []
    for r in ranges.split(","):
        lo, sep, hi = r.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"cannot read the range {r!r} in the host list entry {item!r}")
        if not sep:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's task count from Slurm's ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``: three
    nodes with 2 tasks, then one with 1)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"cannot read SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(
            f"SLURM_NODEID={node_id} but SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r} "
            f"lists {len(counts)} nodes"
        )
    return counts[node_id]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """This process's place in the job from the launcher's variables (see the module text)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        if "RANK" not in env or "WORLD_SIZE" not in env:
            have, lack = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
            raise LaunchError(f"the launcher set {have} but not {lack}")
        launcher, rank, world = "env", _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_world = next((_int(env, k) for k in _LOCAL_SIZE_VARS if env.get(k)), world)
        local_keys = (
            "LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MV2_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
        )
        local_key = next((k for k in local_keys if k in env), None)
        if local_key is not None:
            local_rank = _int(env, local_key)
        elif local_world == world:  # one node: the local rank is the rank
            local_rank = rank
        else:
            raise LaunchError(
                f"RANK={rank} of {world} on nodes of {local_world}, but no LOCAL_RANK: "
                "set it (torchrun and deepspeed do)"
            )
    else:
        found = next(
            (
                (name, *keys)
                for name, *keys in _MPI_VARS
                if keys[0] in env and keys[1] in env and (name != "mpich" or keys[3] in env)
            ),
            None,
        )
        if found is not None:
            launcher, rk, sz, lrk, lsz = found
            rank, world = _int(env, rk), _int(env, sz)
            local_rank = _int(env, lrk) if lrk in env else (rank if lsz not in env else -1)
            local_world = _int(env, lsz) if lsz in env else world
            if local_rank < 0:
                raise LaunchError(f"{launcher}: {lsz} is set but {lrk} is not")
        elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
            launcher = "slurm"
            rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
            local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
            per_node = env.get("SLURM_STEP_TASKS_PER_NODE")
            local_world = (
                tasks_on_node(per_node, _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0)
                if per_node
                else world
            )
        else:
            launcher, rank, world, local_rank, local_world = "none", 0, 1, 0, 1
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{launcher}: rank {rank} is not in a world of {world}")
    if local_world < 1 or not 0 <= local_rank < local_world or local_world > world:
        raise LaunchError(
            f"{launcher}: local rank {local_rank} of {local_world} on this node, "
            f"in a world of {world}"
        )
    multi_node = world > local_world
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    elif not multi_node:
        addr = "127.0.0.1"
    elif launcher == "slurm" and (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        hosts = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        if not hosts:
            raise LaunchError("slurm: the step's node list is empty; set MASTER_ADDR")
        addr = hosts[0]
    else:
        raise LaunchError(
            f"{launcher}: {world} ranks on several nodes and no MASTER_ADDR: set it to rank 0's "
            "host on every rank (mpirun -x MASTER_ADDR=<host>, or MASTER_ADDR=<host> in "
            ".deepspeed_env for deepspeed --launcher openmpi/mvapich)"
        )
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    elif world == 1:
        port = _free_port()
    elif launcher == "slurm" and env.get("SLURM_JOB_ID", "").isdigit():
        port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
    else:
        port = DEFAULT_PORT
    return LaunchEnv(launcher, rank, world, local_rank, local_world, addr, port)


def export(env: MutableMapping[str, str] = os.environ) -> LaunchEnv:
    """:func:`discover`, then write what ``env://`` and the rest of the pipeline read:
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (values a
    launcher set are left as they are). Not the node size: set in a process that later starts
    a launcher (a test, a notebook), a ``LOCAL_WORLD_SIZE`` would pass to its ranks and be read
    before the ``LOCAL_SIZE`` the deepspeed launcher gives them."""
    le = discover(env)
    for key, value in (
        ("RANK", le.rank),
        ("WORLD_SIZE", le.world),
        ("LOCAL_RANK", le.local_rank),
        ("MASTER_ADDR", le.master_addr),
        ("MASTER_PORT", le.master_port),
    ):
        env.setdefault(key, str(value))
    return le


def use_device_for_deepspeed(
    le: LaunchEnv, index: int, env: MutableMapping[str, str] = os.environ
) -> None:
    """DeepSpeed takes a rank's CUDA device from ``LOCAL_RANK`` (its NCCL ``device_id`` and the
    engine's ``set_device``). With one GPU per process (``srun --gpus-per-task=1``) that is
    device 0 for every rank, not the local rank: ``LOCAL_RANK`` is set to the device index then.
    The node-local rank itself stays in ``DistInfo.local_rank``. Under Open MPI DeepSpeed
    also asserts ``OMPI_COMM_WORLD_LOCAL_RANK == LOCAL_RANK`` (its only other use: a fallback
    for ``LOCAL_RANK``), so that one follows too: ``mpirun`` with one GPU per rank would stop
    every rank but each node's first in ``deepspeed.initialize``."""
    if index != le.local_rank:
        env["LOCAL_RANK"] = str(index)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
            env["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank: its local rank when the node's GPUs are all visible, 0 when
    the launcher gave each process one GPU (``srun --gpus-per-task=1``,
    ``CUDA_VISIBLE_DEVICES`` per rank)."""
    if visible < 1:
        raise LaunchError("no CUDA device is visible to this process")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise LaunchError(
        f"local rank {local_rank} but {visible} CUDA devices visible: give each process one GPU "
        "or all of the node's, and at most one process per GPU"
    )


def collective_timeout(env: Mapping[str, str] = os.environ) -> datetime.timedelta:
    """How long a rank waits in a collective (a barrier) before the job fails.

    DeepSpeed's default is 10 minutes (NCCL's too), but at a checkpoint's end and at export
    rank 0 alone downloads, consolidates and uploads the state (12 GB of ZeRO state for GPT-XL,
    more for 3B) while every other rank waits in a barrier. Here the default is 60 minutes;
    ``DEEPSPEED_TIMEOUT`` (minutes, DeepSpeed's own variable) sets it, for the tokenizer
    trainer's group too."""
    return datetime.timedelta(minutes=float(env.get("DEEPSPEED_TIMEOUT") or 60))


# how long a finished rank waits for the slowest part (sampling 30k images may take hours)
PARTS_TIMEOUT = datetime.timedelta(hours=48)
# how long ranks wait for one another to start
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=30)

C = TypeVar("C")
R = TypeVar("R")


def parts_from_launcher(cfg: C, env: Mapping[str, str] = os.environ) -> tuple[C, LaunchEnv]:
    """``cfg`` (a config with ``num_parts``, ``part`` and ``device``) for this rank's part of a
    job a launcher started on several ranks: ``num_parts`` = the world, ``part`` = the rank, and a
    bare ``device=cuda`` becomes this rank's GPU. Unchanged under no launcher (a world of one)."""
    le = discover(env)
    if le.world == 1:
        return cfg, le
    num_parts, part = cfg.num_parts, cfg.part  # type: ignore[attr-defined]
    if num_parts != 1 and (num_parts, part) != (le.world, le.rank):
        raise LaunchError(
            f"num_parts={num_parts} part={part}, but the launcher ({le.launcher}) started "
            f"{le.world} ranks and this is rank {le.rank}: under a launcher the ranks are the "
            "parts; leave num_parts and part out"
        )
    device = cfg.device  # type: ignore[attr-defined]
    if device == "cuda":
        import torch

        device = f"cuda:{cuda_index(le.local_rank, torch.cuda.device_count())}"
    return dataclasses.replace(cfg, num_parts=le.world, part=le.rank, device=device), le  # type: ignore[type-var]


def run_in_parts(cfg: C, run: Callable[[C], R], split: bool = True) -> R | None:
    """``run(cfg)`` split over the ranks of a launcher (torchrun, deepspeed, mpirun, srun).

    Each rank runs its part (:func:`parts_from_launcher`); when all are done (a gloo barrier),
    rank 0 runs ``cfg`` whole with ``num_parts=1``, which finds every part's output and only
    collects (the grid and summary, or the evaluation report). Returns that on rank 0 and None
    elsewhere; with no launcher, ``run(cfg)``. A rank that fails ends the job: the launchers
    stop the others (torchrun, ``srun --kill-on-bad-exit``, mpirun), and gloo's barrier fails
    when a peer is gone; a rerun redoes only the missing outputs. ``split=False`` (nothing to
    split, e.g. scoring images made earlier): rank 0 runs ``cfg`` alone, the others do nothing.

    The ranks meet within :data:`RENDEZVOUS_TIMEOUT` (a rank that never starts fails the job
    then, not after the parts' wait), and wait for one another's parts up to
    :data:`PARTS_TIMEOUT` (``monitored_barrier``, which names a missing rank)."""
    part_cfg, le = parts_from_launcher(cfg)
    if le.world == 1:
        return run(cfg)
    device = str(part_cfg.device)  # type: ignore[attr-defined]
    if device.startswith("cuda:"):
        import torch

        # the rank's GPU as the current device too: an implicit one (a library's allocation,
        # an argument-less synchronize) would otherwise open a context on GPU 0 from every rank
        torch.cuda.set_device(device)
    if not split:
        return run(dataclasses.replace(part_cfg, num_parts=1, part=0)) if le.rank == 0 else None  # type: ignore[type-var]
    import torch.distributed as dist

    export(os.environ)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=RENDEZVOUS_TIMEOUT)
    try:
        run(part_cfg)
        dist.monitored_barrier(timeout=PARTS_TIMEOUT)
        if le.rank == 0:
            return run(dataclasses.replace(part_cfg, num_parts=1, part=0))  # type: ignore[type-var]
        return None
    finally:
        dist.destroy_process_group()
