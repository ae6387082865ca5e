import hashlib
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import to_dict
from pipeline.data import synthetic
from pipeline.data.metadata import (
    STATS_NAME,
    MetadataConfig,
    SeenKeys,
    clean_caption,
    clean_url,
    list_inputs,
    prepare_units,
)


def _laion(n: int, offset: int = 0) -> pa.Table:
    samples = synthetic.make_samples(n, seed=offset)
    urls = [f"http://img.example/{offset + i}.jpg" for i in range(n)]
    return pa.Table.from_pandas(synthetic.laion_coco_table(samples, urls), preserve_index=False)


def _read_units(folder: str) -> list[pa.Table]:
    return [pq.read_table(os.path.join(folder, n)) for n in storage.list_dir(folder, ".parquet")]


def _messy_table() -> pa.Table:
    """LAION-COCO columns with every kind of bad row; captions as raw bytes (one not UTF-8)."""
    urls = [
        "http://a.example/1.jpg",
        "http://a.example/1.jpg",  # duplicate
        "  http://a.example/2.jpg  ",  # whitespace around: stripped, then kept
        None,
        "",
        "   ",
        "file:///etc/passwd",
        "ftp://a.example/3.jpg",
        "http://a.example/4.jpg",
        "http://a.example/5.jpg",
        "http://a.example/6.jpg",
        "http://a.example/7.jpg",
        "http://a.example/2.jpg",  # duplicate of the stripped one
    ]
    captions = [
        b"  a red   circle\non white ",
        b"dup",
        b"second",
        b"no url",
        b"empty url",
        b"blank url",
        b"file",
        b"ftp",
        None,  # missing caption
        b"",  # empty caption
        b"caf\xe9 \xff broken",  # Latin-1 bytes: not UTF-8
        b"x" * 10_000,
        b"dup2",
    ]
    similarity = [0.3, 0.3, float("nan"), 0.3, 0.3, 0.3, 0.3, 0.3, None, 0.3, 0.3, 0.3, 0.3]
    width = [256, 256, None, 256, 256, 256, 256, 256, 256, 256, 256, 256, 256]
    return pa.table(
        {
            "URL": pa.array(urls, pa.string()),
            # a string column holding invalid UTF-8, as real dumps sometimes do
            "TEXT": pa.array(captions, pa.binary()).view(pa.string()),
            "similarity": pa.array(similarity, pa.float64(), from_pandas=True),
            "WIDTH": pa.array(width, pa.int64()),
        }
    )


def test_clean_url_and_caption_rules():
    assert clean_url(float("nan")) == (None, "missing_url")
    assert clean_url("  ") == (None, "missing_url")
    assert clean_url("javascript:alert(1)") == (None, "bad_url_scheme")
    assert clean_url("http://") == (None, "bad_url")
    assert clean_url("http://a b.example/x.jpg") == (None, "bad_url")
    assert clean_url(" HTTPS://x.example/a.jpg ") == ("HTTPS://x.example/a.jpg", None)
    assert clean_caption(float("nan"), 10) == ("", ["missing_caption"])
    assert clean_caption(12.5, 10) == ("12.5", ["caption_not_string"])
    assert clean_caption(" a\t\tb\x00c ", 10) == ("a b c", [])
    text, notes = clean_caption(b"\xffok", 10)
    assert text == "\ufffdok" and notes == ["caption_not_utf8"]
    assert clean_caption("abcdefghijkl", 5) == ("abcde", ["caption_truncated"])


def test_messy_rows_are_counted_and_units_are_clean(tmp_path):
    src = tmp_path / "meta.parquet"
    pq.write_table(_messy_table(), src)
    cfg = MetadataConfig(
        extra_columns=["similarity", "WIDTH", "punsafe"], rows_per_unit=3, max_caption_chars=1000
    )
    stats = prepare_units(str(src), str(tmp_path / "units"), cfg)
    c = stats["counts"]
    assert c["rows_read"] == 13
    assert c["duplicate_url"] == 2
    assert c["missing_url"] == 3
    assert c["bad_url_scheme"] == 2
    assert c["rows_kept"] == 6
    assert c["missing_caption"] == 1 and c["empty_caption"] == 1
    assert c["caption_not_utf8"] == 1 and c["caption_truncated"] == 1
    assert c["null_similarity"] == 1 + 1  # the NaN and the None of kept rows
    assert c["null_WIDTH"] == 1
    assert c["missing_column_punsafe"] == 13  # configured but absent: null, counted
    assert [u["rows"] for u in stats["units"]] == [3, 3]

    rows = pa.concat_tables(_read_units(str(tmp_path / "units"))).to_pylist()
    assert [r["url"] for r in rows] == [
        "http://a.example/1.jpg",
        "http://a.example/2.jpg",
        "http://a.example/4.jpg",
        "http://a.example/5.jpg",
        "http://a.example/6.jpg",
        "http://a.example/7.jpg",
    ]
    caps = [r["caption"] for r in rows]
    assert caps[0] == "a red circle on white"
    assert caps[2] == "" and caps[3] == ""
    assert "\ufffd" in caps[4] and caps[4].startswith("caf")
    assert caps[5] == "x" * 1000
    assert rows[1]["similarity"] is None and rows[1]["WIDTH"] is None
    assert rows[0]["similarity"] == pytest.approx(0.3) and rows[0]["WIDTH"] == 256
    assert all(r["punsafe"] is None for r in rows)
    written = storage.read_json(str(tmp_path / "units" / STATS_NAME))
    assert written["counts"] == c


def test_units_are_deterministic_across_files_folder_and_glob(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(_laion(17, 0), folder / "part-1.parquet")
    pq.write_table(_laion(9, 100), folder / "part-0.parquet")
    (folder / "notes.txt").write_text("not parquet")
    cfg = MetadataConfig(rows_per_unit=10)
    a = prepare_units(str(folder), str(tmp_path / "a"), cfg)
    b = prepare_units(str(folder / "part-*.parquet"), str(tmp_path / "b"), cfg)
    assert [u["rows"] for u in a["units"]] == [10, 10, 6]
    assert a["units"] == b["units"] and a["counts"] == b["counts"]
    ta, tb = _read_units(str(tmp_path / "a")), _read_units(str(tmp_path / "b"))
    assert len(ta) == 3 and all(x.equals(y) for x, y in zip(ta, tb, strict=True))
    # sorted file order (part-0 first), rows in file order, across file boundaries
    urls = pa.concat_tables(ta).column("url").to_pylist()
    assert urls[:9] == [f"http://img.example/{100 + i}.jpg" for i in range(9)]
    assert urls[9:] == [f"http://img.example/{i}.jpg" for i in range(17)]
    assert ta[0].schema.names == [
        "url",
        "caption",
        "similarity",
        "punsafe",
        "pwatermark",
        "WIDTH",
        "HEIGHT",
        "hash",
    ]


def test_rerun_reuses_units_and_config_change_rewrites(tmp_path):
    src = tmp_path / "m.parquet"
    pq.write_table(_laion(12), src)
    out = tmp_path / "units"
    prepare_units(str(src), str(out), MetadataConfig(rows_per_unit=5))
    first = os.stat(out / "00000.parquet").st_mtime_ns
    prepare_units(str(src), str(out), MetadataConfig(rows_per_unit=5))
    assert os.stat(out / "00000.parquet").st_mtime_ns == first  # reused, not rewritten
    os.remove(out / "00002.parquet")  # a unit lost: all are written again
    (out / "00000.parquet").write_bytes(b"from before")
    prepare_units(str(src), str(out), MetadataConfig(rows_per_unit=5))
    assert pq.read_table(out / "00002.parquet").num_rows == 2
    assert pq.read_table(out / "00000.parquet").num_rows == 5  # written anew
    stats = prepare_units(str(src), str(out), MetadataConfig(rows_per_unit=8))
    assert [u["rows"] for u in stats["units"]] == [8, 4]
    assert storage.list_dir(str(out), ".parquet") == ["00000.parquet", "00001.parquet"]


def test_missing_url_column_names_it(tmp_path):
    src = tmp_path / "m.parquet"
    pq.write_table(_laion(3), src)
    with pytest.raises(KeyError, match="'url_link' not found"):
        prepare_units(str(src), str(tmp_path / "u"), MetadataConfig(url_column="url_link"))
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(ValueError, match="rows_per_unit"):
        MetadataConfig(rows_per_unit=0)


def test_top_caption_column_and_s3_glob(s3_bucket, tmp_path):
    local = tmp_path / "m.parquet"
    table = _laion(7)
    pq.write_table(table, local)
    storage.put_file(local, f"{s3_bucket}/meta/part-0.parquet")
    storage.put_file(local, f"{s3_bucket}/meta/part-1.parquet")  # all duplicates
    cfg = MetadataConfig(caption_column="top_caption", rows_per_unit=4)
    stats = prepare_units(f"{s3_bucket}/meta/*.parquet", f"{s3_bucket}/units", cfg)
    assert stats["counts"]["duplicate_url"] == 7 and stats["counts"]["rows_kept"] == 7
    assert len(stats["inputs"]) == 2 and stats["inputs"][0]["path"].startswith("s3://")
    assert storage.list_dir(f"{s3_bucket}/units", ".parquet") == ["00000.parquet", "00001.parquet"]
    with storage.open_read(f"{s3_bucket}/units/00001.parquet") as f:
        unit = pq.read_table(f)
    assert unit.column("caption").to_pylist() == table.column("top_caption").to_pylist()[4:]
    assert not any(math.isnan(v) for v in unit.column("similarity").to_pylist())


def test_seen_keys_answers_as_a_set_would_at_8_bytes_a_key():
    """Streaming first-occurrence dedup over batches with repeats inside a batch and across
    batches, against a Python set row by row; sizes that force many merges."""
    rng = np.random.default_rng(0)
    seen, ref = SeenKeys(max_runs=4), set()
    total = 0
    for b in range(60):
        n = int(rng.integers(0, 700))
        keys = rng.integers(0, 5000, n).astype(np.uint64)  # many repeats
        if b % 7 == 0:
            keys = np.concatenate([keys, np.array([2**64 - 1, 0], dtype=np.uint64)])
        want = []
        for k in keys.tolist():
            want.append(k not in ref)
            ref.add(k)
        got = seen.first_seen(keys)
        assert got.tolist() == want, b
        total += int(got.sum())
        assert len(seen) == len(ref) == total
        assert len(seen.runs) <= 4
        probe = rng.integers(0, 6000, 50).astype(np.uint64)
        assert seen.holds(probe).tolist() == [k in ref for k in probe.tolist()]
    assert sum(r.nbytes for r in seen.runs) == 8 * len(ref)
    for a, b in zip(seen.runs, seen.runs[1:]):  # disjoint, each sorted
        assert np.all(a[1:] > a[:-1]) and not np.intersect1d(a, b).size


def test_a_captionless_row_never_takes_the_url_from_a_captioned_one(tmp_path):
    """The filter stage drops a row without a caption: dedup must not let such a row (first in
    its batch, or in an earlier file) hide a later copy of its URL that has a caption."""
    u = [f"http://a.example/{i}.jpg" for i in range(5)]
    first = pa.table(
        {
            "URL": [u[0], u[0], u[1], u[2], u[2], u[3]],
            "TEXT": [None, "zero, captioned", "  ", "two", None, None],
        }
    )
    second = pa.table(
        {"URL": [u[1], u[3], u[3], u[4], u[4]], "TEXT": ["one, later", None, "", "four", "again"]}
    )
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(first, src / "a.parquet")
    pq.write_table(second, src / "b.parquet")
    cfg = MetadataConfig(extra_columns=[], batch_rows=64)
    stats = prepare_units(str(src), str(tmp_path / "units"), cfg)
    rows = pa.concat_tables(_read_units(str(tmp_path / "units"))).to_pylist()
    assert [(r["url"], r["caption"]) for r in rows] == [
        (u[0], "zero, captioned"),  # the captionless row before it in its batch dropped
        (u[1], ""),  # captionless and first: kept, for the filter stage to drop and count...
        (u[2], "two"),
        (u[3], ""),
        (u[1], "one, later"),  # ...and a later captioned copy is kept
        (u[4], "four"),
    ]
    c = stats["counts"]
    assert c["duplicate_url"] == 5 and c["rows_kept"] == 6 and c["rows_read"] == 11
    # notes are counted for kept rows only
    assert c["empty_caption"] == 1 and c["missing_caption"] == 1


def test_more_units_than_five_digits_name_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline.data import metadata

    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(_laion(30), src / "part.parquet")
    monkeypatch.setattr(metadata, "SHARD_DIGITS", 1)  # 10 units at most, as 100,000 really
    cfg = MetadataConfig(rows_per_unit=2)
    with pytest.raises(ValueError, match=r"more than 9 work units: raise rows_per_unit \(now 2\)"):
        prepare_units(str(src), str(tmp_path / "units"), cfg)
    assert (
        len(
            prepare_units(str(src), str(tmp_path / "units2"), MetadataConfig(rows_per_unit=5))[
                "units"
            ]
        )
        <= 9
    )


def test_config_refuses_columns_img2dataset_writes_and_bad_executor_settings():
    """A user column named like a field img2dataset writes into every sample would be silently
    overwritten; a negative retry count ran no unit at all (inline): both are config errors."""
    from pipeline.data.metadata import MetadataConfig
    from pipeline.executor import ExecutorConfig

    MetadataConfig(extra_columns=["similarity", "punsafe"])
    for name in ("caption", "width", "status", "exif"):
        with pytest.raises(ValueError, match="may not include"):
            MetadataConfig(extra_columns=["similarity", name])
    # a name twice failed every shard inside img2dataset's reader, after its retries
    with pytest.raises(ValueError, match=r"names \['punsafe'\] more than once"):
        MetadataConfig(extra_columns=["punsafe", "similarity", "punsafe"])
    with pytest.raises(ValueError, match="max_retries"):
        ExecutorConfig(max_retries=-1)
    with pytest.raises(ValueError, match="num_actors"):
        ExecutorConfig(num_actors=0)
    with pytest.raises(ValueError, match="cpus_per_actor"):
        ExecutorConfig(cpus_per_actor=0)


def test_invalid_utf8_in_the_url_or_any_text_column_is_counted_not_raised(tmp_path):
    """Arrow's string columns may hold invalid UTF-8 (real dumps do); reading one as Python
    strings raised UnicodeDecodeError and ended the stage. The URL with bad bytes is dropped
    (bad_url: no server has that name), a text extra keeps its row with the bytes replaced and
    is counted (<column>_not_utf8), lists of strings too."""

    def text(values):  # bytes, viewed as a string column without validation
        return pa.array(values, pa.binary()).view(pa.string())

    table = pa.table(
        {
            "URL": text(
                [b"http://a.example/\xff.jpg", b"http://a.example/1.jpg", b"http://a.example/2.jpg"]
            ),
            "top_caption": text([b"one", b"two", b"thr\xe9e"]),
            "note": text([b"ok", b"caf\xe9", None]),
            "all_captions": pa.array([[b"x"], [b"y", b"\xfe"], []], pa.list_(pa.binary())).view(
                pa.list_(pa.string())
            ),
            "hash": pa.array([b"\xff\x00", b"\x01", b"\x02"], pa.binary()),  # bytes: hex
        }
    )
    src = tmp_path / "m.parquet"
    pq.write_table(table, src)
    cfg = MetadataConfig(
        caption_column="top_caption", extra_columns=["note", "all_captions", "hash"]
    )
    stats = prepare_units(str(src), str(tmp_path / "units"), cfg)
    c = stats["counts"]
    assert c["rows_read"] == 3 and c["rows_kept"] == 2 and c["bad_url"] == 1
    assert c["note_not_utf8"] == 1 and c["all_captions_not_utf8"] == 1
    assert c["caption_not_utf8"] == 1 and c["null_note"] == 1
    rows = pa.concat_tables(_read_units(str(tmp_path / "units"))).to_pylist()
    assert [r["url"] for r in rows] == ["http://a.example/1.jpg", "http://a.example/2.jpg"]
    assert rows[0]["note"] == "caf\ufffd" and rows[1]["note"] is None
    assert rows[0]["all_captions"] == ["y", "\ufffd"] and rows[1]["all_captions"] == []
    assert rows[0]["hash"] == "01" and rows[1]["caption"] == "thr\ufffde"
    assert clean_url(b"http://a.example/\xff.jpg") == (None, "bad_url")


@pytest.mark.parametrize("name", ["download.yaml", "download_hq.yaml", "download_local.yaml"])
def test_shipped_download_configs_read_laion_cocos_blip_caption(name, tmp_path):
    """LAION-COCO's TEXT is the original web alt-text; top_caption is the BLIP caption that
    LlamaGen trains on. The shipped configs (and so the demo, which mimics LAION-COCO) read
    top_caption."""
    from pipeline.config import load_config
    from pipeline.data.download import DownloadConfig

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    cfg = load_config(DownloadConfig, os.path.join(root, "data", name), ["input=a", "output=b"])
    assert cfg.metadata.caption_column == "top_caption"
    assert "similarity" in cfg.metadata.extra_columns
    table = _laion(4)
    alt = pa.array([f"IMG_{i:04d}.JPG" for i in range(4)])  # what alt-texts look like
    table = table.set_column(table.schema.get_field_index("TEXT"), "TEXT", alt)
    src = tmp_path / "m.parquet"
    pq.write_table(table, src)
    prepare_units(str(src), str(tmp_path / "units"), cfg.metadata)
    rows = pa.concat_tables(_read_units(str(tmp_path / "units"))).to_pylist()
    assert [r["caption"] for r in rows] == table.column("top_caption").to_pylist()


def _two_files(folder, column: str, first: pa.Array, second: pa.Array) -> None:
    folder.mkdir()
    for i, values in enumerate((first, second)):
        n = len(values)
        urls = [f"http://a.example/{i}-{j}.jpg" for j in range(n)]
        table = pa.table({"URL": urls, "TEXT": ["a cat"] * n, column: values})
        pq.write_table(table, folder / f"part-{i}.parquet")


def test_extra_column_int_in_one_file_float_in_the_next_keeps_the_floats(tmp_path):
    """The type of an extra column came from the first file that had it: int64 there made the
    next file's punsafe 0.97 a 0, without a count, and max_punsafe then kept unsafe images. Now
    every file's footer is read first and int with float is float64; a lossy cast raises."""
    from pipeline.data import metadata

    _two_files(
        tmp_path / "in", "punsafe", pa.array([0, 1], pa.int64()), pa.array([0.97, 0.51, None])
    )
    cfg = MetadataConfig(extra_columns=["punsafe"], rows_per_unit=10)
    stats = prepare_units(str(tmp_path / "in"), str(tmp_path / "units"), cfg)
    (unit,) = _read_units(str(tmp_path / "units"))
    assert unit.schema.field("punsafe").type == pa.float64()
    assert unit.column("punsafe").to_pylist() == [0.0, 1.0, 0.97, 0.51, None]
    assert stats["counts"]["null_punsafe"] == 1
    with pytest.raises(pa.ArrowInvalid, match="truncated"):
        metadata._column_array([1, 0.97], pa.int64())
    # inputs that agree on every type keep the fingerprint they had (their units are reused)
    files, inputs, fingerprint = metadata.units_fingerprint(str(tmp_path / "in/part-1.*"), cfg)
    settings = {k: v for k, v in to_dict(cfg).items() if k != "batch_rows"}
    assert fingerprint == hashlib.sha256(repr((inputs, settings)).encode()).hexdigest()[:16]


def test_extra_column_text_in_one_file_number_in_the_next_is_refused_before_any_unit(tmp_path):
    """A string column in one file and integers in the next failed on the unit that spans both
    (ArrowTypeError), possibly hours into cutting units. Now it is refused up front, naming the
    column, the files and their types, and units already there are left as they were."""
    _two_files(tmp_path / "in", "hash", pa.array(["abc", "def"]), pa.array([123], pa.int64()))
    units = tmp_path / "units"
    units.mkdir()
    (units / "00000.parquet").write_bytes(b"from before")
    cfg = MetadataConfig(extra_columns=["similarity", "hash"], rows_per_unit=1)
    with pytest.raises(TypeError, match=r"'hash'.*string in .*part-0\.parquet.*int64 in .*part-1"):
        prepare_units(str(tmp_path / "in"), str(units), cfg)
    assert os.listdir(units) == ["00000.parquet"]
    assert (units / "00000.parquet").read_bytes() == b"from before"


def test_extra_columns_of_dates_times_and_decimals_are_carried_as_text(tmp_path):
    """img2dataset writes each sample's json with a plain json.dumps after counting the sample a
    success: a timestamp, date, decimal or bytes extra column lost every image while the stage
    said all succeeded. Such columns are carried as their text (bytes as hex); nested ones are
    refused up front, naming the column, the file and its type."""
    import datetime
    import decimal
    import json

    folder = tmp_path / "in"
    folder.mkdir()
    table = pa.table(
        {
            "URL": ["http://a.example/0.jpg", "http://a.example/1.jpg"],
            "TEXT": ["a cat", "a dog"],
            "crawled": pa.array([datetime.datetime(2022, 1, 2, 3, 4, 5), None], pa.timestamp("s")),
            "day": pa.array([datetime.date(2022, 1, 2), datetime.date(2023, 5, 6)]),
            "price": pa.array([decimal.Decimal("1.25"), decimal.Decimal("10.50")]),
            "tags": pa.array([["a", "b"], []]),
        }
    )
    pq.write_table(table, folder / "part-0.parquet")
    cfg = MetadataConfig(extra_columns=["crawled", "day", "price", "tags"], rows_per_unit=10)
    prepare_units(str(folder), str(tmp_path / "units"), cfg)
    (unit,) = _read_units(str(tmp_path / "units"))
    for c in ("crawled", "day", "price"):
        assert unit.schema.field(c).type == pa.string(), c
    rows = unit.to_pylist()
    assert [r["crawled"] for r in rows] == ["2022-01-02 03:04:05.000", None]  # Arrow's text
    assert [r["day"] for r in rows] == ["2022-01-02", "2023-05-06"]
    assert [r["price"] for r in rows] == ["1.25", "10.50"]
    assert [r["tags"] for r in rows] == [["a", "b"], []]
    json.dumps(rows)  # what img2dataset does with each sample's values

    nested = pa.array([[datetime.date(2022, 1, 2)]])  # no JSON form inside a list: refused
    pq.write_table(
        pa.table({"URL": ["http://a.example/2.jpg"], "TEXT": ["x"], "days": nested}),
        folder / "part-1.parquet",
    )
    with pytest.raises(TypeError, match=r"'days' is list<.*date32.* in .*part-1\.parquet: a"):
        prepare_units(str(folder), str(tmp_path / "units2"), MetadataConfig(extra_columns=["days"]))


def test_64_bit_integers_beside_floats_that_float64_cannot_hold_are_refused_up_front(tmp_path):
    """LAION's ``hash`` is a 64-bit integer; int64 in one file and double in another settled
    it as float64, and the first unit holding a hash past 2**53 failed, hours into the run. The
    footers' min/max statistics decide it before any unit; small integers still promote."""
    big = pa.array([-5534741409218447209, 12], pa.int64())
    _two_files(tmp_path / "in", "hash", pa.array([1.5]), big)
    with pytest.raises(TypeError, match=r"'hash' is int64 in .*part-1\.parquet .* float64"):
        prepare_units(
            str(tmp_path / "in"), str(tmp_path / "units"), MetadataConfig(extra_columns=["hash"])
        )
    _two_files(tmp_path / "ok", "hash", pa.array([1.5]), pa.array([2**53, -3], pa.int64()))
    prepare_units(
        str(tmp_path / "ok"), str(tmp_path / "units"), MetadataConfig(extra_columns=["hash"])
    )
    (unit,) = _read_units(str(tmp_path / "units"))
    assert unit.column("hash").to_pylist() == [1.5, float(2**53), -3.0]
