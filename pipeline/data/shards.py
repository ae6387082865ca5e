"""Token shards: the pretokenized dataset the GPT trains on.

One token shard per raw shard, same index: ``{index:05d}.tar`` (a WebDataset tar). Per sample:

- ``__key__``: the raw sample's key (stable across reruns),
- ``codes.npy``: uint16 VQ codes, grid (h, w),
- ``codes_flip.npy`` (optional): uint16 codes of the horizontally flipped image,
- ``t5.npy``: float16 T5 features of the valid caption tokens only, (L, D) with L <= 120; absent
  from shards made without text (pretokenize's ``text: null``, class-conditional shards),
- ``t5_short.npy`` (optional, pretokenize's ``short_captions``): float16 T5 features of the
  caption's first sentence, (L', D), for LlamaGen's stage-2 short-caption training. A sample whose
  first sentence is its whole caption has no such member but ``"t5_short": "t5"`` in its json:
  the same features are not stored twice (most captions are one sentence, and a copy would
  nearly double a shard, ~4 KB a token at 2048-d; a marker in the json costs ~16 bytes, where
  even an empty member would cost a 1 KB tar header and block). Reading resolves the marker, so
  a reader sees ``t5_short`` either way; shards made without the option have neither,
- ``txt``: the caption (utf-8), ``json``: url, size, scores, source shard.

A shard is written to a local temporary file and committed atomically through
``pipeline.storage``; its bytes depend only on its content (samples sorted by key, fixed tar
header fields), so the same input gives the same sha256. After the tar, a per-shard done marker
``{index:05d}.done.json`` is written; a shard counts as done only when that marker exists.
Concurrent workers each write only their own marker; ``merge_manifest`` folds them into
``manifest.json``. Reading decodes only the known extensions above and never unpickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import yaml

from pipeline import scratch, storage
from pipeline.config import ConfigError, save_config, to_dict
from pipeline.log import get_logger

log = get_logger(__name__)

MAX_T5_TOKENS = 120
NPY_EXTS = ("codes.npy", "codes_flip.npy", "t5.npy", "t5_short.npy")
TEXT_EXTS = ("txt",)
JSON_EXTS = ("json",)
KNOWN_EXTS = NPY_EXTS + TEXT_EXTS + JSON_EXTS
_DTYPES = {
    "codes.npy": np.uint16,
    "codes_flip.npy": np.uint16,
    "t5.npy": np.float16,
    "t5_short.npy": np.float16,
}
# json marker of a sample whose short caption is its whole caption: ``t5_short`` is ``t5``
SHORT_IS_FULL = ("t5_short", "t5")
# Keys become tar member prefixes: WebDataset splits "key.ext" at the first dot of the basename.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
MANIFEST = "manifest.json"
DONE_SUFFIX = ".done.json"


def shard_name(index: int) -> str:
    """``00042.tar`` for index 42."""
    return f"{index:05d}.tar"


def done_name(index: int) -> str:
    """``00042.done.json`` for index 42."""
    return f"{index:05d}{DONE_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One finished token shard, as recorded in its done marker."""

    index: int
    uri: str
    num_samples: int
    num_bytes: int
    sha256: str
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardInfo:
        return cls(
            index=int(d["index"]),
            uri=str(d["uri"]),
            num_samples=int(d["num_samples"]),
            num_bytes=int(d["num_bytes"]),
            sha256=str(d["sha256"]),
            stats=dict(d.get("stats", {})),
        )


# --- encoding ---------------------------------------------------------------------------------


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as .npy bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def valid_key(key: str) -> bool:
    """True when ``key`` can name tar members (letters, digits, ``_``, ``-``; no dots)."""
    return bool(_KEY_RE.match(key))


def encode_token_sample(
    key: str,
    codes: np.ndarray,
    t5: np.ndarray | None,
    caption: str,
    meta: Mapping[str, Any],
    codes_flip: np.ndarray | None = None,
    t5_short: np.ndarray | Literal["t5"] | None = None,
) -> dict[str, bytes | str]:
    """The tar members of one sample; checks shapes and casts to the stored dtypes.

    ``t5_short``: features of the caption's first sentence (stored as ``t5_short.npy``), ``"t5"``
    when that sentence is the whole caption (only marked in the json), or None (not made).
    ``t5`` None: no caption features (class-conditional shards), so no ``t5_short`` either."""
    if not valid_key(key):
        raise ValueError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots or slashes)")
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.size == 0 or codes.min() < 0 or codes.max() > 65535:
        raise ValueError(
            f"{key}: codes must be a non-empty 2D grid of ids < 65536, got {codes.shape}"
        )
    if t5 is None:
        if t5_short is not None:
            raise ValueError(f"{key}: t5_short without t5 (a sample made without text)")
    elif (t5 := np.asarray(t5)).ndim != 2 or not 0 < t5.shape[0] <= MAX_T5_TOKENS:
        raise ValueError(f"{key}: t5 must be (L, D) with 0 < L <= {MAX_T5_TOKENS}, got {t5.shape}")
    meta = dict(meta)
    if isinstance(t5_short, str):
        if t5_short != SHORT_IS_FULL[1]:
            raise ValueError(f"{key}: t5_short must be features, 't5' or None, not {t5_short!r}")
        meta[SHORT_IS_FULL[0]] = SHORT_IS_FULL[1]
    elif t5_short is not None:
        t5_short = np.asarray(t5_short)
        if (
            t5_short.ndim != 2
            or not 0 < t5_short.shape[0] <= MAX_T5_TOKENS
            or t5_short.shape[1] != t5.shape[1]
        ):
            raise ValueError(
                f"{key}: t5_short must be (L, {t5.shape[1]}) with 0 < L <= {MAX_T5_TOKENS}, "
                f"got {t5_short.shape}"
            )
    sample: dict[str, bytes | str] = {
        "__key__": key,
        "codes.npy": npy_bytes(codes.astype(np.uint16)),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, default=_json_default).encode("utf-8"),
    }
    if t5 is not None:
        sample["t5.npy"] = npy_bytes(t5.astype(np.float16))
    if isinstance(t5_short, np.ndarray):
        sample["t5_short.npy"] = npy_bytes(t5_short.astype(np.float16))
    if codes_flip is not None:
        codes_flip = np.asarray(codes_flip)
        if codes_flip.shape != codes.shape:
            raise ValueError(f"{key}: codes_flip shape {codes_flip.shape} != codes {codes.shape}")
        sample["codes_flip.npy"] = npy_bytes(codes_flip.astype(np.uint16))
    return sample


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _member(name: str, data: bytes) -> bytes:
    """One tar member (header + data padded to 512 bytes) with fixed metadata."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    pad = (-len(data)) % tarfile.BLOCKSIZE
    return header + data + b"\0" * pad


class TokenShardWriter:
    """Writes one token shard deterministically, then commits it and its done marker.

    Samples may arrive in any order: each is appended to a local spool file and the tar is
    assembled in key order on ``close`` (memory stays bounded by one sample). Use as a context
    manager; leaving the block with an exception commits nothing.
    """

    def __init__(self, out_uri: str, index: int, tmp_dir: str | None = None) -> None:
        self.out_uri = str(out_uri)
        self.index = index
        self.uri = storage.join(self.out_uri, shard_name(index))
        self._spool = tempfile.TemporaryFile(dir=tmp_dir, prefix=f"spool-{index:05d}-")
        self._where: dict[str, tuple[int, int]] = {}
        self._tmp_dir = tmp_dir
        self.info: ShardInfo | None = None

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.info is None:
            self.close()
        self._spool.close()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def write(self, sample: Mapping[str, bytes | str]) -> None:
        """Add one sample (as from ``encode_token_sample``); a repeated key is an error."""
        key = str(sample["__key__"])
        if key in self._where:
            raise ValueError(f"duplicate key {key!r} in shard {self.index}")
        unknown = [k for k in sample if k != "__key__" and k not in KNOWN_EXTS]
        if unknown:
            raise ValueError(f"{key}: unknown member {unknown[0]!r}; known: {KNOWN_EXTS}")
        blob = b"".join(
            _member(f"{key}.{ext}", v if isinstance(v, bytes) else v.encode("utf-8"))
            for ext, v in sorted(sample.items())
            if ext != "__key__"
        )
        start = self._spool.seek(0, os.SEEK_END)
        self._spool.write(blob)
        self._where[key] = (start, len(blob))

    def close(self, stats: Mapping[str, Any] | None = None) -> ShardInfo:
        """Assemble the tar in key order, upload it atomically, then write the done marker."""
        fd, tmp = scratch.mkstemp("shard", suffix=f"-{self.index:05d}.tar", dir=self._tmp_dir)
        digest = hashlib.sha256()
        n_bytes = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for key in sorted(self._where):
                    start, length = self._where[key]
                    self._spool.seek(start)
                    chunk = self._spool.read(length)
                    out.write(chunk)
                    digest.update(chunk)
                    n_bytes += length
                # end of archive: two zero blocks, padded to tar's 10240-byte record
                end = b"\0" * (2 * tarfile.BLOCKSIZE)
                end += b"\0" * ((-(n_bytes + len(end))) % tarfile.RECORDSIZE)
                out.write(end)
                digest.update(end)
                n_bytes += len(end)
            storage.put_file(tmp, self.uri)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        info = ShardInfo(
            index=self.index,
            uri=self.uri,
            num_samples=len(self._where),
            num_bytes=n_bytes,
            sha256=digest.hexdigest(),
            stats=dict(stats or {}),
        )
        storage.write_json(storage.join(self.out_uri, done_name(self.index)), info.to_dict())
        self.info = info
        log.info("token shard %s: %d samples, %d bytes", self.uri, info.num_samples, n_bytes)
        return info


# --- done markers and the manifest ------------------------------------------------------------


def is_done(out_uri: str, index: int) -> bool:
    """True when shard ``index`` under ``out_uri`` has its done marker."""
    return storage.exists(storage.join(out_uri, done_name(index)))


def done_indices(uri: str) -> set[int]:
    """Indices of the shards under ``uri`` with a done marker, from one listing."""
    names = storage.list_dir(uri, suffix=DONE_SUFFIX)
    return {int(n[: -len(DONE_SUFFIX)]) for n in names if n[: -len(DONE_SUFFIX)].isdigit()}


def list_done_shards(uri: str, threads: int = 32) -> list[ShardInfo]:
    """Every finished shard under ``uri`` (those with a done marker), sorted by index.

    The markers are read ``threads`` at a time: one GET each, and a dataset has thousands (5,000
    serial GETs to S3 took minutes at every training start, on every rank)."""

    def read(name: str) -> ShardInfo:
        marker = storage.join(uri, name)
        try:
            info = ShardInfo.from_dict(storage.read_json(marker))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not a marker's JSON
            raise ValueError(
                f"done marker {marker} is unreadable ({type(exc).__name__}: {exc}); remove it "
                "and run pretokenize again on the same output to remake that shard"
            ) from exc
        # the dataset may have been moved or its shards renumbered (two folders merged) since:
        # trust the marker's name, not the index and uri written in it
        index = int(name[: -len(DONE_SUFFIX)])
        return dataclasses.replace(info, index=index, uri=storage.join(uri, shard_name(index)))

    names = storage.list_dir(uri, suffix=DONE_SUFFIX)
    odd = [n for n in names if not n[: -len(DONE_SUFFIX)].isdigit()]
    if odd:
        log.warning(
            "%s: %d done markers not named <index>%s are not shards of this dataset (e.g. %s)",
            uri, len(odd), DONE_SUFFIX, odd[0],
        )  # fmt: skip
        names = [n for n in names if n not in odd]
    if len(names) <= 1 or threads <= 1:
        out = [read(n) for n in names]
    else:
        with ThreadPoolExecutor(min(threads, len(names))) as pool:
            out = list(pool.map(read, names))
    return sorted(out, key=lambda s: s.index)


def remove_shard(uri: str, index: int) -> None:
    """Delete token shard ``index`` under ``uri`` and its done marker (one made from inputs that
    are gone or changed). The marker goes first: a kill between the two leaves a tar without a
    marker, not done (as while it is written), never a marker without its tar."""
    storage.remove(storage.join(uri, done_name(index)))
    storage.remove(storage.join(uri, shard_name(index)))


def merge_manifest(uri: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fold every done marker under ``uri`` into ``manifest.json`` (rewritten whole) and return it."""
    shards = list_done_shards(uri)
    totals: dict[str, Any] = {
        "num_shards": len(shards),
        "num_samples": sum(s.num_samples for s in shards),
        "num_bytes": sum(s.num_bytes for s in shards),
    }
    dropped: dict[str, int] = {}
    sums: dict[str, float] = {}
    t5_tokens = 0
    for s in shards:
        for reason, n in (s.stats.get("dropped") or {}).items():
            dropped[reason] = dropped.get(reason, 0) + int(n)
        for k, v in s.stats.items():
            # a shard's mean summed over shards means nothing: the dataset's is a sum / count
            if _is_number(v) and k != "unit" and not k.endswith("_mean"):
                sums[k] = sums.get(k, 0) + v
        t5_tokens += _t5_tokens(s)
    totals["dropped"] = dict(sorted(dropped.items()))
    totals["stats_sum"] = dict(sorted(sums.items()))
    totals["t5_tokens_mean"] = t5_tokens / totals["num_samples"] if totals["num_samples"] else 0.0
    manifest = {
        "format": "t2i-token-shards/1",
        **totals,
        **dict(extra or {}),
        "shards": [{**s.to_dict(), "uri": shard_name(s.index)} for s in shards],
    }
    storage.write_json(storage.join(uri, MANIFEST), manifest)
    return manifest


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _t5_tokens(shard: ShardInfo) -> float:
    """Caption tokens stored in ``shard``: its ``t5_tokens_sum`` (a marker written before that
    was recorded has only its mean: mean x samples)."""
    st = shard.stats
    if _is_number(st.get("t5_tokens_sum")):
        return st["t5_tokens_sum"]
    return float(st.get("t5_tokens_mean") or 0.0) * shard.num_samples


# --- what made an output folder ----------------------------------------------------------------


def _field(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _set_missing(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d``'s ``dotted`` field to ``value`` where it is absent (sections made as needed)."""
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(d.get(part), dict):
            if part in d:
                return  # not a section (a hand-edited file): compared as it is
            d[part] = {}
        d = d[part]
    d.setdefault(last, value)


def _changes(old: Any, new: Any, path: str, ignore: Collection[str]) -> Iterator[str]:
    """``'path' (old != new)`` for every field at or under ``path`` that differs."""
    if path in ignore:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _changes(old.get(k), new.get(k), f"{path}.{k}", ignore)
    elif old != new and not (isinstance(old, str) and isinstance(new, str) and _same_uri(old, new)):
        yield f"{path!r} ({old!r} != {new!r})"


def _same_uri(a: str, b: str) -> bool:
    """One folder written two ways: ``s3://b/raw/`` and ``s3://b/raw``, ``file:///x`` and ``/x``."""
    return storage.normalize(a).rstrip("/") == storage.normalize(b).rstrip("/")


def claim_output(
    output: str,
    cfg: Any,
    config_name: str,
    inputs_name: str,
    fields: Sequence[str],
    weights: Mapping[str, str],
    has_results: Callable[[], bool],
    ignore: Collection[str] = (),
    missing_as: Mapping[str, Any] | None = None,
    derived: Mapping[str, Any] | None = None,
) -> None:
    """Refuse to add to ``output`` results made with other content settings; then save ``cfg``
    (as ``config_name``) and what its model URIs hold (as ``inputs_name``) beside them.

    ``fields`` are the dotted config fields that decide the results (a section stands for each
    field in it, but those in ``ignore``); ``weights`` maps a name to the dotted field of a
    model URI, whose content (:func:`pipeline.storage.fingerprint`: weights replaced at the same
    URI) decides them too. Either differing from what the last run saved is a
    :class:`ConfigError` naming the fields, when ``has_results()``: one output folder never
    mixes two settings, and the saved config always describes what is there.

    ``missing_as`` maps a dotted field newer than some saved configs to what the code that saved
    them did (e.g. ``{"upscale_small": True}``: small images were enlarged before the setting
    existed). A saved config without the field is read with that value, so an output keeps
    being continued with its old behaviour and is refused with another, where a missing field
    would otherwise differ from every value (None != False).

    ``derived`` maps a name to settings that decide the results without being fields of ``cfg``,
    read from what it points at (e.g. the settings a scores folder was made with). They are
    saved in ``inputs_name`` and compared with the saved ones like ``fields`` (differences named
    ``'name.field'``); one that is None, or absent from a file saved before it was recorded, is
    not compared (nothing to tell by)."""
    new = to_dict(cfg)
    derived = dict(derived or {})
    prints = {
        k: storage.fingerprint(u) if (u := _field(new, f)) else None for k, f in weights.items()
    }
    config_uri = storage.join(output, config_name)
    inputs_uri = storage.join(output, inputs_name)
    diff: list[str] = []
    if storage.exists(config_uri):
        old = yaml.safe_load(storage.read_text(config_uri)) or {}
        for dotted, value in (missing_as or {}).items():
            _set_missing(old, dotted, value)
        diff = [c for f in fields for c in _changes(_field(old, f), _field(new, f), f, ignore)]
        if not diff and storage.exists(inputs_uri):
            saved = storage.read_json(inputs_uri)
            diff = [
                f"content of {weights[k]} (the weights at {_field(new, weights[k])!r} changed)"
                for k, v in prints.items()
                if k in saved
                and (
                    saved[k] != v
                    if _field(new, weights[k]) is None
                    else not storage.same_content(saved[k], _field(new, weights[k]), v)
                )
            ]
            diff += [
                change
                for k, v in derived.items()
                if v is not None and saved.get(k) is not None
                for change in _changes(saved[k], v, k, ())
            ]
    if diff and has_results():
        raise ConfigError(
            f"{output} already holds results made with a different {'; '.join(diff)}; use a new "
            "output folder (or the settings it was made with)"
        )
    storage.makedirs(output)
    save_config(cfg, config_uri)
    storage.write_json(inputs_uri, {**prints, **derived})


# --- reading ----------------------------------------------------------------------------------


def _load_npy(data: bytes, ext: str) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    want = _DTYPES[ext]
    if arr.dtype != want or arr.ndim != 2:
        raise ValueError(
            f"{ext}: expected a 2D {np.dtype(want).name} array, got {arr.dtype} {arr.shape}"
        )
    return arr


def decode_token_sample(sample: Mapping[str, Any], strict: bool = False) -> dict[str, Any]:
    """Decode a raw WebDataset sample dict (bytes per extension) of a token shard.

    Returns ``{"key", "codes", "txt", "json"}`` plus ``"t5"`` (absent from shards made without
    text), ``"codes_flip"`` and ``"t5_short"`` when present (``t5_short`` is the ``t5`` array itself where the json marks the first sentence
    as the whole caption; shards made without short captions have none). Only
    the known extensions are decoded (``np.load(allow_pickle=False)``, utf-8, json); anything
    else is ignored, or rejected with ``strict=True``. Nothing is ever unpickled. A key that the
    writer could not have made (a member path with directories, ``..`` or a leading ``/``) is
    rejected.
    """
    out: dict[str, Any] = {"key": str(sample.get("__key__", ""))}
    if not valid_key(out["key"]):
        # the writer only makes flat keys: "../x", "/abs/x" or "dir/x" come from a forged tar
        raise ValueError(f"{out['key']!r} is not a token-shard key (unsafe member path?)")
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if name in NPY_EXTS:
            out[name[: -len(".npy")]] = _load_npy(value, name)
        elif name in TEXT_EXTS:
            out["txt"] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        elif name in JSON_EXTS:
            out["json"] = json.loads(value)
        elif strict:
            raise ValueError(f"{out['key']}: unexpected member {name!r} in a token shard")
    if "codes" not in out:
        raise ValueError(f"{out['key']}: token sample lacks codes.npy")
    if "t5_short" in out and "t5" not in out:
        raise ValueError(f"{out['key']}: token sample has t5_short.npy but lacks t5.npy")
    meta = out.get("json")
    if "t5_short" not in out and "t5" in out and isinstance(meta, dict):
        if meta.get(SHORT_IS_FULL[0]) == SHORT_IS_FULL[1]:
            out["t5_short"] = out["t5"]
    return out


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records on the archive why its member list ended. A stream ``tarfile`` ends quietly on
    a missing header (a tar cut exactly after a member), a partial one or garbage, just as on the
    zero block that really ends an archive; only that block (``EOFHeaderError``) is an end."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.t2i_end = exc  # type: ignore[attr-defined]
            raise


def iter_tar_samples(stream: Any) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members into WebDataset-style dicts of raw bytes (no decoding).

    An archive without its end-of-archive block (cut off, even exactly after a member) raises
    ``tarfile.ReadError`` after the complete samples. Its last sample may lack members (the cut
    fell between two of them): it is yielded only when it has every member its predecessor
    had (a shard's samples share one layout), else dropped."""
    current: dict[str, Any] | None = None
    previous: set[str] | None = None  # the member names of the sample before ``current``
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo) as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if "." not in base:
                continue
            key, ext = base.split(".", 1)
            prefix = m.name[: len(m.name) - len(base)] + key
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    yield current
                    previous = set(current)
                current = {"__key__": prefix}
            f = tar.extractfile(m)
            current[ext] = f.read() if f is not None else b""
        end = getattr(tar, "t2i_end", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            why = f"{type(end).__name__}: {end}" if end is not None else "no header"
            whole = current is not None and previous is not None and set(current) >= previous
            if whole:
                yield current
            raise tarfile.ReadError(
                f"the archive ends without its end-of-archive block ({why}) after "
                f"{tar.offset} bytes: cut off; its last sample "
                f"{current['__key__'] if current else None!r} is "
                + ("kept (it has every member of the one before)" if whole else "dropped")
            )
    if current is not None:
        yield current


def read_token_shard(uri: str, strict: bool = False) -> Iterator[dict[str, Any]]:
    """Decoded samples of one token shard (local or s3://), in stored (key) order."""
    with storage.open_read(uri) as f:
        for raw in iter_tar_samples(f):
            yield decode_token_sample(raw, strict=strict)


# --- raw (img2dataset) shards: the input of score and pretokenize -----------------------------

RAW_STATS_SUFFIX = "_stats.json"


def read_raw_stats(uri: str) -> dict[str, Any]:
    """img2dataset's ``_stats.json`` at ``uri``; a ValueError when its content is not a stats
    object (img2dataset writes it with a plain ``open``: a kill can cut it short, and it exists,
    empty, while being written). A store error is raised as it is."""
    return _parse_raw_stats(storage.read_bytes(uri))


def _parse_raw_stats(data: bytes) -> dict[str, Any]:
    s = json.loads(data)  # a cut file: json's ValueError (UnicodeDecodeError too)
    if not isinstance(s, dict):
        raise ValueError(f"not a JSON object: {type(s).__name__}")
    return s


def raw_shard_indices(uri: str) -> list[int]:
    """Indices of the complete raw shards under ``uri``: those with a tar and a ``_stats.json``
    that reads (:func:`read_raw_stats`, 32 at a time). One that exists but does not read is
    being written, or was cut short by a kill: the download stage removes it and downloads the
    shard again, so results made from the shard as it is now would outlive it."""
    return list(raw_shard_identities(uri))


def raw_shard_identities(uri: str) -> dict[int, str]:
    """The complete raw shards under ``uri`` (:func:`raw_shard_indices`) by index, sorted, each
    with its :func:`raw_shard_identity`: from one listing (the tars' sizes) and the read of each
    ``_stats.json`` that tells whether it reads, so that knowing which download of each shard
    is there costs no request more than finding the complete ones (a read and a HEAD per shard
    again would be ~100k requests at every run start at LAION scale)."""
    files = storage.list_files(uri)
    found = []
    for n in files:
        stem = n[: -len(RAW_STATS_SUFFIX)]
        if n.endswith(RAW_STATS_SUFFIX) and stem.isdigit():
            if f"{stem}.tar" in files:
                found.append(int(stem))
            else:
                log.warning("%s has a stats file but no tar; skipped", storage.join(uri, n))
    found.sort()

    def identity(index: int) -> str | None:
        data = storage.read_bytes(raw_stats_uri(uri, index))
        try:
            _parse_raw_stats(data)
        except ValueError as e:  # a store error is raised: it says nothing about the shard
            log.warning("%s does not read (%s)", raw_stats_uri(uri, index), e)
            return None
        return _raw_identity(files[shard_name(index)].size, data)

    with ThreadPoolExecutor(32) as pool:
        out = {i: d for i, d in zip(found, pool.map(identity, found), strict=True) if d is not None}
    if len(out) < len(found):
        left = sorted(set(found) - set(out))
        log.warning(
            "%d raw shards under %s have a stats file that does not read (being written, or cut "
            "short): left out as not complete until the download redoes them: %s",
            len(left),
            uri,
            left[:20],
        )
    return out


def raw_tar_uri(uri: str, index: int) -> str:
    return storage.join(uri, shard_name(index))


def raw_stats_uri(uri: str, index: int) -> str:
    return storage.join(uri, f"{index:05d}{RAW_STATS_SUFFIX}")


def raw_shard_identity(uri: str, index: int) -> str:
    """Which download of raw shard ``index`` under ``uri`` is there: a digest of its
    ``_stats.json``'s bytes and its tar's size. img2dataset writes the download's start and end
    times into the stats, so a shard downloaded again (overwrite=true, or redone for stats that
    did not read) gets another identity, while the same files read again, or copied to another
    store, keep theirs (no ETag or modification time in it). Cheap: one small read and one stat
    (:func:`raw_shard_identities` has every complete shard's from one listing)."""
    stats = storage.read_bytes(raw_stats_uri(uri, index))
    return _raw_identity(storage.size(raw_tar_uri(uri, index)), stats)


def _raw_identity(tar_size: int, stats: bytes) -> str:
    return hashlib.sha256(f"{tar_size}\n".encode() + stats).hexdigest()[:20]


class StoreReadError(Exception):
    """Reading a shard's bytes from the store failed (the error is its ``__cause__``): unlike a
    tar that breaks off, it says nothing about the shard, so the shard is not done."""


class _TaggedReads:
    """A binary stream whose read errors come out as :class:`StoreReadError`, so that they are
    told apart from what the tar parser raises about the bytes that did arrive."""

    def __init__(self, f: Any):
        self._f = f

    def read(self, *args: Any) -> bytes:
        try:
            return self._f.read(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised, tagged
            raise StoreReadError(f"{type(exc).__name__}: {exc}") from exc


def iter_raw_tar(tar_uri: str, stats: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The raw samples (bytes per member) of one raw tar, recording damage in ``stats``.

    A tar that is not a tar, or breaks off mid-member, ends early: the samples read intact
    before the damage are yielded, ``stats["corrupt_tar"]`` is set to 1 with the error in
    ``stats["tar_error"]``, and ``stats["raw_samples"]`` counts what was read. An error of the
    store itself is raised (and ``raw_samples`` left unset): opening the tar (a refused or
    vanished object, expired credentials) or reading its bytes (:class:`StoreReadError`,
    re-raised as whatever the store raised), so that no storage failure passes for a short tar.
    """
    n = 0
    # opened outside the classification below: nothing of the tar has been read yet, so any
    # error here is the store's (s3fs raises OSError(EIO) for an unknown S3 error code, and
    # OSError(EINVAL) for an expired token), never damage that would mark the shard done empty
    f = storage.open_read(tar_uri)
    try:
        with f:
            for sample in iter_tar_samples(_TaggedReads(f)):
                n += 1
                yield sample
    except Exception as exc:  # noqa: BLE001 - classified: the store's errors raised, damage counted
        if isinstance(exc, StoreReadError):
            raise exc.__cause__ from exc  # as the store raised it: retryable or not, not damage
        if storage.is_retryable(exc):
            raise
        # access denied, expired credentials, an archived or vanished object: the shard is not
        # damaged, the store refused it (s3fs raises PermissionError / FileNotFoundError), and
        # counting that as a short shard would mark it done with its samples lost
        if isinstance(exc, (PermissionError, FileNotFoundError)):
            raise
        if not isinstance(exc, (tarfile.TarError, EOFError, OSError, ValueError)):
            raise
        stats["corrupt_tar"] = 1
        stats["tar_error"] = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("raw shard %s is damaged after %d samples: %s", tar_uri, n, exc)
    stats["raw_samples"] = n


def iter_raw_shard(uri: str, index: int, stats: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The raw samples of raw shard ``index`` under ``uri`` (:func:`iter_raw_tar`: damage
    counted in ``stats``, store errors raised, so the executor retries the shard and does not
    mark it done). When img2dataset's stats say more images were written than the tar holds,
    ``stats["missing_from_tar"]`` counts the difference.
    """
    tar_uri = raw_tar_uri(uri, index)
    yield from iter_raw_tar(tar_uri, stats)
    n = stats["raw_samples"]
    try:
        expected = int(storage.read_json(raw_stats_uri(uri, index)).get("successes", n))
    except (ValueError, TypeError, FileNotFoundError):
        expected = n
    if expected > n:
        stats["missing_from_tar"] = expected - n
        log.warning("raw shard %s: stats say %d images, the tar holds %d", tar_uri, expected, n)
