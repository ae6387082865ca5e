"""Tokenizer training checkpoints: atomic, marked complete, mirrored to s3://.

Layout under a run's checkpoint folder (``{run_dir}/checkpoints``)::

    step_0000400/state.pt      model, discriminator, both optimizers, step, every rank's RNG
                               states and data position (one torch.save, loaded weights_only)
    step_0000400/COMPLETE      JSON marker, written last: only a folder holding it is resumed

``state.pt`` is written under a temporary name and renamed; the marker follows. When the run
folder is on S3 the same two files are uploaded in the same order after the local write, so an
interrupted upload leaves a folder without a marker, which is ignored.
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
    os.replace(tmp, final)
    marker = json.dumps({"step": step, "time": time.time()})
    storage.write_text(os.path.join(folder, MARKER), marker)
    if remote_root:
        remote = storage.join(remote_root, step_dir_name(step))
        storage.put_file(final, storage.join(remote, STATE))
        storage.write_text(storage.join(remote, MARKER), marker)
    log.info("saved checkpoint step %d to %s", step, remote_root or local_root)
    _prune(local_root, keep, remote=False)
    if remote_root:
        _prune(remote_root, keep, remote=True)
    return folder


def _prune(root: str, keep: int, remote: bool) -> None:
    if keep <= 0:
        return
    for step in complete_steps(root)[:-keep]:
        folder = storage.join(root, step_dir_name(step))
        # the marker goes first: a half-deleted folder must never look complete
        storage.remove(storage.join(folder, MARKER))
        if remote:
            storage.remove(folder, recursive=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def newest_step(local_root: str, remote_root: str | None) -> int | None:
    """The newest step complete locally or in the mirror, or None."""
    steps = set(complete_steps(local_root))
    if remote_root:
        steps |= set(complete_steps(remote_root))
    return max(steps) if steps else None


def load_checkpoint(step: int, local_root: str, remote_root: str | None) -> dict[str, Any]:
    """Load step ``step``, fetching it from the mirror when it is not complete locally."""
    folder = os.path.join(local_root, step_dir_name(step))
    if not os.path.exists(os.path.join(folder, MARKER)):
        if not remote_root:
            raise FileNotFoundError(f"checkpoint {folder} is not complete and there is no mirror")
        remote = storage.join(remote_root, step_dir_name(step))
        storage.get_file(storage.join(remote, STATE), os.path.join(folder, STATE))
        storage.write_text(
            os.path.join(folder, MARKER), storage.read_text(storage.join(remote, MARKER))
        )
    return torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)
