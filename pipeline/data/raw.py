"""Images out of raw img2dataset shards, as a resumable, deterministic stream of batches.

A raw shard is what img2dataset writes: ``00000.tar`` (members ``{key}.jpg/.txt/.json``), plus
``00000.parquet`` and ``00000_stats.json``; it counts as complete only once its stats file
exists. Shards are read at local paths or ``s3://`` URIs with the same reader as the score and
pretokenize stages (``shards.iter_raw_tar``): a tar that breaks off gives what was intact before
the damage and is counted; an error of the store (a missing object, refused access, a read that
fails) is raised, never taken for a short shard. (An ``s3`` scheme is also registered in
``webdataset.gopen``, for code that reads shards through webdataset.)

Only known image extensions are decoded, with PIL and only its JPEG, PNG and WebP decoders
(:func:`decode_rgb`, shared with the score and pretokenize stages); nothing is ever unpickled.
Broken images are skipped and counted: in training once per image (by shard and key), however
many epochs read it again; in evaluation (:func:`iter_eval_images`) in the caller's ``stats``.

``RawImageStream`` is the training stream. Its order is a pure function of (seed, epoch, rank):
each epoch permutes the shard list, gives every rank its share, and passes the raw samples
through a seeded shuffle buffer; every sample's crop and flip come from its own seeded RNG. The
position is (epoch, raw samples consumed), so ``state_dict()`` / ``load_state_dict()`` resume
mid-epoch at exactly the next batch an uninterrupted run would have seen. The state also holds
the sizes of the epoch's shards read so far, so that a resume reads again only the shards still
holding samples after its position (and the few the shuffle buffer held), not the epoch's prefix.
"""

from __future__ import annotations

import collections
import io
import math
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from webdataset.gopen import gopen_schemes

from pipeline import storage
from pipeline.data.shards import RAW_STATS_SUFFIX, iter_raw_tar, read_raw_stats
from pipeline.log import get_logger

log = get_logger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP")


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    if mode != "rb":
        raise ValueError(f"s3 shards are opened read-only here, got mode {mode!r}")
    return storage.open_read(url)


def register_s3_scheme() -> None:
    """Let webdataset open ``s3://`` URLs through ``pipeline.storage`` (idempotent)."""
    gopen_schemes["s3"] = _gopen_s3


register_s3_scheme()


def list_complete_shards(root: str, required: bool = False) -> list[str]:
    """URIs of the raw shard tars under ``root`` whose ``_stats.json`` exists, sorted.
    ``required``: none is a FileNotFoundError naming ``root`` (a wrong ``data=``, most likely;
    the jobs report it in one line)."""
    names = set(storage.list_dir(root))
    out = []
    for n in sorted(names):
        if n.endswith("_stats.json"):
            tar = n[: -len("_stats.json")] + ".tar"
            if tar in names:
                out.append(storage.join(root, tar))
            else:
                log.warning("%s has a stats file but no tar; skipped", storage.join(root, n))
    if required and not out:
        raise FileNotFoundError(f"no complete raw shards (with _stats.json) under {root}")
    return out


def _shard_stats(tar_uri: str) -> dict[str, Any] | None:
    """img2dataset's ``_stats.json`` beside raw shard ``tar_uri``; None (with a warning) when it
    does not read as a stats object. img2dataset writes it with a plain ``open``: a kill can
    cut it short, and it exists, empty, while being written (a download still running). The
    download stage redoes such a shard; until then it is not complete."""
    uri = tar_uri[: -len(".tar")] + RAW_STATS_SUFFIX
    try:
        return read_raw_stats(uri)
    except ValueError as e:
        log.warning("%s does not read (%s): its shard is left out as not complete", uri, e)
        return None


def nonempty_shards(tar_uris: list[str]) -> list[str]:
    """The tars of ``tar_uris`` whose ``_stats.json`` says img2dataset wrote at least one image
    (read 32 at a time). Shards go to ranks whole: a rank dealt only empty ones would have no
    sample in an epoch and stop the run. A shard whose stats do not read is left out too."""

    with ThreadPoolExecutor(32) as pool:  # no key: taken for a shard with images
        counts = [
            0 if s is None else int(s.get("successes", 1)) for s in pool.map(_shard_stats, tar_uris)
        ]
    kept = [t for t, n in zip(tar_uris, counts, strict=True) if n > 0]
    if len(kept) < len(tar_uris):
        log.warning(
            "%d of %d raw shards hold no image (img2dataset: 0 successes, or stats that do not "
            "read); left out",
            len(tar_uris) - len(kept),
            len(tar_uris),
        )
    return kept


def count_successes(root: str) -> int:
    """Images img2dataset reported as written, over the complete shards under ``root`` (a
    shard whose stats do not read counts none)."""
    stats = (_shard_stats(tar) for tar in list_complete_shards(root))
    return sum(int(s.get("successes", 0)) for s in stats if s is not None)


def iter_raw_samples(
    tar_uris: list[str], damaged: set[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "jpg": bytes, "txt": bytes, ...}`` of the given tars, in order.

    Each sample's ``__url__`` is its tar's URI. A damaged tar gives the samples intact before
    the damage, and its URI is added to ``damaged``; an error of the store is raised
    (:func:`pipeline.data.shards.iter_raw_tar`)."""
    for uri in tar_uris:
        stats: dict[str, Any] = {}
        for sample in iter_raw_tar(uri, stats):
            sample["__url__"] = uri
            yield sample
        if stats.get("corrupt_tar") and damaged is not None:
            damaged.add(uri)


class DecodedImage(NamedTuple):
    """What :func:`decode_rgb` made of a sample's image member."""

    image: Image.Image | None  # 8-bit RGB; None when there is none that decodes
    problem: str | None  # missing_image / undecodable_image
    conversions: tuple[str, ...]  # converted_16bit / converted_transparent: counted by callers


_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
    """``img`` as 8-bit RGB the way a viewer shows it, and what that took beyond a plain convert.

    16-bit greyscale (PNG) is scaled to 8 bits (``convert`` would clip every value over 255 to
    white), a colour key (tRNS) kept as an alpha channel marking the pixels equal to it at 16
    bits; transparency (an alpha channel, or a palette / colour key marked transparent) is
    flattened onto white (``convert`` would drop the alpha and show the colour stored under it,
    black in most files)."""
    notes: list[str] = []
    if img.mode in _16BIT_MODES:
        a = np.asarray(img).astype(np.int64).clip(0, 65535)
        grey = ((a + 128) // 257).astype(np.uint8)  # round(a * 255 / 65535)
        key = img.info.get("transparency")
        if isinstance(key, int):  # a colour key (tRNS): the pixels equal to it, at 16 bits
            alpha = np.where(a == key, 0, 255).astype(np.uint8)
            img = Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
        else:
            img = Image.fromarray(grey, "L")
        notes.append("converted_16bit")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            rgba = flat
            notes.append("converted_transparent")
        img = rgba
    return img.convert("RGB"), tuple(notes)


def decode_rgb(sample: dict[str, Any]) -> DecodedImage:
    """The sample's first image member (jpg, jpeg, png, webp) decoded to RGB (:func:`to_rgb`).

    Only PIL's JPEG, PNG and WebP decoders are tried: PIL would otherwise sniff other formats
    too, whatever the member's extension (EPS runs Ghostscript). Any decoder failure (truncated,
    another format, a decompression bomb) is ``undecodable_image``; no image member at all is
    ``missing_image``."""
    for ext in IMAGE_EXTS:
        data = sample.get(ext)
        if data is None:
            continue
        try:
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            img.load()
            rgb, notes = to_rgb(img)
            return DecodedImage(rgb, None, notes)
        except Exception as exc:  # noqa: BLE001 - any decoder error means a broken image
            log.debug("broken image %s: %s", sample.get("__key__"), exc)
            return DecodedImage(None, "undecodable_image", ())
    return DecodedImage(None, "missing_image", ())


def decode_image(sample: dict[str, Any]) -> Image.Image | None:
    """The sample's image as RGB, or None if it has no image member or the image is broken."""
    return decode_rgb(sample).image


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div(127.5).sub(1.0)


def _crop_short_side(size: int, rng: random.Random, max_scale: float) -> int:
    """The short side :func:`random_crop_flip` resizes to (its first draw from ``rng``)."""
    return max(int(round(size * rng.uniform(1.0, max_scale))), size)


def random_crop_flip(
    img: Image.Image, size: int, rng: random.Random, max_scale: float = 1.1, flip: bool = True
) -> Image.Image:
    """Resize the short side to size x U(1, max_scale), crop ``size`` at random, maybe mirror."""
    nw, nh = _short_side_size(*img.size, _crop_short_side(size, rng, max_scale))
    left = rng.randint(0, nw - size)
    top = rng.randint(0, nh - size)
    img = resized_crop(img, (nw, nh), left, top, size)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


# a resized whole image bigger than this many crops (an aspect ratio over 64 after the box
# halving) is resized only where the crop needs (:func:`center_crop`)
_FULL_RESIZE_MAX_CROPS = 64


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """LlamaGen's centre crop (``center_crop_arr`` in its ``dataset/augmentation.py``, from
    ADM), the crop its code extraction and tokenizer evaluation apply: halve the image with a
    box filter while its short side is at least ``2 * size``, resize it (bicubic) so that the
    short side is ``size`` (each side ``round(side * size / short)``), crop the centre ``size``
    x ``size`` (offsets ``(side - size) // 2``). The same Pillow calls on the whole image, so
    the pixels are LlamaGen's exactly, and with them the codes its VQ and GPT saw. (The box
    halving makes a large image softer than a single bicubic resize would.)

    After the halving, the short side is below ``2 * size``, so the whole resized image is only
    ``aspect ratio`` crops big. An image so elongated that it would exceed
    ``_FULL_RESIZE_MAX_CROPS`` crops (a 10000:1 image became a 2.6 GB array on the way to a
    256 x 256 crop) is instead resized only where the crop needs (:func:`resized_crop`): close
    to LlamaGen's pixels there, not equal."""
    box, bicubic = Image.Resampling.BOX, Image.Resampling.BICUBIC
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=box)
    scale = size / min(img.size)
    nw, nh = round(img.width * scale), round(img.height * scale)
    left, top = (nw - size) // 2, (nh - size) // 2
    if nw * nh > _FULL_RESIZE_MAX_CROPS * size * size:
        return resized_crop(img, (nw, nh), left, top, size)
    img = img.resize((nw, nh), resample=bicubic)
    return img.crop((left, top, left + size, top + size))


def resized_crop(
    img: Image.Image, resized: tuple[int, int], left: int, top: int, size: int
) -> Image.Image:
    """The ``size`` x ``size`` crop at (left, top) of ``img`` resized (bicubic) to ``resized``,
    computing only what the crop needs: the source rows it draws on, then its columns
    (horizontal pass), then its rows (vertical pass), each a Pillow resize of a box, so that
    the cost does not grow with the image's aspect ratio. The pixels are close to those of
    resizing the whole image and cropping, not equal: the boxes' offsets round differently in
    floating point, and Pillow picks the order of its two passes for a whole image itself (on
    the pinned Pillow, vertical first for some, a tall image for one), each pass rounded to 8
    bits."""
    w, h = img.size
    nw, nh = resized
    if (nw, nh) == (w, h):
        return img.crop((left, top, left + size, top + size))
    sx, sy = w / nw, h / nh
    # rows are resized independently: keep only the source rows the crop's rows draw on
    # (bicubic reaches 2 * max(sy, 1) source rows from each centre), with a margin, so that no
    # weight changes: a dropped row had none, and the image's own edges stay where they were
    reach = 2 * max(sy, 1.0) + 2
    y0 = max(0, math.floor(top * sy - reach))
    y1 = min(h, math.ceil((top + size) * sy + reach))
    img = img.crop((0, y0, w, y1))
    bicubic = Image.Resampling.BICUBIC
    if nw != w:
        img = img.resize((size, y1 - y0), bicubic, box=(left * sx, 0, (left + size) * sx, y1 - y0))
    else:
        img = img.crop((left, 0, left + size, y1 - y0))
    if nh != h:
        return img.resize(
            (size, size), bicubic, box=(0, top * sy - y0, size, (top + size) * sy - y0)
        )
    return img.crop((0, top - y0, size, top - y0 + size))


def _short_side_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(w, h) scaled so that the short side is ``short``, neither side below it."""
    s = short / min(w, h)
    return max(short, round(w * s)), max(short, round(h * s))


def sample_id(sample: dict[str, Any]) -> tuple[str, str]:
    """(shard tar's file name, key): a raw sample's identity, wherever the shards are read
    from (a resume may name the data folder otherwise)."""
    return str(sample.get("__url__", "")).rsplit("/", 1)[-1], str(sample.get("__key__"))


# image names kept in iter_eval_images's stats, for a warning to quote
_EXAMPLES = 5


def iter_eval_images(
    tar_uris: list[str], size: int, limit: int | None = None, stats: dict[str, Any] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, center-cropped image in [-1, 1]) in shard order, up to ``limit`` of them.

    Broken images (undecodable, or a sample without an image) are skipped; ``stats`` (when
    given) counts them in ``broken_images`` and keeps the first few as ``shard/key`` in
    ``broken_examples``."""
    if stats is not None:
        stats.setdefault("broken_images", 0)
        stats.setdefault("broken_examples", [])
    if limit is not None and limit < 1:
        return  # the count is checked after each image: a limit of 0 would let one through
    n = 0
    for sample in iter_raw_samples(tar_uris):
        img = decode_image(sample)
        if img is None:
            if stats is not None:
                stats["broken_images"] += 1
                if len(stats["broken_examples"]) < _EXAMPLES:
                    stats["broken_examples"].append("/".join(sample_id(sample)))
            continue
        yield sample["__key__"], to_tensor(center_crop(img, size))
        n += 1
        if limit is not None and n >= limit:
            return


class RawImageStream:
    """An endless, resumable stream of augmented image batches (B, 3, S, S) in [-1, 1]."""

    def __init__(
        self,
        tar_uris: list[str],
        image_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        max_scale: float = 1.1,
        flip: bool = True,
        decode_threads: int = 4,
    ):
        if not tar_uris:
            raise ValueError("no complete raw shards to read (none has its _stats.json)")
        for name, value in (
            ("image_size", image_size),
            ("batch_size", batch_size),
            ("shuffle_buffer", shuffle_buffer),
            ("decode_threads", decode_threads),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not max_scale >= 1.0:
            raise ValueError(f"max_scale must be >= 1.0, got {max_scale}")
        self.tar_uris = list(tar_uris)
        self.image_size, self.batch_size = image_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.max_scale, self.flip = shuffle_buffer, max_scale, flip
        self.decode_threads = decode_threads
        self.epoch = 0
        self.consumed = 0  # raw samples of this epoch behind the last yielded batch
        # images skipped as undecodable, over the whole run, as (shard name, key): a set, so
        # that an image read again (every epoch, or by a resume) counts once
        self.broken_ids: set[tuple[str, str]] = set()
        self._broken_legacy = 0  # the count of a state saved before the ids were (see broken)
        # crops resized up from a smaller image (raw shards stored at the crop size, or below
        # it x max_scale): LlamaGen's tokenizer crops full-size images, so downscales only
        self.enlarged = 0
        # tars that broke off (read up to the damage), over the whole run: a set, so that a
        # shard read again (every epoch, or by a resume) counts once
        self.damaged_shards: set[str] = set()
        # raw samples in each of this rank's shards of an epoch, in reading order, as far as
        # read: what lets a resume skip the shards it does not need (:meth:`_resumed`)
        self._sizes: dict[int, list[int]] = {}

    @property
    def broken(self) -> int:
        """Distinct images skipped as undecodable so far (on this rank). A run resumed from a
        state that kept only a count (saved by an older version, which counted an image each
        time it was read) adds that count."""
        return len(self.broken_ids) + self._broken_legacy

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "broken": self.broken,
            "broken_ids": [list(i) for i in sorted(self.broken_ids)],
            "enlarged": self.enlarged,
            "damaged_shards": sorted(self.damaged_shards),
            "shard_sizes": list(self._sizes.get(self.epoch, [])),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        if "broken_ids" in state:
            self.broken_ids = {(str(u), str(k)) for u, k in state["broken_ids"]}
            self._broken_legacy = 0
        else:
            self.broken_ids, self._broken_legacy = set(), int(state.get("broken", 0))
        self.enlarged = int(state.get("enlarged", 0))
        self.damaged_shards = set(state.get("damaged_shards", []))
        self._sizes = {self.epoch: [int(n) for n in state.get("shard_sizes", [])]}

    def _shard_order(self, epoch: int) -> list[str]:
        order = list(self.tar_uris)
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        return order

    def _buffer_rng(self, epoch: int) -> random.Random:
        return random.Random(f"buffer-{self.seed}-{epoch}-{self.rank}")

    def _source(self, epoch: int, shards: list[str], start: int = 0) -> Iterator[dict[str, Any]]:
        """Raw samples of ``shards[start:]`` in order, recording each shard's size."""
        sizes = self._sizes.setdefault(epoch, [])
        for k in range(start, len(shards)):
            n = 0
            for s in iter_raw_samples([shards[k]], self.damaged_shards):
                n += 1
                yield s
            if k == len(sizes):
                sizes.append(n)

    def epoch_samples(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's raw samples of ``epoch`` in their shuffled order, from position ``skip``.

        With the shard sizes of a saved state the shards that only held samples before
        ``skip`` are not read (:meth:`_resumed`); else (a state that recorded none, as older
        ones did) the prefix is read and dropped."""
        order = self._shard_order(epoch)
        if len(order) >= self.world_size:
            mine = order[self.rank :: self.world_size]
            if skip and self._sizes.get(epoch):
                yield from self._resumed(epoch, skip, mine)
                return
            source = self._source(epoch, mine)
        else:  # fewer shards than ranks: every rank reads all and keeps its stride of samples
            source = (
                s
                for i, s in enumerate(iter_raw_samples(order, self.damaged_shards))
                if i % self.world_size == self.rank
            )
        rng = self._buffer_rng(epoch)
        buf: list[dict[str, Any]] = []
        pos = 0
        for s in source:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            if pos >= skip:
                yield s
            pos += 1
        rng.shuffle(buf)
        yield from buf[max(0, skip - pos) :]

    def _resumed(self, epoch: int, skip: int, mine: list[str]) -> Iterator[dict[str, Any]]:
        """:meth:`epoch_samples` from position ``skip`` on, reading only the shards needed.

        The shuffle buffer's draws depend on its length alone, never on the samples, so a
        replay over sample numbers tells how far the source had read at ``skip`` and which
        samples the buffer held then. With the shard sizes of the saved state, the shards
        before the source's place that hold none of those are not read again (a state without
        sizes reads every shard, dropping what came before)."""
        sizes = self._sizes.get(epoch, [])
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        # every size known: the epoch's length too (the source had ended when it was saved)
        end = starts[-1] if len(sizes) == len(mine) else None
        rng = self._buffer_rng(epoch)
        buf: list[int] = []  # sample numbers in the buffer
        n_src = pos = 0  # samples the source has given, and positions yielded
        while pos < skip and n_src != end:
            if len(buf) < self.shuffle_buffer:
                buf.append(n_src)
            else:
                buf[rng.randrange(len(buf))] = n_src
                pos += 1
            n_src += 1
        flush = None
        if pos < skip:  # the source ended before skip: it falls in the final flush
            rng.shuffle(buf)
            flush = buf[skip - pos :]
        return self._replay(epoch, mine, starts, buf, n_src, rng, flush)

    def _replay(
        self,
        epoch: int,
        mine: list[str],
        starts: list[int],
        buf: list[Any],
        n_src: int,
        rng: random.Random,
        flush: list[int] | None,
    ) -> Iterator[dict[str, Any]]:
        wanted = set(buf if flush is None else flush)
        # the shard the source goes on in (the first not known to end before n_src)
        first = next((k for k in range(len(starts) - 1) if starts[k + 1] > n_src), len(starts) - 1)
        shards = sorted(
            {k for k in range(first) if any(starts[k] <= i < starts[k + 1] for i in wanted)}
        )
        log.info(
            "rank %d resumes epoch %d at raw sample %d: reads %d of the %d shards before it",
            self.rank, epoch, n_src, len(shards), first,
        )  # fmt: skip
        held: dict[int, dict[str, Any]] = {}
        for k in shards:
            for j, s in enumerate(iter_raw_samples([mine[k]], self.damaged_shards)):
                if starts[k] + j in wanted:
                    held[starts[k] + j] = s
        if flush is not None:  # every sample is in shards before the end
            yield from (held.pop(i) for i in flush)
            return
        i = starts[first]
        for s in self._source(epoch, mine, first):
            if i < n_src:  # before the resume point in the shard it falls in: buffered or done
                if i in wanted:
                    held[i] = s
                i += 1
                continue
            i += 1
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            out, buf[j] = buf[j], s
            yield held.pop(out) if isinstance(out, int) else out
        rng.shuffle(buf)
        yield from (held.pop(x) if isinstance(x, int) else x for x in buf)

    def _prepare(
        self, sample: dict[str, Any], epoch: int, pos: int
    ) -> tuple[torch.Tensor, bool] | None:
        img = decode_image(sample)
        if img is None:
            return None
        seed = f"aug-{self.seed}-{epoch}-{self.rank}-{pos}"
        enlarged = _crop_short_side(self.image_size, random.Random(seed), self.max_scale)
        enlarged = enlarged > min(img.size)  # the same draw random_crop_flip makes first
        crop = random_crop_flip(
            img, self.image_size, random.Random(seed), self.max_scale, self.flip
        )
        return to_tensor(crop), enlarged

    def _positions(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, position, raw sample) from the saved position on, endlessly."""
        epoch, skip = self.epoch, self.consumed
        while True:
            pos = -1
            for pos, sample in enumerate(self.epoch_samples(epoch, skip), start=skip):
                yield epoch, pos, sample
            if pos < 0 and skip == 0:
                raise RuntimeError(
                    f"rank {self.rank} got no samples in epoch {epoch} from "
                    f"{len(self.tar_uris)} shards: are the shards empty?"
                )
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending: collections.deque[tuple[int, int, tuple[str, str], Future]] = collections.deque()
        lookahead = 2 * self.batch_size
        batch: list[torch.Tensor] = []
        good_in_epoch = self.consumed > 0
        with ThreadPoolExecutor(self.decode_threads) as pool:
            source = self._positions()
            while True:
                while len(pending) < lookahead:
                    epoch, pos, sample = next(source)
                    fut = pool.submit(self._prepare, sample, epoch, pos)
                    pending.append((epoch, pos, sample_id(sample), fut))
                epoch, pos, sid, fut = pending.popleft()
                if epoch != self.epoch:
                    if not good_in_epoch:
                        raise RuntimeError(
                            f"no decodable image in a whole epoch on rank {self.rank}"
                        )
                    self.epoch, good_in_epoch = epoch, False
                self.consumed = pos + 1
                prepared = fut.result()
                if prepared is None:
                    self.broken_ids.add(sid)
                    continue
                img, enlarged = prepared
                self.enlarged += enlarged
                good_in_epoch = True
                batch.append(img)
                if len(batch) == self.batch_size:
                    yield torch.stack(batch)
                    batch = []
