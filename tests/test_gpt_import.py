"""Importing LlamaGen GPT checkpoints: the loaded model is LlamaGen's, whatever the config said,
and ``jobs/export.py --llamagen`` turns one into our export for sampling and ``init_from``."""

import importlib.util
import os

import torch

from pipeline.models.gpt import GPT
from pipeline.models.gpt_import import load_llamagen_gpt, to_llamagen
from pipeline.sample_job import load_exported_gpt
from tests.llamagen_reference import reference_t2i_logits
from tests.test_gpt import random_batch, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llamagen_checkpoint(path, cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ours = GPT(cfg.replace(rope_prefix="llamagen"))
    for name, p in ours.named_parameters():  # large q/k: the prefix rotation matters
        torch.nn.init.normal_(p, std=0.5 if "qkv" in name else 0.05)
    theirs = to_llamagen(ours.state_dict())
    torch.save({"model": theirs}, path)
    return theirs


def test_import_with_a_default_config_is_llamagen_model(tmp_path):
    """The default config's identity prefix rotation would give other logits from the same
    weights; the importer builds the model LlamaGen trained."""
    cfg = tiny()
    assert cfg.rope_prefix == "identity"
    theirs = _llamagen_checkpoint(tmp_path / "ckpt.pt", cfg)
    codes, feats, mask = random_batch(cfg)
    ref = reference_t2i_logits(theirs, cfg.n_head, cfg.grid_size, feats, mask, codes)
    loaded = load_llamagen_gpt(str(tmp_path / "ckpt.pt"), cfg).eval()
    assert loaded.cfg.rope_prefix == "llamagen"
    assert torch.allclose(loaded(codes, feats, mask), ref, atol=1e-4)
    kept = load_llamagen_gpt(str(tmp_path / "ckpt.pt"), cfg, keep_rope_prefix=True).eval()
    assert kept.cfg.rope_prefix == "identity"
    assert not torch.allclose(kept(codes, feats, mask), ref, atol=1e-3)


def test_export_job_imports_a_llamagen_checkpoint(tmp_path, s3_bucket):
    cfg = tiny()
    theirs = _llamagen_checkpoint(tmp_path / "ckpt.pt", cfg)
    spec = importlib.util.spec_from_file_location(
        "export_job", os.path.join(ROOT, "jobs", "export.py")
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = f"{s3_bucket}/models/imported"
    overrides = [
        "model.preset=debug",
        *(f"model.{k}={getattr(cfg, k)}" for k in ("caption_dim", "max_text_tokens", "grid_size")),
        f"model.vocab_size={cfg.vocab_size}",
    ]
    job.main(["--llamagen", str(tmp_path / "ckpt.pt"), "--out", out, *overrides])
    model = load_exported_gpt(out).eval()
    assert model.cfg.rope_prefix == "llamagen"
    codes, feats, mask = random_batch(cfg)
    ref = reference_t2i_logits(theirs, cfg.n_head, cfg.grid_size, feats, mask, codes)
    # dropout does not act in eval mode: the export's config may keep the preset's rates
    assert torch.allclose(model(codes, feats, mask), ref, atol=1e-4)

    # the wrong model for the weights is refused, naming what to check
    import pytest

    with pytest.raises(ValueError, match="does not fit"):
        job.main(["--llamagen", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "x"), "model=B"])
    with pytest.raises(SystemExit):  # a training checkpoint knows its model: no overrides
        job.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "y"), "model=B"])
