import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.data import shards
from pipeline.data.filter import ScoreConfig, decode_rgb, run_score
from pipeline.data.pretokenize import (
    PretokenizeConfig,
    resize_center_crop,
    run_pretokenize,
    to_pixels,
)
from pipeline.models.text_encoder import TextEncoder
from pipeline.models.vq import VQModel
from tests.rawshards import build_tiny_models, download_again, raw_key, write_raw_shards
from tests.raycluster import signal_all, wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "data", "pretokenize_tiny.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_models(str(tmp_path_factory.mktemp("models")))


def _meta(shard, i):
    if (shard, i) == (0, 1):
        return {"punsafe": 0.9}
    if (shard, i) == (0, 2):
        return {"caption": ""}
    return {}


def _overrides(raw, out, models, *extra):
    return [
        f"input={raw}",
        f"output={out}",
        f"vq.uri={models['vq']}",
        f"text.uri={models['t5']}",
        "executor.backend=inline",
        *extra,
    ]


def test_pretokenize_content_drops_and_damage(tmp_path, models):
    raw = str(tmp_path / "raw")
    keys = write_raw_shards(raw, 3, 6, meta_fn=_meta, broken={(1, 3)})
    # shard 2: the tar breaks off mid-way (img2dataset's stats still say 6 images)
    tar2 = os.path.join(raw, "00002.tar")
    data = open(tar2, "rb").read()
    open(tar2, "wb").write(data[: len(data) // 2 + 700])
    # shard 3: not a tar at all
    storage.write_bytes(os.path.join(raw, "00003.tar"), b"garbage" * 100)
    storage.write_json(os.path.join(raw, "00003_stats.json"), {"successes": 6})

    scores = str(tmp_path / "scores")
    run_score(
        load_config(
            ScoreConfig,
            None,
            [
                f"input={raw}",
                f"output={scores}",
                "executor.backend=inline",
                "max_shards=2",
                "filters.min_image_size=32",
            ],
        )
    )
    out = str(tmp_path / "tokens")
    cfg = load_config(PretokenizeConfig, TINY, _overrides(raw, out, models, f"scores={scores}"))
    m = run_pretokenize(cfg)
    # shards 2 and 3 have no score parquet (max_shards=2): left for later, not failed, listed
    assert [s["index"] for s in m["shards"]] == [0, 1]
    assert m["unscored_shards"] == [2, 3] and not m["failed_shards"]
    assert m["dropped"] == {
        "filtered_empty_caption": 1,
        "filtered_unsafe": 1,
        "filtered_undecodable_image": 1,
    }
    assert m["num_samples"] == 9
    assert storage.exists(os.path.join(out, "pretokenize_config.yaml"))

    # what was stored is what the models give (same batch as the worker: one batch per shard)
    got = [
        shards.decode_token_sample(s, strict=True)
        for s in wds.WebDataset(os.path.join(out, "00000.tar"), shardshuffle=False)
    ]
    assert [g["key"] for g in got] == [raw_key(0, i) for i in (0, 3, 4, 5)]
    samples = {s["__key__"]: s for s in shards.iter_raw_shard(raw, 0, {})}
    imgs = [resize_center_crop(decode_rgb(samples[g["key"]])[0], 64) for g in got]
    x = torch.stack([to_pixels(i) for i in imgs])
    x_flip = torch.stack([to_pixels(i.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for i in imgs])
    vq = VQModel.from_pretrained(models["vq"])
    ref = vq.encode(torch.cat([x, x_flip])).numpy()
    text = TextEncoder.from_pretrained(models["t5"], batch_size=16)
    enc = text.encode([g["txt"] for g in got])
    for i, g in enumerate(got):
        assert g["codes"].shape == (8, 8)
        np.testing.assert_array_equal(g["codes"], ref[i])
        np.testing.assert_array_equal(g["codes_flip"], ref[len(got) + i])
        np.testing.assert_array_equal(g["t5"], enc.features[i].numpy())
        assert g["t5"].shape == (enc.lengths[i], 64)
        assert g["txt"] == samples[g["key"]]["txt"].decode()
        assert g["json"]["source_shard"] == 0 and g["json"]["url"].endswith(f"{g['key']}.jpg")
        assert "aesthetic" not in g["json"]["scores"] and g["json"]["scores"]["punsafe"] > 0

    # without scores: every sample, the stage's own checks count the drops; damage is counted
    out2 = str(tmp_path / "tokens_all")
    m2 = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models)))
    by_index = {s["index"]: s for s in m2["shards"]}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[0]["stats"]["dropped"] == {"empty_caption": 1}
    assert by_index[1]["stats"]["dropped"] == {"undecodable_image": 1}
    s2 = by_index[2]["stats"]
    intact = by_index[2]["num_samples"]
    assert 0 < intact < 6 and s2["missing_from_tar"] == 6 - s2["raw_samples"]
    assert [g["key"] for g in shards.read_token_shard(os.path.join(out2, "00002.tar"))] == keys[2][
        :intact
    ]
    s3 = by_index[3]["stats"]
    assert s3["corrupt_tar"] == 1 and by_index[3]["num_samples"] == 0
    assert s3["missing_from_tar"] == 6
    assert m2["stats_sum"]["corrupt_tar"] == sum(
        s["stats"].get("corrupt_tar", 0) for s in m2["shards"]
    )
    assert m2["unscored_shards"] == []
    # the dataset's mean caption length: over the samples stored (not a sum of shard means)
    lengths = [
        g["t5"].shape[0] for i in by_index for g in shards.read_token_shard(f"{out2}/{i:05d}.tar")
    ]
    assert m2["t5_tokens_mean"] == pytest.approx(np.mean(lengths))
    assert "t5_tokens_mean" not in m2["stats_sum"]
    assert m2["stats_sum"]["t5_tokens_sum"] == sum(lengths)

    # rerun: nothing to do, bytes unchanged; another resolution into the same folder is refused
    before = {s["index"]: s["sha256"] for s in m2["shards"]}
    again = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models)))
    assert {s["index"]: s["sha256"] for s in again["shards"]} == before
    with pytest.raises(ConfigError, match="resolution"):
        run_pretokenize(
            load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models, "resolution=32"))
        )
    # other batch sizes and devices are not other content settings: a rerun on other hardware
    # is accepted into the folder (here every shard is done, so it adds nothing and rewrites
    # nothing; features it did encode could differ from these in a last fp16 bit by batching)
    other_hw = ["batch_size=3", "text.batch_size=5", "vq.device=cpu", "text.cache_dir=/tmp/x"]
    again = run_pretokenize(
        load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models, *other_hw))
    )
    assert {s["index"]: s["sha256"] for s in again["shards"]} == before
    with pytest.raises(ValueError, match="at most 120 caption tokens"):
        load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models, "text.max_length=128"))


def test_captions_are_cleaned_for_t5_and_kept_as_given(tmp_path, models):
    """T5 gets LlamaGen's cleaned caption (lowercased, URL removed); the shard keeps the text
    as it came. A caption that cleaning empties (a bare URL) is dropped and counted. Whether
    captions are cleaned decides the features: an output is not continued with the other
    setting."""
    captions = {0: "A RED Circle http://example.com/a", 1: "http://example.com/b.jpg"}
    raw = str(tmp_path / "raw")
    write_raw_shards(
        raw, 1, 3, meta_fn=lambda s, i: {"caption": captions[i]} if i in captions else {}
    )
    out = str(tmp_path / "tokens")
    m = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out, models)))
    assert m["shards"][0]["stats"]["dropped"] == {"empty_caption_after_cleaning": 1}
    got = {g["key"]: g for g in shards.read_token_shard(os.path.join(out, "00000.tar"))}
    assert sorted(got) == [raw_key(0, 0), raw_key(0, 2)]
    first = got[raw_key(0, 0)]
    assert first["txt"] == captions[0]
    plain = TextEncoder.from_pretrained(models["t5"], clean_captions=False)
    want = plain.encode(["a red circle"]).features[0].numpy()
    # byte-level tokens: the cleaned caption's length, EOS included; the values up to the last
    # fp16 bit (the worker encodes the shard's captions as one batch)
    assert first["t5"].shape[0] == len("a red circle") + 1
    np.testing.assert_allclose(first["t5"], want, rtol=0, atol=1e-3)
    with pytest.raises(ConfigError, match=r"'text.clean_captions' \(True != False\)"):
        run_pretokenize(
            load_config(
                PretokenizeConfig, TINY, _overrides(raw, out, models, "text.clean_captions=false")
            )
        )


def test_new_weights_at_the_same_uri_are_not_mixed_into_existing_shards(tmp_path, models):
    import shutil

    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 1, 4)
    vq_dir = str(tmp_path / "vq")
    shutil.copytree(models["vq"], vq_dir)
    out = str(tmp_path / "tokens")
    over = _overrides(raw, out, {**models, "vq": vq_dir})
    run_pretokenize(load_config(PretokenizeConfig, TINY, over))
    run_pretokenize(load_config(PretokenizeConfig, TINY, over))  # unchanged: accepted
    vq = VQModel.from_pretrained(vq_dir)
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(-1.0)
    vq.save_pretrained(vq_dir)  # a retrained tokenizer written over the old one
    with pytest.raises(ConfigError, match=r"content of vq.uri"):
        run_pretokenize(load_config(PretokenizeConfig, TINY, over))


def _run_job(raw, out, models, env, stop_after_first_shard=False):
    """Run jobs/pretokenize.py (local Ray); with ``stop_after_first_shard`` kill -9 it then."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "jobs", "pretokenize.py"),
        "--config",
        TINY,
        *_overrides(raw, out, models, "executor.backend=ray"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if stop_after_first_shard and "pretokenize: unit" in line and " done (" in line:
                # kill -9 the job and everything it started (local Ray, its actor), as a
                # machine dying would: Ray's actor lives in its own process group
                tree = [psutil.Process(proc.pid)]
                tree += tree[0].children(recursive=True)
                signal_all(tree, signal.SIGKILL)
                wait_gone(tree)
                break
        proc.wait(timeout=120)
    finally:
        # the local Ray's helper processes outlive a killed driver: end the whole session
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.stderr.close()
    return proc.returncode, "".join(lines)


def test_kill9_then_rerun_gives_identical_shards(tmp_path, models):
    """kill -9 of the job (local Ray) after its first shard, rerun: same bytes as one clean run."""
    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 5, 8, seed=3)
    env = {**os.environ, "T2I_LOG_LEVEL": "INFO", "RAY_DEDUP_LOGS": "0"}

    # the uninterrupted reference, inline in this process with the actor's one torch thread
    ref = str(tmp_path / "ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, ref, models)))
    finally:
        torch.set_num_threads(threads)

    out = str(tmp_path / "out")
    rc, log = _run_job(raw, out, models, env, stop_after_first_shard=True)
    assert rc == -signal.SIGKILL
    done_before = [s.index for s in shards.list_done_shards(out)]
    assert 1 <= len(done_before) < 5, done_before
    rc, log = _run_job(raw, out, models, env)
    assert rc == 0, log[-3000:]
    assert f"{5 - len(done_before)} to run, {len(done_before)} already done" in log

    want = shards.list_done_shards(ref)
    got = shards.list_done_shards(out)
    assert [s.index for s in got] == list(range(5))
    for a, b in zip(want, got):
        data = open(b.uri, "rb").read()
        assert hashlib.sha256(data).hexdigest() == b.sha256 == a.sha256
        assert a.num_samples == b.num_samples == 8
    keys = [s["key"] for g in got for s in shards.read_token_shard(g.uri)]
    assert len(keys) == len(set(keys)) == 40


@pytest.mark.parametrize(
    "name", sorted(n for n in os.listdir(os.path.dirname(TINY)) if n.startswith("pretokenize"))
)
def test_shipped_pretokenize_configs_load(name):
    cfg = load_config(PretokenizeConfig, os.path.join(os.path.dirname(TINY), name))
    assert cfg.resolution in (64, 256, 512)
    assert (cfg.text is None) == name.endswith("c2i.yaml")  # class ids, no captions
    assert cfg.text is None or cfg.text.max_length == 120
    if name.endswith("stage2.yaml"):
        assert (cfg.resolution, cfg.min_aesthetic, cfg.vq.preset) == (512, 5.0, "VQ-16")


@pytest.mark.parametrize(
    "override, message",
    [
        ("decode_threads=0", "decode_threads is 0: it must be at least 1"),
        ("text.batch_size=0", "text.batch_size is 0: it must be at least 1"),
        ("batch_size=0", "batch_size is 0: it must be at least 1"),
        ("max_shards=0", "max_shards is 0: at least 1, or null for all"),
        ("max_shards=-1", "max_shards is -1: at least 1, or null for all"),
    ],
)
def test_settings_that_would_fail_every_shard_are_refused_at_load(override, message):
    """Found when the config loads, not as a failure of every shard on every worker after
    both models are loaded (or, for max_shards=-1, as the last shard silently left out)."""
    with pytest.raises(ConfigError, match=message):
        load_config(PretokenizeConfig, TINY, ["input=/tmp/none", "output=/tmp/none", override])


def test_bf16_vq_searches_its_codes_in_fp32(tmp_path, models):
    """vq.dtype=bfloat16 runs the encoder in bf16; the last conv and the nearest-code search
    stay fp32, so the latent and the codebook are not rounded before the search."""
    from pipeline.data.pretokenize import PretokenizeWorker

    cfg = load_config(
        PretokenizeConfig,
        TINY,
        _overrides(str(tmp_path), str(tmp_path / "o"), models, "vq.dtype=bfloat16"),
    )
    w = PretokenizeWorker(cfg, text=TextEncoder.from_pretrained(models["t5"]))
    assert next(w.vq.encoder.parameters()).dtype == torch.bfloat16
    assert w.vq.quant_conv.weight.dtype == w.vq.quantize.embedding.weight.dtype == torch.float32
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = w.vq.encode(x.bfloat16())
    with torch.no_grad():
        h = w.vq.quant_conv(w.vq.encoder(x.bfloat16()).float())
    assert torch.equal(codes, w.vq.quantize(h)[2])  # the search ran on the fp32 latent
    # ... against the codebook and conv as stored, not widened back from a bf16 rounding
    stored = VQModel.from_pretrained(cfg.vq.uri, cfg.vq.preset)
    assert torch.equal(w.vq.quantize.embedding.weight, stored.quantize.embedding.weight)
    assert torch.equal(w.vq.quant_conv.weight, stored.quant_conv.weight)


def _rewrite_raw_shard(raw: str, index: int, edit) -> None:
    """Raw shard ``index`` again, with ``edit(i, sample)`` applied to each sample dict."""
    samples = list(shards.iter_raw_shard(raw, index, {}))
    with wds.TarWriter(os.path.join(raw, f"{index:05d}.tar")) as tw:
        for i, s in enumerate(samples):
            tw.write(edit(i, dict(s)))


def test_one_bad_sample_is_a_counted_drop_never_a_failed_shard(tmp_path, models, monkeypatch):
    """Only a failed decode was caught per sample: anything raised in resize / crop, T5 or the
    shard encoding failed the whole shard on every retry. A json caption with a lone
    surrogate (T5's tokenizer and utf-8 raise on it) is mended and counted; the others are
    dropped, counted by reason; the rest of the shard is written, features as they would be."""
    import io
    import json

    from pipeline.data import pretokenize as ptk

    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 1, 6)

    def edit(i, s):
        if i == 1:  # the caption only in the json, with a lone surrogate
            del s["txt"]
            s["json"] = json.dumps({**json.loads(s["json"]), "caption": "a red \ud800 circle"})
        if i == 2:  # an image whose resize fails (as one of 10000:1 would run out of memory)
            buf = io.BytesIO()
            Image.new("RGB", (77, 64), (1, 2, 3)).save(buf, "JPEG")
            s["jpg"] = buf.getvalue()
        if i == 3:
            s["txt"] = b"a BOOM caption"
        return s

    _rewrite_raw_shard(raw, 0, edit)
    real_crop, real_encode = ptk.resize_center_crop, TextEncoder.encode
    real_sample = shards.encode_token_sample

    def crop(img, size):
        if img.size == (77, 64):
            raise MemoryError("cannot allocate 2.6 GB")
        return real_crop(img, size)

    def encode(self, captions, *a, **kw):
        if any("boom" in c.lower() for c in captions):  # raw or cleaned (lowercased)
            raise RuntimeError("T5 cannot take this caption")
        return real_encode(self, captions, *a, **kw)

    def encode_sample(key, *a, **kw):
        if key == raw_key(0, 4):
            raise ValueError("t5 must be (L, D) with 0 < L <= 120")
        return real_sample(key, *a, **kw)

    monkeypatch.setattr(ptk, "resize_center_crop", crop)
    monkeypatch.setattr(TextEncoder, "encode", encode)
    monkeypatch.setattr(shards, "encode_token_sample", encode_sample)
    out = str(tmp_path / "tokens")
    m = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out, models)))
    assert not m["failed_shards"] and m["num_shards"] == 1
    stats = m["shards"][0]["stats"]
    assert stats["dropped"] == {"encode_error": 1, "t5_error": 1, "unprocessable_image": 1}
    assert stats["caption_not_utf8"] == 1 and stats["written"] == 3
    got = {g["key"]: g for g in shards.read_token_shard(os.path.join(out, "00000.tar"))}
    assert sorted(got) == [raw_key(0, i) for i in (0, 1, 5)]
    assert got[raw_key(0, 1)]["txt"] == "a red \ufffd circle"
    # the batch T5 failed on was encoded caption by caption: the same features
    text = TextEncoder.from_pretrained(models["t5"], batch_size=16)
    for g in got.values():
        np.testing.assert_array_equal(g["t5"], real_encode(text, [g["txt"]]).features[0].numpy())

    # a T5 that fails on every caption of a batch is the encoder, not the captions: the shard
    # fails (and is retried), nothing is marked done
    monkeypatch.setattr(TextEncoder, "encode", lambda self, c, *a, **kw: 1 / 0)
    out2 = str(tmp_path / "tokens2")
    m2 = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models)))
    assert list(m2["failed_shards"]) == ["0"] and m2["num_shards"] == 0


def test_a_sticky_cuda_error_on_a_one_caption_batch_fails_the_shard(tmp_path, models, monkeypatch):
    """A T5 failure on every caption was raised only for batches of two or more: a CUDA error
    (the executor's sticky kind) on the last, one-sample batch of a shard was counted as a
    caption's t5_error and the shard marked done, so a rerun skipped it. Such an error fails
    the shard wherever it comes, also in the caption-by-caption retry of a larger batch."""
    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 1, 9)  # batch_size 8: the last batch holds one caption
    real_encode = TextEncoder.encode
    sticky = "CUDA error: an illegal memory access was encountered"

    def one_caption_breaks(self, captions, *a, **kw):
        if len(captions) == 1:
            raise RuntimeError(sticky)
        return real_encode(self, captions, *a, **kw)

    monkeypatch.setattr(TextEncoder, "encode", one_caption_breaks)
    out = str(tmp_path / "tokens")
    m = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out, models)))
    assert list(m["failed_shards"]) == ["0"] and m["num_shards"] == 0
    assert "illegal memory access" in m["failed_shards"]["0"]
    assert not shards.is_done(out, 0)

    # the batch fails on one caption's account, then the context breaks on a later caption:
    # the captions after it are not dropped as bad, the shard fails
    def breaks_after_a_bad_caption(self, captions, *a, **kw):
        if len(captions) > 1:
            raise ValueError("T5 cannot take this caption")
        if captions[0] == txts[2]:
            raise RuntimeError(sticky)
        return real_encode(self, captions, *a, **kw)

    samples = list(shards.iter_raw_shard(raw, 0, {}))
    txts = [s["txt"].decode() for s in samples]
    monkeypatch.setattr(TextEncoder, "encode", breaks_after_a_bad_caption)
    out2 = str(tmp_path / "tokens2")
    m2 = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models)))
    assert list(m2["failed_shards"]) == ["0"] and not shards.is_done(out2, 0)

    # a caption T5 cannot take, alone in the last batch, is still a counted drop
    def last_caption_is_bad(self, captions, *a, **kw):
        if captions == txts[8:]:
            raise ValueError("T5 cannot take this caption")
        return real_encode(self, captions, *a, **kw)

    monkeypatch.setattr(TextEncoder, "encode", last_caption_is_bad)
    out3 = str(tmp_path / "tokens3")
    m3 = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out3, models)))
    assert not m3["failed_shards"] and shards.is_done(out3, 0)
    assert m3["shards"][0]["stats"]["dropped"] == {"t5_error": 1}

    # out of memory on one caption of the caption-by-caption retry is not that caption's fault:
    # it was dropped as t5_error and the shard marked done; the shard fails, to be retried
    def runs_out_of_memory(self, captions, *a, **kw):
        if len(captions) > 1:
            raise ValueError("T5 cannot take this caption")
        if captions[0] == txts[3]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_encode(self, captions, *a, **kw)

    monkeypatch.setattr(TextEncoder, "encode", runs_out_of_memory)
    out4 = str(tmp_path / "tokens4")
    m4 = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out4, models)))
    assert list(m4["failed_shards"]) == ["0"] and not shards.is_done(out4, 0)
    assert "out of memory" in m4["failed_shards"]["0"]


def test_a_gpu_vq_worker_turns_tf32_off(tmp_path, models, monkeypatch):
    """With vq.dtype float32 on a GPU, cuDNN convolutions ran in TF32 by default (PyTorch's
    setting), so a GPU worker's codes could differ from a CPU worker's in the same output. A
    worker whose VQ is on CUDA turns TF32 off for its process; on a CPU nothing is touched."""
    from pipeline.data import pretokenize as ptk

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        assert not ptk.exact_fp32_on_cuda("cpu")
        assert (matmul.fp32_precision, conv.fp32_precision) == saved
        assert conv.fp32_precision == "tf32"  # PyTorch's default: what the worker must undo
        assert ptk.exact_fp32_on_cuda("cuda:0")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert not matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved

    # the worker calls it with its VQ's device, before moving the VQ there
    class Stop(Exception):
        pass

    seen = []

    def spy(device):
        seen.append(device)
        raise Stop  # no CUDA here to move the VQ to

    monkeypatch.setattr(ptk, "exact_fp32_on_cuda", spy)
    cfg = load_config(PretokenizeConfig, TINY, _overrides("raw", "out", models, "vq.device=cuda:0"))
    with pytest.raises(Stop):
        ptk.PretokenizeWorker(cfg)
    assert seen == ["cuda:0"]


def test_center_crop_is_llamagens_and_an_elongated_image_costs_no_more(monkeypatch):
    """The crop is LlamaGen's ``center_crop_arr`` (restated in tests/test_raw.py): the same
    pixels exactly, on noise too, up to an aspect ratio of 64; beyond, it is computed from the
    source region it needs (a few pixels 1-2 levels off), so that an extreme aspect ratio costs
    no more than a square image."""
    from tests.test_raw import llamagen_center_crop_arr

    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (480, 640), (300, 301), (1000, 333), (257, 256), (64, 64),
                 (100, 37), (513, 1024), (33, 77), (350, 700), (2000, 9)]:  # fmt: skip
        for size in (64, 256):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            want = np.asarray(llamagen_center_crop_arr(img, size), np.int16)
            got = np.asarray(resize_center_crop(img, size), np.int16)
            assert got.shape == want.shape == (size, size, 3)
            if max(w, h) <= 64 * min(w, h):
                assert np.array_equal(got, want), (w, h, size)
            else:
                assert np.abs(got - want).max() <= 2 and (got != want).mean() < 0.005, (w, h, size)

    biggest = []
    real_resize = Image.Image.resize

    def resize(self, size, *a, **kw):
        biggest.append(size[0] * size[1])
        if size[0] * size[1] > 4 * 256 * 256:
            raise MemoryError(f"a {size} intermediate on the way to a 256 x 256 crop")
        return real_resize(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", resize)
    for w, h in [(10000, 1), (1, 10000), (20000, 3)]:
        img = Image.new("RGB", (w, h), (10, 20, 30))
        out = resize_center_crop(img, 256)
        assert out.size == (256, 256) and out.getpixel((5, 200)) == (10, 20, 30)
    assert max(biggest) <= 256 * 256


def test_job_warns_about_unscored_shards(tmp_path, models, capsys):
    """Unscored raw shards are left for a later run; the job says so on stderr, names them,
    and the manifest lists them (exit status 0: they are not failures)."""
    import importlib.util

    raw, scores = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 3, 2)
    over = [f"input={raw}", f"output={scores}", "executor.backend=inline", "max_shards=1"]
    run_score(load_config(ScoreConfig, None, [*over, "filters.min_image_size=32"]))
    spec = importlib.util.spec_from_file_location(
        "ptk_job", os.path.join(ROOT, "jobs", "pretokenize.py")
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = str(tmp_path / "tokens")
    rc = job.main(["--config", TINY, *_overrides(raw, out, models, f"scores={scores}")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "WARNING: 2 raw shards" in err and "NOT pretokenized: [1, 2]" in err
    assert storage.read_json(os.path.join(out, shards.MANIFEST))["unscored_shards"] == [1, 2]


def test_tokenizer_random_crop_needs_no_whole_image_resize(monkeypatch):
    """The tokenizer's augmentation (resize the short side by U(1, 1.1), crop at random,
    mirror) draws the same random numbers and gives the pixels of resizing the whole image,
    computed from the region the crop needs."""
    import random

    from pipeline.data.raw import random_crop_flip

    def old(img, size, rng, max_scale=1.1):
        short = int(round(size * rng.uniform(1.0, max_scale)))
        s = max(short, size) / min(img.size)
        big = img.resize(
            (max(short, size, round(img.width * s)), max(short, size, round(img.height * s))),
            Image.Resampling.BICUBIC,
        )
        left, top = rng.randint(0, big.width - size), rng.randint(0, big.height - size)
        out = big.crop((left, top, left + size, top + size))
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out

    gen = np.random.default_rng(1)
    for w, h in [(640, 480), (480, 640), (300, 301), (1000, 333), (100, 37), (2000, 9)]:
        img = Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for seed in range(3):
            want = np.asarray(old(img, 64, random.Random(seed)), np.int16)
            got = np.asarray(random_crop_flip(img, 64, random.Random(seed)), np.int16)
            assert got.shape == want.shape == (64, 64, 3)
            assert np.abs(got - want).max() <= 2 and (got != want).mean() < 0.01, (w, h, seed)

    real_resize = Image.Image.resize

    def resize(self, size, *a, **kw):
        if size[0] * size[1] > 4 * 256 * 256:
            raise MemoryError(f"a {size} intermediate on the way to a 256 x 256 crop")
        return real_resize(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", resize)
    out = random_crop_flip(Image.new("RGB", (20000, 3), (10, 20, 30)), 256, random.Random(0))
    assert out.size == (256, 256) and out.getpixel((5, 200)) == (10, 20, 30)


def test_scores_of_another_download_at_the_same_keys_are_not_applied(tmp_path, models):
    """A key is a place in a raw shard, not an image: a raw folder downloaded again from other
    metadata (download's overwrite=true) while its score parquets stayed would have taken each
    old image's scores and filter decisions for the new image at the same key. Score rows carry
    the URL; a sample whose URL is not its row's is dropped, counted."""
    import json

    raw, scores = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 1, 4)
    over = [f"input={raw}", f"output={scores}", "executor.backend=inline"]
    run_score(load_config(ScoreConfig, None, [*over, "filters.min_image_size=32"]))

    def other_url(i, s):
        if i in (1, 2):
            s["json"] = json.dumps({**json.loads(s["json"]), "url": f"http://other/{i}.jpg"})
        return s

    _rewrite_raw_shard(raw, 0, other_url)
    out = str(tmp_path / "tokens")
    m = run_pretokenize(
        load_config(PretokenizeConfig, TINY, _overrides(raw, out, models, f"scores={scores}"))
    )
    assert m["dropped"] == {"score_of_another_image": 2} and m["num_samples"] == 2

    # min_aesthetic against scores made without an aesthetic model would drop every sample
    # (aesthetic_nan) and mark the shards done, empty: refused before any work
    with pytest.raises(ConfigError, match="without an aesthetic model"):
        run_pretokenize(
            load_config(
                PretokenizeConfig,
                TINY,
                _overrides(
                    raw, str(tmp_path / "t2"), models, f"scores={scores}", "min_aesthetic=5"
                ),
            )
        )
    assert not os.path.exists(tmp_path / "t2")


def test_vq_out_of_memory_goes_on_in_smaller_chunks(tmp_path, models, monkeypatch):
    """Every VQ batch has the same shape: one that runs out of memory failed on every retry of
    every shard. The worker halves the images per forward pass until they fit, and keeps that
    size; the codes are those of that chunking, and flipped codes follow."""
    from pipeline.data.pretokenize import PretokenizeWorker

    cfg = load_config(
        PretokenizeConfig, TINY, _overrides(str(tmp_path), str(tmp_path / "o"), models, "flip=true")
    )
    w = PretokenizeWorker(cfg, text=TextEncoder.from_pretrained(models["t5"]))
    real = w.vq.encode
    sizes = []

    def small_memory(x):
        sizes.append(len(x))
        if len(x) > 4:  # flip doubles the rows: 2 images fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(x)

    monkeypatch.setattr(w.vq, "encode", small_memory)
    pixels = torch.rand(5, 3, 64, 64) * 2 - 1
    codes, flipped = w._encode_images(pixels)
    assert sizes == [10, 4, 4, 2] and w._vq_rows == 2  # 5 images, then 2 at a time
    want = [w._encode_chunk(pixels[i : i + 2]) for i in (0, 2, 4)]
    assert np.array_equal(codes, np.concatenate([c for c, _ in want]))
    assert np.array_equal(flipped, np.concatenate([f for _, f in want]))
    sizes.clear()
    w._encode_images(pixels)  # the next batch goes in chunks of 2 at once
    assert sizes == [4, 4, 2]
    monkeypatch.setattr(w.vq, "encode", lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(torch.OutOfMemoryError):  # not even one image fits: raised (retried)
        w._encode_images(pixels[:1])


def test_scores_of_an_earlier_download_of_the_raw_shard_are_not_used(tmp_path, models):
    """A raw shard downloaded again after it was scored (the same URLs at the same keys, other
    metadata: the URL check cannot tell) has a score parquet of the old download: its keep /
    drop decisions are not applied. The shard waits for its scores like an unscored one, listed
    in the manifest; scored again, it is pretokenized. A parquet written before the raw shard's
    identity was recorded is used as before."""
    import io

    import pyarrow.parquet as pq

    from pipeline.data import filter as flt

    raw, scores = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 3, 2)
    for i in range(3):
        download_again(raw, i, 2, str(tmp_path), 1000.0, lambda s, i: {"punsafe": 0.9})
    over = [f"input={raw}", f"output={scores}", "executor.backend=inline"]
    score_cfg = load_config(ScoreConfig, None, [*over, "filters.min_image_size=32"])
    run_score(score_cfg)
    # shard 2's parquet as written before the identity was recorded
    uri = flt.score_uri(scores, 2)
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    meta = {k: v for k, v in table.schema.metadata.items() if k != flt.RAW_SHARD_KEY}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    storage.write_bytes(uri, buf.getvalue())
    for i in (1, 2):
        download_again(raw, i, 2, str(tmp_path), 2000.0)  # safe now

    out = str(tmp_path / "tokens")
    cfg = load_config(PretokenizeConfig, TINY, _overrides(raw, out, models, f"scores={scores}"))
    m = run_pretokenize(cfg)
    assert m["unscored_shards"] == [1] and m["stale_score_shards"] == [1]
    assert [s["index"] for s in m["shards"]] == [0, 2] and not m["failed_shards"]
    assert m["dropped"] == {"filtered_unsafe": 4}  # shard 2 with its old decisions, as before
    assert run_score(score_cfg)["rescored_changed"] == 1
    m = run_pretokenize(cfg)
    assert m["unscored_shards"] == m["stale_score_shards"] == []
    assert [s["index"] for s in m["shards"]] == [0, 1, 2] and m["num_samples"] == 2


def test_token_shards_of_a_raw_folder_downloaded_again_are_redone_or_kept(tmp_path, models):
    """The raw folder downloaded again (other captions, fewer shards: download's overwrite=true)
    and scored again: a rerun redoes the token shards made from the old downloads, not "all
    done", and keeps the one whose raw shard is gone, in the manifest and in what training
    reads. Nothing changed since: the next rerun redoes nothing."""
    from pipeline.data.loader import list_training_shards

    raw, scores = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 3, 2)
    over = [f"input={raw}", f"output={scores}", "executor.backend=inline"]
    score_cfg = load_config(ScoreConfig, None, [*over, "filters.min_image_size=32"])
    run_score(score_cfg)
    out = str(tmp_path / "tokens")
    cfg = load_config(PretokenizeConfig, TINY, _overrides(raw, out, models, f"scores={scores}"))
    m = run_pretokenize(cfg)
    assert [s["index"] for s in m["shards"]] == [0, 1, 2] and m["num_samples"] == 6
    for i in (0, 1):
        download_again(raw, i, 2, str(tmp_path), 1000.0, lambda s, k: {"caption": f"new one {k}"})
    for suffix in (".tar", ".parquet", "_stats.json"):
        os.remove(os.path.join(raw, f"00002{suffix}"))
    assert run_score(score_cfg)["rescored_changed"] == 2

    m = run_pretokenize(cfg)
    # the one whose raw shard is gone is kept (raw images are deleted after tokenizing to save
    # storage: a rerun must not delete finished token shards for it)
    assert m["redone_changed_input"] == 2 and m["kept_without_raw_shard"] == 1
    assert [s["index"] for s in m["shards"]] == [0, 1, 2] and m["num_samples"] == 6
    for i in (0, 1):
        got = shards.read_token_shard(os.path.join(out, shards.shard_name(i)))
        assert sorted(g["txt"] for g in got) == ["new one 0", "new one 1"]
    assert os.path.exists(os.path.join(out, shards.done_name(2)))
    assert [s.index for s in list_training_shards([out])] == [0, 1, 2]
    again = run_pretokenize(cfg)
    assert again["redone_changed_input"] == 0 and again["kept_without_raw_shard"] == 1
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]


def test_scores_made_again_with_other_filters_are_not_mixed_into_an_output(tmp_path, models):
    """Scores removed and made again into the same folder with another filter setting: the
    output's done shards hold the old decisions, so it is not continued with the new ones (the
    setting is named), and nothing in it is touched. Scored again with the settings it was made
    with, it is continued, and the done shards (same parquets) are not redone."""
    import shutil

    raw, scores = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 4, 2)
    score_over = [f"input={raw}", f"output={scores}", "executor.backend=inline"]
    score_cfg = load_config(ScoreConfig, None, [*score_over, "filters.min_image_size=32"])
    run_score(score_cfg)
    out = str(tmp_path / "tokens")
    over = _overrides(raw, out, models, f"scores={scores}")
    run_pretokenize(load_config(PretokenizeConfig, TINY, [*over, "max_shards=2"]))
    before = {i: storage.read_bytes(os.path.join(out, shards.shard_name(i))) for i in (0, 1)}

    shutil.rmtree(scores)
    other = "filters.max_caption_chars=30"
    run_score(load_config(ScoreConfig, None, [*score_over, "filters.min_image_size=32", other]))
    cfg = load_config(PretokenizeConfig, TINY, over)
    with pytest.raises(
        ConfigError, match=r"'score_config.filters.max_caption_chars' \(1000 != 30\)"
    ):
        run_pretokenize(cfg)
    assert shards.done_indices(out) == {0, 1}
    assert all(
        storage.read_bytes(os.path.join(out, shards.shard_name(i))) == before[i] for i in before
    )

    shutil.rmtree(scores)
    run_score(score_cfg)
    m = run_pretokenize(cfg)
    assert [s["index"] for s in m["shards"]] == [0, 1, 2, 3] and m["redone_changed_input"] == 0


def test_a_token_shard_made_from_another_score_parquet_is_redone(tmp_path, models):
    """A score parquet replaced with other decisions for the same download of its raw shard (as
    scores made again with other weights at the same aesthetic URI would be): its token shard
    is redone with them; the other shard is not."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import filter as flt

    raw, scores = str(tmp_path / "raw"), str(tmp_path / "scores")
    write_raw_shards(raw, 2, 3)
    over = [f"input={raw}", f"output={scores}", "executor.backend=inline"]
    run_score(load_config(ScoreConfig, None, [*over, "filters.min_image_size=32"]))
    out = str(tmp_path / "tokens")
    cfg = load_config(PretokenizeConfig, TINY, _overrides(raw, out, models, f"scores={scores}"))
    m = run_pretokenize(cfg)
    assert m["num_samples"] == 6 and m["dropped"] == {}
    uri = flt.score_uri(scores, 0)
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    keep, reason = table["keep"].to_pylist(), table["reason"].to_pylist()
    keep[1], reason[1] = False, "unsafe"
    names = table.schema.names
    table = table.set_column(names.index("keep"), "keep", pa.array(keep))
    table = table.set_column(names.index("reason"), "reason", pa.array(reason))
    buf = io.BytesIO()  # the score stage's metadata (the raw shard it scored) as it was
    pq.write_table(table.replace_schema_metadata(pq.read_schema(uri).metadata), buf)
    storage.write_bytes(uri, buf.getvalue())

    again = run_pretokenize(cfg)
    assert again["redone_changed_input"] == 1
    assert again["num_samples"] == 5 and again["dropped"] == {"filtered_unsafe": 1}
    assert again["shards"][1]["sha256"] == m["shards"][1]["sha256"]
    got = [g["key"] for g in shards.read_token_shard(os.path.join(out, shards.shard_name(0)))]
    assert got == [raw_key(0, 0), raw_key(0, 2)]


def test_done_markers_without_recorded_inputs_are_kept_and_said_once(tmp_path, models, caplog):
    """A done marker written before what its shard was made from was recorded cannot be checked:
    its shard is kept (as every done shard was), and the run says so once. A shard whose marker
    records its raw shard is redone when that raw shard was downloaded again (no scores here)."""
    import json
    import logging

    from pipeline.data.pretokenize import RAW_SHARD_STAT

    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 2, 2)
    out = str(tmp_path / "tokens")
    cfg = load_config(PretokenizeConfig, TINY, _overrides(raw, out, models))
    m = run_pretokenize(cfg)
    marker = os.path.join(out, shards.done_name(0))
    info = json.loads(storage.read_bytes(marker))
    del info["stats"][RAW_SHARD_STAT]
    storage.write_json(marker, info)
    for i in (0, 1):
        download_again(raw, i, 2, str(tmp_path), 1000.0, lambda s, k: {"caption": f"new one {k}"})

    with caplog.at_level(logging.WARNING, logger="pipeline.data.pretokenize"):
        again = run_pretokenize(cfg)
    assert again["redone_changed_input"] == 1
    assert again["shards"][0]["sha256"] == m["shards"][0]["sha256"]  # kept, unchecked
    assert again["shards"][1]["sha256"] != m["shards"][1]["sha256"]  # redone, new captions
    said = [r.getMessage() for r in caplog.records if "cannot be checked" in r.getMessage()]
    assert (
        len(said) == 1
        and said[0].startswith("pretokenize: 1 done token shards")
        and "[0]" in said[0]
    )


def test_short_captions_store_t5_of_the_first_sentence(tmp_path, models):
    """With short_captions (stage 2), T5 also encodes each caption's first sentence as LlamaGen's
    --trunc-caption makes it: the caption as it came cut at its first '.', then cleaned like
    the caption (cleaning first would turn "dog... running" into one sentence). A first sentence
    that is the whole caption for T5 is not encoded again (marked: the loader reuses t5); an
    empty one uses t5 too, counted. Off, the shards are what they were; one output folder does
    not mix the two settings."""
    import yaml as _yaml

    captions = {
        0: "A dog... running. Fast",
        1: "a red circle",
        2: "a red circle.",
        3: ". leading dot",
        4: "Version 3.5 of it. More",
    }
    raw = str(tmp_path / "raw")
    write_raw_shards(
        raw, 1, 6, meta_fn=lambda s, i: {"caption": captions[i]} if i in captions else {}
    )
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    m = run_pretokenize(
        load_config(PretokenizeConfig, TINY, _overrides(raw, on, models, "short_captions=true"))
    )
    m_off = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, off, models)))
    got = {g["key"]: g for g in shards.read_token_shard(os.path.join(on, "00000.tar"), True)}
    plain = {g["key"]: g for g in shards.read_token_shard(os.path.join(off, "00000.tar"), True)}
    assert sorted(got) == sorted(plain) == [raw_key(0, i) for i in range(6)]

    # own features where the first sentence differs: what T5 gives for it (the worker encodes
    # the batch's first sentences as one batch, in sample order; here the same batch)
    own = {0: "a dog", 2: "a red circle", 4: "version 3"}
    text = TextEncoder.from_pretrained(models["t5"], batch_size=16, clean_captions=False)
    enc = text.encode(list(own.values()))
    for j, i in enumerate(own):
        g = got[raw_key(0, i)]
        np.testing.assert_array_equal(g["t5_short"], enc.features[j].numpy())
        assert g["t5_short"].shape[0] == len(own[i]) + 1  # byte-level tokens + EOS
        assert g["json"]["t5_short_tokens"] == len(own[i]) + 1
    # one sentence ("a red circle", the generated caption) or an empty one: t5 serves
    for i in (1, 3, 5):
        g = got[raw_key(0, i)]
        assert g["json"]["t5_short"] == "t5" and g["t5_short"] is g["t5"]
    # the whole caption's features do not change with the option; off, nothing is added
    for key, g in got.items():
        np.testing.assert_array_equal(g["t5"], plain[key]["t5"])
        assert "t5_short" not in plain[key] and "t5_short" not in plain[key]["json"]
    stats = m["shards"][0]["stats"]
    assert (stats["short_captions"], stats["short_captions_whole"]) == (3, 2)
    assert stats["short_captions_empty"] == 1 and stats["short_captions_truncated"] == 0
    assert m["short_captions"] is True and m["stats_sum"]["short_captions"] == 3
    assert "short_captions" not in m_off and not any(
        "short" in k for k in m_off["shards"][0]["stats"]
    )

    with pytest.raises(ConfigError, match=r"'short_captions' \(False != True\)"):
        run_pretokenize(
            load_config(
                PretokenizeConfig, TINY, _overrides(raw, off, models, "short_captions=true")
            )
        )
    # an output saved before the setting existed was made without short captions: continued
    saved = os.path.join(off, "pretokenize_config.yaml")
    old = _yaml.safe_load(open(saved))
    del old["short_captions"]
    old["upscale_small"] = False  # (that one is checked on its own below)
    open(saved, "w").write(_yaml.safe_dump(old))
    again = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, off, models)))
    assert again["shards"][0]["sha256"] == m_off["shards"][0]["sha256"]


def _image_of(w: int, h: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_images_smaller_than_the_resolution_are_dropped_and_counted(tmp_path, models):
    """An image whose shorter side is below the resolution was enlarged into the shard without
    a word; LlamaGen's t2i dataset skips it. It is dropped now, counted as too_small, unless
    upscale_small keeps it enlarged. An output saved before the setting existed was made with
    enlarging: it is not continued with the new default (that would mix the two in it)."""
    import yaml as _yaml

    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 1, 5)  # 64 px, the tiny config's resolution: kept
    sizes = {1: (48, 80), 2: (80, 63), 3: (64, 200)}
    _rewrite_raw_shard(raw, 0, lambda i, s: {**s, "jpg": _image_of(*sizes[i])} if i in sizes else s)
    drop, keep = str(tmp_path / "drop"), str(tmp_path / "keep")
    m = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, drop, models)))
    assert m["dropped"] == {"too_small": 2} and m["num_samples"] == 3
    assert m["shards"][0]["stats"]["dropped"] == {"too_small": 2}
    kept = [g["key"] for g in shards.read_token_shard(os.path.join(drop, "00000.tar"))]
    assert kept == [raw_key(0, i) for i in (0, 3, 4)]  # 64 x 200: exactly the resolution

    m2 = run_pretokenize(
        load_config(PretokenizeConfig, TINY, _overrides(raw, keep, models, "upscale_small=true"))
    )
    assert m2["dropped"] == {} and m2["num_samples"] == 5
    small = {g["key"]: g for g in shards.read_token_shard(os.path.join(keep, "00000.tar"))}
    assert small[raw_key(0, 1)]["codes"].shape == (8, 8)  # enlarged to 64 px, as before

    with pytest.raises(ConfigError, match=r"'upscale_small' \(False != True\)"):
        run_pretokenize(
            load_config(
                PretokenizeConfig, TINY, _overrides(raw, drop, models, "upscale_small=true")
            )
        )
    # saved before the setting existed (no key): made with enlarging, so the new default is
    # refused as another setting, and the old behaviour continues it
    saved = os.path.join(keep, "pretokenize_config.yaml")
    old = _yaml.safe_load(open(saved))
    del old["upscale_small"], old["short_captions"]
    open(saved, "w").write(_yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"'upscale_small' \(True != False\)"):
        run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, keep, models)))
    again = run_pretokenize(
        load_config(PretokenizeConfig, TINY, _overrides(raw, keep, models, "upscale_small=true"))
    )
    assert again["shards"][0]["sha256"] == m2["shards"][0]["sha256"]


def test_stage2_config_stores_short_captions_and_drops_small_images():
    """LlamaGen's stage 2 trains on first sentences too (their T5 features extracted with
    --trunc-caption); stage 1 does not. Neither enlarges small images."""
    configs = os.path.dirname(TINY)
    s1 = load_config(PretokenizeConfig, os.path.join(configs, "pretokenize_stage1.yaml"))
    s2 = load_config(PretokenizeConfig, os.path.join(configs, "pretokenize_stage2.yaml"))
    assert (s1.short_captions, s2.short_captions) == (False, True)
    assert not s1.upscale_small and not s2.upscale_small


# raw json "label" per (shard, i); absent: no such field. Kept: the label each should get
_RAW_LABELS = {
    (0, 0): 3,
    (0, 2): 3.5,
    (0, 3): "7",
    (0, 4): 10,
    (0, 5): 4.0,
    (1, 0): -1,
    (1, 1): True,
    (1, 2): "n01440764",
    (1, 3): None,
    (1, 4): 9,
    (1, 5): 0,
}
_KEPT_LABELS = {(0, 0): 3, (0, 3): 7, (0, 5): 4, (1, 4): 9, (1, 5): 0}


def test_class_labels_from_the_raw_json_reach_the_class_loader(tmp_path, models):
    """label_field carries each image's class id from the raw json (a metadata extra column)
    into the token sample's json, where the class-conditional loader reads it; a sample
    without a whole-number label in 0..num_classes-1 is dropped, counted by reason. Before,
    no token shard the pipeline made had a label: class-conditional training read none."""
    from pipeline.data.loader import BatchSpec, LoaderConfig, TokenLoader

    raw = str(tmp_path / "raw")
    write_raw_shards(
        raw,
        2,
        6,
        meta_fn=lambda s, i: {"label": _RAW_LABELS[s, i]} if (s, i) in _RAW_LABELS else {},
    )
    out = str(tmp_path / "tokens")
    labels = ["label_field=label", "num_classes=10"]
    m = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out, models, *labels)))
    assert m["dropped"] == {"label_missing": 2, "label_not_integer": 3, "label_out_of_range": 2}
    assert m["shards"][0]["stats"]["dropped"] == {
        "label_missing": 1,  # (0, 1): no field
        "label_not_integer": 1,  # 3.5
        "label_out_of_range": 1,  # 10 with num_classes 10 (10 is the CFG null class)
    }
    assert (m["label_field"], m["num_classes"]) == ("label", 10)
    want = {raw_key(s, i): v for (s, i), v in _KEPT_LABELS.items()}
    stored = {
        g["key"]: g["json"]["label"]
        for i in (0, 1)
        for g in shards.read_token_shard(os.path.join(out, f"{i:05d}.tar"))
    }
    assert stored == want and all(type(v) is int for v in stored.values())

    spec = BatchSpec(grid_size=8, cond="class", num_classes=10)
    cfg = LoaderConfig(shards=[out], batch_size=len(want), num_workers=0, on_error="fail")
    batch = next(iter(TokenLoader(cfg, spec)))
    assert dict(zip(batch["keys"], batch["cond"].tolist())) == want

    # a content setting: the labelled output is not continued without labels, nor the other
    # way round; an output saved before the setting existed was made without labels
    with pytest.raises(ConfigError, match=r"'label_field' \('label' != None\)"):
        run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out, models)))
    with pytest.raises(ConfigError, match=r"'num_classes' \(10 != 1000\)"):
        run_pretokenize(
            load_config(
                PretokenizeConfig,
                TINY,
                _overrides(raw, out, models, "label_field=label", "num_classes=1000"),
            )
        )
    import yaml as _yaml

    plain = str(tmp_path / "plain")
    run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, plain, models)))
    assert (
        "label" not in next(iter(shards.read_token_shard(os.path.join(plain, "00000.tar"))))["json"]
    )
    saved = os.path.join(plain, "pretokenize_config.yaml")
    old = _yaml.safe_load(open(saved))
    del old["label_field"], old["num_classes"]
    open(saved, "w").write(_yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"'label_field' \(None != 'label'\)"):
        run_pretokenize(
            load_config(PretokenizeConfig, TINY, _overrides(raw, plain, models, *labels))
        )
    run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, plain, models)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["num_classes=10"], "num_classes checks the class labels: it needs label_field"),
        (["label_field=label", "num_classes=0"], "num_classes is 0: it must be at least 1"),
        (["label_field="], "label_field is empty"),
    ],
)
def test_label_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretokenizeConfig, TINY, ["input=/tmp/none", "output=/tmp/none", *overrides])


def test_text_free_pretokenize_loads_no_t5_and_reaches_the_class_loader(
    tmp_path, models, monkeypatch
):
    """text: null (class-conditional shards): T5 is never loaded, no t5.npy is written, and an
    empty caption is no reason to drop a sample (its txt is kept, empty); the labels reach the
    class loader, and a text-conditional loader is told the fix. It is a content setting: an
    output made with text is not continued without it, nor the other way round. Before, a null
    text section failed at load, and every sample needed a caption for T5."""
    import tarfile

    from pipeline.data.loader import BatchSpec, DataMismatch, LoaderConfig, TokenLoader

    empty = {(0, 0), (1, 4)}  # kept samples whose caption is empty (one absent, one blank)

    def meta(s, i):
        m = {"label": _RAW_LABELS[s, i]} if (s, i) in _RAW_LABELS else {}
        if (s, i) in empty:
            m["caption"] = None if s else "  "
        return m

    raw = str(tmp_path / "raw")
    write_raw_shards(raw, 2, 6, meta_fn=meta)
    labels = ["label_field=label", "num_classes=10"]
    texted = str(tmp_path / "texted")  # made with text (before T5 is barred below)
    run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, texted, models, *labels)))

    def no_t5(*args, **kwargs):
        raise AssertionError("T5 loaded with text: null")

    monkeypatch.setattr(TextEncoder, "from_pretrained", no_t5)
    monkeypatch.setattr(TextEncoder, "from_config", no_t5)
    out = str(tmp_path / "tokens")
    free = [
        f"input={raw}",
        f"output={out}",
        f"vq.uri={models['vq']}",
        "executor.backend=inline",
        "text=null",
        *labels,
    ]
    m = run_pretokenize(load_config(PretokenizeConfig, TINY, free))
    assert m["failed_shards"] == {} and m["text"] is False
    # only the label drops: no empty_caption
    assert m["dropped"] == {"label_missing": 2, "label_not_integer": 3, "label_out_of_range": 2}
    want = {raw_key(s, i): v for (s, i), v in _KEPT_LABELS.items()}
    got = {}
    for i in (0, 1):
        path = os.path.join(out, f"{i:05d}.tar")
        with tarfile.open(path) as tar:
            exts = {n.split(".", 1)[1] for n in tar.getnames()}
        assert exts == {"codes.npy", "codes_flip.npy", "txt", "json"}  # no t5.npy
        got.update({g["key"]: g for g in shards.read_token_shard(path)})
    assert {k: g["json"]["label"] for k, g in got.items()} == want
    assert all("t5" not in g and "t5_tokens" not in g["json"] for g in got.values())
    assert {k for k, g in got.items() if g["txt"] == ""} == {raw_key(s, i) for s, i in empty}

    cfg = LoaderConfig(shards=[out], batch_size=len(want), num_workers=0, on_error="fail")
    batch = next(iter(TokenLoader(cfg, BatchSpec(grid_size=8, cond="class", num_classes=10))))
    assert dict(zip(batch["keys"], batch["cond"].tolist())) == want
    with pytest.raises(DataMismatch, match="made without text .* with a text section"):
        next(iter(TokenLoader(cfg, BatchSpec(grid_size=8))))

    # a content setting, both ways; the text-free output is continued text-free
    with pytest.raises(ConfigError, match=r"'text\.uri' \('.*' != None\)"):
        run_pretokenize(load_config(PretokenizeConfig, TINY, [*free, f"output={texted}"]))
    with pytest.raises(ConfigError, match=r"'text\.uri' \(None != '.*'\)"):
        run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out, models, *labels)))
    assert run_pretokenize(load_config(PretokenizeConfig, TINY, free))["num_samples"] == len(want)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["text=null"], "text is null .* label_field is not set"),
        (["text=null", "label_field=label", "short_captions=true"], "short_captions .* need text"),
    ],
)
def test_text_free_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretokenizeConfig, TINY, ["input=/tmp/none", "output=/tmp/none", *overrides])


def test_the_c2i_config_makes_llamagen_c2i_shards_without_text():
    """configs/data/pretokenize_c2i.yaml: 256 px, labels 0..999, flipped codes and small images
    enlarged as LlamaGen's extract_codes_c2i, no T5 and no score parquets."""
    cfg = load_config(
        PretokenizeConfig, os.path.join(os.path.dirname(TINY), "pretokenize_c2i.yaml")
    )
    assert cfg.text is None and cfg.scores is None and cfg.min_aesthetic is None
    assert (cfg.label_field, cfg.num_classes, cfg.resolution) == ("label", 1000, 256)
    assert cfg.flip and cfg.upscale_small and not cfg.short_captions
    assert cfg.vq.preset == "VQ-16"


def _count_s3_requests(monkeypatch):
    """A Counter of the S3 API calls made from now on, by operation (get_object, ...): counted
    in aiobotocore's client, under every s3fs entry point (``_call_s3``, its sync ``call_s3``)."""
    import collections

    from aiobotocore.client import AioBaseClient
    from botocore import xform_name

    calls: collections.Counter[str] = collections.Counter()
    call = AioBaseClient._make_api_call

    async def counted(self, operation_name, api_params):
        calls[xform_name(operation_name)] += 1
        return await call(self, operation_name, api_params)

    monkeypatch.setattr(AioBaseClient, "_make_api_call", counted)
    return calls


@pytest.mark.parametrize("store", ["local", "s3"])
def test_score_parquet_identity_is_one_read_of_the_footer(tmp_path, request, monkeypatch, store):
    """A score parquet's identity is the digest of its footer, read with the file's end in one
    suffix read (one GET on S3, no HEAD first), and comes with the file's entry as a listing of
    the scores folder shows it (size, and ETag or mtime and inode): what a done marker records,
    so that a run start reads no footer of a parquet listed unchanged. Written again with other
    rows, the entry differs. A footer longer than the first read is read whole; a file that is
    no parquet is refused."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import pretokenize as pt
    from pipeline.data.filter import score_uri

    scores = f"{request.getfixturevalue('s3_bucket')}/scores" if store == "s3" else str(tmp_path)

    def parquet(keep):
        buf = io.BytesIO()
        pq.write_table(pa.table({"key": ["a", "b"], "keep": keep}), buf)
        return buf.getvalue()

    data = parquet([True, False])
    storage.write_bytes(score_uri(scores, 3), data)
    length = int.from_bytes(data[-8:-4], "little")
    footer = hashlib.sha256(data[-8 - length : -8]).hexdigest()[:20]
    calls = _count_s3_requests(monkeypatch)
    identity, entry = pt.score_parquet_identity(scores, 3)
    assert identity == footer and entry.size == len(data) and entry.version
    if store == "s3":
        assert dict(calls) == {"get_object": 1}
    assert storage.list_files(scores, ".parquet") == {"00003.parquet": entry}
    monkeypatch.setattr(pt, "_FOOTER_READ", 16)  # the footer does not fit: read again, whole
    assert pt.score_parquet_identity(scores, 3) == (identity, entry)
    storage.write_bytes(score_uri(scores, 3), parquet([False, False]))
    other, listed = pt.score_parquet_identity(scores, 3)
    assert other != identity and listed != entry
    assert storage.list_files(scores, ".parquet")["00003.parquet"] == listed
    storage.write_bytes(score_uri(scores, 4), b"not a parquet")
    with pytest.raises(ValueError, match="not a parquet"):
        pt.score_parquet_identity(scores, 4)


def test_a_rerun_checks_its_done_shards_from_listings(s3_bucket, tmp_path, models, monkeypatch):
    """At a run start the done shards' inputs are checked from the listings of the raw and
    scores folders: no HEAD and no footer read per done shard (they cost ~6 requests a shard,
    minutes at every start of a LAION-sized output). The requests a start makes grow with its
    done shards only by the reads of their done markers, as before the check existed.
    Markers written before parquet entries were recorded are checked with one footer read
    each, once: the entry is recorded then. A parquet rewritten with other decisions is still
    found (its listing shows another ETag) and its shard redone; one written again with the
    same bytes is not."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import pretokenize as pt
    from pipeline.data.filter import score_uri

    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    raw, scores, out = (f"{s3_bucket}/{name}" for name in ("raw", "scores", "tokens"))
    write_raw_shards(raw, 5, 1)
    over = [f"input={raw}", f"output={scores}", "executor.backend=inline"]
    run_score(load_config(ScoreConfig, None, [*over, "filters.min_image_size=32"]))
    over = _overrides(raw, out, models, f"scores={scores}")
    footers = []  # the indices of the score parquets whose footers were read
    read_footer = pt.score_parquet_identity

    def counted(scores, index):
        footers.append(index)
        return read_footer(scores, index)

    monkeypatch.setattr(pt, "score_parquet_identity", counted)

    def start(*extra):
        """The requests of a run start (every done shard's inputs checked, nothing to do)."""
        footers.clear()
        with monkeypatch.context() as m:
            calls = _count_s3_requests(m)
            manifest = run_pretokenize(load_config(PretokenizeConfig, TINY, [*over, *extra]))
        assert manifest["redone_changed_input"] == 0
        return calls

    run_pretokenize(load_config(PretokenizeConfig, TINY, [*over, "max_shards=1"]))
    one = start("max_shards=1")
    run_pretokenize(load_config(PretokenizeConfig, TINY, over))
    five = start()
    assert footers == [] and five["head_object"] == one["head_object"]  # claim_output's
    assert five["list_objects_v2"] == one["list_objects_v2"]
    # per done shard only its marker's reads (the check's, then the manifest's), as before the
    # check existed; every raw shard's stats are read either way (to tell it is complete)
    assert sum(five.values()) - sum(one.values()) <= 2 * 4, (dict(one), dict(five))

    for i in range(5):  # done markers as written before parquet entries were recorded
        marker = storage.join(out, shards.done_name(i))
        info = storage.read_json(marker)
        del info["stats"][pt.SCORES_ENTRY_STAT]
        storage.write_json(marker, info)
    start()
    assert sorted(footers) == [0, 1, 2, 3, 4]  # each footer read once, the entries recorded
    start()
    assert footers == []

    uri = score_uri(scores, 0)
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data)  # the same bytes again: the same ETag
    start()
    assert footers == []
    table = pq.read_table(io.BytesIO(data))
    names, meta = table.schema.names, table.schema.metadata
    assert table["keep"].to_pylist() == [True]
    table = table.set_column(names.index("keep"), "keep", pa.array([False]))
    table = table.set_column(names.index("reason"), "reason", pa.array(["unsafe"]))
    buf = io.BytesIO()  # the score stage's metadata (the raw shard it scored) as it was
    pq.write_table(table.replace_schema_metadata(meta), buf)
    storage.write_bytes(uri, buf.getvalue())
    m = run_pretokenize(load_config(PretokenizeConfig, TINY, over))
    assert footers == [0, 0]  # the check's read, then the redo's
    assert m["redone_changed_input"] == 1 and m["dropped"] == {"filtered_unsafe": 1}
    assert m["num_samples"] == 4
