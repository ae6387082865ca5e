"""Stage 2's metadata from stage 1's results: the high-aesthetic subset's URLs and captions.

LlamaGen's stage 2 trains on ~10M high-aesthetic images at 512 px. Stage 1 has downloaded and
scored its images already: each score parquet holds a sample's key, url, ``keep``, aesthetic
score and original size, and the raw shard's own parquet (img2dataset's ``NNNNN.parquet``) its
caption and the original metadata's extra columns. This stage joins the two by key and writes the
selected rows as metadata parquet for the download stage (``configs/data/download_hq.yaml``), so
stage 2 downloads only the images it trains on, at 512 px, not the whole stage-1 set again.

A row is selected when its score row has ``keep`` true, an aesthetic score >= ``min_aesthetic``
(5.0, as ``configs/data/pretokenize_stage2.yaml`` selects) and an original image whose shorter
side is >= ``min_original_size`` (512: stage 2's resolution; the size img2dataset recorded as
``original_width`` / ``original_height`` before its resize, which the score parquet keeps as
``width`` / ``height``), and its raw parquet row has the same url and a caption. Every row left
out is counted by reason: ``not_kept`` (the score stage dropped it), ``size_missing``,
``too_small``, ``aesthetic_nan``, ``low_aesthetic``, ``not_in_raw_parquet``,
``score_of_another_image`` (the urls differ), ``empty_caption``.

Shards are read in index order, ``threads`` at a time. Only complete raw shards with a score
parquet are read; raw shards without one (``unscored``), score parquets of an earlier download of
their raw shard (``stale_scores``: their keys may name other images now), score parquets without
a complete raw shard and raw shards without their parquet are skipped and counted.

Output (``output``): ``part-00000.parquet``, ``part-00001.parquet``, ... of ``rows_per_part``
rows each, with the URL and caption columns named as the download's ``metadata`` section reads
them (``url_column``, ``caption_column``) and then ``extra_columns``; ``_select_hq_config.yaml``;
and ``_select_hq_summary.json`` (counts, the parts with their sha256), written last: a folder
without it is not complete. The download's metadata reader skips names starting with ``_`` and
refuses a folder holding the config (written before any part) without the summary, or parts
other than the summary lists.

Reruns: the same inputs and settings give the same files, byte for byte, and a rerun that finds
them in place writes no part again. The parts are made in a local scratch folder and uploaded only
when all are made; a folder left without its summary by a killed run is replaced whole (parts of
another count removed). A complete selection made with other settings is refused (use a new
folder), and so is a folder holding parquet files this stage did not write (the download would
read them too). A complete selection of the same settings whose inputs changed since (more
shards scored) is replaced; a download already made from the old one refuses the new one (its
metadata fingerprint changed): download it into a new folder.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline import scratch, storage
from pipeline.cluster_paths import check_paths_for_ray_job
from pipeline.config import ConfigError, doc, save_config
from pipeline.data import shards
from pipeline.data.filter import RAW_SHARD_KEY, SCORE_CONFIG_NAME, score_uri, scored_indices
from pipeline.data.metadata import SELECTION_CONFIG_NAME as CONFIG_NAME
from pipeline.data.metadata import SELECTION_SUMMARY_NAME as SUMMARY_NAME
from pipeline.data.metadata import MetadataConfig
from pipeline.log import get_logger, progress

log = get_logger(__name__)

_PART = re.compile(r"part-\d{5}\.parquet")
# what decides the parts' content: a complete selection made with other values is refused
_CONTENT_FIELDS = (
    "input",
    "scores",
    "min_aesthetic",
    "min_original_size",
    "url_column",
    "caption_column",
    "extra_columns",
    "rows_per_part",
)
_URI_FIELDS = ("input", "scores")
_SCORE_COLUMNS = ["key", "url", "width", "height", "aesthetic", "keep"]
_RAW_COLUMNS = ("key", "url", "caption")  # img2dataset's, in every raw shard parquet


@dataclasses.dataclass(frozen=True)
class SelectHQConfig:
    """Stage 1's raw shards and score parquets in, stage 2's metadata parquet out."""

    input: str = doc("Stage 1's raw shards (img2dataset output), local dir or s3:// URI")
    scores: str = doc("Stage 1's score parquets (the score stage's output for input)")
    output: str = doc("Where stage 2's metadata parquet goes (the download's input)")
    min_aesthetic: float = doc(
        "Select aesthetic >= this (configs/data/pretokenize_stage2.yaml's min_aesthetic)", 5.0
    )
    min_original_size: int | None = doc(
        "Select images whose original shorter side is >= this (pixels; stage 2 trains at 512); "
        "null: any size",
        512,
    )
    url_column: str = doc(
        "Name of the URL column written (the download's metadata.url_column)", "URL"
    )
    caption_column: str = doc(
        "Name of the caption column written (the download's metadata.caption_column)",
        "top_caption",
    )
    extra_columns: list[str] = doc(
        "Columns of the raw shards' parquet carried over (the original metadata's extras, the "
        "download's metadata.extra_columns); one a raw parquet lacks is written as nulls",
        ["similarity", "punsafe", "pwatermark", "WIDTH", "HEIGHT", "hash"],
    )
    rows_per_part: int = doc("Rows per output parquet file (bounds memory)", 1_000_000)
    threads: int = doc("Shards read at a time", 32)
    report_thresholds: list[float] = doc(
        "Aesthetic thresholds the summary counts the kept, large-enough rows at",
        [4.5, 5.0, 5.5, 6.0, 6.5],
    )
    tmp_dir: str | None = doc("Local scratch folder for the parts; default: the system's", None)
    allow_partial: bool = doc(
        "Select from the scored shards when some raw shards have no (current) score parquet "
        "yet; false: refuse (a download made from a partial selection cannot be extended by "
        "the full one later: that needs a new folder)",
        False,
    )

    def __post_init__(self) -> None:
        for name in ("rows_per_part", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}: it must be at least 1")
        if self.min_original_size is not None and self.min_original_size < 1:
            raise ValueError(f"min_original_size is {self.min_original_size}: at least 1, or null")
        names = [self.url_column, self.caption_column, *self.extra_columns]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"column {twice[0]!r} is named twice (url, caption or extra columns)")
        # the download's own checks on these names (reserved img2dataset fields, duplicates)
        MetadataConfig(
            url_column=self.url_column,
            caption_column=self.caption_column,
            extra_columns=list(self.extra_columns),
        )


@dataclasses.dataclass
class _Shard:
    """What one shard gave: its selected rows (None when skipped), drops and threshold counts."""

    index: int
    rows: pa.Table | None
    status: str  # "read", "stale_scores", "raw_parquet_missing"
    rows_read: int = 0
    dropped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    at_aesthetic: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


def _keep_where(table: pa.Table, ok: Any, reason: str, dropped: collections.Counter) -> pa.Table:
    """``table``'s rows where ``ok`` is true (null: false); the others counted as ``reason``."""
    kept = table.filter(pc.fill_null(ok, False))
    if kept.num_rows < table.num_rows:
        dropped[reason] += table.num_rows - kept.num_rows
    return kept


def raw_parquet_uri(raw: str, index: int) -> str:
    """img2dataset's parquet of raw shard ``index``: every row of its unit, with its caption."""
    return storage.join(raw, f"{index:05d}.parquet")


def select_shard(cfg: SelectHQConfig, index: int) -> _Shard:
    """The selected rows of shard ``index``, as the output's columns, with the drops counted."""
    data = storage.read_bytes(score_uri(cfg.scores, index))
    scores = pq.read_table(io.BytesIO(data), columns=_SCORE_COLUMNS)
    recorded = (scores.schema.metadata or {}).get(RAW_SHARD_KEY)
    if recorded and recorded.decode() != shards.raw_shard_identity(cfg.input, index):
        return _Shard(index, None, "stale_scores")
    out = _Shard(index, None, "read", rows_read=scores.num_rows)
    t = _keep_where(scores, scores["keep"], "not_kept", out.dropped)
    if cfg.min_original_size is not None:
        known = pc.and_(pc.is_finite(t["width"]), pc.is_finite(t["height"]))
        t = _keep_where(t, known, "size_missing", out.dropped)
        short = pc.min_element_wise(t["width"], t["height"])
        t = _keep_where(t, pc.greater_equal(short, cfg.min_original_size), "too_small", out.dropped)
    for threshold in cfg.report_thresholds:
        n = pc.sum(pc.fill_null(pc.greater_equal(t["aesthetic"], threshold), False)).as_py()
        out.at_aesthetic[f"{threshold:g}"] += n or 0
    t = _keep_where(t, pc.is_finite(t["aesthetic"]), "aesthetic_nan", out.dropped)
    high = pc.greater_equal(t["aesthetic"], cfg.min_aesthetic)
    t = _keep_where(t, high, "low_aesthetic", out.dropped)
    if t.num_rows == 0:
        return out
    try:
        raw = _read_raw_parquet(cfg, index)
    except FileNotFoundError:
        out.dropped["raw_parquet_missing"] += t.num_rows
        out.status = "raw_parquet_missing"
        return out
    # index_in keeps the score parquet's order, and takes a key's first raw row
    where = pc.index_in(t["key"], value_set=raw["key"])
    t = t.append_column("_raw", where)
    t = _keep_where(t, pc.is_valid(where), "not_in_raw_parquet", out.dropped)
    rows = raw.take(t["_raw"])
    # a key is a place in the shard: a raw folder downloaded again from other metadata names
    # other images with the same keys (the score parquets of older raw shards record no identity)
    same = pc.or_(pc.equal(t["url"], rows["url"]), pc.equal(pc.fill_null(t["url"], ""), ""))
    rows = _keep_where(rows, same, "score_of_another_image", out.dropped)
    text = pc.utf8_trim_whitespace(pc.fill_null(rows["caption"], ""))
    rows = _keep_where(rows, pc.not_equal(text, ""), "empty_caption", out.dropped)
    out.rows = _output_table(cfg, rows)
    return out


def _read_raw_parquet(cfg: SelectHQConfig, index: int) -> pa.Table:
    uri = raw_parquet_uri(cfg.input, index)
    data = io.BytesIO(storage.read_bytes(uri))
    names = pq.read_schema(data).names
    missing = [c for c in _RAW_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{uri} has no {missing[0]!r} column (columns: {', '.join(names)}): not the parquet "
            "img2dataset writes beside a raw shard downloaded with a caption column"
        )
    wanted = [*_RAW_COLUMNS, *(c for c in cfg.extra_columns if c in names)]
    return pq.read_table(data, columns=wanted)


def _output_table(cfg: SelectHQConfig, rows: pa.Table) -> pa.Table:
    """The metadata columns the download reads: url, caption, then the extra columns (nulls
    where the raw parquet has none)."""
    cols = {cfg.url_column: rows["url"], cfg.caption_column: rows["caption"]}
    for c in cfg.extra_columns:
        cols[c] = rows[c] if c in rows.column_names else pa.nulls(rows.num_rows)
    return pa.table(cols)


def _select_all(cfg: SelectHQConfig, indices: list[int]) -> Iterator[_Shard]:
    """:func:`select_shard` of each index, in order, ``threads`` at a time (tens of thousands
    of shards at LAION scale; at most 4 x ``threads`` results held)."""
    with ThreadPoolExecutor(cfg.threads) as pool:
        window: collections.deque = collections.deque()
        todo = iter(indices)
        for i in todo:
            window.append(pool.submit(select_shard, cfg, i))
            if len(window) >= 4 * cfg.threads:
                break
        while window:
            result = window.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                window.append(pool.submit(select_shard, cfg, nxt))
            yield result


class _PartWriter:
    """Cuts the selected rows into local parts of ``rows_per_part`` rows, in arrival order."""

    def __init__(self, folder: str, rows_per_part: int) -> None:
        self.folder, self.rows_per_part = folder, rows_per_part
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buffer.append(table)
            self.buffered += table.num_rows
        while self.buffered >= self.rows_per_part:
            self._flush(self.rows_per_part)

    def close(self) -> list[dict[str, Any]]:
        if self.buffered:
            self._flush(self.buffered)
        return self.parts

    def _flush(self, n: int) -> None:
        try:
            # a column all null in some shards (an extra a raw parquet lacks) takes the type the
            # others give it
            table = pa.concat_tables(self.buffer, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise TypeError(f"the raw parquets type a carried column differently: {e}") from e
        head, rest = table.slice(0, n), table.slice(n)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        name = f"part-{len(self.parts):05d}.parquet"
        path = os.path.join(self.folder, name)
        pq.write_table(head.combine_chunks(), path)  # bytes decided by the rows alone
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.parts.append(
            {"name": name, "rows": n, "bytes": os.path.getsize(path), "sha256": digest}
        )


# --- the stage ----------------------------------------------------------------------------------


def _settings(cfg: SelectHQConfig) -> dict[str, Any]:
    """The content fields, URIs written one way (``s3://b/x/`` and ``s3://b/x`` are one)."""
    out = {k: getattr(cfg, k) for k in _CONTENT_FIELDS}
    for k in _URI_FIELDS:
        out[k] = storage.normalize(out[k]).rstrip("/")
    out["extra_columns"] = list(out["extra_columns"])
    return out


def _check_output(cfg: SelectHQConfig) -> None:
    """Refuse, before any work, a folder the download would read more than the selection from,
    and a complete selection made with other settings."""
    foreign = [n for n in storage.list_dir(cfg.output, ".parquet") if not _PART.fullmatch(n)]
    if foreign:
        raise ConfigError(
            f"{cfg.output} holds parquet files this stage did not write ({', '.join(foreign[:5])}"
            "): the download would read them with the selection; use an empty folder"
        )
    summary_uri = storage.join(cfg.output, SUMMARY_NAME)
    if not storage.exists(summary_uri):
        return
    old, new = storage.read_json(summary_uri).get("settings", {}), _settings(cfg)
    diff = [f"{k!r} ({old.get(k)!r} != {new[k]!r})" for k in new if old.get(k) != new[k]]
    if diff:
        raise ConfigError(
            f"{cfg.output} already holds a selection made with a different {'; '.join(diff)}; "
            "use a new output folder (or the settings it was made with)"
        )


def _check_scored_with_aesthetic(scores: str) -> None:
    """Score parquets made without an aesthetic model have none to select by (all NaN)."""
    uri = storage.join(scores, SCORE_CONFIG_NAME)
    if storage.exists(uri) and not (yaml.safe_load(storage.read_text(uri)) or {}).get("aesthetic"):
        raise ConfigError(
            f"{scores} was scored without an aesthetic model ({SCORE_CONFIG_NAME}: aesthetic "
            "null): no row has a score to select by. Score with one (score.yaml's aesthetic)"
        )


def _commit(cfg: SelectHQConfig, folder: str, summary: dict[str, Any]) -> bool:
    """Put the parts made in ``folder`` and the summary in place; False when the output held
    them already (nothing uploaded). The summary goes last: until then the folder reads as
    incomplete, and one a killed commit left is replaced by the next run."""
    out, parts = cfg.output, summary["parts"]
    summary_uri = storage.join(out, SUMMARY_NAME)
    old = storage.read_json(summary_uri) if storage.exists(summary_uri) else None
    present = set(storage.list_dir(out, ".parquet"))
    names = {p["name"] for p in parts}
    if (
        old is not None
        and old.get("parts") == parts
        and present == names
        and all(storage.size(storage.join(out, p["name"])) == p["bytes"] for p in parts)
    ):
        if not storage.exists(storage.join(out, CONFIG_NAME)):
            save_config(cfg, storage.join(out, CONFIG_NAME))
        if old != summary:  # the same parts, other counts asked for (report_thresholds)
            storage.write_json(summary_uri, summary)
        return False
    if old is not None:
        log.warning(
            "select_hq: %s holds another selection of the same settings (%d rows; %d now: "
            "more shards scored since?): replacing it; a download made from the old one "
            "refuses this one (download into a new folder)",
            out, old.get("rows", {}).get("selected", 0), summary["rows"]["selected"],
        )  # fmt: skip
    storage.remove(summary_uri)  # from here the folder reads as incomplete
    # the config before any part: the download refuses a folder with it and without a summary
    save_config(cfg, storage.join(out, CONFIG_NAME))
    for name in sorted(present - names):
        storage.remove(storage.join(out, name))
    for p in parts:
        storage.put_file(os.path.join(folder, p["name"]), storage.join(out, p["name"]))
    storage.write_json(summary_uri, summary)
    return True


def run_select_hq(cfg: SelectHQConfig) -> dict[str, Any]:
    """Select stage 2's rows from stage 1's scores and raw parquets into metadata parquet under
    ``cfg.output``; returns (and writes) the summary."""
    check_paths_for_ray_job({"input": cfg.input, "scores": cfg.scores, "output": cfg.output})
    _check_scored_with_aesthetic(cfg.scores)
    _check_output(cfg)
    raw = shards.raw_shard_indices(cfg.input)
    scored = scored_indices(cfg.scores)
    todo = [i for i in raw if i in scored]
    unscored = [i for i in raw if i not in scored]
    orphans = sorted(scored - set(raw))
    if not todo:
        raise FileNotFoundError(
            f"no complete raw shard under {cfg.input} has a score parquet under {cfg.scores}"
        )
    if unscored and not cfg.allow_partial:
        raise ConfigError(
            f"{len(unscored)} of {len(raw)} raw shards under {cfg.input} have no score parquet "
            f"under {cfg.scores} yet (e.g. {unscored[:10]}): score them first (jobs/score.py; "
            "still running, or some shards failed?), or allow_partial=true to select from the "
            "scored ones (a download made from it cannot take the full selection later: that "
            "needs a new folder)"
        )
    if unscored:
        log.warning(
            "select_hq: %d of %d raw shards have no score parquet yet (skipped, allow_partial; "
            "score them and run again into a new folder for the full selection): %s",
            len(unscored), len(raw), unscored[:20],
        )  # fmt: skip
    dropped: collections.Counter[str] = collections.Counter()
    at_aesthetic: collections.Counter[str] = collections.Counter()
    skipped: dict[str, list[int]] = {"stale_scores": [], "raw_parquet_missing": []}
    rows_read = 0
    with scratch.temporary_directory("select_hq", dir=cfg.tmp_dir) as folder:
        parts = _PartWriter(folder, cfg.rows_per_part)
        results = _select_all(cfg, todo)
        for shard in progress(results, desc="select_hq", total=len(todo), unit="shard"):
            if shard.status in skipped:
                skipped[shard.status].append(shard.index)
            rows_read += shard.rows_read
            dropped.update(shard.dropped)
            at_aesthetic.update(shard.at_aesthetic)
            if shard.rows is not None:
                parts.add(shard.rows)
        written = parts.close()
        summary: dict[str, Any] = {
            "settings": _settings(cfg),
            "shards": {
                "raw": len(raw),
                "read": len(todo) - sum(len(v) for v in skipped.values()),
                "unscored": len(unscored),
                "stale_scores": len(skipped["stale_scores"]),
                "raw_parquet_missing": len(skipped["raw_parquet_missing"]),
                "scores_without_raw": len(orphans),
                # the first of each, to look at
                "examples": {
                    "unscored": unscored[:100],
                    "scores_without_raw": orphans[:100],
                    **{k: v[:100] for k, v in skipped.items()},
                },
            },
            "rows": {"read": rows_read, "selected": sum(p["rows"] for p in written)},
            "dropped": dict(sorted(dropped.items())),
            # kept by the score stage and large enough, by aesthetic threshold (before the join
            # with the raw parquets): what another min_aesthetic would select
            "at_aesthetic": {
                f"{t:g}": at_aesthetic[f"{t:g}"] for t in sorted(set(cfg.report_thresholds))
            },
            "parts": written,
        }
        if not summary["rows"]["selected"]:
            raise ConfigError(
                f"min_aesthetic={cfg.min_aesthetic}, min_original_size={cfg.min_original_size} "
                f"select none of {rows_read} rows ({summary['dropped']}); nothing written"
            )
        if (stale := skipped["stale_scores"]) and not cfg.allow_partial:
            raise ConfigError(
                f"{len(stale)} raw shards under {cfg.input} were downloaded again after they "
                f"were scored (e.g. {stale[:10]}): score them again first (jobs/score.py redoes "
                "them), or allow_partial=true to select without them"
            )
        if stale:
            log.warning(
                "select_hq: %d raw shards were downloaded again after they were scored; their "
                "score parquets are the old download's (skipped; score again): %s",
                len(stale), stale[:20],
            )  # fmt: skip
        wrote = _commit(cfg, folder, summary)
    n = summary["shards"]
    log.info(
        "select_hq: %d of %d rows selected from %d shards into %d parts under %s%s; dropped %s; "
        "shards skipped: %d unscored, %d stale scores, %d without their raw parquet; %d score "
        "parquets without a complete raw shard",
        summary["rows"]["selected"], rows_read, n["read"], len(summary["parts"]), cfg.output,
        "" if wrote else " (already there: nothing written)", summary["dropped"], n["unscored"],
        n["stale_scores"], n["raw_parquet_missing"], n["scores_without_raw"],
    )  # fmt: skip
    return summary
