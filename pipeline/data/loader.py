"""Training batches from token shards (local or ``s3://``), resumable to the exact next sample.

Each rank reads its own part of the data through ``R`` streams (one per DataLoader worker, or one
in the main process when ``num_workers`` is 0). A stream's epoch is planned from its seed alone:

1. the epoch's shard order is a seeded permutation of every done shard;
2. the stream takes every ``(world * R)``-th shard of it (split by node, then by worker) or, when
   there are fewer shards than streams, every ``(world * R)``-th sample of all of them;
3. its samples, numbered in reading order (source positions ``0..n-1``, counted from the done
   markers' ``num_samples``), are shuffled by a seeded shuffle buffer. The buffer is simulated over
   the positions only, so the whole emission order is known before any byte is read;
4. a seeded coin per position picks ``codes`` or ``codes_flip``, and another, of its own
   stream, ``t5`` or ``t5_short`` (the caption's first sentence, ``short_caption_p`` of the time,
   as LlamaGen's stage 2 does 30% of the time). The flip coin and the order are drawn as before
   the short-caption coin existed, so a state saved then resumes with the same samples and flips.

A stream's place is therefore two integers, ``(epoch, cursor)`` into that order. Resuming reads
from the shard holding the oldest position still due (at most about a buffer's worth behind) and
skips, without decoding, whatever was already emitted: the resumed run sees exactly the samples an
uninterrupted one would. Streams never end (epoch after epoch), so the DataLoader's round-robin
over workers is exact: batch ``i`` comes from stream ``i mod R``; the loader records which stream
is next and every stream's place as batches are *consumed* (prefetched ones do not count).

WebDataset opens the shards: its ``gopen`` (with an ``s3`` scheme registered here that opens
through ``pipeline.storage``); the tar is grouped into samples by ``shards.iter_tar_samples``,
which, unlike webdataset's ``group_by_keys``, tells a tar cut at a member boundary from a whole one.
Its own shard shuffle, node/worker split and shuffle buffer are not used: their state cannot be
saved, and an exact resume needs it. A damaged shard (not a tar, or cut short) is logged, counted
and skipped from the point of damage (or fails the run with ``on_error: fail``); a transient
storage error reopens the shard after a jittered backoff and skips what was read (six failed
opens in a row are an outage, not damage: the run stops, to resume from its checkpoint). A stream that gets nothing readable in
an epoch goes on to the next (which deals it other shards); three such epochs in a row are an
error (every shard it can get is refused or damaged).

Split by shard, streams get whole shards, so their epochs differ in length by up to a shard
while every stream feeds batches at the same rate: a stream with fewer samples starts its next
epoch sooner. Over a run every sample is seen about equally often, not exactly (with 1000
shards over 256 streams, a run of about 2.5 passes reads some shards twice and others three
times). ``split: sample`` gives every stream the same share.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import importlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.config import doc
from pipeline.data.shards import (
    ShardInfo,
    decode_token_sample,
    iter_tar_samples,
    list_done_shards,
)
from pipeline.log import get_logger
from pipeline.train.stop import ignore_in_worker

log = get_logger(__name__)
# the module: ``webdataset.gopen`` as an attribute is the function it re-exports
wds_gopen = importlib.import_module("webdataset.gopen")

STATE_VERSION = 1
_COUNTERS = (
    "bad_shards",
    "bad_samples",
    "missing_samples",
    "extra_samples",
    "truncated_captions",
    # drawn for its short caption but made without (shards pretokenized without short_captions):
    # trained on the whole caption instead
    "no_short_caption",
)


@dataclass(frozen=True)
class LoaderConfig:
    """Where the token shards are and how they are batched."""

    shards: list[str] = doc("token shard folders (local or s3://), each with done markers", [])
    batch_size: int = doc("micro-batch size per rank", 8)
    num_workers: int = doc("DataLoader worker processes per rank (0: read in the main process)", 2)
    prefetch_factor: int = doc("batches each worker prepares ahead", 4)
    shuffle: bool = doc("shuffle shard order and samples each epoch", True)
    shuffle_buffer: int = doc("samples in the shuffle buffer (per stream)", 1000)
    seed: int = doc("seed of the shard order, the shuffle buffer and the coins (flip, caption)", 0)
    flip: bool = doc("use the horizontally flipped codes half of the time, when present", True)
    short_caption_p: float = doc(
        "train on the caption's first sentence (t5_short, pretokenize's short_captions) with "
        "this probability (LlamaGen's stage 2: 0.3); a sample without one uses t5, counted",
        0.0,
    )
    on_error: Literal["skip", "fail"] = doc(
        "a damaged shard or sample: count and skip, or fail", "skip"
    )
    split: Literal["auto", "shard", "sample"] = doc(
        "split among streams by shard, by sample, or auto (by shard when each stream gets one)",
        "auto",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_caption_p <= 1.0:
            raise ValueError(f"short_caption_p is {self.short_caption_p}: a probability, 0 to 1")


@dataclass(frozen=True)
class BatchSpec:
    """What the model needs from a batch (taken from the model config)."""

    grid_size: int
    cond: Literal["text", "class"] = "text"
    max_text_tokens: int = 120
    caption_dim: int = 2048
    vocab_size: int | None = None  # codes must be below it (None: not checked)
    num_classes: int | None = None  # class labels must be below it (None: not checked)

    @classmethod
    def for_model(cls, model: Any) -> BatchSpec:
        """The spec of a :class:`~pipeline.models.gpt.GPTConfig`: every check on."""
        return cls(
            grid_size=model.grid_size,
            cond=model.cond,
            max_text_tokens=model.max_text_tokens,
            caption_dim=model.caption_dim,
            vocab_size=model.vocab_size,
            num_classes=model.num_classes if model.cond == "class" else None,
        )


class DataMismatch(ValueError):
    """Token shards made for another model (grid, caption width, codebook): not damage, a config
    error, so it stops the run at once whatever ``on_error`` says."""


# --- webdataset: s3 through pipeline.storage ----------------------------------------------------


def _gopen_storage(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    if mode != "rb":
        raise ValueError(f"{url}: the loader only reads")
    return storage.open_read(url)


def register_s3_scheme() -> None:
    """Let ``webdataset.gopen`` open ``s3://`` URLs via ``pipeline.storage`` (idempotent)."""
    wds_gopen.gopen_schemes["s3"] = _gopen_storage


register_s3_scheme()


def iter_shard_raw(uri: str) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of one tar, opened through webdataset's ``gopen``.

    Grouped by :func:`pipeline.data.shards.iter_tar_samples`, not webdataset's
    ``tar_file_expander``/``group_by_keys``: Python's streaming tarfile reads a tar cut at a
    member boundary as a clean end, and webdataset then yields the last sample without its
    missing members (a sample cut after its json read as "shards made without text", which
    stopped the run on every resume). Ours drops that sample and raises ``tarfile.ReadError``."""
    stream = wds_gopen.gopen(uri)
    try:
        for sample in iter_tar_samples(stream):
            yield {**sample, "__url__": uri}
    finally:
        stream.close()


# --- planning an epoch ------------------------------------------------------------------------


def buffer_order(n: int, bufsize: int, rng: np.random.Generator) -> np.ndarray:
    """The emission order of a shuffle buffer of ``bufsize`` over inputs ``0..n-1``.

    Fill the buffer, then each new input evicts a random member (webdataset's scheme); at the
    end the buffer drains in random order. Computed over positions only, so it is cheap.
    """
    if bufsize <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    picks = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    k = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= bufsize:
            j = int(picks[k] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    while buf:
        j = int(picks[k] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out[k] = buf.pop()
        k += 1
    return out


@dataclass
class EpochPlan:
    """What one stream reads in one epoch and in which order it emits the samples."""

    reads: list[ShardInfo]  # shards in reading order
    starts: list[int]  # global index (within ``reads``) of each shard's first sample
    stride: int  # 1 when split by shard; the number of streams when split by sample
    offset: int  # which residue of the global index is ours
    order: np.ndarray  # source positions in emission order
    flips: np.ndarray  # per source position: use codes_flip
    shorts: np.ndarray  # per source position: use t5_short

    @property
    def size(self) -> int:
        return len(self.order)

    def position(self, shard_k: int, j: int) -> int | None:
        """Source position of sample ``j`` of ``reads[shard_k]``, or None if not this stream's."""
        g = self.starts[shard_k] + j
        if g % self.stride != self.offset:
            return None
        return g // self.stride

    def shard_of(self, pos: int) -> int:
        """Index into ``reads`` of the shard holding source position ``pos``."""
        g = pos * self.stride + self.offset
        return bisect.bisect_right(self.starts, g) - 1


def plan_epoch(
    shards: list[ShardInfo],
    cfg: LoaderConfig,
    epoch: int,
    stream: int,
    n_streams: int,
    salt: int = 0,
) -> EpochPlan:
    """The deterministic plan of ``stream`` (of ``n_streams``) for ``epoch``.

    ``salt`` (0 for a run's own data order) gives another order with the same seed: a run that
    cannot continue its saved order (another world size, another shard set) starts one that is
    fresh, not a replay of epoch 0's."""
    seed0 = [cfg.seed, epoch] if salt == 0 else [cfg.seed, epoch, salt]
    perm = (
        np.random.default_rng(seed0).permutation(len(shards))
        if cfg.shuffle
        else np.arange(len(shards))
    )
    by_shard = cfg.split == "shard" or (cfg.split == "auto" and len(shards) >= n_streams)
    if by_shard:
        reads = [shards[i] for i in perm[stream::n_streams]]
        stride, offset = 1, 0
    else:
        reads = [shards[i] for i in perm]
        stride, offset = n_streams, stream
    starts = np.cumsum([0] + [s.num_samples for s in reads]).tolist()
    total = starts[-1]
    n = len(range(offset, total, stride))
    starts = starts[:-1]
    seed = [cfg.seed, epoch, stream] if salt == 0 else [cfg.seed, epoch, stream, salt]
    bufsize = cfg.shuffle_buffer if cfg.shuffle else 1
    order = buffer_order(n, bufsize, np.random.default_rng([*seed, 1]))
    flips = np.random.default_rng([*seed, 2]).random(n) < 0.5
    # a stream of its own (3), not more draws from the flips' or the buffer's: those stay what
    # they were before this coin existed, so saved states resume with the same order and flips
    p = cfg.short_caption_p
    shorts = np.random.default_rng([*seed, 3]).random(n) < p if p > 0 else np.zeros(n, dtype=bool)
    return EpochPlan(reads, starts, stride, offset, order, flips, shorts)


# --- one stream ---------------------------------------------------------------------------------


# epochs in a row with no readable sample after which a stream gives up
EMPTY_EPOCHS = 3
# opens of a shard whose reads fail with transient storage errors, with backoff between them
READ_ATTEMPTS = 6
# the backoff's jitter: its own generator, so the global one (the trainer's RNG state) is untouched
_JITTER = random.Random()


class _Stream:
    """One stream's samples from its saved place on, forever (epoch after epoch)."""

    def __init__(
        self,
        shards: list[ShardInfo],
        cfg: LoaderConfig,
        spec: BatchSpec,
        stream: int,
        n_streams: int,
        state: dict[str, Any],
    ):
        self.shards, self.cfg, self.spec = shards, cfg, spec
        self.stream, self.n_streams = stream, n_streams
        self.state = dict(state)

    def _count(self, name: str, n: int = 1) -> None:
        self.state[name] = self.state.get(name, 0) + n

    def _read(
        self, plan: EpochPlan, first_pos: int, done: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        """(source position, raw sample) for every position >= first_pos not yet emitted."""
        for k in range(plan.shard_of(first_pos), len(plan.reads)):
            info = plan.reads[k]
            j = 0
            for attempt in range(READ_ATTEMPTS):
                try:
                    it = iter_shard_raw(info.uri)
                    for _ in range(j):  # a reopened shard: skip what was read before
                        next(it)
                    for raw in it:
                        if j >= info.num_samples:  # counted at the end (_count_extras)
                            j += 1
                            continue
                        pos = plan.position(k, j)
                        j += 1
                        if pos is not None and pos >= first_pos and not done[pos]:
                            yield pos, raw
                    if j < info.num_samples:  # tar cut at a member boundary reads as a clean end
                        raise EOFError(f"ends after {j} of {info.num_samples} samples")
                    self._count_extras(k, j - info.num_samples)
                    break
                except Exception as exc:  # noqa: BLE001 - transient: retry; damage: counted
                    if storage.is_retryable(exc):
                        if attempt + 1 < READ_ATTEMPTS:
                            delay = 0.2 * 2**attempt * (0.5 + _JITTER.random())
                            log.warning(
                                "reading %s failed (%s); reopening in %.1fs", info.uri, exc, delay
                            )
                            time.sleep(delay)
                            continue
                        # storage still failing after backoff (an outage), not a damaged
                        # shard: skipping it would lose its samples without cause, and the next
                        # shards' as well. The run stops; its last checkpoint resumes exactly
                        raise RuntimeError(
                            f"reading token shard {info.uri} failed {READ_ATTEMPTS} times, the "
                            f"last with {type(exc).__name__}: {exc}; the storage is unreachable "
                            "or overloaded: resume from the last checkpoint once it answers"
                        ) from exc
                    if self.cfg.on_error == "fail":
                        raise RuntimeError(f"damaged token shard {info.uri}: {exc}") from exc
                    self._count_extras(k, j - info.num_samples)
                    # a resume re-reads up to a buffer behind: count and tell a shard once
                    if k in self.state.get("damaged", ()):
                        break
                    self.state["damaged"] = (*self.state.get("damaged", ()), k)
                    self._count("bad_shards")
                    log.warning(
                        "token shard %s is damaged after %d samples (%s: %s); skipping the rest",
                        info.uri,
                        j,
                        type(exc).__name__,
                        exc,
                    )
                    break

    def _count_extras(self, k: int, extra: int) -> None:
        """Count the samples of read ``k`` past its marker's ``num_samples`` once an epoch (a
        resume re-reads up to a buffer behind: counted while reading, they were counted again)."""
        if extra > 0 and k not in self.state.get("extras", ()):
            self.state["extras"] = (*self.state.get("extras", ()), k)
            self._count("extra_samples", extra)

    def _decode(self, raw: dict, flip: bool, short: bool = False) -> dict[str, Any] | None:
        try:
            s = decode_token_sample(raw)
            codes = s["codes_flip"] if flip and self.cfg.flip and "codes_flip" in s else s["codes"]
            g = self.spec.grid_size
            if codes.shape != (g, g):
                raise DataMismatch(
                    f"codes grid {codes.shape[0]}x{codes.shape[1]}, the model's grid is {g}x{g}"
                )
            vocab = self.spec.vocab_size
            if vocab is not None and codes.size and int(codes.max()) >= vocab:
                raise DataMismatch(
                    f"code {int(codes.max())} is outside the model's codebook of {vocab} "
                    "(shards from another VQ tokenizer?)"
                )
            out = {"key": s["key"], "codes": codes.reshape(-1)}
            if self.spec.cond == "class":
                meta = s.get("json")
                if not isinstance(meta, dict) or "label" not in meta:
                    # every sample of such shards lacks one: skipping each, an epoch at a time,
                    # ends in "gave none that could be read" after a warning per sample
                    raise DataMismatch(
                        "token shards without class labels (no 'label' in the sample's json): "
                        "pretokenize with label_field=<the raw json field of the class id> "
                        "(configs/train/class_cond.yaml says how)"
                    )
                label, n = int(meta["label"]), self.spec.num_classes
                # label n is the null class (CFG): real images must not train it, and one
                # beyond it fails in the embedding (a device-side assert on a GPU, hours in)
                if n is not None and not 0 <= label < n:
                    raise DataMismatch(
                        f"class label {label} is outside the model's classes 0..{n - 1} "
                        f"(model.num_classes={n}; {n} is the null class): labels counted from "
                        "1, or another class count?"
                    )
                out["label"] = label
            else:
                if "t5" not in s:
                    # every sample of such shards lacks it: a DataMismatch, not a skipped sample
                    raise DataMismatch(
                        "token shards made without text (no t5.npy: pretokenize's text: null, "
                        "for class-conditional models): pretokenize with a text section (the "
                        "T5 encoder) for a text-conditional model, or train with model.cond: class"
                    )
                t5 = s["t5"]
                if short:
                    if "t5_short" in s:
                        t5 = s["t5_short"]
                    else:  # shards made without short captions (told once, by TokenLoader)
                        self._count("no_short_caption")
                if t5.shape[1] != self.spec.caption_dim:
                    raise DataMismatch(
                        f"t5 features are {t5.shape[1]}-d, the model takes "
                        f"{self.spec.caption_dim}-d"
                    )
                if t5.shape[0] > self.spec.max_text_tokens:
                    # shards encoded with a longer max_length: the first tokens and the EOS
                    # row, as a caption truncated by the encoder ends (text_encoder keeps EOS)
                    self._count("truncated_captions")
                    keep = self.spec.max_text_tokens - 1
                    t5 = np.concatenate([t5[:keep], t5[-1:]])
                out["t5"] = t5
            return out
        except DataMismatch as exc:
            raise DataMismatch(
                f"token sample {raw.get('__key__')} from {raw.get('__url__')}: {exc}; these "
                "shards were made for another model (check data.shards against the model config)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a bad sample is counted and skipped
            if self.cfg.on_error == "fail":
                raise
            self._count("bad_samples")
            log.warning("skipping sample %s: %s: %s", raw.get("__key__"), type(exc).__name__, exc)
            return None

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        """Decoded samples; None for a position that had to be skipped. ``self.state`` follows."""
        while True:
            epoch, cursor = self.state["epoch"], self.state["cursor"]
            salt = self.state.get("salt", 0)
            plan = plan_epoch(self.shards, self.cfg, epoch, self.stream, self.n_streams, salt)
            # a saved place past 0 was saved with a batch of this stream: the sample right
            # before it was readable (a resumed epoch whose rest reads nothing is no empty epoch)
            readable = int(cursor > 0)
            if cursor < plan.size:
                done = np.zeros(plan.size, dtype=bool)
                done[plan.order[:cursor]] = True
                reader = self._read(plan, int(plan.order[cursor:].min()), done)
                hold: dict[int, dict] = {}
                read_to = -1  # highest source position read so far
                for i in range(cursor, plan.size):
                    q = int(plan.order[i])
                    while q not in hold and read_to < q:
                        nxt = next(reader, None)
                        if nxt is None:
                            read_to = plan.size
                            break
                        read_to = nxt[0]
                        hold[nxt[0]] = nxt[1]
                    raw = hold.pop(q, None)
                    self.state["cursor"] = i + 1
                    if raw is None:
                        self._count("missing_samples")
                        yield None
                    else:
                        sample = self._decode(raw, bool(plan.flips[q]), bool(plan.shorts[q]))
                        readable += sample is not None
                        yield sample
            self._after_epoch(epoch, plan, readable)
            self.state.update(epoch=epoch + 1, cursor=0)
            self.state.pop("damaged", None)
            self.state.pop("extras", None)

    def _after_epoch(self, epoch: int, plan: EpochPlan, readable: int) -> None:
        """Raise once :data:`EMPTY_EPOCHS` epochs in a row gave this stream nothing readable.

        One such epoch is not the end: a stream may have drawn a single shard, damaged or
        empty, and the next epoch deals it others (an epoch is quickly over when nothing can be
        read). Several in a row mean every shard it can get is refused or damaged: the trainer
        would wait for a batch forever."""
        if readable > 0:
            self.state.pop("empty_epochs", None)
            return
        n = self.state.get("empty_epochs", 0) + 1
        self.state["empty_epochs"] = n
        what = (
            f"epoch {epoch} of stream {self.stream} of {self.n_streams}: {plan.size} samples in "
            f"{len(plan.reads)} shards gave none that could be read"
        )
        if n < EMPTY_EPOCHS:
            log.warning("%s; going on to the next epoch", what)
            return
        damage = {c: self.state.get(c, 0) for c in _COUNTERS if self.state.get(c)}
        raise RuntimeError(
            f"{what}, {n} epochs in a row ({damage}); check the shards and the access to them"
        )


def collate(samples: list[dict[str, Any]], spec: BatchSpec) -> dict[str, Any]:
    """Stack codes; left-pad T5 features to ``max_text_tokens`` with a validity mask."""
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "codes": torch.from_numpy(np.stack([s["codes"] for s in samples]).astype(np.int64)),
    }
    if spec.cond == "class":
        batch["cond"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        batch["cond_mask"] = None
        return batch
    L = spec.max_text_tokens
    feats = np.zeros((len(samples), L, spec.caption_dim), dtype=np.float16)
    mask = np.zeros((len(samples), L), dtype=bool)
    for i, s in enumerate(samples):
        n = s["t5"].shape[0]
        feats[i, L - n :] = s["t5"]  # valid tokens at the end, right before the image
        mask[i, L - n :] = True
    batch["cond"] = torch.from_numpy(feats)
    batch["cond_mask"] = torch.from_numpy(mask)
    return batch


class _StreamDataset(IterableDataset):
    """Batches of this rank's streams; DataLoader worker w serves stream (rotation + w) mod R."""

    def __init__(self, shards, cfg, spec, rank, world, n_local, states, rotation):
        self.shards, self.cfg, self.spec = shards, cfg, spec
        self.rank, self.world, self.n_local = rank, world, n_local
        self.states, self.rotation = states, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        logical = (self.rotation + (info.id if info else 0)) % self.n_local
        stream = _Stream(
            self.shards,
            self.cfg,
            self.spec,
            self.rank * self.n_local + logical,
            self.world * self.n_local,
            self.states[logical],
        )
        samples: list[dict[str, Any]] = []
        for s in stream:
            if s is not None:
                samples.append(s)
            if len(samples) == self.cfg.batch_size:
                batch = collate(samples, self.spec)
                batch["_stream"] = logical
                batch["_state"] = dict(stream.state)
                yield batch
                samples = []


def list_training_shards(uris: list[str]) -> list[ShardInfo]:
    """The finished token shards (done markers) under every folder of ``uris``, in order."""
    if not uris:
        raise ValueError("data.shards is empty: give at least one token shard folder")
    found = [s for uri in uris for s in list_done_shards(uri)]
    if not found:
        raise FileNotFoundError(f"no finished token shards (done markers) under {uris}")
    return found


def _check_every_stream_gets_samples(
    n_shards: int, n_samples: int, n_listed: int, cfg: LoaderConfig, world: int, n_local: int
) -> None:
    """Raise, naming the fix, when some of the ``world * n_local`` streams would get no sample
    in an epoch (their trainer rank would wait for a batch forever)."""
    streams = world * n_local
    who = f"{streams} streams ({world} ranks x {n_local} per rank, data.num_workers)"
    if n_samples == 0:
        raise ValueError(f"the {n_listed} token shards under {cfg.shards} hold no samples")
    if cfg.split == "shard" and n_shards < streams:
        raise ValueError(
            f"data.split=shard deals whole shards to {who}, and there are {n_shards} shards "
            "with samples: set data.split to auto or sample, or use fewer data.num_workers"
        )
    if n_samples < streams:
        raise ValueError(
            f"{n_samples} samples cannot be split among {who}: use fewer data.num_workers "
            "or more data"
        )


def _warn_if_every_stream_reads_every_shard(
    n_shards: int, cfg: LoaderConfig, world: int, n_local: int
) -> None:
    streams = world * n_local
    who = f"{streams} streams ({world} ranks x {n_local} per rank, data.num_workers)"
    if cfg.split == "sample" or (cfg.split == "auto" and n_shards < streams):
        # each stream reads every shard and keeps its share: the reads of an epoch are the
        # data's size times the stream count (from S3 too); whole shards per stream read once
        log.warning(
            "data: %d shards split by sample among %s: every stream reads every shard, %dx the "
            "data's bytes an epoch%s",
            n_shards, who, streams,
            " (at least as many shards as streams splits them whole: pretokenize with smaller "
            "shards, or use fewer data.num_workers)" if cfg.split == "auto" else "",
        )  # fmt: skip


def _warn_if_shards_lack_short_captions(shards: list[ShardInfo], cfg: LoaderConfig) -> None:
    """Say once, on rank 0, that shards pretokenized without ``short_captions`` (their done
    markers lack its counts; older shards too) give the whole caption where the coin picks the
    short one: the run goes on, each such draw counted as ``no_short_caption``. Said here, not
    per sample: every DataLoader worker of every rank would say it again."""
    without = [s for s in shards if "short_captions" not in s.stats]
    if without:
        log.warning(
            "data.short_caption_p is %s, but %d of %d token shards were made without short "
            "captions (pretokenize short_captions: false, or older shards; e.g. %s): their "
            "samples train on the whole caption every time (counted as no_short_caption)",
            cfg.short_caption_p, len(without), len(shards), without[0].uri,
        )  # fmt: skip


class TokenLoader:
    """This rank's endless sequence of training batches, with ``state_dict`` for exact resume.

    Batch: ``keys`` (list of str), ``codes`` (B, grid**2) long, ``cond`` (B, L, D) float16 T5
    features left-padded to ``max_text_tokens`` with ``cond_mask`` (B, L) bool, or (B,) long class
    labels with ``cond_mask`` None.
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        spec: BatchSpec,
        rank: int = 0,
        world: int = 1,
        shards: list[ShardInfo] | None = None,
        pin_memory: bool | None = None,
    ):
        """``shards``: the finished shards of ``cfg.shards`` as one rank listed them
        (:func:`list_training_shards`; every rank of a job must read the same list), or None to
        list them here. ``pin_memory``: batches in page-locked memory for fast copies to a GPU
        (None: where CUDA is available); the trainer says whether it trains on one (a CPU run
        on a GPU machine must not: pinning sets up CUDA on GPU 0 in every rank)."""
        self.cfg, self.spec, self.rank, self.world = cfg, spec, rank, world
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        listed = list(shards) if shards is not None else list_training_shards(cfg.shards)
        # a shard of no samples (pretokenize writes one when a raw shard had nothing usable) is
        # left out of the plan: a stream dealt only such shards would have nothing to give
        self.shards = [s for s in listed if s.num_samples > 0]
        self._listed = listed
        self.n_local = max(1, cfg.num_workers)
        n_samples = sum(s.num_samples for s in self.shards)
        _check_every_stream_gets_samples(
            len(self.shards), n_samples, len(listed), cfg, world, self.n_local
        )
        if rank == 0:
            _warn_if_every_stream_reads_every_shard(len(self.shards), cfg, world, self.n_local)
            if cfg.short_caption_p > 0 and spec.cond == "text":
                _warn_if_shards_lack_short_captions(self.shards, cfg)
        self._state: dict[str, Any] = {}
        self.start_afresh(0)
        log.info(
            "loader: %d shards, %d samples, %d streams per rank x %d ranks%s",
            len(self.shards),
            n_samples,
            self.n_local,
            world,
            f" ({len(listed) - len(self.shards)} shards of 0 samples left out)"
            if len(listed) > len(self.shards)
            else "",
        )

    def start_afresh(self, salt: int) -> None:
        """Begin a data order of its own, from its first sample (``salt`` 0: the run's own order;
        another: a fresh order, for a run that cannot continue a saved one)."""
        stream = {"epoch": 0, "cursor": 0, **({"salt": int(salt)} if salt else {})}
        self._state = {
            "streams": [dict(stream) for _ in range(self.n_local)],
            "next": 0,
            "batches": 0,
        }

    def _plan_settings(self) -> dict[str, Any]:
        """The settings that shape a stream's plan besides the shard set."""
        c = self.cfg
        return {"seed": c.seed, "shuffle": c.shuffle, "buffer": c.shuffle_buffer, "split": c.split}

    @property
    def fingerprint(self) -> str:
        """Identifies the shard set by content and order (a different one plans different
        epochs), not by location: the same shards copied to another bucket or local disk, or
        named by another path, continue the saved order."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.index}:{s.num_samples}:{s.sha256}\n".encode())
        return h.hexdigest()[:16]

    def _legacy_fingerprint(self) -> str | None:
        """The fingerprint states saved before it named shards by content (by URI, over every
        listed shard): such a state continues where the shards are still where they were and
        none has 0 samples (those are now left out of the plan, which changes the order)."""
        if len(self._listed) != len(self.shards):
            return None
        h = hashlib.sha256()
        for s in self._listed:
            h.update(f"{s.uri}:{s.num_samples}:{s.sha256}\n".encode())
        return h.hexdigest()[:16]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = _StreamDataset(
            self.shards,
            self.cfg,
            self.spec,
            self.rank,
            self.world,
            self.n_local,
            copy.deepcopy(self._state["streams"]),
            self._state["next"],
        )
        if self.cfg.num_workers == 0:
            it: Any = iter(ds)
        else:
            it = iter(
                DataLoader(
                    ds,
                    batch_size=None,
                    num_workers=self.cfg.num_workers,
                    prefetch_factor=self.cfg.prefetch_factor,
                    pin_memory=self.pin_memory,
                    # its own generator: creating workers must not draw from the global torch RNG,
                    # or a resumed run's dropout would be one draw off
                    generator=torch.Generator().manual_seed(self.cfg.seed),
                    # a stop signal is the rank's to act on (save, then end), not the worker's
                    worker_init_fn=ignore_in_worker,
                )
            )
        for batch in it:
            s = batch.pop("_stream")
            self._state["streams"][s] = batch.pop("_state")
            self._state["next"] = (s + 1) % self.n_local
            self._state["batches"] += 1
            yield batch

    def counters(self) -> dict[str, int]:
        """Damage counters (and ``no_short_caption``) summed over this rank's streams (as of the
        consumed batches)."""
        return {c: sum(st.get(c, 0) for st in self._state["streams"]) for c in _COUNTERS}

    @property
    def epoch(self) -> int:
        return min(st["epoch"] for st in self._state["streams"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world": self.world,
            "num_workers": self.cfg.num_workers,
            "fingerprint": self.fingerprint,
            "plan": self._plan_settings(),
            **copy.deepcopy(self._state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Continue where ``state`` was taken; the next batch is the one that would have come.

        Returns False, changing nothing, when the saved place means nothing here: the number of
        streams, the shard set or the settings that plan an epoch (seed, shuffle, buffer, split)
        changed since. Its
        cursor would then index another order, repeating some samples and never reaching others
        in that epoch; the caller starts a fresh order (:meth:`start_afresh`) instead."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        changed = []
        if state["world"] != self.world or len(state["streams"]) != self.n_local:
            changed.append(
                f"{state['world']} ranks x {len(state['streams'])} streams -> {self.world} x "
                f"{self.n_local} (keep world size and data.num_workers to resume exactly)"
            )
        if state["fingerprint"] not in (self.fingerprint, self._legacy_fingerprint()):
            changed.append("the token shard set (or its order)")
        plan = state.get("plan")  # (older states did not record it)
        if plan is not None and plan != self._plan_settings():
            now = self._plan_settings()
            changed.extend(
                f"data.{k} {plan.get(k)!r} -> {now[k]!r}" for k in now if plan.get(k) != now[k]
            )
        if changed:
            log.warning(
                "the saved data order cannot be continued: %s changed since the checkpoint",
                ", ".join(changed),
            )
            return False
        self._state = {k: copy.deepcopy(state[k]) for k in ("streams", "next", "batches")}
        return True
