import io
import math
import os

import numpy as np
import pytest

from pipeline import storage
from pipeline.config import ConfigError, load_config, to_dict
from pipeline.data import filter as flt
from pipeline.data.filter import FilterConfig, ScoreConfig, filter_reason, run_score
from tests.rawshards import build_tiny_models, download_again, raw_key, write_raw_shards

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


def test_an_image_clip_cannot_preprocess_is_counted(tmp_path, models, monkeypatch):
    """A decodable image that CLIP's preprocessing fails on gets no score (NaN): kept unscored
    without min_aesthetic, as before, but now counted in the shard's stats."""
    from pipeline.models.aesthetic import AestheticScorer

    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 1, 4)
    real = AestheticScorer.score

    def first_unscored(self, images):  # as score_and_embed gives an image it cannot preprocess
        scores = real(self, images)
        scores[0] = np.nan
        return scores

    monkeypatch.setattr(AestheticScorer, "score", first_unscored)
    summary = run_score(_score_cfg(raw, out, to_dict(models["aesthetic"])))
    assert summary["stats_sum"]["aesthetic_unscored"] == 1
    rows = list(flt.read_scores(out, 0).values())
    assert sum(math.isnan(r["aesthetic"]) for r in rows) == 1 and all(r["keep"] for r in rows)


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


# --- what a score output folder records ------------------------------------------------------


def _score_cfg(raw, out, aesthetic, *extra):
    over = [f"input={raw}", f"output={out}", "executor.backend=inline", "filters.min_image_size=32"]
    return load_config(ScoreConfig, None, [*over, *extra], aesthetic=aesthetic)


def test_rerun_with_other_content_settings_is_refused(tmp_path, models):
    """Scored parquets are skipped on a rerun: one made with other filters, another aesthetic
    model, or new weights at the same URI would keep its old rows under a score_config.yaml
    that no longer describes them. Such a rerun is refused, naming what changed; devices and
    batch sizes are not content and a rerun with others adds to the folder."""
    import shutil

    import torch

    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 2, 3)
    aes_dir = str(tmp_path / "aesthetic")
    shutil.copytree(os.path.dirname(models["aesthetic"].head_weights), aes_dir)
    aesthetic = {
        **to_dict(models["aesthetic"]),
        "clip_weights": os.path.join(aes_dir, "clip.pt"),
        "head_weights": os.path.join(aes_dir, "head.pth"),
        "clip_model_config": os.path.join(
            aes_dir, os.path.basename(models["aesthetic"].clip_model_config)
        ),
    }
    run_score(_score_cfg(raw, out, aesthetic, "max_shards=1"))
    saved = storage.read_text(os.path.join(out, flt.SCORE_CONFIG_NAME))

    with pytest.raises(ConfigError, match=r"'filters.min_similarity' \(0.28 != 0.3\)"):
        run_score(_score_cfg(raw, out, aesthetic, "filters.min_similarity=0.3"))
    with pytest.raises(ConfigError) as info:
        bf16 = {**aesthetic, "dtype": "bfloat16"}
        run_score(_score_cfg(raw, out, bf16, "filters.max_punsafe=0.4"))
    assert "'aesthetic.dtype' ('float32' != 'bfloat16')" in str(info.value)
    assert "'filters.max_punsafe' (0.5 != 0.4)" in str(info.value)
    with pytest.raises(ConfigError, match=r"'aesthetic' \(\{"):
        run_score(_score_cfg(raw, out, None))
    # another raw input scored into the same folder would mix two datasets' rows in it
    other_raw = str(tmp_path / "raw_other")
    write_raw_shards(other_raw, 2, 3)
    with pytest.raises(ConfigError, match=r"'input'"):
        run_score(_score_cfg(other_raw, out, aesthetic))
    assert storage.read_text(os.path.join(out, flt.SCORE_CONFIG_NAME)) == saved  # not overwritten
    # the same input written with a trailing slash is the same folder: nothing left to score
    assert run_score(_score_cfg(raw + "/", out, aesthetic, "max_shards=1"))["skipped_done"] == 1

    # other hardware: accepted, and it scores the shard left
    other_hw = {**aesthetic, "batch_size": 2, "device": "cpu", "cache_dir": str(tmp_path)}
    summary = run_score(_score_cfg(raw, out, other_hw))
    assert summary["shards"] == 2 and summary["skipped_done"] == 1

    # weights fingerprinted the way outputs saved before whole-file digests were (sampled
    # blocks): the same weights, accepted, and the record is brought up to date
    inputs_uri = os.path.join(out, flt.SCORE_INPUTS_NAME)
    prints = storage.read_json(inputs_uri)
    key = "head_weights"
    legacy = storage._local_fingerprint(aesthetic[key], storage._sampled_digest)
    assert prints[key] and legacy != prints[key]
    storage.write_json(inputs_uri, {**prints, key: legacy})
    assert run_score(_score_cfg(raw, out, aesthetic))["skipped_done"] == 2
    assert storage.read_json(inputs_uri) == prints

    # a retrained aesthetic head written over the old one
    head = torch.load(aesthetic["head_weights"], weights_only=True)
    torch.save({k: -v for k, v in head.items()}, aesthetic["head_weights"])
    with pytest.raises(ConfigError, match=r"content of aesthetic.head_weights"):
        run_score(_score_cfg(raw, out, aesthetic))

    # an empty folder (nothing scored yet) takes any settings
    other = str(tmp_path / "scores_other")
    run_score(_score_cfg(raw, other, None, "max_shards=1"))
    storage.remove(flt.score_uri(other, 0))
    run_score(_score_cfg(raw, other, None, "max_shards=1", "filters.min_similarity=0.3"))
    assert "min_similarity: 0.3" in storage.read_text(os.path.join(other, flt.SCORE_CONFIG_NAME))


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_decode_rgb_scales_16bit_flattens_transparency_on_white_and_sniffs_nothing():
    from PIL import Image

    from pipeline.data.raw import decode_rgb

    grey16 = Image.fromarray(np.array([[0, 257, 30000, 65535]], dtype=np.uint16))
    img, problem, notes = decode_rgb({"png": _png(grey16)})
    assert problem is None and notes == ("converted_16bit",)
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0,) * 3, (1,) * 3, (117,) * 3, (255,) * 3]

    # transparent pixels store black (or any colour) underneath: a viewer shows the background
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (200, 0, 0, 255))
    rgba.putpixel((2, 0), (200, 0, 0, 128))
    img, _, notes = decode_rgb({"png": _png(rgba)})
    assert notes == ("converted_transparent",)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (200, 0, 0)
    assert img.getpixel((2, 0)) == (227, 127, 127)  # half over white
    la = Image.new("LA", (2, 2), (0, 0))
    assert decode_rgb({"png": _png(la)})[0].getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30])
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0
    img, _, notes = decode_rgb({"png": _png(pal)})
    assert notes == ("converted_transparent",)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (10, 200, 30)
    # opaque alpha: nothing to flatten, nothing counted
    img, _, notes = decode_rgb({"png": _png(Image.new("RGBA", (2, 2), (9, 8, 7, 255)))})
    assert notes == () and img.getpixel((0, 0)) == (9, 8, 7)
    # only the JPEG, PNG and WebP decoders: a GIF under any name is not decoded
    gif = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(gif, "GIF")
    assert decode_rgb({"png": gif.getvalue()})[:2] == (None, "undecodable_image")
    assert decode_rgb({"txt": b"x"})[:2] == (None, "missing_image")


def test_damage_and_mended_inputs_are_kept_with_each_shard_and_summed(tmp_path):
    """A damaged tar's counts, non-UTF-8 captions and converted images are stored inside the
    shard's parquet and summed in score_summary.json, on every run: a rerun that skips the
    scored shards reports them as the first run did."""
    import json as jsonlib

    import webdataset as wds
    from PIL import Image

    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 2, 3)
    # shard 1 again, by hand: a 16-bit PNG, a transparent PNG, a caption that is not utf-8
    # and one from the json with a lone surrogate (json.dumps writes it as \\ud800)
    meta = {"original_width": 64, "original_height": 64, "punsafe": 0.0, "pwatermark": 0.0,
            "similarity": 0.5, "url": "http://x/\ud800.jpg"}  # fmt: skip
    grey16 = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    samples = [
        {"png": _png(grey16), "txt": b"a grey square"},
        {"png": _png(rgba), "txt": b"caf\xe9 on a \xff wall"},
        {"png": _png(rgba), "json-caption": "a lone \ud800 surrogate"},
    ]
    with wds.TarWriter(os.path.join(raw, "00001.tar")) as tw:
        for i, s in enumerate(samples):
            m = {**meta, "caption": s.pop("json-caption", "")}
            tw.write({"__key__": raw_key(1, i), **s, "json": jsonlib.dumps(m).encode()})
    storage.write_json(os.path.join(raw, "00001_stats.json"), {"successes": 3})
    # shard 2: broken off after its first sample; img2dataset said 3
    write_raw_shards(str(tmp_path / "more"), 3, 3)
    data = open(tmp_path / "more" / "00002.tar", "rb").read()
    storage.write_bytes(os.path.join(raw, "00002.tar"), data[: len(data) // 2])
    storage.write_json(os.path.join(raw, "00002_stats.json"), {"successes": 3})

    cfg = _score_cfg(raw, out, None, "filters.min_caption_chars=1")
    for summary in (run_score(cfg), run_score(cfg)):  # the second run skips every shard
        sums = summary["stats_sum"]
        assert 3 + 3 <= sums["raw_samples"] < 9  # shard 2 gave what came before the damage
        assert sums["corrupt_tar"] == 1 and sums["missing_from_tar"] == 9 - sums["raw_samples"]
        assert list(summary["damaged_shards"]) == ["2"] and summary["damaged_shards"]["2"]
        assert sums["caption_not_utf8"] == 2
        assert sums["converted_16bit"] == 1 and sums["converted_transparent"] == 2
        assert summary["shards_without_stats"] == 0
    assert storage.read_json(os.path.join(out, flt.SUMMARY_NAME))["stats_sum"] == sums
    rows = flt.read_scores(out, 1)
    assert [r["keep"] for r in rows.values()] == [True, True, True]
    assert rows[raw_key(1, 0)]["url"] == "http://x/\ufffd.jpg"


@pytest.mark.parametrize(
    "override, message",
    [
        ("decode_threads=0", "decode_threads is 0: it must be at least 1"),
        ("decode_threads=-2", "decode_threads is -2: it must be at least 1"),
        ("aesthetic.batch_size=0", "aesthetic.batch_size is 0: it must be at least 1"),
        ("max_shards=0", "max_shards is 0: it must be at least 1"),
        ("max_shards=-1", "max_shards is -1: it must be at least 1"),
    ],
)
def test_score_settings_that_would_fail_every_shard_are_refused_at_load(override, message):
    """Found when the config loads, not as every shard failing on every worker ("max_workers
    must be greater than 0") after the model is loaded."""
    with pytest.raises(ConfigError, match=message):
        load_config(
            ScoreConfig, os.path.join(CONFIGS, "score.yaml"), ["input=a", "output=b", override]
        )


# --- a raw shard downloaded again after it was scored -------------------------------------------


def test_stats_that_do_not_read_leave_their_shard_out(tmp_path):
    """img2dataset writes _stats.json with a plain open: while it is written it exists, empty,
    and a kill can cut it short; the download removes such a file and downloads the shard
    again. Until then the shard is not complete: scored now, its parquet would outlive it."""
    from pipeline.data import shards

    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 4, 3)
    storage.write_bytes(os.path.join(raw, "00001_stats.json"), b"")
    storage.write_bytes(os.path.join(raw, "00002_stats.json"), b'{"count": 3, "succ')
    storage.write_bytes(os.path.join(raw, "00003_stats.json"), b"[3]")
    assert shards.raw_shard_indices(raw) == [0]
    summary = run_score(_score_cfg(raw, out, None))
    assert summary["shards"] == 1 and flt.scored_indices(out) == {0}


def test_a_raw_shard_downloaded_again_is_scored_again(tmp_path):
    """A score parquet is done for the download of its raw shard that it scored: one
    downloaded again since (overwrite=true into the same folder, or redone for stats that did
    not read) is scored again, its parquet overwritten and counted; the others are skipped."""
    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 2, 3)
    for i in (0, 1):
        download_again(raw, i, 3, str(tmp_path), 1000.0, lambda s, i: {"punsafe": 0.9})
    cfg = _score_cfg(raw, out, None)
    first = run_score(cfg)
    assert first["kept"] == 0 and first["rescored_changed"] == 0
    assert flt.read_raw_identity(out, 1) is not None
    before = os.stat(flt.score_uri(out, 0)).st_mtime_ns

    download_again(raw, 1, 3, str(tmp_path), 2000.0)  # the same URLs, safe this time
    summary = run_score(cfg)
    assert summary["rescored_changed"] == 1 and summary["skipped_done"] == 1
    assert [r["keep"] for r in flt.read_scores(out, 1).values()] == [True] * 3
    assert summary["kept"] == 3 and summary["dropped"] == {"unsafe": 3}
    assert os.stat(flt.score_uri(out, 0)).st_mtime_ns == before
    again = run_score(cfg)
    assert again["rescored_changed"] == 0 and again["skipped_done"] == 2


def _forget_raw_identity(out, index):
    """Score parquet ``index`` as written before the raw shard's identity was recorded."""
    import pyarrow.parquet as pq

    uri = flt.score_uri(out, index)
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    meta = {k: v for k, v in table.schema.metadata.items() if k != flt.RAW_SHARD_KEY}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    storage.write_bytes(uri, buf.getvalue())


def test_score_parquets_without_a_raw_identity_are_done_as_before(tmp_path):
    """A parquet written before the raw shard's identity was recorded has nothing to compare:
    it stays done, as it was, never taken for another download's."""
    raw, out = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 2, 3)
    cfg = _score_cfg(raw, out, None)
    run_score(cfg)
    _forget_raw_identity(out, 0)
    assert flt.read_raw_identity(out, 0) is None
    download_again(raw, 0, 3, str(tmp_path), 3000.0)
    summary = run_score(cfg)
    assert summary["rescored_changed"] == 0 and summary["skipped_done"] == 2
    assert flt.replaced_raw_shards(raw, out, [0, 1]) == []
