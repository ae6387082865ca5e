"""Tokenizer training end to end: raw-shard reading, RNG capture, training, exact resume, metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.data.raw import RawImageStream, list_complete_shards
from pipeline.models.vq import VQConfig, VQModel
from pipeline.tokenizer import checkpoint as ckpt
from pipeline.tokenizer import evaluate as ev
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from pipeline.train.rng import capture_rng_state, restore_rng_state
from tests.conftest import free_port
from tests.rawshards import write_raw_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tokenizer/tiny.yaml")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Single-threaded torch: on a shared 2-core box, OpenMP threads that wait on each other
    make small-convolution training several times slower than one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("raw"))
    write_raw_shards(d, 3, 48, size=32, broken={(0, 5)})
    # a shard still being written: tar present, no stats file yet -> never read
    write_raw_shards(os.path.join(d, "partial"), 1, 8, size=32)
    os.replace(os.path.join(d, "partial", "00000.tar"), os.path.join(d, "00009.tar"))
    return d


def _stream(uris, **kw) -> RawImageStream:
    args = dict(image_size=16, batch_size=5, seed=3, shuffle_buffer=8, max_scale=1.3)
    return RawImageStream(uris, **{**args, **kw})


def test_raw_stream_reads_complete_shards_and_resumes_exactly(raw_dir):
    shards = list_complete_shards(raw_dir)
    assert [os.path.basename(s) for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    a = _stream(shards)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    # 143 good images per epoch: 40 batches run into epoch 1
    rest = [next(it) for _ in range(40)]
    assert a.epoch == 1 and a.broken == 1  # the truncated JPEG was skipped and counted
    assert all(b.shape == (5, 3, 16, 16) and b.min() >= -1 and b.max() <= 1 for b in first)
    b = _stream(shards)
    b.load_state_dict(state)
    it_b = iter(b)
    for expected in rest:
        assert torch.equal(next(it_b), expected)
    assert b.state_dict() == a.state_dict()
    # epochs differ in order; ranks split an epoch's samples without overlap
    keys = [
        [s["__key__"] for s in _stream(shards, rank=r, world_size=2).epoch_samples(0)]
        for r in (0, 1)
    ]
    assert not set(keys[0]) & set(keys[1]) and len(keys[0]) + len(keys[1]) == 144
    e1 = [s["__key__"] for s in _stream(shards, rank=0, world_size=2).epoch_samples(1)]
    assert e1 != keys[0]


def test_raw_stream_resume_skips_the_shards_it_no_longer_needs(raw_dir, monkeypatch):
    """Resumed after any batch (mid-shard, in the final buffer flush, in the next epoch), the
    stream gives exactly the batches an uninterrupted one does, and late in an epoch it does not
    read again the shards that only held samples before its position."""
    import pipeline.data.raw as raw

    shards = list_complete_shards(raw_dir)
    a = _stream(shards, shuffle_buffer=16)
    it = iter(a)
    states, batches = [], []
    for _ in range(36):  # 143 good images an epoch: 28.6 batches, so into epoch 1
        batches.append(next(it))
        states.append(a.state_dict())
    assert states[-1]["epoch"] == 1 and states[27]["epoch"] == 0
    assert states[27]["shard_sizes"] == [48, 48, 48]
    opened: list[str] = []
    real = raw.iter_raw_samples

    def counting(uris, handler=None):
        opened.extend(uris)
        return real(uris, handler)

    monkeypatch.setattr(raw, "iter_raw_samples", counting)
    reads = {}
    for k in range(len(states) - 2):
        b = _stream(shards, shuffle_buffer=16)
        b.load_state_dict(states[k])
        it_b = iter(b)
        opened.clear()
        for j in (1, 2):
            assert torch.equal(next(it_b), batches[k + j]), (k, j)
        reads[k] = list(opened)
        assert b.state_dict()["consumed"] == states[k + 2]["consumed"]
    # the epoch's third shard starts at raw sample 96, and the source is 16 samples (the
    # buffer) ahead of the position: resumed from there on, at least one of the first two
    # shards (whose samples were all handed out) is not read again; a full re-read takes all 3
    late = [k for k in reads if states[k]["epoch"] == 0 and states[k]["consumed"] > 96 - 16]
    assert len(late) >= 6 and all(len(set(reads[k])) <= 2 for k in late), reads
    order = _stream(shards)._shard_order(0)
    # a state saved before shard sizes were recorded reads the prefix again, as exactly
    old = {k: v for k, v in states[22].items() if k != "shard_sizes"}
    b = _stream(shards, shuffle_buffer=16)
    b.load_state_dict(old)
    opened.clear()
    assert torch.equal(next(iter(b)), batches[23])
    assert order[0] in opened


def test_raw_stream_resumes_from_a_state_without_shard_sizes(monkeypatch):
    """An older state records no shard sizes: the resume reads the epoch's prefix and drops it,
    also where the place falls in the final flush of the shuffle buffer (the sizes-based replay
    would count past the epoch's end there)."""
    import pipeline.data.raw as raw

    sizes = {"a": 6, "b": 6}
    monkeypatch.setattr(
        raw,
        "iter_raw_samples",
        lambda uris, damaged=None: ({"__key__": f"{u}-{j}"} for u in uris for j in range(sizes[u])),
    )

    def make():
        return raw.RawImageStream(["a", "b"], 8, 2, seed=0, shuffle_buffer=4)

    full = [x["__key__"] for x in make().epoch_samples(0, 0)]
    for skip in range(1, len(full)):
        s = make()
        s.load_state_dict({"epoch": 0, "consumed": skip})  # no shard_sizes
        assert [x["__key__"] for x in s.epoch_samples(0, skip)] == full[skip:], skip


def test_decode_image_accepts_only_known_formats():
    from PIL import Image

    from pipeline.data.raw import decode_image

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (8, 8), 200).save(buf, fmt)
        return buf.getvalue()

    img = decode_image({"__key__": "a", "png": encoded("PNG"), "txt": b"x"})
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 200, 200)
    assert decode_image({"__key__": "b", "jpg": encoded("GIF")}) is None  # sniffed, refused
    assert decode_image({"__key__": "c", "pickle": b"\x80\x04K\x01."}) is None  # never unpickled
    assert decode_image({"__key__": "d", "jpg": b"\xff\xd8 cut"}) is None


def test_raw_stream_reads_s3(raw_dir, s3_bucket):
    storage.put_dir(raw_dir, f"{s3_bucket}/raw")
    remote = list_complete_shards(f"{s3_bucket}/raw")
    assert [u.rsplit("/", 1)[1] for u in remote] == ["00000.tar", "00001.tar", "00002.tar"]
    got = next(iter(_stream(remote)))
    assert torch.equal(got, next(iter(_stream(list_complete_shards(raw_dir)))))


def test_resume_reads_the_checkpoints_shard_set(raw_dir, tmp_path):
    from pipeline.tokenizer.train import _training_shards

    everything = list_complete_shards(raw_dir)
    assert _training_shards(raw_dir, None) == everything
    # shards completed after the checkpoint are left out, so the data order stays the same
    assert _training_shards(raw_dir, {"shards": ["00000.tar", "00002.tar"]}) == [
        everything[0],
        everything[2],
    ]
    with pytest.raises(RuntimeError, match="00007.tar"):
        _training_shards(raw_dir, {"shards": ["00000.tar", "00007.tar"]})


def test_a_new_run_leaves_out_shards_without_an_image(raw_dir, tmp_path, caplog):
    """Shards go to ranks whole: a rank dealt only a shard img2dataset wrote no image into had no
    sample in its epoch and stopped the run ("got no samples"), the other ranks waiting in a
    collective. A new run leaves such shards out, and says so."""
    import shutil

    from pipeline.tokenizer.train import _training_shards

    data = tmp_path / "raw"
    shutil.copytree(raw_dir, data)
    (data / "00009.tar").write_bytes(b"\0" * 1024)  # an empty tar: its end blocks only
    storage.write_json(str(data / "00009_stats.json"), {"count": 5, "successes": 0})
    listed = list_complete_shards(str(data))
    assert listed[-1].endswith("00009.tar")
    assert _training_shards(str(data), None) == listed[:-1]
    assert "1 of " in caplog.text and "hold no image" in caplog.text
    # a stats file cut short by a kill (or empty while img2dataset writes it): not complete
    # yet, left out with a warning naming it, not a bare JSONDecodeError at the run's start
    (data / "00009_stats.json").write_text('{"count": 5, "succ')
    assert _training_shards(str(data), None) == listed[:-1]
    assert "00009_stats.json does not read" in caplog.text
    from pipeline.data.raw import count_successes

    assert count_successes(str(data)) == count_successes(str(raw_dir))


def _metric_rows(steps, tag: str) -> str:
    return "".join(json.dumps({"step": s, "loss": tag}) + "\n" for s in steps)


def _steps_and_tags(text: str) -> list[tuple[int, str]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, text.splitlines())]


def test_resumed_metrics_history_comes_from_the_remote_copy(tmp_path, s3_bucket):
    """With an S3 run folder its metrics.jsonl (mirrored before each checkpoint) is the history:
    a stale local file (the run moved to another node and back) is not read."""
    from pipeline.tokenizer.train import _Metrics

    run, node = f"{s3_bucket}/run", tmp_path / "node"
    node.mkdir()
    storage.write_text(f"{run}/metrics.jsonl", _metric_rows(range(1, 10), "remote"))
    (node / "metrics.jsonl").write_text(_metric_rows(range(1, 4), "local"))
    m = _Metrics(str(node), run, resume_step=6)
    m.write({"step": 7, "loss": "new"})
    m.f.close()
    m.mirror()
    want = [(s, "remote") for s in range(1, 7)] + [(7, "new")]
    assert _steps_and_tags(storage.read_text(f"{run}/metrics.jsonl")) == want
    assert _steps_and_tags((node / "metrics.jsonl").read_text()) == want
    # no remote copy yet (killed before the first mirror): the local file is all there is
    storage.remove(f"{run}/metrics.jsonl")
    (node / "metrics.jsonl").write_text(_metric_rows(range(1, 4), "local"))
    _Metrics(str(node), run, resume_step=2).f.close()
    assert _steps_and_tags((node / "metrics.jsonl").read_text()) == [(1, "local"), (2, "local")]


def test_resume_skips_a_torn_metrics_line(tmp_path, caplog):
    """A last line cut short by a power loss is dropped with a warning, not a failed resume."""
    from pipeline.tokenizer.train import _Metrics

    run = tmp_path / "run"  # a local run folder: its own file is the history
    run.mkdir()
    (run / "metrics.jsonl").write_text(_metric_rows(range(1, 6), "ok") + '{"step": 6, "lo')
    with caplog.at_level("WARNING"):
        m = _Metrics(str(run), str(run), resume_step=6)
    m.write({"step": 6, "loss": "again"})
    m.f.close()
    want = [(s, "ok") for s in range(1, 6)] + [(6, "again")]
    assert _steps_and_tags((run / "metrics.jsonl").read_text()) == want
    assert "skipped 1 unreadable line(s)" in caplog.text


_TWO_RANK_SCRIPT = """
import json, os, sys
from pipeline.config import load_config
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer
summary = train_tokenizer(load_config(TokenizerTrainConfig, sys.argv[1], sys.argv[2:]), "none")
print("SUMMARY " + json.dumps(summary), flush=True)
os._exit(0)  # gloo may abort at interpreter exit (jobs/train_tokenizer.py)
"""


def test_summary_counts_broken_images_of_every_rank(tmp_path):
    """Each rank reads its own shards: the summary's broken-image count is over all ranks (the
    logged figure), on every rank, not rank 0's own count. It counts distinct images: over
    three epochs, in which the two ranks swap shards (seed 1), each broken image counts once,
    not once per reading (a sum of the ranks' counts would count each twice)."""
    data = str(tmp_path / "raw")
    # every other image of both shards is broken, so both ranks (one shard each) skip some
    write_raw_shards(data, 2, 12, size=32, broken={(s, i) for s in (0, 1) for i in range(0, 12, 2)})
    run = tmp_path / "run"
    # 6 good images a shard: 8 steps of 2 read each rank's shard of epochs 0 and 1 whole
    args = [f"data={data}", f"run_dir={run}", "batch_size=2", "max_steps=8", "max_scale=1.0",
            "log_every=1", "eval_images=0", "decode_threads=1", "shuffle_buffer=4",
            "seed=1"]  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(WORLD_SIZE="2", OMP_NUM_THREADS="1", T2I_CACHE=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_RANK_SCRIPT, TINY, *args],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summaries = [json.loads(o.split("SUMMARY ", 1)[1].splitlines()[0]) for o in outs]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8 and last["broken_images"] == 12
    assert [s["broken_images"] for s in summaries] == [last["broken_images"]] * 2
    assert [s["enlarged_crops"] for s in summaries] == [last["enlarged_crops"]] * 2


def test_crops_resized_up_from_smaller_images_are_counted(raw_dir):
    """LlamaGen's tokenizer crops full-size images: its crops are downscaled. Raw shards stored
    at the crop size (256 px LAION-COCO for a 256 px tokenizer) make most crops of
    ``max_scale`` 1.25 enlarged (bicubic) without a word. Counted, and kept on resume."""
    import itertools

    tars = [os.path.join(raw_dir, f"{i:05d}.tar") for i in range(3)]  # 32 px images
    for size, scale, some in ((16, 1.3, False), (32, 1.0, False), (32, 1.3, True)):
        stream = _stream(tars, image_size=size, max_scale=scale, decode_threads=1)
        list(itertools.islice(iter(stream), 4))
        assert (stream.enlarged > 0) == some, (size, scale, stream.enlarged)
    assert stream.enlarged >= 10  # most of the 20 crops: a draw of exactly 32 px is rare
    again = _stream(tars, image_size=32, max_scale=1.3)
    again.load_state_dict(stream.state_dict())
    assert again.enlarged == stream.enlarged


def test_lpips_backbone_is_never_downloaded(tmp_path, monkeypatch, caplog):
    from pipeline.tokenizer.losses import build_lpips

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips("pretrained")
    with caplog.at_level("WARNING"):
        net = build_lpips("auto")
    assert net.random_backbone and "RANDOM VGG16 BACKBONE" in caplog.text
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(net(x, x).mean()) == 0.0 and float(net(x, -x).mean()) > 0


def test_a_node_fetches_a_mirrored_checkpoint_once_for_all_its_ranks(tmp_path, monkeypatch):
    """The ranks of a node resuming from the mirror: its local rank 0 downloads, the others wait
    for it and load that copy (one download a node, not one a rank); a failed download is raised
    by every rank's own load, after the barrier, so no rank waits on a failed one forever."""
    import threading

    ckpt.save_checkpoint({"w": torch.arange(3)}, 7, str(tmp_path / "a"), str(tmp_path / "m"), 0)
    real_get, calls = storage.get_file, []

    def slow_get(*args, **kwargs):  # slow enough that a second rank would overlap it
        calls.append(args)
        time.sleep(0.3)
        return real_get(*args, **kwargs)

    monkeypatch.setattr(storage, "get_file", slow_get)

    def node(local_root: str, remote_root: str) -> list:
        barrier, out = threading.Barrier(2), [None, None]

        def rank(i: int) -> None:
            try:
                ckpt.fetch_once_per_node(7, local_root, remote_root, i, barrier.wait)
                out[i] = ckpt.load_checkpoint(7, local_root, remote_root)["w"].tolist()
            except Exception as exc:  # noqa: BLE001 - checked below
                out[i] = exc

        threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return out

    assert node(str(tmp_path / "b"), str(tmp_path / "m")) == [[0, 1, 2], [0, 1, 2]]
    assert len(calls) == 1
    gone = node(str(tmp_path / "c"), str(tmp_path / "missing"))
    assert all(isinstance(x, FileNotFoundError) for x in gone), gone


def test_rng_state_roundtrip(tmp_path):
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == draws


def test_shipped_configs_load():
    over = ["data=/d", "run_dir=/r"]
    tiny = load_config(TokenizerTrainConfig, TINY, over)
    assert tiny.model.codebook_size == 512 and tiny.image_size % tiny.model.downsample == 0
    big = load_config(TokenizerTrainConfig, str(ROOT / "configs/tokenizer/vq16_256.yaml"), over)
    assert big.model.downsample == 16 and big.model.codebook_size == 16384
    assert big.image_size == 256 and big.disc_start > 0 and big.lpips_backbone == "pretrained"
    with pytest.raises(ConfigError, match="lr_max"):
        load_config(TokenizerTrainConfig, TINY, [*over, "lr_max=1"])
    from pipeline.tokenizer.evaluate import TokenizerEvalConfig

    ev_cfg = load_config(
        TokenizerEvalConfig,
        str(ROOT / "configs/tokenizer/eval.yaml"),
        ["model=m", "data=d", "output=o"],
    )
    assert ev_cfg.image_size == 256 and ev_cfg.num_images == 50000


def test_psnr_ssim_on_known_inputs():
    x = torch.rand(2, 3, 32, 32) * 0.6 + 0.2
    y = x + 0.1  # mse 0.01 -> 20 dB exactly
    assert torch.allclose(ev.psnr(x, y), torch.full((2,), 20.0, dtype=torch.float64))
    # pixel-exact: a finite 100 dB (MSE floored at 1e-10), so means and JSON stay finite
    assert torch.equal(ev.psnr(x, x), torch.full((2,), 100.0, dtype=torch.float64))
    json.dumps(float(ev.psnr(x, x).mean()), allow_nan=False)
    # the training log's PSNR ([-1, 1] images, range 2) is capped the same way
    from pipeline.tokenizer.losses import psnr_from_mse

    assert psnr_from_mse(0.0) == pytest.approx(100.0)
    assert psnr_from_mse(0.04) == pytest.approx(20.0)  # 4 / 0.04 = 100 -> 20 dB
    # one 8-bit level off in one sample of a 32 px image: MSE 5.1e-9, 82.9 dB, not floored
    near = x.clone()
    near[:, 0, 0, 0] += 1 / 255
    assert ev.psnr(x, near).tolist() == pytest.approx([20 * np.log10(255 * 3072**0.5)] * 2)
    assert torch.allclose(ev.ssim(x, x), torch.ones(2, dtype=torch.float64))
    from skimage.metrics import structural_similarity

    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ref = structural_similarity(
        x[0].permute(1, 2, 0).numpy(),
        noisy[0].permute(1, 2, 0).numpy(),
        channel_axis=2,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert abs(float(ev.ssim(x[:1], noisy[:1])) - ref) < 0.02
    assert float(ev.ssim(x[:1], noisy[:1])) < 0.9
    assert torch.equal(
        ev.to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0])),
        torch.tensor([0, 0, 128, 255], dtype=torch.uint8),
    )


def test_rfid_unavailable_without_weights(raw_dir):
    fid, note = ev.build_fid(None)
    assert fid is None and "unavailable" in note
    torch.manual_seed(0)
    out = ev.evaluate_model(
        VQModel(VQConfig.from_name("tiny")), list_complete_shards(raw_dir), 32, 6, batch_size=4
    )
    assert out["images"] == 6 and out["rfid"] is None and "unavailable" in out["rfid_note"]
    assert 0 < out["codes_used"] <= 6 * 16 and out["codebook_usage"] == out["codes_used"] / 512


def test_fewer_images_than_asked_are_counted_and_warned(tmp_path, caplog):
    """num_images beyond what the shards hold evaluated fewer without a word: the result says
    how many of how many, and a warning says why."""
    write_raw_shards(str(tmp_path), 1, 3, size=32)
    torch.manual_seed(0)
    out = ev.evaluate_model(
        VQModel(VQConfig.from_name("tiny")), list_complete_shards(str(tmp_path)), 32, 5
    )
    assert (out["images"], out["images_requested"]) == (3, 5)
    assert "tokenizer evaluated on 3 images, fewer than the 5 asked for" in caplog.text


def test_rfid_from_local_inception_weights(tmp_path):
    # random-init InceptionV3 saved as a local weights file (real weights cannot be downloaded)
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(
            fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None
        ),
    ):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    fid, note = ev.build_fid(str(path))
    assert fid is not None and str(path) in note
    w = "Conv2d_1a_3x3.conv.weight"
    assert torch.equal(fid.inception.state_dict()[w], net.state_dict()[w])
    feats = fid.inception(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048)
    # the standard FID's features: torch-fidelity's own network, its TF1-style resize to 299 px
    # (torchmetrics' default antialiased resize of a 512 px image gives other features, and
    # another score)
    x = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    feats = fid.inception(x)
    with torch.no_grad():
        (standard,) = net.eval()(x)
    assert torch.allclose(feats.double(), standard.double(), rtol=1e-4, atol=0)
    # a weights file holding pickled objects is refused before torch-fidelity's unsafe load
    bad = tmp_path / "bad.pth"
    torch.save({"w": _NotATensor()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        ev.build_fid(str(bad))


class _NotATensor:
    pass


def test_rfid_through_evaluate_with_injected_extractor(raw_dir):
    """The FID plumbing of evaluate_model, with a small feature extractor instead of Inception."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Pooled(torch.nn.Module):
        num_features = 12

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 (B, 3, H, W)
            x = x.float() / 255
            return torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3)), x.amin((2, 3))], 1)

    torch.manual_seed(0)
    shards = list_complete_shards(raw_dir)
    out = ev.evaluate_model(
        VQModel(VQConfig.from_name("tiny")),
        shards,
        32,
        16,
        batch_size=8,
        fid=FrechetInceptionDistance(feature=Pooled()),
    )
    assert out["rfid"] is not None and out["rfid"] > 0.1  # untrained: far from the real images


def test_eval_job_writes_metrics(raw_dir, tmp_path, monkeypatch):
    from jobs.eval_tokenizer import main as eval_main

    exact = []  # on a GPU the job turns TF32 off, to find the codes pretokenize writes
    monkeypatch.setattr(ev, "exact_fp32_on_cuda", exact.append)

    torch.manual_seed(0)
    VQModel(VQConfig.from_name("tiny")).save_pretrained(str(tmp_path / "vq"))
    out = tmp_path / "eval.json"
    eval_main([f"model={tmp_path / 'vq'}", f"data={raw_dir}", f"output={out}", "image_size=32",
              "num_images=5", "batch_size=2"])  # fmt: skip
    got = json.loads(out.read_text())
    assert got["images"] == 5 and got["rfid"] is None and 0 < got["psnr"] < 60
    assert got["broken_images"] == 0
    assert got["config"]["num_images"] == 5 and got["config"]["image_size"] == 32
    assert exact == [got["config"]["device"]]


def test_discriminator_optimizer_starts_as_llamagens():
    """LlamaGen steps its discriminator's Adam on a zero loss until disc_start; starting ours
    from that state gives the same parameters, step for step, without running those steps."""
    from pipeline.tokenizer.train import _start_at_step

    torch.manual_seed(0)
    w0, grads = torch.randn(5, 3), [torch.randn(5, 3) for _ in range(3)]
    runs = []
    for zero_steps in ("taken", "skipped"):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
        if zero_steps == "taken":
            for _ in range(40):
                w.grad = torch.zeros_like(w)
                opt.step()
        path = []
        for g in grads:
            _start_at_step(opt, 40)  # a no-op once the optimizer has state
            w.grad = g.clone()
            opt.step()
            path.append(w.detach().clone())
        runs.append(path)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and it differs from a fresh Adam, whose first update is the full lr per weight
    fresh = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([fresh], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    fresh.grad = grads[0].clone()
    opt.step()
    assert (fresh.detach() - w0).abs().mean() > 1.5 * (runs[1][0] - w0).abs().mean()


def test_train_tiny_improves_psnr_and_exports(raw_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    run = str(tmp_path / "run")
    cfg = load_config(
        TokenizerTrainConfig,
        TINY,
        [
            f"data={raw_dir}",
            f"run_dir={run}",
            "image_size=32",
            "max_steps=300",
            "disc_start=260",
            "max_scale=1.0",  # the images are already 32 px
            "ckpt_every=150",
            "log_every=50",
            "perceptual_weight=0",  # LPIPS takes part in the resume test
            "eval_images=48",
        ],
    )
    torch.manual_seed(cfg.seed)  # the same initial weights train_tokenizer starts from
    shards = list_complete_shards(raw_dir)
    before = ev.evaluate_model(VQModel(cfg.model), shards, 32, 48)
    summary = train_tokenizer(cfg, resume="auto")
    after = json.loads(Path(run, "eval.json").read_text())
    assert summary["step"] == 300 and summary["eval"] == after
    assert after["psnr"] > before["psnr"] + 4.0, (before, after)  # >2.5x lower MSE
    assert after["codebook_usage"] > 0 and after["rfid"] is None
    assert after["images_from"] == "training shards (not held out)"
    rows = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 301))
    # the GAN terms switch on at step disc_start (counting from 1, as LlamaGen does)
    assert all(r["d_loss"] == 0 for r in rows[:259]) and all(r["d_loss"] > 0 for r in rows[259:])
    # the discriminator's Adam counts every step, as LlamaGen's (stepped on a zero loss before)
    final = ckpt.load_checkpoint(300, str(Path(run, "checkpoints")), None)["opt_disc"]["state"]
    assert final and {float(s["step"]) for s in final.values()} == {300.0}
    assert sorted(os.listdir(Path(run, "checkpoints"))) == ["step_0000150", "step_0000300"]
    assert load_config(TokenizerTrainConfig, str(Path(run, "config.yaml"))) == cfg
    model = VQModel.from_pretrained(str(Path(run, "export")))
    assert model.config == cfg.model
    again = ev.evaluate_model(model, shards, 32, 48)
    assert again["psnr"] == pytest.approx(after["psnr"])
    # pruning keeps the highest steps: a fresh run here, or one resumed from the older
    # checkpoint, would lose its own checkpoints to the finished run's, so both are refused
    # before anything is written
    with pytest.raises(ValueError, match=r"already has checkpoints \(newest: step 300\)"):
        train_tokenizer(cfg, resume="none")
    with pytest.raises(ValueError, match=r"from step 150, but .* newer checkpoint \(step 300\)"):
        train_tokenizer(cfg, resume="150")
    # a step that has no complete checkpoint is named as such, before anything is written
    with pytest.raises(ValueError, match=r"no complete checkpoint of step 400 .*\[150, 300\]"):
        train_tokenizer(cfg, resume="400")
    with pytest.raises(ValueError, match=r"give auto, none or a step number"):
        train_tokenizer(cfg, resume="latest")
    assert [json.loads(x)["step"] for x in Path(run, "metrics.jsonl").read_text().splitlines()] == (
        list(range(1, 301))
    )
    # a resume with a lower learning rate trains with it: loading the optimizer put back the
    # saved one, while config.yaml recorded the new one
    slower = dataclasses.replace(cfg, max_steps=301, ckpt_every=1, lr=cfg.lr / 4)
    train_tokenizer(slower, resume="auto")
    saved = torch.load(Path(run, "checkpoints", "step_0000301", "state.pt"), weights_only=False)
    for key in ("opt", "opt_disc"):
        assert {g["lr"] for g in saved[key]["param_groups"]} == {cfg.lr / 4}


def _launch(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / "jobs/train_tokenizer.py"),
        "--config",
        TINY,
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once. torchrun starts each worker in a session of
    its own, so killing the launcher's process group would leave them training on."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(procs[1:], timeout=30)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def _losses(metrics_text: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in metrics_text.splitlines()]
    keys = ("loss", "rec", "perceptual", "codebook", "commit", "entropy", "g_adv", "d_loss")
    # codebook usage is logged every log_every steps, over the codes seen since the last line
    return {r["step"]: {k: r.get(k) for k in (*keys, "codebook_usage")} for r in rows}


def test_kill_and_resume_reproduces_uninterrupted_losses(raw_dir, tmp_path, s3_bucket):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "T2I_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",  # log lines reach the file as they are written
    }
    common = [
        "image_size=32",
        "batch_size=4",
        "max_steps=12",
        "ckpt_every=3",
        "disc_start=2",
        "log_every=2",  # a checkpoint (every 3) inside a logging interval: the usage carries over
        "eval_images=0",
        "decode_threads=1",
        "keep_checkpoints=0",
        "perceptual_weight=0.1",  # every loss term takes part: L2, LPIPS, GAN, VQ, entropy
    ]
    # uninterrupted reference, local data and run folder
    ref_dir = tmp_path / "ref"
    ref = _launch([f"data={raw_dir}", f"run_dir={ref_dir}", *common], tmp_path / "ref.log", env)
    # the same run on S3 data with an S3 run folder, killed after its first mirrored checkpoint
    storage.put_dir(raw_dir, f"{s3_bucket}/raw")
    run = f"{s3_bucket}/run"
    s3_args = [f"data={s3_bucket}/raw", f"run_dir={run}", *common]
    # told to go on far longer (the learning rate is constant: nothing else changes), so that
    # it is surely still training when it is killed, right after its step-3 checkpoint is on S3
    victim = _launch(
        [*s3_args, f"local_dir={tmp_path / 'node_a'}", "max_steps=100000"], tmp_path / "a.log", env
    )
    deadline = time.time() + 300
    while "saved checkpoint step 3 " not in Path(tmp_path / "a.log").read_text():
        assert victim.poll() is None, Path(tmp_path / "a.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)  # the log says when: no guess at timing
    _kill_tree(victim)
    assert storage.exists(f"{run}/checkpoints/step_0000003/COMPLETE")
    assert not storage.exists(f"{run}/export/model.safetensors"), "run ended before the kill"
    # resume on a "new machine": empty local folder, everything comes from the S3 mirror
    resumed = _launch([*s3_args, f"local_dir={tmp_path / 'node_b'}"], tmp_path / "b.log", env)
    assert resumed.wait(timeout=300) == 0, Path(tmp_path / "b.log").read_text()[-3000:]
    assert ref.wait(timeout=300) == 0, Path(tmp_path / "ref.log").read_text()[-3000:]
    log_b = Path(tmp_path / "b.log").read_text()
    resumed_at = int(log_b.split("resumed from checkpoint step ")[1].split()[0])
    assert resumed_at in (3, 6, 9), resumed_at  # a real mid-run resume
    # one download for the node's two ranks: its local rank 0 fetches, the other finds it
    assert log_b.count(f"fetching checkpoint step {resumed_at} from") == 1, log_b[-3000:]
    expected = _losses(Path(ref_dir, "metrics.jsonl").read_text())
    got = _losses(storage.read_text(f"{run}/metrics.jsonl"))
    assert sorted(got) == list(range(1, 13)) == sorted(expected)
    assert got == expected  # bit-identical per-step losses, GAN phase included
    assert got[12]["d_loss"] > 0 and got[12]["perceptual"] > 0 and got[12]["entropy"] != 0
    assert got[4]["codebook_usage"] > 0 and got[3]["codebook_usage"] is None


def test_sigterm_saves_the_step_and_stops(raw_dir, tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption), which passes it on to its ranks: they
    save the step they are at, together, and end with status 75."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "T2I_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    run = tmp_path / "run"
    args = [f"data={raw_dir}", f"run_dir={run}", "image_size=32", "batch_size=4",
            "max_steps=100000", "ckpt_every=100000", "log_every=1", "eval_images=0",
            "decode_threads=1"]  # fmt: skip
    log_path = tmp_path / "run.log"
    proc = _launch(args, log_path, env)
    deadline = time.time() + 300
    while "step 3 |" not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, "no step 3"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = log_path.read_text()
    stopped = [x for x in out.splitlines() if "stopped by SIGTERM after step" in x]
    assert len(stopped) == 1, out[-3000:]
    at = int(stopped[0].split("after step ")[1].split()[0])
    assert 3 <= at < 100000 and f"saved checkpoint step {at} " in out
    assert os.path.exists(run / "checkpoints" / f"step_{at:07d}" / "COMPLETE")
    # no rank failed (torchrun itself ends with its SignalException's traceback)
    assert " E [" not in out and "ChildFailedError" not in out, out[-3000:]


def test_num_images_below_one_is_refused_not_one_image(raw_dir):
    """num_images=0 evaluated one image (the limit was checked after each)."""
    from pipeline.data.raw import iter_eval_images

    shards = list_complete_shards(raw_dir)
    assert list(iter_eval_images(shards, 16, 0)) == []
    assert len(list(iter_eval_images(shards, 16, 2))) == 2
    with pytest.raises(ValueError, match="num_images must be >= 1, got 0"):
        ev.evaluate_model(VQModel(VQConfig.from_name("tiny")), shards, 32, 0)
    overrides = ["model=m", f"data={raw_dir}", "output=e.json", "num_images=0"]
    with pytest.raises(ConfigError, match="num_images must be >= 1, got 0"):
        load_config(ev.TokenizerEvalConfig, None, overrides)


def test_a_data_path_without_raw_shards_is_named(tmp_path):
    """A wrong data= is a missing input, named in one line by the jobs (FileNotFoundError), in
    training and in evaluation alike."""
    from pipeline.tokenizer.evaluate import TokenizerEvalConfig, evaluate_tokenizer

    nothing = str(tmp_path / "nothere")
    cfg = load_config(TokenizerTrainConfig, TINY, [f"data={nothing}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(FileNotFoundError, match=f"no complete raw shards .* under {nothing}$"):
        train_tokenizer(cfg, resume="auto")
    torch.manual_seed(0)
    VQModel(VQConfig.from_name("tiny")).save_pretrained(str(tmp_path / "vq"))
    ecfg = TokenizerEvalConfig(
        model=str(tmp_path / "vq"), data=nothing, output=str(tmp_path / "e.json"), device="cpu"
    )
    with pytest.raises(FileNotFoundError, match=f"under {nothing}$"):
        evaluate_tokenizer(ecfg)


def _tiny_cfg(data: str, run: str, *overrides: str) -> TokenizerTrainConfig:
    return load_config(
        TokenizerTrainConfig,
        TINY,
        [f"data={data}", f"run_dir={run}", "image_size=32", "batch_size=8", "eval_images=0",
         "perceptual_weight=0", "decode_threads=1", "disc_start=1000", *overrides],
    )  # fmt: skip


def test_a_broken_image_counts_once_however_often_it_is_read(tmp_path):
    """The stream read a broken image again every epoch and counted it again each time (4 after
    4 epochs for one broken image). It counts distinct images (shard and key), and a stream
    resumed after any batch counts as an uninterrupted one does."""
    data = str(tmp_path / "raw")
    write_raw_shards(data, 2, 6, size=16, broken={(0, 1), (1, 4)})  # 10 good images an epoch
    shards = list_complete_shards(data)
    a = _stream(shards, decode_threads=1)
    it = iter(a)
    states, counts = [], []
    for _ in range(12):  # 2 batches of 5 an epoch: 6 epochs
        next(it)
        states.append(a.state_dict())
        counts.append(a.broken)
    assert a.epoch == 5 and counts[-1] == 2
    assert sorted(a.broken_ids) == [("00000.tar", "000000001"), ("00001.tar", "000010004")]
    for k in range(len(states) - 1):
        b = _stream(shards, decode_threads=1)
        b.load_state_dict(states[k])
        it_b = iter(b)
        for j in range(k + 1, len(states)):
            next(it_b)
            assert b.broken == counts[j] and b.state_dict() == states[j], (k, j)
    # a state saved before the images were kept (a count only) keeps its count
    old = {key: v for key, v in states[3].items() if key != "broken_ids"}
    c = _stream(shards, decode_threads=1)
    c.load_state_dict({**old, "broken": 7})
    assert c.broken == 7


def test_a_resumed_run_counts_broken_images_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """Through a checkpoint: the logged and summed broken-image count of a run resumed in its
    second epoch is the uninterrupted run's, one per broken image."""
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    data = str(tmp_path / "raw")
    write_raw_shards(data, 2, 12, size=32, broken={(0, 3)})  # 23 good images an epoch
    common = ["max_scale=1.0", "log_every=1", "ckpt_every=4", "shuffle_buffer=4"]
    ref = train_tokenizer(_tiny_cfg(data, str(tmp_path / "ref"), "max_steps=9", *common))
    run = str(tmp_path / "run")
    train_tokenizer(_tiny_cfg(data, run, "max_steps=4", *common))
    resumed = train_tokenizer(_tiny_cfg(data, run, "max_steps=9", *common), resume="auto")

    def counts(folder: str) -> list[int]:
        rows = Path(folder, "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["broken_images"] for x in rows]

    assert ref["broken_images"] == resumed["broken_images"] == 1  # 72 images: 3+ epochs
    logged = counts(run)
    assert counts(str(tmp_path / "ref")) == logged and len(logged) == 9
    assert logged[-1] == max(logged) == 1 and logged.count(1) >= 7  # seen within 16 samples


def test_most_crops_enlarged_is_warned_at_the_start_naming_the_fix(tmp_path, monkeypatch, caplog):
    """Raw shards stored at the crop size (raw/laion-coco's 256 px for vq16_256.yaml) make
    nearly every crop of max_scale 1.25 an enlargement, which was said only in passing at the
    first log line. Most of rank 0's first crops enlarged is a warning before the training goes
    on, naming the fix; the log lines and the summary count them."""
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    data = str(tmp_path / "raw")
    write_raw_shards(data, 1, 40, size=32)  # stored at the crop size
    with caplog.at_level("INFO", logger="pipeline"):
        out = train_tokenizer(
            _tiny_cfg(data, str(tmp_path / "up"), "max_scale=1.25", "max_steps=10", "log_every=10")
        )
    messages = [r.getMessage() for r in caplog.records]
    warned = [i for i, m in enumerate(messages) if "ENLARGED" in m]
    logged = [i for i, m in enumerate(messages) if m.startswith("step 10 |")]
    assert len(warned) == 2 and len(logged) == 1, messages  # at the start and in the end
    first = messages[warned[0]]
    assert warned[0] < logged[0] and "of the first 64 training crops" in first
    assert "raw/laion-hq" in first and "max_scale=1.0" in first and "40 px" in first
    assert out["training_crops"] == 80 and out["enlarged_crops"] > 60
    assert "enlarged crops" in messages[logged[0]]
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        out = train_tokenizer(
            _tiny_cfg(data, str(tmp_path / "same"), "max_scale=1.0", "max_steps=10")
        )
    assert out["enlarged_crops"] == 0 and "ENLARGED" not in caplog.text


def test_enlarged_warning_only_for_most_crops_unless_asked_for_any():
    from pipeline.tokenizer.train import enlarged_warning

    cfg = TokenizerTrainConfig(data="d", run_dir="r", image_size=256, max_scale=1.25)
    assert enlarged_warning(cfg, 32, 64, "first") is None
    assert enlarged_warning(cfg, 0, 64, "some") is None
    assert "320 px" in enlarged_warning(cfg, 33, 64, "first")
    assert "1 of the 64 training crops so far" in enlarged_warning(cfg, 1, 64, "some")
    assert "60 of the run's 64" in enlarged_warning(cfg, 60, 64, "all")


def test_the_tokenizer_examples_train_on_shards_stored_larger_than_the_crops():
    """The --help example and the job's docstring trained vq16_256.yaml on raw/laion-coco
    (256 px centre crops), which its max_scale 1.25 enlarges. They name raw/laion-hq, what
    download_hq.yaml writes, at a size no crop of vq16_256.yaml exceeds."""
    import re

    import jobs.train_tokenizer
    from pipeline.cli import JOB_EXAMPLES
    from pipeline.data.download import DownloadConfig

    hq_yaml = ROOT / "configs/data/download_hq.yaml"
    written = re.search(r"download_hq\.yaml[\s#]+input=\S+ output=(\S+)", hq_yaml.read_text())[1]
    assert written.endswith("/raw/laion-hq")
    for text in (" ".join(JOB_EXAMPLES["TokenizerTrainConfig"]), jobs.train_tokenizer.__doc__):
        assert re.search(r"vq16_256\.yaml.*?data=(\S+)", text, re.S)[1] == written, text
    hq = load_config(DownloadConfig, str(hq_yaml), ["input=i", "output=o"])
    big = load_config(
        TokenizerTrainConfig, str(ROOT / "configs/tokenizer/vq16_256.yaml"), ["data=d", "run_dir=r"]
    )
    assert hq.image_size >= big.image_size * big.max_scale


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=0", "batch_size must be >= 1, got 0"),
        ("log_every=0", "log_every must be >= 1, got 0"),
        ("ckpt_every=0", "ckpt_every must be >= 1, got 0"),
        ("shuffle_buffer=0", "shuffle_buffer must be >= 1, got 0"),
        ("decode_threads=0", "decode_threads must be >= 1, got 0"),
        ("max_steps=0", "max_steps must be >= 1, got 0"),
        ("image_size=0", "image_size must be >= 1, got 0"),
        ("disc_layers=0", "disc_layers must be >= 1, got 0"),
        ("keep_checkpoints=-1", "keep_checkpoints must be >= 0, got -1"),
        ("eval_images=-1", "eval_images must be >= 0, got -1"),
        ("grad_clip=-1", "grad_clip must be >= 0, got -1"),
        ("disc_weight=-0.5", "disc_weight must be >= 0, got -0.5"),
        ("lr=0", "lr must be > 0, got 0"),
        ("lr=-1", "lr must be > 0, got -1"),
        ("betas=[0.9,1.0]", r"betas must each be in \[0, 1\)"),
        ("max_scale=0.5", "max_scale must be >= 1.0"),
    ],
)
def test_tokenizer_config_refuses_values_that_fail_later(override, message):
    """batch_size=0, log_every=0, shuffle_buffer=0, lr<=0 ... were accepted, to fail deep in the
    run (IndexError, ZeroDivisionError, an empty randrange) or train nothing: refused at load,
    by name."""
    with pytest.raises(ConfigError, match=message):
        load_config(TokenizerTrainConfig, TINY, ["data=d", "run_dir=r", override])


def test_raw_stream_refuses_an_empty_batch_or_buffer(raw_dir):
    shards = list_complete_shards(raw_dir)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        _stream(shards, batch_size=0)
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 1, got 0"):
        _stream(shards, shuffle_buffer=0)
    with pytest.raises(ValueError, match="max_scale must be >= 1.0, got 0.5"):
        _stream(shards, max_scale=0.5)
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        load_config(ev.TokenizerEvalConfig, None, ["model=m", "data=d", "output=o", "batch_size=0"])


def test_evaluation_counts_and_names_the_broken_images_it_skips(raw_dir, caplog):
    """evaluate_model skipped undecodable images without a word: the results count them
    (broken_images) and a warning names how many, and the first."""
    from pipeline.data.raw import iter_eval_images

    shards = list_complete_shards(raw_dir)  # 00000.tar's image 5 is cut short
    stats: dict = {}
    keys = [k for k, _ in iter_eval_images(shards, 16, 10, stats)]
    assert "000000005" not in keys and len(keys) == 10
    assert stats == {"broken_images": 1, "broken_examples": ["00000.tar/000000005"]}
    torch.manual_seed(0)
    model = VQModel(VQConfig.from_name("tiny"))
    out = ev.evaluate_model(model, shards, 32, 10, batch_size=4)
    assert (out["images"], out["broken_images"]) == (10, 1)
    assert "skipped 1 undecodable image(s) (first: 00000.tar/000000005)" in caplog.text
    caplog.clear()
    out = ev.evaluate_model(model, shards, 32, 5, batch_size=4)  # ends before the broken one
    assert (out["images"], out["broken_images"]) == (5, 0) and "undecodable" not in caplog.text
