"""Tokenizer training checkpoints: atomic, marked complete, mirrored to s3://.

Layout under a run's checkpoint folder (``{run_dir}/checkpoints``)::

    step_0000400/state.pt      model, discriminator, both optimizers, step, every rank's RNG
                               states and data position (one torch.save, loaded weights_only)
    step_0000400/COMPLETE      JSON marker, written last: only a folder holding it is resumed

``state.pt`` is written under a temporary name, put on disk (fsync) and renamed; the marker
follows. When the run folder is on S3 the same two files are uploaded in the same order after the
local write, so an interrupted upload leaves a folder without a marker, which is ignored. With an
S3 run folder only its checkpoints count when resuming: the local folder is a cache of them,
used while its marker is the same as the mirror's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from typing import Any

import torch

from pipeline import storage
from pipeline.log import get_logger
from pipeline.resume import fsync

log = get_logger(__name__)

STATE = "state.pt"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_steps(ckpt_root: str) -> list[int]:
    """Steps with a complete checkpoint under ``ckpt_root`` (local or s3://), ascending."""
    steps = []
    for name in storage.list_dir(ckpt_root):
        m = _STEP_DIR.match(name)
        if m and storage.exists(storage.join(ckpt_root, name, MARKER)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def save_checkpoint(
    state: dict[str, Any], step: int, local_root: str, remote_root: str | None, keep: int
) -> str:
    """Write ``state`` as step ``step``: locally, then mirrored; prune to the newest ``keep``."""
    folder = os.path.join(local_root, step_dir_name(step))
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, STATE)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    torch.save(state, tmp)
    fsync(tmp)
    os.replace(tmp, final)
    fsync(folder)  # the rename (and the folder's own entry) on disk before the marker
    fsync(local_root)
    marker = json.dumps({"step": step, "time": time.time()})
    storage.write_text(os.path.join(folder, MARKER), marker)
    if remote_root:
        remote = storage.join(remote_root, step_dir_name(step))
        storage.put_file(final, storage.join(remote, STATE))
        storage.write_text(storage.join(remote, MARKER), marker)
    log.info("saved checkpoint step %d to %s", step, remote_root or local_root)
    _prune(local_root, keep, step, remote=False)
    if remote_root:
        _prune(remote_root, keep, step, remote=True)
    return folder


def _prune(root: str, keep: int, saved: int, remote: bool) -> None:
    """The complete steps beyond the newest ``keep`` (``keep`` <= 0: all kept), and the folders
    older than ``saved`` without a marker: a save killed mid-way that no resume will take."""
    complete = complete_steps(root)
    doomed = complete[:-keep] if keep > 0 else []
    for name in storage.list_dir(root):
        m = _STEP_DIR.match(name)
        if m and int(m.group(1)) < saved and int(m.group(1)) not in complete:
            doomed.append(int(m.group(1)))
    for step in doomed:
        folder = storage.join(root, step_dir_name(step))
        # the marker goes first: a half-deleted folder must never look complete
        storage.remove(storage.join(folder, MARKER))
        if remote:
            storage.remove(folder, recursive=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def newest_step(local_root: str, remote_root: str | None) -> int | None:
    """The newest complete step, or None: in the mirror when there is one (the local folder is
    only its cache: a run emptied on S3 to start over is not resumed from a stale local copy),
    else locally."""
    steps = complete_steps(remote_root or local_root)
    return steps[-1] if steps else None


def fetch_checkpoint(step: int, local_root: str, remote_root: str | None) -> None:
    """With a mirror, download step ``step`` into ``local_root`` unless the local copy is the
    same checkpoint (the same marker: not an older run's step of that number)."""
    if not remote_root:
        return
    folder = os.path.join(local_root, step_dir_name(step))
    local_marker = os.path.join(folder, MARKER)
    remote = storage.join(remote_root, step_dir_name(step))
    marker = storage.read_text(storage.join(remote, MARKER))
    if not os.path.exists(local_marker) or storage.read_text(local_marker) != marker:
        log.info("fetching checkpoint step %d from %s", step, remote)
        storage.get_file(storage.join(remote, STATE), os.path.join(folder, STATE))
        fsync(os.path.join(folder, STATE))
        fsync(folder)
        storage.write_text(local_marker, marker)


def fetch_once_per_node(
    step: int, local_root: str, remote_root: str | None, local_rank: int, barrier: Any
) -> None:
    """Every rank of a node calls it: its local rank 0 downloads step ``step`` from the mirror
    (one download a node, not one a rank), the others wait in ``barrier`` and find it there. A
    failed download is logged, not raised here, where the node's other ranks would wait: each
    rank's own :func:`load_checkpoint` after it tries again and raises."""
    if local_rank == 0:
        try:
            fetch_checkpoint(step, local_root, remote_root)
        except Exception as exc:  # noqa: BLE001 - raised again by each rank's load
            log.warning("fetching checkpoint step %d failed: %s", step, exc)
    barrier()


def load_checkpoint(step: int, local_root: str, remote_root: str | None) -> dict[str, Any]:
    """Load step ``step``; with a mirror, fetched from it first where the local copy is not
    that checkpoint (:func:`fetch_checkpoint`)."""
    folder = os.path.join(local_root, step_dir_name(step))
    fetch_checkpoint(step, local_root, remote_root)
    if not os.path.exists(os.path.join(folder, MARKER)):
        raise FileNotFoundError(f"checkpoint {folder} is not complete and there is no mirror")
    return torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)
