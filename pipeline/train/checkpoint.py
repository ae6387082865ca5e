"""Training checkpoints: DeepSpeed's sharded save plus what an exact resume needs, mirrored to S3.

Layout under the run's local directory (and, when the run dir is ``s3://``, the same keys there)::

    checkpoints/step_00001000/          DeepSpeed's files (model, ZeRO optimizer partitions,
                                        LR schedule, client state: step, samples, config)
    checkpoints/step_00001000/rank_state_00003.pt   rank 3's RNG states and data-loader place
    checkpoints/step_00001000/COMPLETE.json         written last: the checkpoint is usable; it
                                        lists every file of the checkpoint with its size

Save order: each node's first rank clears what an earlier attempt at the same step left (and
rank 0 the run dir's copy), every rank writes locally, barrier, each node's first rank makes
its files durable (fsync) and lists them, each uploads its share, each writes the node's marker,
then rank 0 writes the remote marker. A checkpoint without its marker (a run killed mid-save)
is never resumed from. With an ``s3://`` run dir the run dir alone says which checkpoints
exist (``resume: auto`` takes the newest complete one there); the local directory is a cache,
checked against the marker's file list and completed from S3. A cache that holds complete
checkpoints the run dir has no trace of, newer than the one resumed, is refused (the run would
overwrite or prune them), and a save never prunes those. Only the newest ``keep_last``
complete checkpoints are kept. A multi-node run needs an ``s3://`` run dir (or a shared file
system) so that resuming and exporting see every node's files. Nodes may share the local
directory (an NFS home): what each node's first rank does there is safe when another does it
at the same time (downloads and conversions are staged under unique names and renamed into
place; one that finds the result already there keeps it).

Exports are consolidated fp32 weights as ``model.safetensors`` plus ``gpt_config.json``: what
sampling and stage 2 load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import scratch, storage
from pipeline.config import ConfigError
from pipeline.export_stamp import ID_KEY, begin_export, check_export
from pipeline.export_stamp import MARKER as EXPORT_MARKER
from pipeline.log import get_logger
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.resume import decided_on_rank0, fsync, resume_conflict
from pipeline.train import engine
from pipeline.train.engine import DistInfo, partitioned_optimizer

log = get_logger(__name__)

MARKER = "COMPLETE.json"
CONVERTED = "CONVERTED"  # in a universal-format folder: the marker of the checkpoint it came from
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
    "initializer_range",  # the initialisation's alone: loaded weights replace it
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


def _requested_tag(resume: str, complete: list[str], where: str) -> str:
    """The tag that ``--resume`` names (neither ``auto`` nor ``none``), if it is among the
    ``complete`` checkpoints in ``where``; else why not."""
    if "://" in resume or "/" in resume:
        raise ConfigError(
            f"--resume {resume!r}: give auto, none or a checkpoint tag of this run "
            f"(step_NNNNNNNN, from {where}), not a path; to start from another run's weights, "
            "export them (jobs/export.py) and give init_from"
        )
    if not _TAG_RE.match(resume):
        raise ConfigError(
            f"--resume {resume!r} is neither auto, none nor a checkpoint tag (step_NNNNNNNN)"
        )
    if resume not in complete:
        raise ConfigError(
            f"--resume {resume}: {where} has no complete checkpoint {resume} (complete ones: "
            f"{', '.join(complete) or 'none'})"
        )
    return resume


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


# --- local files: durable, listed, checked against a marker --------------------------------------


# Without an s3:// run dir every node must see every file of a checkpoint it saved: the seconds
# to wait, and list again, before a node that lacks some is taken for a node-local disk
SHARED_FS_WAITS_S = (2.0, 10.0, 30.0)


def _durable_listing(folder: str) -> dict[str, int]:
    """Every file under ``folder`` but the marker, fsynced, with its size (relative ``/`` paths);
    the folders are fsynced too, ``folder``'s parent included: a marker written after this
    never survives a power loss that truncates or loses a file it lists."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel != MARKER:
                fsync(path)
                files[rel] = os.path.getsize(path)
        fsync(parent)
    fsync(os.path.dirname(os.path.abspath(folder)))
    return files


def _missing_files(folder: str, files: dict[str, int]) -> list[str]:
    """The files of ``files`` (name: size) that local ``folder`` lacks or holds at another size."""

    def size(name: str) -> int:
        try:
            return os.path.getsize(os.path.join(folder, *name.split("/")))
        except OSError:
            return -1

    return sorted(n for n, s in files.items() if size(n) != s)


def _check_whole(folder: str, files: dict[str, int], context: str = "") -> None:
    """Raise unless local ``folder`` holds every file of ``files`` (name: size) at its size."""
    wrong = _missing_files(folder, files)
    if wrong:
        shown = ", ".join(wrong[:4]) + (", ..." if len(wrong) > 4 else "")
        raise FileNotFoundError(
            f"checkpoint {folder} lacks {len(wrong)} of the files its marker lists, or holds them "
            f"at other sizes ({shown}){context}"
        )


def _read_marker(path: str) -> dict[str, Any] | None:
    """A local marker's content; None when absent or unreadable (an old empty one)."""
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return None


def _publish(staging: str, target: str, is_current: Callable[[], bool]) -> None:
    """Rename the finished folder ``staging`` to ``target``. Another node sharing this file
    system may have put the same result there first (then its copy is kept and ``staging``
    removed); an outdated ``target`` is moved aside and removed, then the rename is tried again."""
    for _ in range(5):
        try:
            os.rename(staging, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if is_current():
            shutil.rmtree(staging, ignore_errors=True)
            return
        aside = f"{target}.old-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):  # another node moved it first
            os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not put {staging} in place of {target}: it keeps changing")


def _fetch(remote: str, local: str, files: dict[str, int], names: list[str]) -> list[str]:
    """Download ``names`` of checkpoint ``remote`` (whose marker lists ``files``) into folder
    ``local`` and onto disk, then check every listed file there; returns ``names``."""
    folders = set()
    for name in names:
        path = os.path.join(local, *name.split("/"))
        try:
            storage.get_file(storage.join(remote, name), path)
        except FileNotFoundError:
            # a marker that lists a file the run dir lacks: this checkpoint cannot be resumed
            # (deleted by hand, an expiry rule, a copy that missed it); the one before can
            raise FileNotFoundError(
                f"checkpoint {remote} lacks {name}, which its {MARKER} lists: it cannot be "
                f"resumed. Move that checkpoint aside (out of {os.path.dirname(remote)}) to "
                "resume from the one before it"
            ) from None
        fsync(path)
        folders.add(os.path.dirname(path))
    for folder in sorted(folders):
        fsync(folder)
    _check_whole(local, files, f" after a download from {remote}")
    return names


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

    @property
    def _universal_dir(self) -> str:
        """Where checkpoints converted to DeepSpeed's universal format go (:meth:`universal_root`)."""
        return os.path.join(os.path.dirname(self.local_root), "universal")

    def _on_each_node(
        self, what: str, fn: Callable[[], Any], main_only: bool = False
    ) -> dict[int, Any]:
        """``fn()`` on each node's first rank (``main_only``: on rank 0 alone), then every rank
        waits for all of them; returns their answers by rank. An error on one node's first rank
        is raised on every rank: raised there alone, it would leave the others in a collective
        until its timeout."""
        answer, error = None, None
        ran = self.dist.is_local_main and (self.dist.is_main or not main_only)
        if ran:
            try:
                answer = fn()
            except Exception as exc:  # noqa: BLE001 - reported to every rank, raised here below
                error = exc
        failed = None if error is None else f"{type(error).__name__}: {error}"
        reports = engine.gather_objects((self.dist.rank, ran, answer, failed))
        if error is not None:
            raise error
        for rank, _, _, failed in reports:
            if failed is not None:
                raise RuntimeError(f"{what} failed on rank {rank}: {failed}")
        return {rank: a for rank, first, a, _ in reports if first}

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
        remote = storage.join(self.remote_root, tag) if self.remote_root else None
        t0 = time.time()

        def clear() -> set[str] | None:
            # an earlier attempt at this step (killed mid-save, perhaps on another number of
            # ranks) left files that are not this checkpoint's: its marker goes first, so that a
            # half-cleared folder never looks complete. The run dir's copy has no marker (a step
            # is saved again only when it was never complete there: find() resumes the newest).
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(local, MARKER))
            shutil.rmtree(local, ignore_errors=True)
            if remote and self.dist.is_main:
                storage.remove(storage.join(remote, MARKER))
                storage.remove(remote, recursive=True)
            # what the run dir holds before this save prunes it (the prune of every node's
            # cache is measured against it: rank 0 may prune the run dir first)
            return set(_tags(self.remote_root)) if self.remote_root else None

        run_dir_tags = self._on_each_node(f"clearing checkpoint {tag}", clear)
        engine.save_checkpoint(eng, self.local_root, tag, client_state)
        torch.save(rank_state, os.path.join(local, f"rank_state_{self.dist.rank:05d}.pt"))
        if self.dist.is_main and meta is not None:
            storage.write_json(os.path.join(local, "meta.json"), meta)
        engine.barrier()  # every rank's files are written
        held = self._on_each_node(
            f"writing checkpoint {tag}", lambda: (_durable_listing(local), time.time())
        )
        # the same on every rank: every node's files (one node's when they share a disk) and
        # rank 0's time; each file is uploaded by the first node that holds it
        files: dict[str, int] = {}
        uploader: dict[str, int] = {}
        for rank in sorted(held):
            for name, size in held[rank][0].items():
                files.setdefault(name, size)
                uploader.setdefault(name, rank)
        if not remote:
            # without a store to upload to, every node must see every file itself (one folder
            # that the nodes share): node-local disks would each hold a part of the checkpoint,
            # marked complete everywhere and resumable nowhere. The same answer on every rank.
            lacking = {r: sorted(set(files) - set(held[r][0])) for r in sorted(held)}
            for wait in (*SHARED_FS_WAITS_S, None):
                lacking = {r: names for r, names in sorted(lacking.items()) if names}
                if not lacking or wait is None:
                    break
                time.sleep(wait)  # a shared filesystem's listing may lag the other nodes' writes
                lacking = self._on_each_node(
                    f"listing checkpoint {tag}", lambda: _missing_files(local, files)
                )
            if lacking:
                r, names = next(iter(lacking.items()))
                raise RuntimeError(
                    f"checkpoint {tag}: the node of rank {r} lacks {len(names)} of the checkpoint's "
                    f"{len(files)} files ({names[0]}, ...) in {self.local_root}: the nodes write "
                    "to their own disks, so none holds a whole checkpoint to resume from. Give "
                    "an s3:// run_dir (each node uploads its ranks' files) or a run_dir on a "
                    "filesystem that every node shares"
                )
        marker = {
            "tag": tag,
            "step": step,
            "world_size": self.dist.world,
            "time": held[min(held)][1],
            "files": dict(sorted(files.items())),
        }

        def upload_and_mark() -> None:
            if remote:
                for name in sorted(n for n, r in uploader.items() if r == self.dist.rank):
                    storage.put_file(
                        os.path.join(local, *name.split("/")), storage.join(remote, name)
                    )
            storage.write_json(os.path.join(local, MARKER), marker)

        self._on_each_node(f"uploading checkpoint {tag}", upload_and_mark)

        def finish() -> None:
            if remote and self.dist.is_main:
                storage.write_json(storage.join(remote, MARKER), marker)
            self._prune(tag, run_dir_tags[self.dist.rank])

        self._on_each_node(f"completing checkpoint {tag}", finish)
        log.info(
            "checkpoint %s complete in %.1fs%s",
            tag,
            time.time() - t0,
            f" (mirrored to {self.remote_root})" if self.remote_root else "",
        )
        return tag

    def _prune(self, saved: str, run_dir_tags: set[str] | None) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (and anything newer); on each
        node's first rank. With an ``s3://`` run dir, complete local copies newer than ``saved``
        that the run dir holds without its marker go too (a save killed between the local and
        the remote marker: the run dir decides what is resumed, :meth:`find`). Complete local
        checkpoints of which the run dir (``run_dir_tags``: its tags before this save) holds
        no trace are never removed, nor counted as this run's: another run's, or the only copy
        of work whose run dir copy is gone (:meth:`find` refuses to train over newer ones).
        Folders older than ``saved`` without a marker (a save killed mid-way, then a resume
        that saved other steps) go at once: no resume takes them, and each is up to a whole
        checkpoint (GPT-XL: ~12 GB) that would stay until ``keep_last`` newer ones exist."""
        roots = [self.local_root]
        if self.remote_root and self.dist.is_main:
            roots.append(self.remote_root)
        for root in roots:
            remote = storage.is_remote(root)
            tags = _tags(root)
            complete = complete_tags(root)
            cache = self.remote_root is not None and not remote
            if cache:
                # newer than this save and unknown to the run dir: not this run's to remove
                # (find refuses to start beside them). Older ones go by keep_last as always:
                # this run's own, pruned from the run dir while the node was away, pile up
                # otherwise (a run dir with newer checkpoints never resumes them)
                traced = {saved} | (run_dir_tags or set())
                untraced = {t for t in complete if t not in traced and t > saved}
                tags = [t for t in tags if t not in untraced]
                complete = [t for t in complete if t not in untraced]
            doomed = [t for t in complete if t > saved] if cache else []
            doomed += [t for t in tags if t < saved and t not in complete]
            complete = [t for t in complete if t not in doomed]
            if len(complete) > self.keep_last:
                oldest_kept = complete[-self.keep_last]
                doomed += [t for t in tags if t < oldest_kept and t not in doomed]
            for t in doomed:
                # the marker first: a prune killed mid-way leaves an incomplete folder, never
                # a marker over missing files
                storage.remove(storage.join(root, t, MARKER))
                if remote:
                    storage.remove(storage.join(root, t), recursive=True)
                else:
                    shutil.rmtree(os.path.join(root, t), ignore_errors=True)
        self._prune_leftovers(saved)

    def _prune_leftovers(self, saved: str) -> None:
        """Local folders no resume needs once ``saved`` is complete: the universal-format copies
        of older checkpoints (a resume now reads ``saved`` or newer; an older one is converted
        again if asked for), and the staging folders (``.<tag>-xxxx``) of a download or
        conversion killed mid-way, up to ``saved``. Every node is here at once (a collective
        phase of the save), so no staging folder of this run is in use."""
        universal = self._universal_dir
        for root in (self.local_root, universal):
            try:
                names = os.listdir(root)
            except FileNotFoundError:
                continue
            for name in names:
                staged = name.startswith(".")
                tag = name[1:].split("-", 1)[0] if staged else name
                if not _TAG_RE.match(tag) or tag > saved:
                    continue
                if staged or (root == universal and tag < saved):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    # -- finding and loading

    def find(self, resume: str) -> str | None:
        """The tag to resume from (same answer on every rank), or None to start fresh.

        ``auto``: the newest complete checkpoint; ``none``: start fresh; a tag
        (``step_00001000``): that one, which must be complete. With an ``s3://`` run dir only
        its checkpoints count (the local directory is a cache of them). A fresh start in a run
        dir with checkpoints, or a resume from an older one than the newest, raises
        (:func:`pipeline.resume.resume_conflict`); so does any start while the cache holds
        complete checkpoints that the run dir has no trace of, newer than the one resumed
        (the run would overwrite or prune them: :meth:`_untraced_cache`).
        """

        def decide() -> str | None:
            where = self.remote_root or self.local_root
            found = complete_tags(where)
            untraced: list[str] = []
            if self.remote_root:
                traced = set(_tags(self.remote_root))
                cached = sorted(set(complete_tags(self.local_root)) - set(found))
                untraced = [t for t in cached if t not in traced]
                unfinished = [t for t in cached if t in traced]
                if unfinished:  # a save killed between the local and the run dir's marker
                    log.warning(
                        "the local cache %s holds checkpoints that are not complete in the run "
                        "dir %s (%s): ignored, the run dir decides",
                        self.local_root, where, ", ".join(unfinished),
                    )  # fmt: skip
                if untraced and not found:
                    raise ConfigError(self._untraced_cache(untraced, None))
            newest = max(found, default=None)
            tag = newest if resume == "auto" else None
            if resume not in ("auto", "none"):
                tag = _requested_tag(resume, found, where)
            conflict = resume_conflict(
                resume,
                None if tag is None else step_of(tag),
                None if newest is None else step_of(newest),
                where,
            )
            if conflict:
                if self.remote_root:  # a copy left in the cache would be refused next
                    conflict += (
                        f" (their cached copies in {self.local_root} too, if this node has "
                        "them: the run dir decides, and a complete copy it has no trace of "
                        "is refused)"
                    )
                raise ConfigError(conflict)
            newer = [t for t in untraced if tag is None or t > tag]
            if newer:
                raise ConfigError(self._untraced_cache(newer, tag))
            if untraced:
                log.warning(
                    "the local cache %s holds checkpoints older than %s that the run dir %s "
                    "has no trace of (%s): not resumed; keep_last prunes them as this run saves",
                    self.local_root, tag, where, ", ".join(untraced),
                )  # fmt: skip
            return tag

        return decided_on_rank0(self.dist.is_main, engine.broadcast_object, decide)

    def _untraced_cache(self, tags: list[str], resumed: str | None) -> str:
        """Why a run may not start beside cached checkpoints ``tags`` that the s3:// run dir
        has no trace of, newer than ``resumed`` (None: the run dir has no checkpoint)."""
        which = "has no checkpoint" if resumed is None else f"has none newer than {resumed}"
        return (
            f"the run dir {self.remote_root} {which}, but the local cache {self.local_root} "
            f"holds complete checkpoints that it has no trace of: {', '.join(tags)}. The run "
            "dir alone decides what a run resumes, and training here would overwrite or "
            "delete them. If they are this run's (its run dir was emptied, or the run moved "
            "from a local run_dir), upload them to the run dir first, e.g. aws s3 sync "
            f"{self.local_root} {self.remote_root} (from every node, where each holds its own "
            "ranks' files), and resume; if not (another run's, or "
            f"moved aside in the run dir on purpose), move them out of {self.local_root} (or "
            "remove them), or give another local_dir"
        )

    def ensure_local(self, tag: str, main_only: bool = False) -> str:
        """The local directory of ``tag``, every file of it there (every rank calls it;
        ``main_only``: made whole on rank 0's node alone, for the export, which reads it there
        only: the other nodes would each download every other node's partitions for nothing).

        The checkpoint's marker lists its files. With an ``s3://`` run dir the local copy is
        a cache: taken when its marker is the run dir's, completed from the run dir with the
        files it lacks (on several nodes without a shared file system a node's own copy holds
        only its ranks' files: DeepSpeed writes the model states on data-parallel rank 0 alone,
        and every rank reads every rank's optimizer partition when it loads), else downloaded
        anew. Once per tag: a resume asks twice (the world size, then the load)."""
        local = os.path.join(self.local_root, tag)
        if tag not in self._local_tags:
            self._on_each_node(
                f"fetching checkpoint {tag}", lambda: self._make_whole(tag), main_only
            )
            if not main_only:
                self._local_tags.add(tag)
        return local

    def _make_whole(self, tag: str) -> None:
        local = os.path.join(self.local_root, tag)
        mine = _read_marker(os.path.join(local, MARKER))
        if not self.remote_root:
            if mine is None:
                raise FileNotFoundError(f"no complete checkpoint {tag} under {self.local_root}")
            _check_whole(
                local,
                mine.get("files", {}),
                ": written on other nodes? A run on several nodes needs an s3:// run dir or a "
                "shared file system",
            )
            return
        remote = storage.join(self.remote_root, tag)
        try:
            marker = storage.read_json(storage.join(remote, MARKER))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"checkpoint {tag} is not complete in {self.remote_root}"
            ) from None
        if "files" not in marker:  # written before markers listed their files
            self._make_whole_unlisted(tag, mine is not None, marker)
            return
        files = marker["files"]
        if mine == marker:  # this checkpoint: fetch what the node lacks
            lacking = _fetch(remote, local, files, _missing_files(local, files))
            if lacking:
                log.info("checkpoint %s: %d files fetched from %s", tag, len(lacking), remote)
            return
        # absent, partial, or another run's checkpoint of the same step: download it
        log.info("downloading checkpoint %s from %s", tag, self.remote_root)
        staging = tempfile.mkdtemp(prefix=f".{tag}-", dir=self.local_root)
        try:
            _fetch(remote, staging, files, sorted(files))
            storage.write_json(os.path.join(staging, MARKER), marker)
            _publish(
                staging,
                local,
                lambda: (
                    _read_marker(os.path.join(local, MARKER)) == marker
                    and not _missing_files(local, files)
                ),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _make_whole_unlisted(self, tag: str, have_marker: bool, marker: dict[str, Any]) -> None:
        """:meth:`_make_whole` for a checkpoint whose marker lists no files: the whole prefix
        when the local copy has no marker; the files it lacks when the run spans nodes, or when
        it holds fewer ranks' states than the checkpoint's world size."""
        local = os.path.join(self.local_root, tag)
        remote = storage.join(self.remote_root, tag)
        if not have_marker:
            log.info("downloading checkpoint %s from %s", tag, self.remote_root)
            staging = tempfile.mkdtemp(prefix=f".{tag}-", dir=self.local_root)
            try:
                storage.get_dir(remote, staging)
                _publish(staging, local, lambda: os.path.exists(os.path.join(local, MARKER)))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return
        ranks_here = len(glob.glob(os.path.join(local, "rank_state_*.pt")))
        if self.dist.world > self.dist.local_world or ranks_here < marker.get("world_size", 0):
            n = storage.get_dir(remote, local, missing_only=True)
            if n:
                log.info("checkpoint %s: %d files of other nodes from %s", tag, n, remote)

    def written_time(self, tag: str) -> float | None:
        """When ``tag`` was written (the marker's time, which tells it from another save of the
        same step), read from the local copy that :meth:`ensure_local` made; None: unknown."""
        marker = _read_marker(os.path.join(self.local_root, tag, MARKER))
        return None if marker is None else marker.get("time")

    def written_world(self, tag: str) -> int | None:
        """How many ranks wrote ``tag`` (from its marker; fetched first when only S3 has it)."""
        return written_world_size(self.ensure_local(tag))

    def needs_universal(self, tag: str, layout: dict[str, Any] | None = None) -> bool:
        """Whether resuming ``tag`` on this run's ranks goes through the universal form: its
        optimizer state is cut per rank, and it was written by another number of ranks or with
        another ``layout`` (ZeRO stage, precision: see :meth:`layout_changes`)."""
        local = self.ensure_local(tag)
        if not partitioned_optimizer(local):
            return False
        written = written_world_size(local)
        return written not in (None, self.dist.world) or bool(self.layout_changes(tag, layout))

    def check_layout(self, tag: str, layout: dict[str, Any]) -> dict[str, tuple]:
        """:meth:`layout_changes`, refused where no load carries them: DeepSpeed's universal
        form loads a ZeRO-1 checkpoint into ZeRO-2 and back, and any stage's into another
        precision, but not ZeRO-3's per-rank model states into stage 1 or 2 (nor back), and
        without ZeRO there is nothing per rank to re-cut (both tried: each fails inside
        DeepSpeed with an AssertionError or a missing file)."""
        changed = self.layout_changes(tag, layout)
        if not changed:
            return changed
        was, now = changed.get("zero_stage", (layout["zero_stage"],) * 2)
        if {was, now} <= {1, 2} or (was == now and now != 0):
            return changed
        what = ", ".join(f"{k} {a} (this run: {b})" for k, (a, b) in changed.items())
        raise ConfigError(
            f"checkpoint {tag} was written with {what}: DeepSpeed cannot load it so (ZeRO-3 "
            "keeps per-rank model states, and without ZeRO there is no per-rank state to re-cut; "
            "ZeRO-1 and 2 load each other's). Resume with the settings it was written with, or "
            "start a new run_dir from its weights: python jobs/export.py --checkpoint RUN_DIR "
            "--out EXPORT, then init_from=EXPORT (the optimizer state does not carry over)"
        )

    def check_model(self, tag: str, model: dict[str, Any], groups: list[list[str]]) -> None:
        """Refuse to resume ``tag`` into another architecture (``model``: this run's
        ``GPTConfig`` as a dict, but the :data:`TRANSFERABLE` fields, which change no weight)
        or other parameter groups (``groups``: each AdamW group's parameter names), as its
        ``meta.json`` records them (a key it lacks, from an older checkpoint, is not
        compared). DeepSpeed's load fails on either, with its own traceback (missing keys of
        the state dict; a parameter-alignment layout that does not match)."""
        path = os.path.join(self.ensure_local(tag), "meta.json")
        meta = storage.read_json(path) if os.path.exists(path) else {}
        written = dict(meta.get("model") or {})
        model = dict(model)
        for d in (written, model):  # n_kv_head unset means n_head: the same weights either way
            if d.get("n_kv_head") is None and "n_head" in d:
                d["n_kv_head"] = d["n_head"]
        changed = [
            f"model.{k}: checkpoint {written[k]!r}, this run {v!r}"
            for k, v in model.items()
            if k in written and k not in TRANSFERABLE and written[k] != v
        ]
        saved = meta.get("param_groups")
        if not changed and saved is not None and [list(g) for g in saved] != groups:
            decayed = set(saved[0]) if saved else set()
            now = set(groups[0]) if groups else set()
            moved = sorted(decayed ^ now)
            shown = ", ".join(moved[:4]) + (", ..." if len(moved) > 4 else "")
            was = bool(decayed - now)  # the checkpoint decayed what this run does not
            changed.append(
                f"optim.decay_embeddings: checkpoint {str(was).lower()}, this run "
                f"{str(not was).lower()} ({shown}: weight decay in "
                f"{'the checkpoint' if was else 'this run'} only)"
                if moved
                else "the parameter groups (optim.decay_embeddings?): checkpoint "
                f"{[len(g) for g in saved]} tensors, this run {[len(g) for g in groups]}"
            )
        if changed:
            raise ConfigError(
                f"checkpoint {tag} was written with another model or optimizer layout: "
                + "; ".join(changed)
                + ". Resume with the checkpoint's values, or start a new run_dir from its "
                "weights: python jobs/export.py --checkpoint RUN_DIR --out EXPORT, then "
                "init_from=EXPORT (same architecture; the optimizer state does not carry over)"
            )

    def layout_changes(self, tag: str, layout: dict[str, Any] | None) -> dict[str, tuple]:
        """``{key: (written, now)}`` for the settings in ``layout`` (``zero_stage``,
        ``precision``) that ``tag`` was written with otherwise (its ``meta.json``; a checkpoint
        from before they were recorded tells none). DeepSpeed's plain load of another stage or
        precision fails on file names (a bare AssertionError, or a missing ``bf16_*`` file that
        reads as an incomplete checkpoint); the universal form re-cuts the state for either."""
        path = os.path.join(self.ensure_local(tag), "meta.json")
        meta = storage.read_json(path) if os.path.exists(path) else {}
        return {k: (meta[k], v) for k, v in (layout or {}).items() if k in meta and meta[k] != v}

    def universal_root(self, tag: str) -> str:
        """Where ``tag`` converted to DeepSpeed's universal format lies (converted on each node
        once, by its first rank, from the local copy that :meth:`ensure_local` made): the form
        from which ZeRO re-cuts its optimizer partitions for another number of ranks. Every
        rank calls it. A conversion is kept while it names the checkpoint's marker."""
        root = self._universal_dir
        out = os.path.join(root, tag)

        def convert() -> None:
            source = storage.read_json(os.path.join(self.local_root, tag, MARKER))

            def current() -> bool:
                return _read_marker(os.path.join(out, CONVERTED)) == {"source": source}

            if current():
                return
            log.info("converting checkpoint %s to DeepSpeed's universal format in %s", tag, out)
            os.makedirs(root, exist_ok=True)
            # in a folder of its own: DeepSpeed writes latest_universal beside its output
            staging = tempfile.mkdtemp(prefix=f".{tag}-", dir=root)
            try:
                target = os.path.join(staging, tag)
                cmd = [
                    sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder", os.path.join(self.local_root, tag), "--output_folder", target,
                    # our client state has no Megatron-style universal_checkpoint_info: add it
                    "--inject_missing_state", "--num_extract_workers", "2",
                    "--num_merge_workers", "2",
                ]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"converting checkpoint {tag} to the universal format failed "
                        f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
                    )
                _durable_listing(target)
                storage.write_json(os.path.join(target, CONVERTED), {"source": source})
                _publish(target, out, current)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        self._on_each_node(f"converting checkpoint {tag}", convert)
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
            if written_world_size(local) != self.dist.world:
                return client, None
            # the same ranks with another ZeRO stage or precision: each keeps its own place
            path = os.path.join(local, f"rank_state_{self.dist.rank:05d}.pt")
            return client, torch.load(path, weights_only=True)
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
    export_id = begin_export(out_uri)
    fd, tmp = scratch.mkstemp("export", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"tag": tag, ID_KEY: export_id})
        storage.put_file(tmp, storage.join(out_uri, "model.safetensors"))
    finally:
        os.remove(tmp)
    storage.write_json(storage.join(out_uri, "gpt_config.json"), dataclasses.asdict(cfg))
    with torch.device("meta"):
        buffers = {name for name, _ in GPT(cfg).named_buffers()}
    storage.write_json(
        storage.join(out_uri, "export.json"),
        {
            ID_KEY: export_id,
            "tag": tag,
            "step": step_of(tag),
            "num_tensors": len(state),
            # parameters, as GPT.num_params and the presets' counts: not the buffers (the
            # null caption, 120 x 2048 for FLAN-T5-XL features)
            "num_params": int(sum(v.numel() for k, v in state.items() if k not in buffers)),
            **(extra or {}),
        },
    )
    log.info("exported %s to %s (%d tensors)", tag, out_uri, len(state))
    return out_uri


def export_is_of(uri: str, tag: str, written: float | None, cfg: GPTConfig | None = None) -> bool:
    """Whether ``uri`` holds a whole export (its ``export.json``, written last) of checkpoint
    ``tag`` as written at ``written`` (:meth:`CheckpointManager.written_time`; None: unknown,
    never taken for the same) and, given ``cfg``, with that model config in ``gpt_config.json``
    (a resume that trains nothing may change settings that keep the weights, e.g. dropout)."""
    marker = storage.join(uri, EXPORT_MARKER)
    if written is None or not storage.exists(marker):
        return False
    info = storage.read_json(marker)
    if info.get("tag") != tag or info.get("checkpoint_time") != written:
        return False
    if cfg is None:
        return True
    config = storage.join(uri, "gpt_config.json")
    return storage.exists(config) and storage.read_json(config) == json.loads(
        json.dumps(dataclasses.asdict(cfg))  # as written: tuples are lists in JSON
    )


def load_export(uri: str) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """(state dict, GPTConfig) of an export folder (local or s3://). A remote export is copied
    once per machine into the local model cache (``storage.local_copy``: the ranks of a node
    share one download, and a new export at the same URI is copied again)."""
    cfg = GPTConfig(**storage.read_json(storage.join(uri, "gpt_config.json")))
    weights = storage.local_copy(storage.join(uri, "model.safetensors"))
    marker = storage.join(uri, EXPORT_MARKER)
    check_export(uri, weights, storage.read_json(marker) if storage.exists(marker) else None)
    return load_file(weights), cfg


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
        raise ConfigError(
            f"init_from: export {uri} has another architecture than model: "
            + "; ".join(
                f"{k}: export {getattr(saved, k)!r}, config {getattr(cfg, k)!r}"
                for k in sorted(diff)
            )
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
    listed = storage.read_json(storage.join(root, tag, MARKER)).get("files", {})
    _check_whole(os.path.join(local_root, tag), listed)
    meta = storage.read_json(os.path.join(local_root, tag, "meta.json"))
    cfg = GPTConfig(**meta["model"])
    return export_weights(local_root, tag, cfg, out_uri, extra={"source": storage.join(root, tag)})
