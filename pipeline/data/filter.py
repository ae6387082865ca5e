"""The score stage: basic filters plus the CLIP aesthetic score, one parquet per raw shard.

For every sample of raw shard ``i`` the output ``{i:05d}.parquet`` holds a row: key, url, the
metadata the filters read, the aesthetic score, ``keep`` and, for a drop, ``reason`` (the first
filter that failed, e.g. ``too_small``, ``punsafe_missing``, ``undecodable_image``). The parquet is
written atomically and is its own done marker, so a rerun skips finished shards. Its key-value
metadata holds the shard's stats (``SHARD_STATS_KEY``): what the reader found wrong with the raw
tar (``corrupt_tar``, ``tar_error``, ``missing_from_tar``) and what was mended on the way
(``caption_not_utf8``, ``converted_16bit``, ``converted_transparent``); ``score_summary.json``
sums them over the shards. It also records which download of the raw shard it scored
(``RAW_SHARD_KEY``, :func:`pipeline.data.shards.raw_shard_identity`): a raw shard downloaded
again into the same folder since is scored again by a rerun (``rescored_changed``), and
pretokenize does not take the old parquet's decisions for it. A parquet written before that was
recorded is taken as made from the raw shard there now, as it was then.

An output folder holds the results of one setting: a rerun with other filters, another
aesthetic model or other weights at the same URI is refused while scored parquets are there
(``score_config.yaml`` and ``score_inputs.json`` say what made them).

Basic filters run on the sample's json (img2dataset's columns plus the carried metadata); only
the survivors are decoded and scored. Missing or NaN metadata fails its filter with a reason of
its own (``<field>_missing`` / ``<field>_nan``) unless ``missing: keep``. Stage-2 selection is a
threshold on the aesthetic score (``min_aesthetic``, here or at pretokenize time).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import json
import math
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cluster_paths import check_paths_for_ray_job
from pipeline.config import doc
from pipeline.data import shards
from pipeline.data.raw import decode_rgb
from pipeline.executor import (
    ExecutorConfig,
    check_gpu_devices,
    prefetch,
    run_units,
)
from pipeline.log import get_logger
from pipeline.models.aesthetic import AestheticConfig

log = get_logger(__name__)

SCORE_CONFIG_NAME = "score_config.yaml"
SCORE_INPUTS_NAME = "score_inputs.json"
SUMMARY_NAME = "score_summary.json"
SHARD_STATS_KEY = b"t2i.score_stats"  # the parquet's key-value metadata: the shard's stats (json)
RAW_SHARD_KEY = b"t2i.raw_shard"  # ... and the identity of the raw shard it scored
# What decides a score parquet's rows: a folder must not mix two settings of them (the device,
# batch size and cache of the aesthetic model do not).
_CONTENT_FIELDS = ("input", "filters", "aesthetic")
_NOT_CONTENT = ("aesthetic.batch_size", "aesthetic.device", "aesthetic.cache_dir")
_WEIGHTS = {
    "clip_weights": "aesthetic.clip_weights",
    "head_weights": "aesthetic.head_weights",
    "clip_model_config": "aesthetic.clip_model_config",
}


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the basic filters (null turns one off) and the aesthetic selection."""

    min_image_size: int | None = doc("Smallest allowed shorter side of the original image", 256)
    max_aspect_ratio: float | None = doc("Largest allowed long side / short side", 2.0)
    min_caption_chars: int | None = doc("Shortest allowed caption (characters, stripped)", 5)
    max_caption_chars: int | None = doc("Longest allowed caption (characters, stripped)", 1000)
    max_punsafe: float | None = doc("Keep only punsafe < this", 0.5)
    max_pwatermark: float | None = doc("Keep only pwatermark < this", 0.8)
    min_similarity: float | None = doc(
        "Keep only CLIP image-text similarity >= this. LAION-COCO's similarity column scores "
        "the image against its original alt-text (TEXT), not the BLIP caption (top_caption)",
        0.28,
    )
    min_aesthetic: float | None = doc("Keep only aesthetic score >= this (stage-2 selection)", None)
    missing: Literal["drop", "keep"] = doc(
        "What a filter does with a missing/NaN value: drop (reason <field>_missing/_nan) or keep",
        "drop",
    )
    punsafe_field: str = doc("json field holding the NSFW probability", "punsafe")
    pwatermark_field: str = doc("json field holding the watermark probability", "pwatermark")
    similarity_field: str = doc("json field holding the image-text similarity", "similarity")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """The score stage: raw shards in, one score parquet per shard out."""

    input: str = doc("Raw shards (img2dataset output): local dir or s3:// URI")
    output: str = doc("Where the score parquets go: local dir or s3:// URI")
    filters: FilterConfig = doc("Basic filter thresholds", default_factory=FilterConfig)
    aesthetic: AestheticConfig | None = doc(
        "CLIP + aesthetic head; null: no aesthetic score (column left NaN)", None
    )
    decode_threads: int = doc("Threads decoding images while the model runs", 2)
    max_shards: int | None = doc("Score only the first N complete raw shards (null: all)", None)
    executor: ExecutorConfig = doc("Ray settings", default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        # caught here, not as a failure of every shard on every worker after the model loads
        sizes = [("decode_threads", self.decode_threads)]
        if self.max_shards is not None:  # 0 read as "no complete raw shards", -1 as all but one
            sizes.append(("max_shards", self.max_shards))
        if self.aesthetic is not None:
            sizes.append(("aesthetic.batch_size", self.aesthetic.batch_size))
        for name, value in sizes:
            if value < 1:
                raise ValueError(f"{name} is {value}: it must be at least 1")
        if self.aesthetic is None and self.filters.min_aesthetic is not None:
            raise ValueError("filters.min_aesthetic needs an aesthetic model (aesthetic: ...)")
        check_gpu_devices(
            self.executor,
            {"aesthetic.device": self.aesthetic.device} if self.aesthetic is not None else {},
        )


# --- basic filters ----------------------------------------------------------------------------


def _number(meta: Mapping[str, Any], field: str) -> tuple[float | None, str | None]:
    """(value, problem) where problem is ``<field>_missing`` / ``_nan`` / ``_invalid``."""
    v = meta.get(field)
    if v is None:
        return None, f"{field}_missing"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None, f"{field}_invalid"
    if math.isnan(x):
        return None, f"{field}_nan"
    return x, None


def _size(meta: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """The original image size from img2dataset's json (the size before its resize)."""
    w = meta.get("original_width", meta.get("width"))
    h = meta.get("original_height", meta.get("height"))
    try:
        w, h = float(w), float(h)
    except (TypeError, ValueError):
        return None, None
    if math.isnan(w) or math.isnan(h) or w <= 0 or h <= 0:
        return None, None
    return w, h


def filter_reason(meta: Mapping[str, Any], caption: str | None, cfg: FilterConfig) -> str | None:
    """The first basic filter ``(meta, caption)`` fails, or None when it passes them all."""
    keep_missing = cfg.missing == "keep"
    text = (caption or "").strip()
    if not text:
        return "empty_caption"
    if cfg.min_caption_chars is not None and len(text) < cfg.min_caption_chars:
        return "caption_too_short"
    if cfg.max_caption_chars is not None and len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    if cfg.min_image_size is not None or cfg.max_aspect_ratio is not None:
        w, h = _size(meta)
        if w is None or h is None:
            if not keep_missing:
                return "size_missing"
        else:
            if cfg.min_image_size is not None and min(w, h) < cfg.min_image_size:
                return "too_small"
            if cfg.max_aspect_ratio is not None and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
                return "aspect_ratio_too_large"
    checks = (
        (cfg.punsafe_field, cfg.max_punsafe, lambda x, t: x < t, "unsafe"),
        (cfg.pwatermark_field, cfg.max_pwatermark, lambda x, t: x < t, "watermark"),
        (cfg.similarity_field, cfg.min_similarity, lambda x, t: x >= t, "low_similarity"),
    )
    for field, threshold, ok, reason in checks:
        if threshold is None:
            continue
        x, problem = _number(meta, field)
        if problem is not None:
            if keep_missing:
                continue
            return problem
        if not ok(x, threshold):
            return reason
    return None


def aesthetic_reason(score: float, min_aesthetic: float | None) -> str | None:
    """``aesthetic_nan`` / ``low_aesthetic`` against ``min_aesthetic`` (None: no selection)."""
    if min_aesthetic is None:
        return None
    if score is None or math.isnan(score):
        return "aesthetic_nan"
    return None if score >= min_aesthetic else "low_aesthetic"


# --- raw samples --------------------------------------------------------------------------------


def sample_meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's json (``{}`` when missing or not a JSON object)."""
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


_SURROGATE = re.compile("[\ud800-\udfff]")


def sample_caption(sample: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[str, str | None]:
    """(caption, problem): the ``txt`` member, else the json's ``caption``, stripped.

    Bytes that are not UTF-8, and lone surrogates (which a json string may hold, and which no
    encoder takes: T5's tokenizer and the token shard's utf-8 would raise), are replaced with
    U+FFFD; ``problem`` is then ``caption_not_utf8``, for the caller to count."""
    raw = sample.get("txt")
    if raw is not None:
        try:
            return raw.decode("utf-8").strip(), None
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace").strip(), "caption_not_utf8"
    text = str(meta.get("caption") or "")
    clean = storable_text(text)
    return clean.strip(), None if clean == text else "caption_not_utf8"


def storable_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD: what utf-8 (and parquet) can hold."""
    return _SURROGATE.sub("\ufffd", text)


# --- the score worker -----------------------------------------------------------------------------


def score_uri(out: str, index: int) -> str:
    return storage.join(out, f"{index:05d}.parquet")


class ScoreWorker:
    """Loads the aesthetic model once; ``worker(index)`` scores raw shard ``index``."""

    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg
        self.scorer = None
        if cfg.aesthetic is not None:
            from pipeline.models.aesthetic import AestheticScorer

            self.scorer = AestheticScorer.from_config(cfg.aesthetic)

    def __call__(self, index: int) -> dict[str, Any]:
        cfg, f = self.cfg, self.cfg.filters
        # taken before the tar is read: a shard replaced meanwhile is recorded as the older
        # download, and scored again by the next run
        raw_identity = shards.raw_shard_identity(cfg.input, index)
        stats: dict[str, Any] = {"unit": index}
        mended: collections.Counter[str] = collections.Counter()  # kept, but changed on the way
        rows: list[dict[str, Any]] = []
        to_score: list[tuple[int, Mapping[str, Any]]] = []  # (row, raw sample) passing filters
        seen: set[str] = set()
        for sample in shards.iter_raw_shard(cfg.input, index, stats):
            key = str(sample["__key__"])
            meta = sample_meta(sample)
            caption, caption_problem = sample_caption(sample, meta)
            if caption_problem is not None:
                mended[caption_problem] += 1
            w, h = _size(meta)
            row = {
                # a tar member name that was not utf-8 comes with surrogates (pretokenize drops
                # its sample as bad_key); so may a json url
                "key": storable_text(key),
                "url": storable_text(str(meta.get("url") or "")),
                "caption_chars": len(caption),
                "width": w,
                "height": h,
                "punsafe": _number(meta, f.punsafe_field)[0],
                "pwatermark": _number(meta, f.pwatermark_field)[0],
                "similarity": _number(meta, f.similarity_field)[0],
                "aesthetic": float("nan"),
                "keep": False,
                "reason": "duplicate_key" if key in seen else filter_reason(meta, caption, f),
            }
            seen.add(key)
            rows.append(row)
            if row["reason"] is None:
                to_score.append((len(rows) - 1, sample))
        self._score(rows, to_score, mended)
        for row in rows:
            if row["reason"] is None:
                row["reason"] = aesthetic_reason(row["aesthetic"], f.min_aesthetic)
            row["keep"] = row["reason"] is None
            row["reason"] = row["reason"] or ""
        reasons = collections.Counter(r["reason"] for r in rows if not r["keep"])
        stats.update(mended, samples=len(rows), kept=sum(r["keep"] for r in rows))
        stats["dropped"] = dict(sorted(reasons.items()))
        # the stats travel inside the parquet: written with it, atomically, or not at all
        storage.write_bytes(score_uri(cfg.output, index), _to_parquet(rows, stats, raw_identity))
        return stats

    def _score(
        self,
        rows: list[dict[str, Any]],
        to_score: list[tuple[int, Any]],
        mended: collections.Counter[str],
    ) -> None:
        """Decode the survivors (in threads, a chunk ahead) and score them in model batches;
        images converted on the way are counted in ``mended``."""
        batch = self.cfg.aesthetic.batch_size if self.cfg.aesthetic else 64
        chunks = [to_score[i : i + batch] for i in range(0, len(to_score), batch)]
        with ThreadPoolExecutor(self.cfg.decode_threads) as pool:

            def decode(chunk):
                return chunk, list(pool.map(lambda rs: decode_rgb(rs[1]), chunk))

            for chunk, decoded in prefetch(map(decode, chunks), depth=2):
                good = []
                for (r, _), (img, problem, conversions) in zip(chunk, decoded):
                    mended.update(conversions)
                    if problem is not None:
                        rows[r]["reason"] = problem
                    else:
                        good.append((r, img))
                if self.scorer is None or not good:
                    continue
                scores = self.scorer.score([img for _, img in good])
                for (r, _), s in zip(good, scores):
                    rows[r]["aesthetic"] = float(s)
                # decoded, but CLIP's preprocessing failed: no score (NaN), counted here; a
                # min_aesthetic drops it as aesthetic_nan, without one it is kept unscored
                mended["aesthetic_unscored"] += int(np.isnan(scores).sum())


_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption_chars", pa.int32()),
        ("width", pa.float32()),
        ("height", pa.float32()),
        ("punsafe", pa.float32()),
        ("pwatermark", pa.float32()),
        ("similarity", pa.float32()),
        ("aesthetic", pa.float32()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),
    ]
)


def _to_parquet(rows: list[dict[str, Any]], stats: Mapping[str, Any], raw_identity: str) -> bytes:
    cols = {name: [r[name] for r in rows] for name in _SCHEMA.names}
    meta = {
        SHARD_STATS_KEY: json.dumps(dict(stats), sort_keys=True, default=str).encode(),
        RAW_SHARD_KEY: raw_identity.encode(),
    }
    table = pa.table(cols, schema=_SCHEMA.with_metadata(meta))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def scored_indices(out: str) -> set[int]:
    """Shards with a score parquet under ``out`` (one listing; the parquet is the done marker)."""
    names = storage.list_dir(out, suffix=".parquet")
    return {int(n[: -len(".parquet")]) for n in names if n[: -len(".parquet")].isdigit()}


def read_raw_identity(out: str, index: int) -> str | None:
    """The raw shard identity score parquet ``index`` under ``out`` recorded (None for one
    written before it was): the footer alone (as metadata._extra_types reads its inputs'), not
    the whole parquet, since every run start asks it of every scored shard."""
    with storage.open_read(score_uri(out, index)) as f:
        meta = pq.read_schema(f).metadata or {}
    raw = meta.get(RAW_SHARD_KEY)
    return raw.decode() if raw else None


def replaced_raw_shards(raw: str, out: str, indices: list[int]) -> list[int]:
    """Those of ``indices`` (shards with a score parquet under ``out``) whose raw shard under
    ``raw`` is another download than the one their parquet scored: the parquet's rows are
    the old download's. A parquet without a recorded identity is not counted (nothing to tell
    by). One parquet read and one raw shard identity per shard, 32 at a time (tens of thousands
    of shards at LAION scale)."""

    def replaced(i: int) -> bool:
        recorded = read_raw_identity(out, i)
        return recorded is not None and recorded != shards.raw_shard_identity(raw, i)

    with ThreadPoolExecutor(32) as pool:
        return [i for i, r in zip(indices, pool.map(replaced, indices), strict=True) if r]


def read_scores(out: str, index: int) -> dict[str, dict[str, Any]]:
    """Score rows of shard ``index`` by key: ``{"keep", "reason", "aesthetic", ...}``.

    A key the shard holds twice has two rows, the second marked ``duplicate_key``: the first
    row is the one for that key (it scored the first copy, which is the one kept)."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(score_uri(out, index))))
    rows: dict[str, dict[str, Any]] = {}
    for r in table.to_pylist():
        rows.setdefault(r["key"], r)
    return rows


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every complete raw shard not scored yet; returns (and writes) the summary."""
    check_paths_for_ray_job({"input": cfg.input, "output": cfg.output})
    indices = shards.raw_shard_indices(cfg.input)
    if cfg.max_shards is not None:
        indices = indices[: cfg.max_shards]
    if not indices:
        raise FileNotFoundError(f"no complete raw shards (with _stats.json) under {cfg.input}")
    shards.claim_output(
        cfg.output,
        cfg,
        SCORE_CONFIG_NAME,
        SCORE_INPUTS_NAME,
        _CONTENT_FIELDS,
        _WEIGHTS,
        has_results=lambda: bool(scored_indices(cfg.output)),
        ignore=_NOT_CONTENT,
    )
    scored = scored_indices(cfg.output)
    # a parquet is done only for the download of its raw shard that it scored
    changed = set(replaced_raw_shards(cfg.input, cfg.output, [i for i in indices if i in scored]))
    if changed:
        log.warning(
            "score: %d raw shards were downloaded again after they were scored; scored again "
            "(their parquets overwritten): %s",
            len(changed),
            sorted(changed)[:20],
        )
    report = run_units(
        indices,
        _ScoreFactory(cfg),
        cfg.executor,
        is_done=lambda i: i in scored and i not in changed,
        desc="score",
        # the parquet is the done marker: one the driver does not see would be summed as none
        done_marker=lambda i: score_uri(cfg.output, i),
    )
    # a replaced shard whose scoring failed still has the old download's parquet: not summed
    stale = changed & set(report.failed)
    summary = summarize_scores(cfg.output, [i for i in indices if i not in stale])
    summary["failed_shards"] = {str(k): v for k, v in sorted(report.failed.items())}
    summary["skipped_done"] = len(report.skipped)
    summary["rescored_changed"] = len(changed)
    storage.write_json(storage.join(cfg.output, SUMMARY_NAME), summary)
    log.info(
        "score: %d/%d samples kept over %d shards; drops %s",
        summary["kept"],
        summary["samples"],
        summary["shards"],
        summary["dropped"],
    )
    if summary["damaged_shards"]:
        log.warning(
            "score: %d raw tars are damaged (scored up to the damage): %s",
            len(summary["damaged_shards"]),
            dict(list(summary["damaged_shards"].items())[:5]),
        )
    return summary


def read_shard_stats(table: pa.Table) -> dict[str, Any] | None:
    """The shard stats a score parquet carries (None for one written before they were kept)."""
    raw = (table.schema.metadata or {}).get(SHARD_STATS_KEY)
    return json.loads(raw) if raw else None


def _add_shard(
    i: int,
    table: pa.Table,
    totals: collections.Counter[str],
    sums: collections.Counter[str],
    damaged: dict[str, str],
    dropped: collections.Counter[str],
    aesthetic: list[np.ndarray],
) -> None:
    """Add score parquet ``i``'s rows, shard stats, drops and scores to the running totals."""
    keep = table["keep"].to_numpy(zero_copy_only=False)
    totals.update(shards=1, samples=len(keep), kept=int(keep.sum()))
    stats = read_shard_stats(table)
    if stats is None:
        totals["without_stats"] += 1
    else:
        sums.update(
            {
                k: v
                for k, v in stats.items()
                if isinstance(v, (int, float))
                and not isinstance(v, bool)
                and k not in ("unit", "samples", "kept")  # counted from the rows
            }
        )
        if stats.get("corrupt_tar"):
            damaged[str(i)] = str(stats.get("tar_error", ""))
    dropped.update(r for r, k in zip(table["reason"].to_pylist(), keep) if not k)
    a = table["aesthetic"].to_numpy(zero_copy_only=False)
    aesthetic.append(a[~np.isnan(a)])


def summarize_scores(out: str, indices: list[int]) -> dict[str, Any]:
    """Counts over the finished score parquets among ``indices``, with their shard stats summed
    (``stats_sum``: damage such as ``corrupt_tar`` and ``missing_from_tar``, mended captions and
    images) and each damaged tar's error (``damaged_shards``)."""
    dropped: collections.Counter[str] = collections.Counter()
    sums: collections.Counter[str] = collections.Counter()
    damaged: dict[str, str] = {}
    totals: collections.Counter[str] = collections.Counter()
    aesthetic: list[np.ndarray] = []
    scored = scored_indices(out)
    todo = [i for i in indices if i in scored]

    def read(i: int) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(score_uri(out, i))))

    # tens of thousands of parquets at LAION scale: read 16 at a time (256 held at most),
    # summed in shard order
    with ThreadPoolExecutor(16) as pool:
        for start in range(0, len(todo), 256):
            part = todo[start : start + 256]
            for i, table in zip(part, pool.map(read, part), strict=True):
                _add_shard(i, table, totals, sums, damaged, dropped, aesthetic)
    scores = np.concatenate(aesthetic) if aesthetic else np.zeros(0)
    return {
        "shards": totals["shards"],
        "samples": totals["samples"],
        "kept": totals["kept"],
        "dropped": dict(sorted(dropped.items())),
        "stats_sum": dict(sorted(sums.items())),
        "damaged_shards": damaged,
        # parquets written before their stats were kept: stats_sum leaves them out
        "shards_without_stats": totals["without_stats"],
        "aesthetic_mean": float(scores.mean()) if scores.size else None,
        "aesthetic_quantiles": (
            {str(q): float(np.quantile(scores, q)) for q in (0.1, 0.5, 0.9)} if scores.size else {}
        ),
    }


@dataclasses.dataclass(frozen=True)
class _ScoreFactory:
    """Picklable ``make_worker`` for the executor (the actor builds the worker)."""

    cfg: ScoreConfig

    def __call__(self) -> ScoreWorker:
        return ScoreWorker(self.cfg)


def score_settings(saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of a saved score config (its YAML as a dict) decides the parquets' rows: the content
    fields (raw input, filters, aesthetic model), not the device or batch size. None for None."""
    if saved is None:
        return None
    out = {f: copy.deepcopy(saved.get(f)) for f in _CONTENT_FIELDS}
    for dotted in _NOT_CONTENT:
        *parents, last = dotted.split(".")
        section: Any = out
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(last, None)
    return out
