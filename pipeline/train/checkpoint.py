"""Training checkpoints: DeepSpeed's sharded save plus what an exact resume needs, mirrored to S3.

Layout under the run's local directory (and, when the run dir is ``s3://``, the same keys there)::

    checkpoints/step_00001000/          DeepSpeed's files (model, ZeRO optimizer partitions,
                                        LR schedule, client state: step, samples, config)
    checkpoints/step_00001000/rank_state_00003.pt   rank 3's RNG states and data-loader place
    checkpoints/step_00001000/COMPLETE.json         written last: the checkpoint is usable

Save order: every rank writes locally, barrier, each node's first rank uploads that node's
files, barrier, each node's local marker, barrier, then rank 0 writes the remote marker. A
checkpoint without its marker (a run killed mid-save) is never resumed from. ``resume: auto``
takes the newest complete checkpoint, local or remote (downloading it when only S3 has it);
only the newest ``keep_last`` complete ones are kept. A multi-node run needs an ``s3://`` run dir
(or a shared file system) so that resuming and exporting see every node's files.

Exports are consolidated fp32 weights as ``model.safetensors`` plus ``gpt_config.json``: what
sampling and stage 2 load.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import storage
from pipeline.log import get_logger
from pipeline.models.gpt import GPTConfig
from pipeline.resume import decided_on_rank0, resume_conflict
from pipeline.train import engine
from pipeline.train.engine import DistInfo, partitioned_optimizer

log = get_logger(__name__)

MARKER = "COMPLETE.json"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
# Fields that may differ between an export and the model that loads it: they change no weight.
TRANSFERABLE = {
    "grid_size",
    "token_dropout_p",
    "attn_dropout_p",
    "resid_dropout_p",
    "ffn_dropout_p",
    "cond_dropout_p",
    "grad_checkpointing",
}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG_RE.match(tag)
    if not m:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_NNNNNNNN)")
    return int(m.group(1))


def _tags(root: str) -> list[str]:
    return sorted(n for n in storage.list_dir(root) if _TAG_RE.match(n))


def complete_tags(root: str) -> list[str]:
    """Tags under ``root`` (local or remote) whose completion marker exists, oldest first."""
    return [t for t in _tags(root) if storage.exists(storage.join(root, t, MARKER))]


def written_world_size(ckpt_dir: str) -> int | None:
    """How many ranks wrote the checkpoint in local ``ckpt_dir`` (None: its marker predates it)."""
    written = storage.read_json(os.path.join(ckpt_dir, MARKER)).get("world_size")
    return None if written is None else int(written)


def check_world_size(ckpt_dir: str, tag: str, world: int) -> None:
    """Raise if the checkpoint in ``ckpt_dir`` was written by another number of ranks and cut
    its optimizer state per rank (:func:`partitioned_optimizer`)."""
    written = written_world_size(ckpt_dir)
    if written is not None and written != world and partitioned_optimizer(ckpt_dir):
        raise ValueError(
            f"checkpoint {tag} was written by {written} ranks and this run has {world}: "
            "load it as a universal checkpoint (CheckpointManager.load(universal=True))"
        )


class CheckpointManager:
    """Saves, finds and loads this run's checkpoints on every rank of the job."""

    def __init__(self, run_dir: str, local_dir: str, keep_last: int, dist: DistInfo):
        self.dist = dist
        self.keep_last = max(1, keep_last)
        self.local_root = os.path.join(local_dir, "checkpoints")
        self.remote_root = (
            storage.join(run_dir, "checkpoints") if storage.is_remote(run_dir) else None
        )
        os.makedirs(self.local_root, exist_ok=True)
        self._local_tags: set[str] = set()  # made local by ensure_local (the same on every rank)

    # -- saving

    def save(
        self,
        eng,
        step: int,
        client_state: dict[str, Any],
        rank_state: dict[str, Any],
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Write checkpoint ``step`` on every rank; returns its tag once it is complete.

        ``meta`` (rank 0's) goes to ``meta.json`` beside DeepSpeed's files, readable without
        unpickling them (the export job takes the model config from it)."""
        tag = tag_for(step)
        local = os.path.join(self.local_root, tag)
        t0 = time.time()
        if self.dist.is_local_main and os.path.exists(os.path.join(local, MARKER)):
            os.remove(os.path.join(local, MARKER))  # about to be overwritten: not complete now
        engine.barrier()
        engine.save_checkpoint(eng, self.local_root, tag, client_state)
        torch.save(rank_state, os.path.join(local, f"rank_state_{self.dist.rank:05d}.pt"))
        if self.dist.is_main and meta is not None:
            storage.write_json(os.path.join(local, "meta.json"), meta)
        engine.barrier()
        if self.remote_root and self.dist.is_local_main:
            storage.put_dir(local, storage.join(self.remote_root, tag))
        engine.barrier()
        marker = {
            "tag": tag,
            "step": step,
            "world_size": self.dist.world,
            "time": time.time(),
            "host_rank0": self.dist.rank == 0,
        }
        if self.dist.is_local_main:
            storage.write_json(os.path.join(local, MARKER), marker)
        engine.barrier()
        if self.remote_root and self.dist.is_main:
            storage.write_json(storage.join(self.remote_root, tag, MARKER), marker)
        self._prune()
        engine.barrier()
        log.info(
            "checkpoint %s complete in %.1fs%s",
            tag,
            time.time() - t0,
            f" (mirrored to {self.remote_root})" if self.remote_root else "",
        )
        return tag

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (and anything newer)."""
        roots = []
        if self.dist.is_local_main:
            roots.append(self.local_root)
        if self.remote_root and self.dist.is_main:
            roots.append(self.remote_root)
        for root in roots:
            complete = complete_tags(root)
            if len(complete) <= self.keep_last:
                continue
            oldest_kept = complete[-self.keep_last]
            for t in _tags(root):
                if t < oldest_kept:
                    if storage.is_remote(root):
                        storage.remove(storage.join(root, t), recursive=True)
                    else:
                        shutil.rmtree(os.path.join(root, t), ignore_errors=True)

    # -- finding and loading

    def find(self, resume: str) -> str | None:
        """The tag to resume from (same answer on every rank), or None to start fresh.

        ``auto``: the newest complete checkpoint, local or remote; ``none``: start fresh; a tag
        (``step_00001000``): that one. A fresh start in a run dir with checkpoints, or a resume
        from an older one than the newest, raises (:func:`pipeline.resume.resume_conflict`).
        """

        def decide() -> str | None:
            found = complete_tags(self.local_root)
            if self.remote_root:
                found += complete_tags(self.remote_root)
            newest = max(found, default=None)
            tag = newest if resume == "auto" else None
            if resume not in ("auto", "none"):
                tag = os.path.basename(resume.rstrip("/"))
            conflict = resume_conflict(
                resume,
                None if tag is None else step_of(tag),
                None if newest is None else step_of(newest),
                self.remote_root or self.local_root,
            )
            if conflict:
                raise ValueError(conflict)
            return tag

        return decided_on_rank0(self.dist.is_main, engine.broadcast_object, decide)

    def ensure_local(self, tag: str) -> str:
        """The local directory of ``tag``, downloaded from the run dir when only S3 has it.

        On several nodes without a shared file system a node's own copy holds only its ranks'
        files: DeepSpeed writes the model states on data-parallel rank 0 alone, and every rank
        reads every rank's optimizer partition when it loads. There the files the node lacks
        come from the run dir, which has every node's (on a shared file system none are
        missing). Once per tag: a resume asks twice (the world size, then the load)."""
        local = os.path.join(self.local_root, tag)
        if tag in self._local_tags:
            return local
        if self.dist.is_local_main and not os.path.exists(os.path.join(local, MARKER)):
            if not self.remote_root:
                raise FileNotFoundError(f"no complete checkpoint {tag} under {self.local_root}")
            log.info("downloading checkpoint %s from %s", tag, self.remote_root)
            shutil.rmtree(local, ignore_errors=True)
            staging = tempfile.mkdtemp(prefix=f".{tag}-", dir=self.local_root)
            storage.get_dir(storage.join(self.remote_root, tag), staging)
            os.replace(staging, local)
        elif (
            self.dist.is_local_main and self.remote_root and self.dist.world > self.dist.local_world
        ):
            n = storage.get_dir(storage.join(self.remote_root, tag), local, missing_only=True)
            if n:
                log.info("checkpoint %s: %d files of other nodes from %s", tag, n, self.remote_root)
        engine.barrier()
        self._local_tags.add(tag)
        return local

    def written_world(self, tag: str) -> int | None:
        """How many ranks wrote ``tag`` (from its marker; fetched first when only S3 has it)."""
        return written_world_size(self.ensure_local(tag))

    def needs_universal(self, tag: str) -> bool:
        """Whether resuming ``tag`` on this run's ranks goes through the universal form: it was
        written by another number of ranks and its optimizer state is cut per rank."""
        local = self.ensure_local(tag)
        written = written_world_size(local)
        return written not in (None, self.dist.world) and partitioned_optimizer(local)

    def universal_root(self, tag: str) -> str:
        """Where ``tag`` converted to DeepSpeed's universal format lies (converted on each node
        once, by its first rank, from the local copy that :meth:`ensure_local` made): the form
        from which ZeRO re-cuts its optimizer partitions for another number of ranks. Every
        rank calls it (it ends with a barrier)."""
        root = os.path.join(os.path.dirname(self.local_root), "universal")
        out = os.path.join(root, tag)
        done = os.path.join(out, "CONVERTED")
        if self.dist.is_local_main and not os.path.exists(done):
            shutil.rmtree(out, ignore_errors=True)
            log.info("converting checkpoint %s to DeepSpeed's universal format in %s", tag, out)
            cmd = [
                sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                "--input_folder", os.path.join(self.local_root, tag), "--output_folder", out,
                # our client state has no Megatron-style universal_checkpoint_info: add it
                "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "2",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"converting checkpoint {tag} to the universal format failed "
                    f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
                )
            open(done, "w").close()
        engine.barrier()
        return root

    def load(
        self, eng, tag: str, universal: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load ``tag`` into ``eng``; returns (client state, this rank's RNG + loader state).

        ``universal`` (:meth:`needs_universal`): ``tag`` was written by another number of
        ranks, which cut the optimizer state per data-parallel rank; DeepSpeed re-cuts it from
        the universal form (:meth:`universal_root`), which ``eng`` must have been built to load
        (``checkpoint.load_universal`` in its config). Without per-rank optimizer state (no
        ZeRO) another number of ranks loads the checkpoint as it is. Either way model,
        optimizer, LR schedule and step carry over; the per-rank RNG and data-loader places do
        not (None is returned for them).
        """
        local = self.ensure_local(tag)
        if universal:
            client = engine.load_checkpoint(eng, self.universal_root(tag), tag)
            log.info("resumed from checkpoint %s (step %d), universal", tag, client.get("step", -1))
            return client, None
        check_world_size(local, tag, self.dist.world)
        client = engine.load_checkpoint(eng, self.local_root, tag)
        if written_world_size(local) not in (None, self.dist.world):
            log.info(
                "resumed from checkpoint %s (step %d), whole optimizer state",
                tag,
                client.get("step", -1),
            )
            return client, None
        path = os.path.join(local, f"rank_state_{self.dist.rank:05d}.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: checkpoint {tag} was written by "
                f"{client.get('world_size', '?')} ranks, this run has {self.dist.world}"
            )
        rank_state = torch.load(path, weights_only=True)
        log.info("resumed from checkpoint %s (step %d)", tag, client.get("step", -1))
        return client, rank_state

    def local_dir_of(self, tag: str) -> str:
        return os.path.join(self.local_root, tag)


# --- exports ------------------------------------------------------------------------------------


def export_weights(
    ckpt_root: str, tag: str, cfg: GPTConfig, out_uri: str, extra: dict[str, Any] | None = None
) -> str:
    """Consolidate checkpoint ``tag`` under local ``ckpt_root`` into ``out_uri``:
    ``model.safetensors`` (fp32), ``gpt_config.json``, and ``export.json`` (written last)."""
    meta_path = os.path.join(ckpt_root, tag, "meta.json")
    meta = storage.read_json(meta_path) if os.path.exists(meta_path) else {}
    state = engine.consolidated_state_dict(ckpt_root, tag, meta.get("param_groups"))
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"tag": tag})
        storage.put_file(tmp, storage.join(out_uri, "model.safetensors"))
    finally:
        os.remove(tmp)
    storage.write_json(storage.join(out_uri, "gpt_config.json"), dataclasses.asdict(cfg))
    storage.write_json(
        storage.join(out_uri, "export.json"),
        {
            "tag": tag,
            "step": step_of(tag),
            "num_tensors": len(state),
            "num_params": int(sum(v.numel() for v in state.values())),
            **(extra or {}),
        },
    )
    log.info("exported %s to %s (%d tensors)", tag, out_uri, len(state))
    return out_uri


def load_export(uri: str) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """(state dict, GPTConfig) of an export folder (local or s3://). A remote export is copied
    once per machine into the local model cache (``storage.local_copy``: the ranks of a node
    share one download, and a new export at the same URI is copied again)."""
    cfg = GPTConfig(**storage.read_json(storage.join(uri, "gpt_config.json")))
    return load_file(storage.local_copy(storage.join(uri, "model.safetensors"))), cfg


def init_from_export(model: torch.nn.Module, uri: str, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Load an export into ``model`` (built from ``cfg``): same architecture, any grid size.
    Returns the exported (fp32) state, for the engine's master weights."""
    state, saved = load_export(uri)
    diff = {
        f.name
        for f in dataclasses.fields(GPTConfig)
        if getattr(saved, f.name) != getattr(cfg, f.name)
    } - TRANSFERABLE
    if diff:
        raise ValueError(
            f"export {uri} has a different architecture: "
            + ", ".join(f"{k}={getattr(saved, k)!r} vs {getattr(cfg, k)!r}" for k in sorted(diff))
        )
    model.load_state_dict(state, strict=True)
    log.info(
        "initialised from export %s (trained at grid %d, now grid %d)",
        uri,
        saved.grid_size,
        cfg.grid_size,
    )
    return state


def export_checkpoint(path: str, out_uri: str) -> str:
    """Export a checkpoint folder, or a run dir's newest complete one (local or s3://)."""
    name = os.path.basename(path.rstrip("/"))
    if _TAG_RE.match(name):
        root, tag = path.rstrip("/")[: -len(name) - 1], name
    else:
        root = storage.join(path, "checkpoints")
        tag = max(complete_tags(root), default=None)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint under {root}")
    if not storage.exists(storage.join(root, tag, MARKER)):
        raise FileNotFoundError(
            f"checkpoint {storage.join(root, tag)} is not complete (no {MARKER})"
        )
    local_root = root
    if storage.is_remote(root):
        local_root = os.path.dirname(storage.local_copy(storage.join(root, tag)))
    meta = storage.read_json(os.path.join(local_root, tag, "meta.json"))
    cfg = GPTConfig(**meta["model"])
    return export_weights(local_root, tag, cfg, out_uri, extra={"source": storage.join(root, tag)})
