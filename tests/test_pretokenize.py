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
from tests.rawshards import build_tiny_models, raw_key, write_raw_shards
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
    # shards 2 and 3 have no score parquet (max_shards=2): left for later, not failed
    assert [s["index"] for s in m["shards"]] == [0, 1]
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

    # rerun: nothing to do, bytes unchanged; another resolution into the same folder is refused
    before = {s["index"]: s["sha256"] for s in m2["shards"]}
    again = run_pretokenize(load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models)))
    assert {s["index"]: s["sha256"] for s in again["shards"]} == before
    with pytest.raises(ConfigError, match="resolution"):
        run_pretokenize(
            load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models, "resolution=32"))
        )
    # other batch sizes and devices make the same shards: a rerun on other hardware adds to them
    other_hw = ["batch_size=3", "text.batch_size=5", "vq.device=cpu", "text.cache_dir=/tmp/x"]
    again = run_pretokenize(
        load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models, *other_hw))
    )
    assert {s["index"]: s["sha256"] for s in again["shards"]} == before
    with pytest.raises(ValueError, match="at most 120 caption tokens"):
        load_config(PretokenizeConfig, TINY, _overrides(raw, out2, models, "text.max_length=128"))


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
    assert cfg.resolution in (64, 256, 512) and cfg.text.max_length == 120
    if name.endswith("stage2.yaml"):
        assert (cfg.resolution, cfg.min_aesthetic, cfg.vq.preset) == (512, 5.0, "VQ-16")


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
