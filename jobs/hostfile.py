"""Write a DeepSpeed hostfile (``host slots=N`` per line) from the nodes of a live Ray cluster.

    python jobs/hostfile.py out=~/hostfile                 # on the cluster's head node
    python jobs/hostfile.py out=~/hostfile wait_for_gpus=32  # scale up to 32 GPUs first
    python jobs/hostfile.py out=~/hostfile deepspeed_env=~/.deepspeed_env  # + the ranks' env
    deepspeed --hostfile ~/hostfile jobs/train.py --config configs/train/stage1.yaml \
        run_dir=s3://b/runs/stage1 "data.shards=[s3://b/tokens/stage1-256]"  # b: your bucket
    python jobs/hostfile.py release=true                   # training done: let them go

DeepSpeed is not a Ray workload, so Ray's autoscaler neither starts GPU nodes for it nor sees
them busy: to Ray, nodes running only DeepSpeed ranks are idle, and it would terminate them
after the cluster's idle timeout, in the middle of training. ``wait_for_gpus`` asks the
autoscaler for that many GPUs (``request_resources``) and waits until they are up; and every
written hostfile asks it to keep all the GPUs the file lists (with or without
``wait_for_gpus``), so no listed node is scaled down. The request stays until ``release=true``
(or ``ray down``); idle nodes then go after the idle timeout. If more GPUs are alive than asked
for (nodes left from an earlier job), all of them are listed and kept, and a warning says so:
DeepSpeed starts a rank per slot, so the world size and the global batch grow with them.

With ``device=gpu`` (the default) every alive node with GPUs gets ``slots = its GPU count``;
nodes without GPUs (the head, download workers) are left out, and a cluster without GPUs is an
error. ``device=cpu`` (CPU training with gloo) lists every alive node that offers CPUs with
``cpu_slots`` slots. Nodes sharing one address (several raylets on one machine) are merged into
one line, since DeepSpeed refuses a host listed twice. Hosts are sorted so the same cluster
always gives the same file; DeepSpeed's rank 0 is on the first line. With one host in the file,
DeepSpeed's launcher starts the ranks on the machine it runs on, not on that host, unless given
``--force_multi``: a warning says so (``ONE_HOST_WARNING``).

DeepSpeed's ranks on other nodes start over pdsh's non-interactive ssh: they read no
``~/.bashrc`` and see only the variables the launcher forwards (``PYTHON*``, ``MLFLOW*``,
``MV2*``, ``UCX*``, plus ``NCCL*`` where the launching node has a GPU) and the ``NAME=value``
lines of ``~/.deepspeed_env`` on the launching node. ``deepspeed_env=PATH`` writes a starter
file there from this shell's environment (see ``DEEPSPEED_ENV_NAMES``); an existing file is
left as it is.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pipeline import storage
from pipeline.cli import parse_job, run_main
from pipeline.config import doc
from pipeline.log import get_logger

log = get_logger("hostfile")

# What ``deepspeed_env=`` copies from this shell into the ranks' environment, if set: PATH (with
# this venv's bin first: the ops DeepSpeed JIT-builds need its `ninja`), where the built ops are
# cached, S3 and pipeline settings, and every NCCL_* / FI_* (EFA) variable. Never credentials:
# the nodes have instance profiles.
DEEPSPEED_ENV_NAMES = (
    "PATH",
    "LD_LIBRARY_PATH",
    "TORCH_EXTENSIONS_DIR",
    "DEEPSPEED_TIMEOUT",
    "T2I_CACHE",
    "T2I_LOG_LEVEL",
    "PIPELINE_KEEP_FREED_MEMORY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)
DEEPSPEED_ENV_PREFIXES = ("NCCL_", "FI_")

# DeepSpeed's runner (0.19.8, deepspeed/launcher/runner.py) takes its multi-node path (pdsh or
# another --launcher, with ~/.deepspeed_env) only for `len(active_resources) > 1` or
# --force_multi; with one host it starts the ranks with deepspeed.launcher.launch on the machine
# it runs on, whatever host the file names.
ONE_HOST_WARNING = (
    "the hostfile lists one host (%s): `deepspeed --hostfile` then starts every rank on the "
    "machine you run it on, not on that host, and does not read ~/.deepspeed_env. Run it on %s "
    "itself, or add `--force_multi` to start the ranks there over ssh (pdsh)"
)


@dataclasses.dataclass(frozen=True)
class HostfileConfig:
    """Which Ray cluster to read and where the DeepSpeed hostfile goes."""

    address: str = doc("Ray address: 'auto' (the cluster of this machine) or 'host:6379'", "auto")
    out: str = doc("Hostfile to write (local path or s3://); '-' writes it to stdout", "hostfile")
    device: Literal["gpu", "cpu"] = doc(
        "gpu: nodes with GPUs, a slot per GPU (none alive is an error); cpu: CPU training with "
        "gloo, every node with CPUs gets cpu_slots",
        "gpu",
    )
    cpu_slots: int = doc("Slots (ranks) per node with device=cpu", 1)
    host: Literal["ip", "hostname"] = doc(
        "Name nodes by their IP (always reachable inside a VPC) or by their hostname", "ip"
    )
    wait_for_gpus: int = doc("Ask the autoscaler for this many GPUs and wait for them (0: no)", 0)
    wait_timeout_s: float = doc("Give up waiting for GPUs after this many seconds", 3600.0)
    release: bool = doc("Withdraw an earlier GPU request (and write no hostfile)", False)
    deepspeed_env: str = doc(
        "Also write a starter DeepSpeed env file here (e.g. ~/.deepspeed_env) from this shell's "
        "environment, unless one exists ('': no)",
        "",
    )

    def __post_init__(self) -> None:
        if self.cpu_slots < 1:
            raise ValueError(f"cpu_slots must be >= 1, got {self.cpu_slots}")
        if self.wait_for_gpus < 0:
            raise ValueError(f"wait_for_gpus must be >= 0, got {self.wait_for_gpus}")
        if self.device == "cpu" and self.wait_for_gpus:
            raise ValueError("wait_for_gpus asks for GPU nodes: it does not go with device=cpu")


def hostfile_entries(
    nodes: Iterable[Mapping[str, Any]],
    cpu_slots: int = 1,
    host: Literal["ip", "hostname"] = "ip",
    device: Literal["gpu", "cpu"] = "gpu",
) -> list[tuple[str, int]]:
    """(host, slots) pairs from ``ray.nodes()`` records; see the module docstring."""
    alive = [n for n in nodes if n.get("Alive")]
    key = "NodeManagerAddress" if host == "ip" else "NodeManagerHostname"
    slots: dict[str, int] = {}
    if device == "gpu":
        for n in alive:
            gpus = int(n.get("Resources", {}).get("GPU", 0))
            if gpus > 0:
                name = str(n[key])
                slots[name] = slots.get(name, 0) + gpus
    else:
        for n in alive:
            if float(n.get("Resources", {}).get("CPU", 0)) > 0:
                slots[str(n[key])] = cpu_slots
    return sorted(slots.items(), key=lambda e: host_order(e[0]))


def host_order(name: str) -> tuple:
    """Sort key: addresses by value (10.0.1.5 before 10.0.1.17), names with their numbers as
    numbers (node2 before node10), as pdsh orders hosts: DeepSpeed's launcher numbers the nodes
    by the file's order and pdsh's ``%n`` by its own, which must agree."""
    try:
        ip = ipaddress.ip_address(name)
        return (0, ip.version, int(ip))
    except ValueError:
        return (1, tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name)))


def check_entries(
    entries: list[tuple[str, int]], cfg: HostfileConfig, n_nodes: int
) -> list[tuple[str, int]]:
    """Refuse an empty hostfile with the reason; warn when it holds more GPUs than asked for,
    and when it holds one host (see ``ONE_HOST_WARNING``)."""
    if not entries:
        if cfg.device == "gpu":
            raise RuntimeError(
                f"no alive node with GPUs among {n_nodes} Ray nodes at {cfg.address}: start GPU "
                "workers (wait_for_gpus=N asks the autoscaler for them), or pass device=cpu for "
                "CPU training with gloo"
            )
        raise RuntimeError(f"no alive node with CPUs among {n_nodes} Ray nodes at {cfg.address}")
    total = sum(n for _, n in entries)
    if cfg.device == "gpu" and 0 < cfg.wait_for_gpus < total:
        log.warning(
            "%d GPUs are alive, more than wait_for_gpus=%d: the hostfile lists all of them, so "
            "DeepSpeed starts %d ranks and the world size and global batch (micro batch x "
            "grad_accum x ranks) grow with them. To train on %d, drop hosts from the file or "
            "pass `deepspeed --num_nodes N`",
            total,
            cfg.wait_for_gpus,
            total,
            cfg.wait_for_gpus,
        )
    if len(entries) == 1:
        log.warning(ONE_HOST_WARNING, entries[0][0], entries[0][0])
    return entries


def format_hostfile(entries: Iterable[tuple[str, int]]) -> str:
    return "".join(f"{name} slots={n}\n" for name, n in entries)


def deepspeed_env_lines(environ: Mapping[str, str], venv_bin: str) -> list[str]:
    """``NAME=value`` lines for ``~/.deepspeed_env``: what DeepSpeed's runner reads there. It
    splits every line at its first ``=``, so the file holds no blank lines and no comments."""
    env = dict(environ)
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    if path.split(":")[0] != venv_bin:
        env["PATH"] = f"{venv_bin}:{path}"
    names = [n for n in DEEPSPEED_ENV_NAMES if n in env]
    names += sorted(n for n in env if n.startswith(DEEPSPEED_ENV_PREFIXES))
    lines = []
    for n in names:
        # the launcher puts each value, in double quotes, on the remote shell's command line
        if any(c in env[n] for c in '\n"`$\\'):
            log.warning("%s left out of the DeepSpeed env file: its value needs quoting", n)
        elif env[n]:
            lines.append(f"{n}={env[n]}")
    return lines


def write_deepspeed_env(path: str, environ: Mapping[str, str], venv_bin: str) -> bool:
    """Write the starter env file unless ``path`` exists; True when written."""
    path = os.path.expanduser(path)
    if os.path.exists(path):
        log.info("%s exists: left as it is (delete it to have it written anew)", path)
        return False
    lines = deepspeed_env_lines(environ, venv_bin)
    storage.write_text(path, "".join(line + "\n" for line in lines))
    log.info("wrote %s: %s", path, ", ".join(line.split("=", 1)[0] for line in lines))
    return True


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
        entries = check_entries(
            hostfile_entries(nodes, cfg.cpu_slots, cfg.host, cfg.device), cfg, len(nodes)
        )
        if cfg.device == "gpu":
            from ray.autoscaler.sdk import request_resources

            # keep every listed GPU: the autoscaler would take DeepSpeed's nodes for idle
            total = sum(n for _, n in entries)
            request_resources(bundles=[{"GPU": 1}] * total)
            log.info(
                "asked the autoscaler to keep %d GPUs (the hostfile's) until release=true", total
            )
    finally:
        if connected:
            ray.shutdown()
    text = format_hostfile(entries)
    if cfg.out == "-":
        sys.stdout.write(text)
    else:
        storage.write_text(os.path.expanduser(cfg.out), text)
        log.info("wrote %s: %d hosts, %d slots", cfg.out, len(entries), sum(n for _, n in entries))
    if cfg.deepspeed_env:
        write_deepspeed_env(cfg.deepspeed_env, os.environ, os.path.dirname(sys.executable))
    return entries


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job(HostfileConfig, __doc__.splitlines()[0], argv)
    write_hostfile(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
