"""The aesthetic scorer on a tiny random CLIP: head layout, normalisation, loading, batching."""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.models.aesthetic import (
    AestheticHead,
    AestheticScorer,
    build_tiny_aesthetic,
    load_head,
    score_embeddings,
)

# The published sac+logos+ava1-l14-linearMSE.pth state dict: names and shapes.
PUBLISHED_KEYS = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(80, 64), (64, 100), (33, 47), (128, 128)]
    modes = ["RGB", "L", "RGBA", "RGB"]
    out = []
    for i in range(n):
        w, h = sizes[i % 4]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(img.convert(modes[i % 4]))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_aesthetic(str(tmp_path_factory.mktemp("aes") / "tiny"), seed=0)


def _published_like_head(path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in PUBLISHED_KEYS.items()}
    torch.save(state, path)
    return state


def test_head_matches_published_layout(tmp_path):
    assert {k: tuple(v.shape) for k, v in AestheticHead().state_dict().items()} == PUBLISHED_KEYS
    state = _published_like_head(tmp_path / "head.pth")
    head = load_head(str(tmp_path / "head.pth"))
    emb = torch.randn(4, 768)
    # reference computation straight from the published weights, no dropout
    x = emb / emb.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(score_embeddings(head, emb), x.squeeze(-1))


def test_head_file_errors_are_clear(tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an aesthetic-head"):
        load_head(str(tmp_path / "bad.pth"))
    _published_like_head(tmp_path / "head.pth")
    with pytest.raises(ValueError, match="768-d"):
        load_head(str(tmp_path / "head.pth"), in_dim=64)


def test_scale_invariance_from_l2_normalisation(tmp_path):
    _published_like_head(tmp_path / "head.pth")
    head = load_head(str(tmp_path / "head.pth"))
    emb = torch.randn(5, 768)
    base = score_embeddings(head, emb)
    torch.testing.assert_close(score_embeddings(head, emb * 37.0), base)
    torch.testing.assert_close(score_embeddings(head, emb * 0.01), base)
    # without the normalisation the head would give something else
    assert not torch.allclose(head(emb * 37.0).squeeze(-1), base)


def test_score_shapes_determinism_and_batching(tiny, caplog):
    with caplog.at_level(logging.WARNING):
        scorer = AestheticScorer.from_config(tiny)
    assert "RANDOM weights" in caplog.text
    images = _images(11)
    scores, emb = scorer.score_and_embed(images)
    assert scores.shape == (11,) and scores.dtype == np.float32
    assert emb.shape == (11, 64)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert np.unique(scores.round(6)).size > 1  # distinct images, distinct scores
    np.testing.assert_array_equal(scorer.score(images), scores)  # deterministic (eval mode)
    # batch size does not change results; order is kept
    scorer.batch_size = 1
    np.testing.assert_allclose(scorer.score(images[::-1]), scores[::-1], rtol=1e-4, atol=1e-5)
    # the scores are the head applied to the embeddings
    np.testing.assert_allclose(
        score_embeddings(scorer.head, torch.from_numpy(emb)).numpy(), scores, rtol=1e-4, atol=1e-5
    )


def test_unreadable_image_is_nan_not_a_crash(tiny):
    scorer = AestheticScorer.from_config(tiny)
    buf = io.BytesIO()
    _images(1)[0].save(buf, format="JPEG")
    truncated = Image.open(
        io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2])
    )  # decodes lazily, fails in transform
    good = _images(3)
    scores = scorer.score([good[0], truncated, good[2]])
    assert np.isnan(scores[1]) and np.isfinite(scores[[0, 2]]).all()
    np.testing.assert_allclose(scores[[0, 2]], scorer.score([good[0], good[2]]), rtol=1e-5)


def test_load_from_s3(tiny, s3_bucket, tmp_path, monkeypatch):
    local_dir = tiny.clip_weights.rsplit("/", 1)[0]
    storage.put_dir(local_dir, f"{s3_bucket}/aes")
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    remote_cfg = dataclasses.replace(
        tiny,
        clip_weights=f"{s3_bucket}/aes/clip.pt",
        head_weights=f"{s3_bucket}/aes/head.pth",
        clip_model_config=f"{s3_bucket}/aes/t2i-tiny-ViT-16.json",
    )
    images = _images(4)
    np.testing.assert_array_equal(
        AestheticScorer.from_config(remote_cfg).score(images),
        AestheticScorer.from_config(tiny).score(images),
    )


def test_build_tiny_on_s3_and_mismatched_dim(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    cfg = build_tiny_aesthetic(f"{s3_bucket}/tiny", seed=2, embed_dim=32)
    assert AestheticScorer.from_config(cfg).score(_images(2)).shape == (2,)
    with pytest.raises(ValueError, match="32-d"):
        AestheticScorer.from_config(dataclasses.replace(cfg, embed_dim=768))


def test_low_precision_clip_keeps_its_layernorms_in_fp32(tiny):
    """dtype=bfloat16 loads CLIP as open_clip's (and OpenAI's) mixed precision: matmul weights in
    bf16, LayerNorms computed in fp32, so the embeddings stay close to fp32's."""
    from open_clip.transformer import LayerNormFp32

    full = AestheticScorer.from_config(tiny)
    low = AestheticScorer.from_config(dataclasses.replace(tiny, dtype="bfloat16"))
    norms = [m for m in low.clip.visual.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, LayerNormFp32) for m in norms)
    assert all(m.weight.dtype == torch.float32 for m in norms)
    assert low.clip.visual.conv1.weight.dtype == torch.bfloat16 == low.input_dtype
    images = _images(6)
    _, a = full.score_and_embed(images)
    _, b = low.score_and_embed(images)
    assert (a * b).sum(axis=1).min() > 0.99  # cosine of unit vectors
