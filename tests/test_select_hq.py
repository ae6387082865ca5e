"""Stage 2's metadata from stage 1's results (pipeline/data/select_hq.py, jobs/select_hq.py).

A stage-1 set is built once: raw shards with img2dataset's parquet beside each tar, scored by the
score stage with the tiny aesthetic model; the aesthetic column is then set to known values the
way the score stage writes it (its shard stats and raw-shard identity kept), so which rows stage 2
gets is known exactly.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import storage
from pipeline.config import ConfigError, load_config, to_dict
from pipeline.data import filter as flt
from pipeline.data import shards
from pipeline.data.download import DownloadConfig
from pipeline.data.metadata import MetadataConfig, list_inputs, prepare_units, units_fingerprint
from pipeline.data.pretokenize import PretokenizeConfig
from pipeline.data.select_hq import (
    SUMMARY_NAME,
    SelectHQConfig,
    raw_parquet_uri,
    run_select_hq,
)
from tests.rawshards import build_tiny_models, download_again, raw_key, write_raw_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "data")
SELECT_YAML = os.path.join(CONFIGS, "select_hq.yaml")
EXTRAS = ["similarity", "punsafe", "pwatermark", "WIDTH", "HEIGHT", "hash"]
N_SHARDS, PER_SHARD, SCORED = 3, 8, 2  # shard 2 is downloaded but not scored

# per sample index: the original size img2dataset recorded, the aesthetic score set, and more
SIZES = {1: (600, 300), 4: (512, 512), 6: (2048, 1536), 7: (511, 900)}  # else 1024 x 768
AESTHETIC = {0: 6.0, 1: 5.5, 2: 5.3, 3: 7.0, 4: 5.0, 5: math.nan, 6: 3.0, 7: 5.2}
UNSAFE = {3}  # punsafe 0.9: the score stage drops it (keep false)
SELECTED = [0, 2, 4]  # kept, large enough (512 exactly counts), aesthetic >= 5.0 (exactly too)


def _meta(shard: int, i: int) -> dict:
    w, h = SIZES.get(i, (1024, 768))
    meta = {"original_width": w, "original_height": h, "WIDTH": w, "HEIGHT": h}
    meta["hash"] = f"hash-{shard}-{i}"
    if i in UNSAFE:
        meta["punsafe"] = 0.9
    return meta


def _img2dataset_parquet(raw: str, index: int, extras: list[str]) -> None:
    """Raw shard ``index``'s parquet as img2dataset writes it: the unit's columns (url, caption,
    the extra columns), then key, status, error_message, sizes and the hash; a failed row too,
    and the rows in another order than the tar's (the join is by key)."""
    rows = []
    for sample in shards.iter_raw_shard(raw, index, {}):
        meta = json.loads(sample["json"])
        rows.append(
            {
                "url": meta["url"],
                "caption": sample["txt"].decode(),
                **{c: meta.get(c) for c in extras},
                "key": meta["key"],
                "status": "success",
                "error_message": None,
                "width": meta["width"],
                "height": meta["height"],
                "original_width": meta["original_width"],
                "original_height": meta["original_height"],
                "sha256": "0" * 64,
            }
        )
    failed = {k: None for k in rows[0]}
    failed.update(url=f"http://127.0.0.1/dead-{index}.jpg", caption="a dead link",
                  key=raw_key(index, 9999), status="failed_to_download",
                  error_message="HTTP Error 404: Not Found")  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([failed, *reversed(rows)]), buf)
    storage.write_bytes(raw_parquet_uri(raw, index), buf.getvalue())


def _set_aesthetic(scores: str, index: int) -> None:
    """Score parquet ``index`` with AESTHETIC's values, written as the score stage writes it
    (its key-value metadata: shard stats and raw-shard identity, kept)."""
    uri = flt.score_uri(scores, index)
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    values = [AESTHETIC[int(k[-4:])] for k in table["key"].to_pylist()]
    col = table.schema.get_field_index("aesthetic")
    table = table.set_column(col, table.schema.field(col), pa.array(values, pa.float32()))
    assert table.schema.metadata[flt.RAW_SHARD_KEY]
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict:
    """Stage 1's raw shards and score parquets, and the captions and metadata by key."""
    root = tmp_path_factory.mktemp("stage1")
    models = build_tiny_models(str(root / "models"), aesthetic=True)
    raw, scores = str(root / "raw"), str(root / "scores")
    write_raw_shards(raw, N_SHARDS, PER_SHARD, meta_fn=_meta)
    for i in range(N_SHARDS):  # shard 1's metadata had no hash column
        _img2dataset_parquet(raw, i, EXTRAS if i != 1 else [e for e in EXTRAS if e != "hash"])
    cfg = load_config(
        flt.ScoreConfig,
        os.path.join(CONFIGS, "score.yaml"),
        [
            f"input={raw}",
            f"output={scores}",
            "executor.backend=inline",
            f"max_shards={SCORED}",
            "filters.min_image_size=32",
        ],  # fmt: skip
        aesthetic=to_dict(models["aesthetic"]),
    )
    flt.run_score(cfg)
    for i in range(SCORED):
        _set_aesthetic(scores, i)
    samples = {}
    for i in range(N_SHARDS):
        for s in shards.iter_raw_shard(raw, i, {}):
            samples[s["__key__"]] = {"json": json.loads(s["json"]), "caption": s["txt"].decode()}
    return {"root": str(root), "samples": samples}


def _copy(stage1: dict, tmp_path) -> tuple[str, str]:
    """A copy of stage 1's raw and score folders for one test (the raw shards keep their
    identity: it is their stats' bytes and tar sizes)."""
    for name in ("raw", "scores"):
        shutil.copytree(os.path.join(stage1["root"], name), tmp_path / name)
    return str(tmp_path / "raw"), str(tmp_path / "scores")


def _cfg(raw: str, scores: str, out: str, *more: str) -> SelectHQConfig:
    # the fixture leaves one raw shard unscored (SCORED < N_SHARDS)
    overrides = [f"input={raw}", f"scores={scores}", f"output={out}", "threads=4",
                 "allow_partial=true", *more]  # fmt: skip
    return load_config(SelectHQConfig, SELECT_YAML, overrides)


def _expected(samples: dict, shard_ids=range(SCORED)) -> list[dict]:
    """The rows stage 2 should get, in shard then tar order, as the metadata columns."""
    out = []
    for shard in shard_ids:
        for i in SELECTED:
            s = samples[raw_key(shard, i)]
            meta = s["json"]
            row = {"URL": meta["url"], "top_caption": s["caption"]}
            row.update({c: meta.get(c) for c in EXTRAS})
            if shard == 1:
                row["hash"] = None  # its raw parquet has no such column
            out.append(row)
    return out


def _parts(out: str) -> list[str]:
    return [storage.join(out, n) for n in storage.list_dir(out, ".parquet")]


def _rows(out: str) -> list[dict]:
    rows = []
    for uri in _parts(out):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
    return rows


def _files(out: str) -> dict[str, bytes]:
    return {n: storage.read_bytes(storage.join(out, n)) for n in storage.list_dir(out)}


def test_selects_kept_aesthetic_large_rows_with_captions_for_the_download(stage1, tmp_path):
    raw, scores = _copy(stage1, tmp_path)
    out = str(tmp_path / "metadata-hq")
    summary = run_select_hq(_cfg(raw, scores, out, "rows_per_part=4"))

    expected = _expected(stage1["samples"])
    got = _rows(out)
    assert [r["URL"] for r in got] == [r["URL"] for r in expected]
    assert got == expected  # captions and the original metadata's columns, hash null in shard 1
    assert all(r["top_caption"] for r in got)
    assert storage.list_dir(out, ".parquet") == ["part-00000.parquet", "part-00001.parquet"]
    assert [p["rows"] for p in summary["parts"]] == [4, 2]

    assert summary["rows"] == {"read": SCORED * PER_SHARD, "selected": 6}
    assert summary["dropped"] == {
        "not_kept": 2,  # punsafe
        "too_small": 4,  # 600 x 300 and 511 x 900, though their aesthetic passes
        "aesthetic_nan": 2,
        "low_aesthetic": 2,
    }
    assert summary["at_aesthetic"] == {"4.5": 6, "5": 6, "5.5": 2, "6": 2, "6.5": 0}
    assert summary["shards"]["raw"] == N_SHARDS and summary["shards"]["read"] == SCORED
    assert summary["shards"]["unscored"] == 1 and summary["shards"]["examples"]["unscored"] == [2]
    assert storage.read_json(os.path.join(out, SUMMARY_NAME)) == summary

    # the stage-2 download's metadata stage reads it as it is, with download_hq.yaml's columns
    dl = load_config(
        DownloadConfig,
        os.path.join(CONFIGS, "download_hq.yaml"),
        [f"input={out}/", f"output={tmp_path / 'raw-hq'}"],
    )
    files, _, _ = units_fingerprint(dl.input, dl.metadata)
    assert [os.path.basename(f) for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    units = str(tmp_path / "units")
    stats = prepare_units(dl.input, units, dl.metadata)
    assert stats["counts"]["rows_read"] == stats["counts"]["rows_kept"] == 6
    assert not [k for k in stats["counts"] if k.startswith("missing_column")]
    assert stats["counts"]["null_hash"] == 3  # shard 1's
    (unit,) = stats["units"]
    table = pq.read_table(os.path.join(units, unit["name"]))
    assert table["url"].to_pylist() == [r["URL"] for r in expected]
    assert table["caption"].to_pylist() == [r["top_caption"] for r in expected]
    assert table["WIDTH"].to_pylist() == [r["WIDTH"] for r in expected]


def test_thresholds_are_settings(stage1, tmp_path):
    raw, scores = _copy(stage1, tmp_path)
    out = str(tmp_path / "any-size")
    summary = run_select_hq(_cfg(raw, scores, out, "min_original_size=null", "min_aesthetic=5.5"))
    keys = {raw_key(s, i) for s in range(SCORED) for i in (0, 1)}  # 6.0, and 5.5 at 600 x 300
    urls = {stage1["samples"][k]["json"]["url"] for k in keys}
    assert {r["URL"] for r in _rows(out)} == urls and summary["rows"]["selected"] == 4
    assert "too_small" not in summary["dropped"]


def test_rerun_gives_identical_files_and_replaces_a_killed_run(stage1, tmp_path):
    raw, scores = _copy(stage1, tmp_path)
    out = str(tmp_path / "metadata-hq")
    cfg = _cfg(raw, scores, out, "rows_per_part=4")
    first = run_select_hq(cfg)
    files = _files(out)
    assert set(files) == {"part-00000.parquet", "part-00001.parquet", SUMMARY_NAME,
                          "_select_hq_config.yaml"}  # fmt: skip
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in files}

    assert run_select_hq(cfg) == first
    assert _files(out) == files
    # nothing written again
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in files} == mtimes

    # a run killed while committing: no summary, a part cut short, one of another count
    os.remove(os.path.join(out, SUMMARY_NAME))
    with open(os.path.join(out, "part-00001.parquet"), "r+b") as f:
        f.truncate(10)
    shutil.copy(os.path.join(out, "part-00000.parquet"), os.path.join(out, "part-00007.parquet"))
    assert run_select_hq(cfg) == first
    assert _files(out) == files

    # the parts are the same for the same inputs, wherever they are written
    again = str(tmp_path / "elsewhere")
    run_select_hq(_cfg(raw, scores, again, "rows_per_part=4"))
    assert {n: b for n, b in _files(again).items() if n.endswith(".parquet")} == {
        n: b for n, b in files.items() if n.endswith(".parquet")
    }


def test_the_download_refuses_a_selection_being_written_or_changed(stage1, tmp_path, monkeypatch):
    raw, scores = _copy(stage1, tmp_path)
    out = str(tmp_path / "metadata-hq")
    cfg = _cfg(raw, scores, out, "rows_per_part=4")

    # the first run killed after uploading one part: the config is there, the summary not
    put_file, calls = storage.put_file, []

    def killed_after_one(src, dst):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(dst)
        put_file(src, dst)

    monkeypatch.setattr(storage, "put_file", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_select_hq(cfg)
    monkeypatch.undo()
    assert storage.list_dir(out, ".parquet") == ["part-00000.parquet"]
    for source in (out, out + "/", os.path.join(out, "*.parquet")):
        with pytest.raises(FileNotFoundError, match="select_hq output without its"):
            prepare_units(source, str(tmp_path / "units"), MetadataConfig())

    run_select_hq(cfg)  # completes the folder
    assert len(list_inputs(out)) == 2

    # a part removed, or one added, after the summary: the folder is not the selection it lists
    extra = os.path.join(out, "part-00002.parquet")
    shutil.copy(os.path.join(out, "part-00000.parquet"), extra)
    with pytest.raises(FileNotFoundError, match=r"part-00002.parquet: missing, extra"):
        list_inputs(out)
    os.remove(extra)
    os.remove(os.path.join(out, "part-00001.parquet"))
    with pytest.raises(FileNotFoundError, match=r"part-00001.parquet: missing, extra"):
        list_inputs(out)
    # one part named alone is read as asked (a file, not the folder's selection)
    assert list_inputs(os.path.join(out, "part-00000.parquet")) == [
        os.path.join(out, "part-00000.parquet")
    ]


def test_other_settings_and_foreign_files_are_refused(stage1, tmp_path):
    raw, scores = _copy(stage1, tmp_path)
    out = str(tmp_path / "metadata-hq")
    run_select_hq(_cfg(raw, scores, out))
    files = _files(out)
    with pytest.raises(ConfigError, match=r"different 'min_aesthetic' \(5\.0 != 6\.0\)"):
        run_select_hq(_cfg(raw, scores, out, "min_aesthetic=6.0"))
    assert _files(out) == files  # untouched
    # the same folder spelt with a trailing slash is the same setting
    run_select_hq(_cfg(raw + "/", scores + "/", out))

    other = tmp_path / "not-empty"
    other.mkdir()
    pq.write_table(pa.table({"URL": ["http://x/y.jpg"]}), other / "mine.parquet")
    with pytest.raises(ConfigError, match="did not write .*mine.parquet"):
        run_select_hq(_cfg(raw, scores, str(other)))
    assert os.listdir(other) == ["mine.parquet"]

    with pytest.raises(ConfigError, match="select none"):
        run_select_hq(_cfg(raw, scores, str(tmp_path / "none"), "min_aesthetic=99"))
    assert not os.path.exists(tmp_path / "none" / SUMMARY_NAME)


def test_a_score_row_of_another_image_is_dropped(stage1, tmp_path):
    """A key is a place in a shard: a raw parquet whose url at that key is another image's (a
    raw folder downloaded again from other metadata, scores older than the identity check)."""
    raw, scores = _copy(stage1, tmp_path)
    table = pq.read_table(raw_parquet_uri(raw, 1))
    urls = table["url"].to_pylist()
    urls[table["key"].to_pylist().index(raw_key(1, 2))] = "http://127.0.0.1/else.jpg"
    table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls))
    pq.write_table(table, raw_parquet_uri(raw, 1))
    summary = run_select_hq(_cfg(raw, scores, str(tmp_path / "out")))
    assert summary["dropped"]["score_of_another_image"] == 1
    expected = [r for r in _expected(stage1["samples"]) if r["URL"] != _url(stage1, 1, 2)]
    assert _rows(str(tmp_path / "out")) == expected and len(expected) == 5


def _url(stage1: dict, shard: int, i: int) -> str:
    return stage1["samples"][raw_key(shard, i)]["json"]["url"]


def test_stale_score_parquets_are_counted(stage1, tmp_path):
    raw, scores = _copy(stage1, tmp_path)
    download_again(raw, 0, PER_SHARD, str(tmp_path), when=1e9, meta_fn=_meta)
    _img2dataset_parquet(raw, 0, EXTRAS)
    os.remove(os.path.join(raw, "00002_stats.json"))  # the unscored shard, not complete now
    with pytest.raises(ConfigError, match=r"1 raw shards .* downloaded again .*\[0\]"):
        run_select_hq(_cfg(raw, scores, str(tmp_path / "out"), "allow_partial=false"))
    summary = run_select_hq(_cfg(raw, scores, str(tmp_path / "out")))
    assert summary["shards"]["stale_scores"] == 1 and summary["shards"]["read"] == 1
    assert summary["shards"]["examples"]["stale_scores"] == [0]
    assert summary["rows"]["selected"] == len(SELECTED)


def test_on_s3_through_the_job(stage1, tmp_path, s3_bucket):
    raw, scores = f"{s3_bucket}/t2i/raw/laion-coco", f"{s3_bucket}/t2i/scores/laion-coco"
    storage.put_dir(os.path.join(stage1["root"], "raw"), raw)
    storage.put_dir(os.path.join(stage1["root"], "scores"), scores)
    out = f"{s3_bucket}/t2i/metadata/laion-hq"
    spec = importlib.util.spec_from_file_location("select_hq_job", f"{ROOT}/jobs/select_hq.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--config", SELECT_YAML, f"input={raw}", f"scores={scores}", f"output={out}",
            "rows_per_part=5"]  # fmt: skip
    # a raw shard not scored yet (score still running, or failed there): refused, nothing written
    with pytest.raises(ConfigError, match=r"1 of 3 raw shards .* no score parquet .*\[2\]"):
        job.main(argv)
    assert not storage.list_dir(out)
    argv.append("allow_partial=true")
    assert job.main(argv) == 0
    assert _rows(out) == _expected(stage1["samples"])
    files = _files(out)
    assert len([n for n in files if n.endswith(".parquet")]) == 2
    assert job.main(argv) == 0
    assert _files(out) == files

    dl = load_config(
        DownloadConfig,
        os.path.join(CONFIGS, "download_hq.yaml"),
        [f"input={out}/", f"output={s3_bucket}/t2i/raw/laion-hq"],
    )
    stats = prepare_units(dl.input, f"{s3_bucket}/t2i/raw/laion-hq/_meta/units", dl.metadata)
    assert stats["counts"]["rows_kept"] == 6


def test_shipped_config_matches_the_stage2_download_and_pretokenize():
    cfg = load_config(SelectHQConfig, SELECT_YAML, ["input=r", "scores=s", "output=o"])
    dl = load_config(
        DownloadConfig, os.path.join(CONFIGS, "download_hq.yaml"), ["input=i", "output=o"]
    )
    pre = load_config(PretokenizeConfig, os.path.join(CONFIGS, "pretokenize_stage2.yaml"))
    assert cfg.url_column == dl.metadata.url_column
    assert cfg.caption_column == dl.metadata.caption_column
    assert cfg.extra_columns == dl.metadata.extra_columns
    assert cfg.min_aesthetic == pre.min_aesthetic == 5.0
    assert cfg.min_original_size == pre.resolution == dl.min_image_size == 512
    with pytest.raises(ConfigError, match="may not include"):
        load_config(SelectHQConfig, SELECT_YAML, ["input=r", "scores=s", "output=o",
                                                  "extra_columns=[original_width]"])  # fmt: skip


def test_scores_made_without_an_aesthetic_model_are_refused(stage1, tmp_path):
    raw, scores = _copy(stage1, tmp_path)
    saved = os.path.join(scores, flt.SCORE_CONFIG_NAME)
    with open(saved) as f:
        cfg = yaml.safe_load(f)
    with open(saved, "w") as f:
        yaml.safe_dump({**cfg, "aesthetic": None}, f)
    with pytest.raises(ConfigError, match="without an aesthetic model"):
        run_select_hq(_cfg(raw, scores, str(tmp_path / "out")))
