import math
import os

import numpy as np
import pytest

from pipeline import storage
from pipeline.config import load_config, to_dict
from pipeline.data import filter as flt
from pipeline.data.filter import FilterConfig, ScoreConfig, filter_reason, run_score
from tests.rawshards import build_tiny_models, raw_key, write_raw_shards

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "data")

GOOD = {
    "original_width": 512,
    "original_height": 384,
    "punsafe": 0.1,
    "pwatermark": 0.2,
    "similarity": 0.3,
}


@pytest.mark.parametrize(
    "change, caption, reason",
    [
        ({}, "a red circle on white", None),
        ({}, "   ", "empty_caption"),
        ({}, "red", "caption_too_short"),
        ({}, "x" * 1001, "caption_too_long"),
        ({"original_width": 200}, "a red circle on white", "too_small"),
        (
            {"original_width": 1000, "original_height": 300},
            "a red circle",
            "aspect_ratio_too_large",
        ),
        ({"original_width": None, "width": None}, "a red circle", "size_missing"),
        ({"punsafe": 0.5}, "a red circle", "unsafe"),
        ({"punsafe": None}, "a red circle", "punsafe_missing"),
        ({"punsafe": float("nan")}, "a red circle", "punsafe_nan"),
        ({"punsafe": "high"}, "a red circle", "punsafe_invalid"),
        ({"pwatermark": 0.8}, "a red circle", "watermark"),
        ({"pwatermark": 0.79}, "a red circle", None),
        ({"similarity": 0.27}, "a red circle", "low_similarity"),
        ({"similarity": 0.28}, "a red circle", None),
        ({"punsafe": 0.9, "similarity": 0.1}, "red", "caption_too_short"),  # first failing
    ],
)
def test_filter_reasons(change, caption, reason):
    meta = {**GOOD, **change}
    assert filter_reason(meta, caption, FilterConfig()) == reason


def test_missing_keep_and_disabled_filters():
    meta = {"original_width": 512, "original_height": 512, "punsafe": float("nan")}
    assert filter_reason(meta, "a red circle", FilterConfig()) == "punsafe_nan"
    assert filter_reason(meta, "a red circle", FilterConfig(missing="keep")) is None
    off = FilterConfig(max_punsafe=None, max_pwatermark=None, min_similarity=None)
    assert filter_reason(meta, "a red circle", off) is None
    assert flt.aesthetic_reason(float("nan"), 5.0) == "aesthetic_nan"
    assert flt.aesthetic_reason(4.9, 5.0) == "low_aesthetic"
    assert flt.aesthetic_reason(float("nan"), None) is None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_models(str(tmp_path_factory.mktemp("models")), aesthetic=True)


def _meta(shard, i):
    return {
        1: {"punsafe": 0.9},
        2: {"similarity": None},
        3: {"caption": ""},
        4: {"original_width": 10},
    }.get(i, {})


def test_score_stage(tmp_path, models):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    keys = write_raw_shards(raw, 2, 8, meta_fn=_meta, broken={(1, 5)})
    # a damaged raw shard: not a tar at all (counted, scored as empty)
    storage.write_bytes(os.path.join(raw, "00002.tar"), b"this is not a tar" * 50)
    storage.write_json(os.path.join(raw, "00002_stats.json"), {"successes": 8})
    overrides = [f"input={raw}", f"output={out}", "executor.backend=inline"]
    cfg = load_config(
        ScoreConfig,
        os.path.join(CONFIGS, "score.yaml"),
        [*overrides, "filters.min_image_size=32"],
        aesthetic=to_dict(models["aesthetic"]),
    )
    summary = run_score(cfg)
    assert summary["shards"] == 3 and summary["samples"] == 16
    assert summary["dropped"] == {
        "unsafe": 2,
        "similarity_missing": 2,
        "empty_caption": 2,
        "too_small": 2,
        "undecodable_image": 1,
    }
    rows = flt.read_scores(out, 1)
    assert list(rows) == keys[1]
    assert rows[raw_key(1, 5)]["reason"] == "undecodable_image"
    kept = [r for r in rows.values() if r["keep"]]
    assert len(kept) == 3 and all(r["reason"] == "" for r in kept)
    assert all(np.isfinite(r["aesthetic"]) for r in kept)
    # dropped before scoring: no score spent on them
    assert math.isnan(rows[raw_key(1, 1)]["aesthetic"])
    assert flt.read_scores(out, 2) == {}
    assert storage.exists(os.path.join(out, flt.SCORE_CONFIG_NAME))

    # rerun: done shards are skipped (their parquet is not rewritten)
    before = os.stat(flt.score_uri(out, 0)).st_mtime_ns
    again = run_score(cfg)
    assert again["skipped_done"] == 3
    assert os.stat(flt.score_uri(out, 0)).st_mtime_ns == before

    # stage-2 selection: a threshold on the aesthetic score
    scores = sorted(r["aesthetic"] for r in kept)
    out2 = str(tmp_path / "scores2")
    cfg2 = load_config(
        ScoreConfig,
        None,
        [
            f"input={raw}",
            f"output={out2}",
            "executor.backend=inline",
            "max_shards=2",
            "filters.min_image_size=32",
            f"filters.min_aesthetic={scores[1]}",
        ],
        aesthetic=to_dict(models["aesthetic"]),
    )
    run_score(cfg2)
    rows2 = flt.read_scores(out2, 1)
    for k, r in rows.items():
        if r["keep"]:
            assert rows2[k]["keep"] == (r["aesthetic"] >= scores[1])
            assert rows2[k]["reason"] in ("", "low_aesthetic")


def test_score_config_rejects_threshold_without_model():
    with pytest.raises(Exception, match="min_aesthetic"):
        load_config(ScoreConfig, None, ["input=a", "output=b", "filters.min_aesthetic=5"])


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(CONFIGS) if n.startswith("score")))
def test_shipped_score_configs_load(name):
    cfg = load_config(ScoreConfig, os.path.join(CONFIGS, name))
    assert cfg.filters.max_punsafe == 0.5 and cfg.filters.max_pwatermark == 0.8
    assert cfg.aesthetic is not None and cfg.aesthetic.embed_dim == 768


def test_score_job_cli(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "score_job", os.path.join(CONFIGS, "..", "..", "jobs", "score.py")
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 1, 3, meta_fn=lambda s, i: {"punsafe": None} if i == 0 else {})
    argv = ["--config", os.path.join(CONFIGS, "score_cpu.yaml"), f"input={raw}",
            f"output={out}", "aesthetic=null", "filters.min_image_size=32",
            "executor.backend=inline"]  # fmt: skip
    assert job.main(argv) == 0
    rows = flt.read_scores(out, 0)
    assert [r["reason"] for r in rows.values()] == ["punsafe_missing", "", ""]
    assert storage.read_json(os.path.join(out, flt.SUMMARY_NAME))["kept"] == 2


def test_read_scores_keeps_the_first_row_of_a_key_the_shard_holds_twice(tmp_path):
    """The score stage scores a key's first copy and marks the second ``duplicate_key``; the
    first row is the key's, so pretokenize keeps the first copy (and drops the second itself)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"key": "k1", "keep": True, "reason": "", "aesthetic": 6.0},
        {"key": "k2", "keep": True, "reason": "", "aesthetic": 5.0},
        {"key": "k1", "keep": False, "reason": "duplicate_key", "aesthetic": float("nan")},
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(flt.score_uri(str(tmp_path), 3), buf.getvalue())
    got = flt.read_scores(str(tmp_path), 3)
    assert got["k1"]["keep"] is True and got["k1"]["aesthetic"] == 6.0
    assert set(got) == {"k1", "k2"}
