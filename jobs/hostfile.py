"""Write a DeepSpeed hostfile (``host slots=N`` per line) from the nodes of a live Ray cluster.

    python jobs/hostfile.py out=~/hostfile                 # on the cluster's head node
    python jobs/hostfile.py out=~/hostfile wait_for_gpus=32  # scale up to 32 GPUs first
    deepspeed --hostfile ~/hostfile jobs/train.py --config configs/train/stage1.yaml
    python jobs/hostfile.py release=true                   # training done: let them go

DeepSpeed is not a Ray workload, so Ray's autoscaler does not start GPU nodes for it by itself:
``wait_for_gpus`` asks the autoscaler for that many GPUs (``request_resources``) and waits until
they are up. The request stays until ``release=true`` (or ``ray down``); idle nodes then go
after the cluster's idle timeout.

Every alive node with GPUs gets ``slots = its GPU count``; nodes without GPUs (the head, download
workers) are left out. On a cluster with no GPUs at all (CPU training with gloo), every alive node
that offers CPUs gets ``cpu_slots`` slots. Nodes sharing one address (several raylets on one
machine) are merged into one line, since DeepSpeed refuses a host listed twice. Hosts are sorted
so the same cluster always gives the same file; DeepSpeed's rank 0 is on the first line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pipeline import storage
from pipeline.cli import parse_job
from pipeline.config import doc
from pipeline.log import get_logger

log = get_logger("hostfile")


@dataclasses.dataclass(frozen=True)
class HostfileConfig:
    """Which Ray cluster to read and where the DeepSpeed hostfile goes."""

    address: str = doc("Ray address: 'auto' (the cluster of this machine) or 'host:6379'", "auto")
    out: str = doc("Hostfile to write (local path or s3://); '-' writes it to stdout", "hostfile")
    cpu_slots: int = doc("Slots per node when the cluster has no GPUs (CPU training, gloo)", 1)
    host: Literal["ip", "hostname"] = doc(
        "Name nodes by their IP (always reachable inside a VPC) or by their hostname", "ip"
    )
    wait_for_gpus: int = doc("Ask the autoscaler for this many GPUs and wait for them (0: no)", 0)
    wait_timeout_s: float = doc("Give up waiting for GPUs after this many seconds", 3600.0)
    release: bool = doc("Withdraw an earlier GPU request (and write no hostfile)", False)

    def __post_init__(self) -> None:
        if self.cpu_slots < 1:
            raise ValueError(f"cpu_slots must be >= 1, got {self.cpu_slots}")
        if self.wait_for_gpus < 0:
            raise ValueError(f"wait_for_gpus must be >= 0, got {self.wait_for_gpus}")


def hostfile_entries(
    nodes: Iterable[Mapping[str, Any]],
    cpu_slots: int = 1,
    host: Literal["ip", "hostname"] = "ip",
) -> list[tuple[str, int]]:
    """(host, slots) pairs from ``ray.nodes()`` records; see the module docstring."""
    alive = [n for n in nodes if n.get("Alive")]
    key = "NodeManagerAddress" if host == "ip" else "NodeManagerHostname"
    gpu_nodes = [n for n in alive if int(n.get("Resources", {}).get("GPU", 0)) > 0]
    slots: dict[str, int] = {}
    if gpu_nodes:
        for n in gpu_nodes:
            name = str(n[key])
            slots[name] = slots.get(name, 0) + int(n["Resources"]["GPU"])
    else:
        for n in alive:
            if float(n.get("Resources", {}).get("CPU", 0)) > 0:
                slots[str(n[key])] = cpu_slots
    return sorted(slots.items())


def format_hostfile(entries: Iterable[tuple[str, int]]) -> str:
    return "".join(f"{name} slots={n}\n" for name, n in entries)


def _alive_gpus(nodes: Iterable[Mapping[str, Any]]) -> int:
    return sum(int(n.get("Resources", {}).get("GPU", 0)) for n in nodes if n.get("Alive"))


def _wait_for_gpus(n: int, timeout_s: float) -> list[dict[str, Any]]:
    """Request ``n`` GPUs from the autoscaler; poll until the alive nodes hold them."""
    import ray
    from ray.autoscaler.sdk import request_resources

    # single-GPU bundles: the autoscaler packs them onto as few GPU nodes as fit
    request_resources(bundles=[{"GPU": 1}] * n)
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = ray.nodes()
        have = _alive_gpus(nodes)
        if have >= n:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {have} of {n} GPUs came up within {timeout_s:.0f}s: check the "
                "autoscaler (`ray monitor CLUSTER.yaml`), spot capacity and your EC2 quotas"
            )
        log.info("waiting for GPUs: %d of %d up", have, n)
        time.sleep(min(15.0, max(0.5, deadline - time.monotonic())))


def write_hostfile(cfg: HostfileConfig) -> list[tuple[str, int]]:
    """Read the live cluster's nodes and write the hostfile; returns its entries."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback clusters
    connected = False
    if not ray.is_initialized():
        ray.init(address=cfg.address, configure_logging=False, log_to_driver=False)
        connected = True
    try:
        if cfg.release:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
            log.info("GPU request withdrawn: idle nodes go after the idle timeout")
            return []
        if cfg.wait_for_gpus:
            nodes = _wait_for_gpus(cfg.wait_for_gpus, cfg.wait_timeout_s)
        else:
            nodes = ray.nodes()
    finally:
        if connected:
            ray.shutdown()
    entries = hostfile_entries(nodes, cfg.cpu_slots, cfg.host)
    if not entries:
        raise RuntimeError(
            f"no usable node among {len(nodes)} Ray nodes at {cfg.address} "
            "(none alive with GPUs or CPUs)"
        )
    text = format_hostfile(entries)
    if cfg.out == "-":
        sys.stdout.write(text)
    else:
        storage.write_text(os.path.expanduser(cfg.out), text)
        log.info("wrote %s: %d hosts, %d slots", cfg.out, len(entries), sum(n for _, n in entries))
    return entries


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job(HostfileConfig, __doc__.splitlines()[0], argv)
    write_hostfile(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
