"""LAION-COCO-style metadata parquet -> clean, de-duplicated work units for the download stage.

Input: one parquet file, a folder of them, or a glob; local or ``s3://``. Output: ``00000.parquet``,
``00001.parquet``, ... of ``rows_per_unit`` rows each with columns ``url``, ``caption`` and the
configured extra columns (names kept), plus ``metadata_stats.json`` (counts by reason, unit
sizes, the inputs and the config) in the same folder. Same input and config -> same units, byte
for byte in content: files are read in sorted order and rows in file order, the first occurrence
of a URL with a caption wins (a captionless row never takes a URL from a captioned one).

What is dropped (counted): null / NaN / empty URLs, URLs that are not http(s) (``file://`` would
read the worker's own disk) or not valid UTF-8 (``bad_url``), duplicates. What is kept but
counted: NaN / missing captions (as ``""``, for the filter stage to drop), non-UTF-8 captions (bad
bytes replaced), over-long captions (cut to ``max_caption_chars``), NaN extras (stored as null),
non-UTF-8 text in an extra column (bad bytes replaced, ``<column>_not_utf8``). Every text column
is read as bytes and decoded here: Arrow's string columns may hold invalid UTF-8, which
``to_pylist`` would raise on.

The caption: LAION-COCO has two. ``top_caption`` is the BLIP caption LlamaGen trains on (what
``configs/data/download.yaml`` reads); ``TEXT`` is the image's original web alt-text, which is
also what the dataset's ``similarity`` column scores the image against.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import doc, to_dict
from pipeline.log import get_logger

log = get_logger(__name__)

SHARD_DIGITS = 5  # unit and raw shard names: 00000 ... 99999

STATS_NAME = "metadata_stats.json"
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class MetadataConfig:
    """How to read the metadata parquet and cut it into work units."""

    url_column: str = doc("column holding the image URL", "URL")
    caption_column: str = doc(
        "column holding the caption. LAION-COCO: top_caption, the BLIP caption LlamaGen trains "
        "on (configs/data/download.yaml); TEXT is the original web alt-text, as in LAION-400M/5B",
        "TEXT",
    )
    extra_columns: list[str] = doc(
        "columns carried along into each sample's json (missing ones become null, counted)",
        ["similarity", "punsafe", "pwatermark", "WIDTH", "HEIGHT", "hash"],
    )
    rows_per_unit: int = doc("rows per work unit (= per raw shard)", 10000)
    dedup_urls: bool = doc("drop repeated URLs, keeping the first occurrence", True)
    max_caption_chars: int = doc("captions are cut to this many characters (counted)", 1000)
    batch_rows: int = doc("rows read from parquet at a time (bounds memory)", 65536)

    def __post_init__(self) -> None:
        if self.rows_per_unit < 1:
            raise ValueError(f"rows_per_unit must be >= 1, got {self.rows_per_unit}")
        if self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be >= 1, got {self.max_caption_chars}")
        twice = sorted({c for c in self.extra_columns if self.extra_columns.count(c) > 1})
        if twice:
            # img2dataset's reader fails on every shard (a field twice in its schema), retrying
            raise ValueError(f"extra_columns names {twice} more than once")
        clash = RESERVED_COLUMNS.intersection(self.extra_columns)
        if clash:
            raise ValueError(
                f"extra_columns may not include {sorted(clash)}: the unit's url and caption, or "
                "fields img2dataset writes into every sample (they would be overwritten)"
            )


# the unit's own columns, and the fields img2dataset writes into each sample's json and parquet row
RESERVED_COLUMNS = frozenset(
    {
        "url",
        "caption",
        "key",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "sha256",
    }
)


# what ``jobs/select_hq.py`` writes beside its parts (here, so that the download can check them)
SELECTION_CONFIG_NAME = "_select_hq_config.yaml"
SELECTION_SUMMARY_NAME = "_select_hq_summary.json"


def check_selection(files: list[str], whole: bool) -> None:
    """Refuse the parts of a ``select_hq`` output that is not complete: its config (written
    before any part) without its summary (written last) means the job is still running or was
    killed mid-upload; a part the summary does not list, or of another size, means the folder
    changed since, and so does one it lists missing when the folder is read ``whole``. Folders
    without the config are read as they are."""
    for folder in sorted({os.path.dirname(f) for f in files}):
        if not storage.exists(storage.join(folder, SELECTION_CONFIG_NAME)):
            continue
        summary_uri = storage.join(folder, SELECTION_SUMMARY_NAME)
        if not storage.exists(summary_uri):
            raise FileNotFoundError(
                f"{folder} is a select_hq output without its {SELECTION_SUMMARY_NAME}: the "
                "selection is still being written, or its job was killed; wait for it, or run "
                "jobs/select_hq.py again (it completes the folder)"
            )
        parts = {p["name"]: p["bytes"] for p in storage.read_json(summary_uri).get("parts", [])}
        here = {os.path.basename(f) for f in files if os.path.dirname(f) == folder}
        wrong = [n for n in sorted(here) if storage.size(storage.join(folder, n)) != parts.get(n)]
        wrong += sorted(set(parts) - here) if whole else []
        if wrong:
            raise FileNotFoundError(
                f"{folder} does not hold the parts its {SELECTION_SUMMARY_NAME} lists "
                f"({', '.join(wrong[:5])}: missing, extra or of another size); run "
                "jobs/select_hq.py again into it, or into a new folder"
            )


def list_inputs(source: str) -> list[str]:
    """The parquet files named by ``source`` (a file, a folder or a glob), sorted; the parts of
    a ``select_hq`` output only once it is complete (``check_selection``)."""
    fs, path = storage.filesystem(source)
    remote = storage.is_remote(source)
    proto = source.split("://", 1)[0] + "://" if remote else ""
    whole = False  # the folder itself, not some of its files
    if any(ch in path for ch in "*?["):
        found = fs.glob(path) if remote else globlib.glob(path)
    elif whole := fs.isdir(path):
        found = fs.glob(path.rstrip("/") + "/*.parquet")  # this folder only, not sub-folders
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"metadata not found: {source}")
    files = sorted(
        f"{proto}{p}" if remote and not str(p).startswith(proto) else str(p) for p in found
    )
    files = [f for f in files if not os.path.basename(f).startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"no parquet files match {source}")
    check_selection(files, whole)
    return files


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def clean_url(v: Any) -> tuple[str | None, str | None]:
    """(url, None) for a usable URL, or (None, reason) for one that is dropped."""
    if _is_missing(v):
        return None, "missing_url"
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:  # no server has that name; a mended one would fetch another
            return None, "bad_url"
    if not isinstance(v, str):
        return None, "bad_url"
    url = v.strip()
    if not url:
        return None, "missing_url"
    try:
        parts = urlsplit(url)
    except ValueError:
        return None, "bad_url"
    if parts.scheme.lower() not in ("http", "https"):
        return None, "bad_url_scheme"
    if not parts.netloc or any(c in url for c in "\r\n\t "):
        return None, "bad_url"
    return url, None


def clean_caption(v: Any, max_chars: int) -> tuple[str, list[str]]:
    """A normalised caption (whitespace collapsed, stripped, cut) and what was wrong with it."""
    notes = []
    if _is_missing(v):
        return "", ["missing_caption"]
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            v = v.decode("utf-8", errors="replace")
            notes.append("caption_not_utf8")
    elif not isinstance(v, str):
        v = str(v)
        notes.append("caption_not_string")
    text = _WS.sub(" ", v.replace("\x00", " ")).strip()
    if not text:
        notes.append("empty_caption")
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
        notes.append("caption_truncated")
    return text, notes


def _url_key(url: str) -> int:
    # an 8-byte digest instead of the URL itself
    digest = hashlib.blake2b(url.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SeenKeys:
    """A set of 64-bit keys at 8 bytes a key: sorted numpy runs, merged as they pile up.

    A Python set of the same keys as 8-byte ``bytes`` costs about 78 bytes a key (the object plus
    its slot): 47 GB for the 600M rows of LAION-COCO, against 4.8 GB here (and up to 1.5x that
    while the largest runs merge); ``benchmarks/bench_dedup.py`` measures both. ``first_seen``
    answers for a whole batch at once, as a set would row by row: a key is new if no earlier
    batch and no earlier row of this batch had it."""

    def __init__(self, max_runs: int = 12) -> None:
        self.runs: list[np.ndarray] = []  # sorted, disjoint uint64 arrays
        self.max_runs = max_runs

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask over ``keys`` (uint64): True where the key is new; records them."""
        keys = np.asarray(keys, dtype=np.uint64)
        new = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return new
        uniq, first = np.unique(keys, return_index=True)  # first occurrence within the batch
        fresh = np.ones(len(uniq), dtype=bool)
        for run in self.runs:
            pos = np.searchsorted(run, uniq)
            hit = pos < len(run)
            hit[hit] = run[pos[hit]] == uniq[hit]
            fresh &= ~hit
        new[first[fresh]] = True
        if fresh.any():
            self._add(uniq[fresh])
        return new

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask over ``keys`` (uint64): True where the key is recorded; records nothing."""
        keys = np.asarray(keys, dtype=np.uint64)
        held = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            pos = np.searchsorted(run, keys)
            hit = pos < len(run)
            hit[hit] = run[pos[hit]] == keys[hit]
            held |= hit
        return held

    def _add(self, sorted_keys: np.ndarray) -> None:
        self.runs.append(sorted_keys)
        # merge while the newest run is at least half the one before it (sizes stay geometric:
        # a membership test looks at O(log n) runs), and always past max_runs
        while len(self.runs) > 1 and (
            len(self.runs[-1]) * 2 >= len(self.runs[-2]) or len(self.runs) > self.max_runs
        ):
            b, a = self.runs.pop(), self.runs.pop()
            merged = np.concatenate([a, b])  # disjoint: no key twice
            merged.sort(kind="stable")  # timsort: two sorted runs merge in linear time
            self.runs.append(merged)


def _as_bytes(t: pa.DataType) -> pa.DataType | None:
    """``t`` with every string in it read as bytes instead; None when it holds no string."""
    if pa.types.is_string(t) or pa.types.is_string_view(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _as_bytes(t.value_type)
        if inner is None:
            return None
        if pa.types.is_fixed_size_list(t):
            return pa.list_(inner, t.list_size)
        return pa.large_list(inner) if pa.types.is_large_list(t) else pa.list_(inner)
    if pa.types.is_struct(t):
        fields = list(t)
        inner_types = [_as_bytes(f.type) for f in fields]
        if all(x is None for x in inner_types):
            return None
        return pa.struct([f.with_type(x or f.type) for f, x in zip(fields, inner_types)])
    return None


def _decode_text(v: Any, t: pa.DataType) -> tuple[Any, bool]:
    """A value read through :func:`_as_bytes`, its strings decoded as ``t`` says: UTF-8, bad
    bytes replaced with U+FFFD; and whether any were bad."""
    if v is None:
        return None, False
    if pa.types.is_string(t) or pa.types.is_string_view(t) or pa.types.is_large_string(t):
        try:
            return v.decode("utf-8"), False
        except UnicodeDecodeError:
            return v.decode("utf-8", errors="replace"), True
    if pa.types.is_struct(t):
        parts = {f.name: _decode_text(v.get(f.name), f.type) for f in t}
        return {k: x for k, (x, _) in parts.items()}, any(bad for _, bad in parts.values())
    if isinstance(v, list):
        items = [_decode_text(x, t.value_type) for x in v]
        return [x for x, _ in items], any(bad for _, bad in items)
    return v, False


def _read_batches(
    path: str, cfg: MetadataConfig, counts: Counter
) -> Iterator[tuple[dict[str, list], dict[str, pa.DataType]]]:
    """Batches of (url, caption, extras) as Python lists, and the Arrow type of each column that
    was read as bytes: every text column is (a string column may hold invalid UTF-8; Arrow's
    ``to_pylist`` would raise on it), for ``clean_url`` / ``clean_caption`` /
    :func:`_decode_text` to decode leniently."""
    with storage.open_read(path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        for col in (cfg.url_column, cfg.caption_column):
            if col not in names:
                raise KeyError(
                    f"{path}: column {col!r} not found (columns: {', '.join(names)}); "
                    "set url_column / caption_column"
                )
        missing = [c for c in cfg.extra_columns if c not in names]
        for c in missing:
            log.warning("%s: extra column %r missing; stored as null", path, c)
        wanted = [cfg.url_column, cfg.caption_column] + [c for c in cfg.extra_columns if c in names]
        extra = set(cfg.extra_columns) - {cfg.url_column, cfg.caption_column}
        for batch in pf.iter_batches(
            batch_size=cfg.batch_rows, columns=list(dict.fromkeys(wanted))
        ):
            n = batch.num_rows
            out: dict[str, list] = {}
            text_types: dict[str, pa.DataType] = {}
            for col in batch.schema.names:
                arr = batch.column(col)
                if (
                    col in extra
                    and _as_json_type(arr.type) == pa.string()
                    and not _is_text(arr.type)
                ):
                    if pa.types.is_dictionary(arr.type):
                        arr = arr.dictionary_decode()
                    if _is_bytes(arr.type):  # a digest, say: its hex
                        out[col] = [None if v is None else v.hex() for v in arr.to_pylist()]
                        continue
                    arr = arr.cast(pa.string())  # a date, time or decimal: its text
                as_bytes = _as_bytes(arr.type)
                if as_bytes is not None:
                    text_types[col] = arr.type
                    arr = arr.cast(as_bytes)
                out[col] = arr.to_pylist()
            for c in missing:
                out[c] = [None] * n
                counts[f"missing_column_{c}"] += n
            yield out, text_types


def _unit_schema(extra_types: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema(
        [("url", pa.string()), ("caption", pa.string())] + [(c, t) for c, t in extra_types.items()]
    )


def iter_clean_rows(
    files: list[str], cfg: MetadataConfig, counts: Counter
) -> Iterator[tuple[str, str, list[Any]]]:
    """(url, caption, extras) for every kept row, in input order; ``counts`` gets the reasons.

    Dedup keeps a URL's first row with a caption: a row without one (missing or blank, which
    the filter stage drops) never takes the URL from a captioned row, in this batch or a later
    one. A captionless row is itself a duplicate when a row of an earlier batch or any row of
    its own batch, captioned or not, had its URL first; one seen before a captioned row of a
    later batch stays (and is dropped by the filter stage)."""
    seen = SeenKeys()  # URLs of kept rows with a caption
    seen_blank = SeenKeys()  # URLs of kept rows without one
    for path in files:
        for batch, text_types in _read_batches(path, cfg, counts):
            caps = batch[cfg.caption_column]
            extras = [batch[c] for c in cfg.extra_columns]
            cleaned = [clean_url(u) for u in batch[cfg.url_column]]
            captions = [
                None if url is None else clean_caption(caps[i], cfg.max_caption_chars)
                for i, (url, _) in enumerate(cleaned)
            ]
            if cfg.dedup_urls:
                duplicate = _duplicates(cleaned, captions, seen, seen_blank)
            for i, (url, why) in enumerate(cleaned):
                counts["rows_read"] += 1
                if url is None:
                    counts[why] += 1
                    continue
                if cfg.dedup_urls and duplicate[i]:
                    counts["duplicate_url"] += 1
                    continue
                caption, notes = captions[i]
                for note in notes:
                    counts[note] += 1
                row_extras = []
                for name, col in zip(cfg.extra_columns, extras):
                    v = col[i]
                    if _is_missing(v):
                        counts[f"null_{name}"] += 1
                        v = None
                    elif name in text_types:
                        v, bad = _decode_text(v, text_types[name])
                        if bad:
                            counts[f"{name}_not_utf8"] += 1
                    row_extras.append(v)
                counts["rows_kept"] += 1
                yield url, caption, row_extras


def _duplicates(
    cleaned: list[tuple[str | None, str | None]],
    captions: list[tuple[str, list[str]] | None],
    seen: SeenKeys,
    seen_blank: SeenKeys,
) -> np.ndarray:
    """The rows of one batch that repeat a URL (see :func:`iter_clean_rows`); records the rest."""
    duplicate = np.zeros(len(cleaned), dtype=bool)
    with_caption = [i for i, (url, _) in enumerate(cleaned) if url is not None and captions[i][0]]
    blank = [i for i, (url, _) in enumerate(cleaned) if url is not None and not captions[i][0]]
    if with_caption:
        keys = np.fromiter((_url_key(cleaned[i][0]) for i in with_caption), np.uint64)
        duplicate[np.asarray(with_caption, dtype=np.int64)] = ~seen.first_seen(keys)
    if blank:
        keys = np.fromiter((_url_key(cleaned[i][0]) for i in blank), np.uint64)
        taken = seen.holds(keys)  # this batch's captioned rows are recorded by now
        fresh = seen_blank.first_seen(keys[~taken])
        dup = taken.copy()
        dup[~taken] = ~fresh
        duplicate[np.asarray(blank, dtype=np.int64)] = dup
    return duplicate


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _common_type(types: list[pa.DataType]) -> pa.DataType | None:
    """One type that holds the values of every type in ``types`` (several, none null) without
    loss, or None if there is none."""
    if all(pa.types.is_integer(t) for t in types):
        if len({pa.types.is_signed_integer(t) for t in types}) == 1:
            return max(types, key=lambda t: t.bit_width)  # the widest
        return pa.int64()  # signed and unsigned (a uint64 past int64 raises when written)
    if all(_is_number(t) for t in types):  # a float, or bools with numbers
        return pa.float64()
    if all(_is_text(t) for t in types):
        return types[0]  # the values are Python strings by then: any of them holds them
    if any(_is_number(t) for t in types):
        return None  # a number beside text, a timestamp, a list...: no type holds both
    try:  # lists, structs, timestamps of other units...: Arrow's own promotion, if any
        schemas = [pa.schema([("c", t)]) for t in types]
        return pa.unify_schemas(schemas, promote_options="permissive").field("c").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
        return None


def _is_bytes(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _as_json_type(t: pa.DataType) -> pa.DataType | None:
    """The type an extra column of type ``t`` is carried as: img2dataset writes each sample's
    json with a plain ``json.dumps`` after counting it a success, so a value it cannot dump (a
    datetime, a Decimal, bytes) lost the image without a word. Dates, times and decimals become
    their text (Arrow's cast), bytes their hex; None: no JSON form (such values nested)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_temporal(t) or pa.types.is_decimal(t) or _is_bytes(t):
        return pa.string()
    if pa.types.is_null(t) or _is_number(t) or _is_text(t):
        return t
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return t if _as_json_type(t.value_type) == t.value_type else None
    if pa.types.is_struct(t):
        return t if all(_as_json_type(f.type) == f.type for f in t) else None
    return None


def _extra_types(
    files: list[str], cfg: MetadataConfig
) -> tuple[dict[str, pa.DataType], dict[str, pa.DataType]]:
    """(the Arrow type of each extra column, the columns whose type is not the first
    file's), from every input file's footer (no row is read).

    Files that type a column differently are promoted to one type (int and float: float64);
    types that cannot be are refused here, before any unit is written, rather than
    truncating (Python floats converted as int64 lose their fraction without a word) or failing
    on the unit that spans both files. A column no file has is a string column of nulls."""

    def footer(path: str) -> pq.FileMetaData:
        with storage.open_read(path) as f:
            return pq.read_metadata(f)

    with ThreadPoolExecutor(min(32, len(files))) as pool:  # one request a file on S3
        footers = list(pool.map(footer, files))
    schemas = [m.schema.to_arrow_schema() for m in footers]
    types: dict[str, pa.DataType] = {}
    changed: dict[str, pa.DataType] = {}
    for c in cfg.extra_columns:
        by_type: dict[pa.DataType, list[str]] = {}  # in file order: the first file's first
        for path, schema in zip(files, schemas):
            if c in schema.names:
                t = _as_json_type(schema.field(c).type)
                if t is None:
                    raise TypeError(
                        f"extra column {c!r} is {schema.field(c).type} in {path}: a sample's "
                        "json cannot hold it (img2dataset would drop every image). Leave it "
                        "out of extra_columns, or store it as text or numbers"
                    )
                by_type.setdefault(t, []).append(path)
        if not by_type:
            types[c] = pa.string()
            continue
        first = next(iter(by_type))
        known = [t for t in by_type if not pa.types.is_null(t)]  # all-null in some files
        if len(known) <= 1:
            types[c] = known[0] if known else first
        else:
            common = _common_type(known)
            if common is None:
                found = "; ".join(
                    f"{t} in {', '.join(ps[:3])}"
                    + (f" and {len(ps) - 3} more" if len(ps) > 3 else "")
                    for t, ps in by_type.items()
                )
                raise TypeError(
                    f"extra column {c!r} has types that cannot be combined across the input "
                    f"files: {found}. Make it one type in the metadata, or leave it out of "
                    "extra_columns"
                )
            types[c] = common
            if pa.types.is_floating(common):
                _check_exact_as_float(c, by_type, dict(zip(files, footers)))
        if types[c] != first:
            changed[c] = types[c]
    return types, changed


def _check_exact_as_float(
    column: str, by_type: dict[pa.DataType, list[str]], footers: dict[str, pq.FileMetaData]
) -> None:
    """Integers promoted to float64 beside another file's floats must be exact there (below
    2**53): LAION's 64-bit ``hash`` is not, and failed the unit that held the first one, hours
    into cutting units. Judged from the footers' min/max statistics, before any unit."""
    limit = 2**53
    for t, paths in by_type.items():
        if not pa.types.is_integer(t) or t.bit_width < 64:
            continue
        for path in paths:
            meta = footers[path]
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for k in range(group.num_columns):
                    col = group.column(k)
                    stats = col.statistics
                    if col.path_in_schema != column or stats is None or not stats.has_min_max:
                        continue
                    if max(abs(int(stats.min)), abs(int(stats.max))) > limit:
                        raise TypeError(
                            f"extra column {column!r} is {t} in {path} and floating point in "
                            f"other input files; its integers (min {stats.min}, max "
                            f"{stats.max}) do not fit a float64 exactly. Make it one type in "
                            "the metadata, or leave it out of extra_columns"
                        )


def _column_array(values: list[Any], t: pa.DataType) -> pa.Array:
    """``values`` as an Arrow array of type ``t``; a value that does not fit raises."""
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return pa.array(values, type=t, from_pandas=True)
    # pa.array(values, type=int64) turns 0.97 into 0 without a word, safe or not: let the values
    # take their own type, then cast with safe=True, which refuses truncation and overflow
    values = [int(v) if isinstance(v, bool) else v for v in values]
    try:
        arr = pa.array(values, from_pandas=True)
    except OverflowError:  # an integer past int64 (uint64): Arrow range-checks it against t
        return pa.array(values, type=t, from_pandas=True)
    return arr.cast(t, safe=True)


def units_fingerprint(
    source: str, cfg: MetadataConfig
) -> tuple[list[str], list[dict[str, Any]], str]:
    """(the input files of ``source``, their paths and sizes, a digest of those and of the
    settings that decide the units' content): what :func:`prepare_units` would make, without
    reading a row (a stage can refuse a changed input before the hours of rewriting units).
    Reads every file's footer: extra columns the files type differently are settled (or
    refused) here."""
    files = list_inputs(source)
    inputs = [{"path": p, "bytes": storage.size(p)} for p in files]
    # what decides the units' content (batch_rows only changes how they are read)
    settings = {k: v for k, v in to_dict(cfg).items() if k != "batch_rows"}
    key: tuple = (inputs, settings)
    _, changed = _extra_types(files, cfg)
    if changed:  # units cut before these were promoted hold other (truncated) values
        key += ({c: str(t) for c, t in changed.items()},)
    return files, inputs, hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def prepare_units(
    source: str,
    output: str,
    cfg: MetadataConfig,
    listing: tuple[list[str], list[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Write work units for ``source`` into ``output``; returns (and writes) the stats dict.

    Rerunning with the same inputs and config reuses the finished units (their stats file is
    the done marker); a different input listing or config rewrites them. ``listing``: what
    :func:`units_fingerprint` gave for the same source and config, if the caller has it.
    """
    files, inputs, fingerprint = listing or units_fingerprint(source, cfg)
    stats_uri = storage.join(output, STATS_NAME)
    if storage.exists(stats_uri):
        old = storage.read_json(stats_uri)
        have = set(storage.list_dir(output, ".parquet"))  # one listing, not a HEAD per unit
        if old.get("fingerprint") == fingerprint and all(u["name"] in have for u in old["units"]):
            log.info("metadata units in %s are up to date (%d units)", output, len(old["units"]))
            return old
        log.info("metadata inputs or config changed: rewriting units in %s", output)
    extra_types, _ = _extra_types(files, cfg)  # refuses types that do not mix: nothing touched
    stale = storage.list_dir(output, ".parquet")
    with ThreadPoolExecutor(32) as pool:  # tens of thousands of units on S3: not one at a time
        list(pool.map(lambda name: storage.remove(storage.join(output, name)), stale))
    storage.remove(stats_uri)

    schema = _unit_schema(extra_types)
    counts: Counter = Counter()
    units: list[dict[str, Any]] = []
    buf: list[tuple[str, str, list[Any]]] = []

    def flush() -> None:
        if len(units) >= 10**SHARD_DIGITS:
            # unit i becomes raw shard i, five digits wide (img2dataset sorts its inputs by name)
            raise ValueError(
                f"more than {10**SHARD_DIGITS - 1:,} work units: raise rows_per_unit "
                f"(now {cfg.rows_per_unit:,}) so that the dataset fits"
            )
        name = f"{len(units):0{SHARD_DIGITS}d}.parquet"
        cols = {"url": [r[0] for r in buf], "caption": [r[1] for r in buf]}
        for j, c in enumerate(cfg.extra_columns):
            cols[c] = [r[2][j] for r in buf]
        arrays = {}
        for k, v in cols.items():
            try:
                arrays[k] = _column_array(v, schema.field(k).type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise ValueError(
                    f"unit {name}: column {k!r} does not fit {schema.field(k).type}: {e}"
                ) from e
        table = pa.Table.from_pydict(arrays)
        with storage.open_write(storage.join(output, name)) as f:
            pq.write_table(table, f)
        units.append({"name": name, "rows": len(buf)})
        buf.clear()

    for row in iter_clean_rows(files, cfg, counts):
        buf.append(row)
        if len(buf) >= cfg.rows_per_unit:
            flush()
    if buf:
        flush()
    stats = {
        "fingerprint": fingerprint,
        "counts": dict(sorted(counts.items())),
        "units": units,
        "inputs": inputs,
        "config": dataclasses.asdict(cfg),
    }
    # written last: it marks the units as complete
    storage.write_json(stats_uri, stats)
    log.info(
        "metadata: %d rows read, %d kept in %d units; dropped %s",
        counts["rows_read"],
        counts["rows_kept"],
        len(units),
        {k: v for k, v in counts.items() if k not in ("rows_read", "rows_kept")},
    )
    return stats
