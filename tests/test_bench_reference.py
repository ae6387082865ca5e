"""The LlamaGen baseline of ``benchmarks/bench_reference.py``: it is the reference's model (its
state dict imports into ours and both compute the same logits), it trains, and the benchmark's
table is consistent with itself."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_reference  # noqa: E402
from llamagen_ref import (  # noqa: E402
    LlamaGenT2I,
    dataset_mask,
    reference_optimizer,
    reference_train_step,
)

from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.models.gpt_import import from_llamagen  # noqa: E402
from tests.llamagen_reference import reference_t2i_logits  # noqa: E402
from tests.test_gpt import tiny as gpt_tiny  # noqa: E402


def tiny(**kw):
    return gpt_tiny(**{"cond_dropout_p": 0.0, **kw})


def batch(cfg, B=3):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.vocab_size, (B, cfg.image_tokens), generator=g)
    feats = torch.randn(B, cfg.max_text_tokens, cfg.caption_dim, generator=g)
    mask = torch.ones(B, cfg.max_text_tokens, dtype=torch.bool)
    mask[0, :3] = False  # padded captions (left-padded, as LlamaGen's dataset does)
    mask[1, :1] = False
    return codes, feats, mask


def test_baseline_is_llamagens_model_and_imports_into_ours():
    cfg = tiny(rope_prefix="llamagen")
    torch.manual_seed(0)
    ref = LlamaGenT2I(cfg).eval()
    for name, p in ref.named_parameters():  # large q/k: attention far from uniform
        torch.nn.init.normal_(p, std=0.5 if "wqkv" in name else 0.05)
    codes, feats, mask = batch(cfg)
    T = cfg.max_text_tokens + cfg.image_tokens - 1
    logits, loss = ref(codes, feats, dataset_mask(mask, T))
    assert logits.shape == (3, cfg.image_tokens, cfg.vocab_size)
    # the functional restatement the checkpoint-import test uses
    functional = reference_t2i_logits(
        ref.state_dict(), cfg.n_head, cfg.grid_size, feats, mask, codes
    )
    assert torch.allclose(logits, functional, atol=1e-5)
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_llamagen(ref.state_dict()), strict=True)
    assert torch.allclose(ours(codes, feats, mask), logits, atol=1e-5)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten())
    assert torch.allclose(loss, expected)
    # without a mask: causal attention over every caption position
    causal, _ = ref(codes, feats, None)
    assert torch.allclose(ours(codes, feats, torch.ones_like(mask)), causal, atol=1e-5)


def test_baseline_has_ours_parameter_count_at_preset_b():
    with torch.device("meta"):
        ref = LlamaGenT2I(GPTConfig.from_name("B"))
        ours = GPT(GPTConfig.from_name("B"))
    n = sum(p.numel() for p in ref.parameters())
    assert n == ours.num_params()
    assert round(n / 1e6, 1) == 112.3


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reference_step_trains(dtype):
    cfg = tiny()
    codes, feats, mask = batch(cfg)
    step = reference_train_step(cfg, dtype, (codes, feats, mask))
    losses = [step() for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the same batch, no dropout, lr 1e-4: the loss falls step after step
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.1, losses[::5]


def test_bench_reference_table_is_consistent():
    rows = bench_reference.run(("debug",), ("fp32",), repeat=1, compiled=False, min_seconds=0.0)
    (row, peak) = rows
    assert (row["preset"], row["dtype"], row["mode"]) == ("debug", "fp32", "eager")
    assert row["reference_s"] > 0 and row["ours_s"] > 0
    assert row["speedup"] == pytest.approx(row["reference_s"] / row["ours_s"])
    assert row["goal"] == 1.0
    assert row["ours_mfu"] / row["reference_mfu"] == pytest.approx(row["speedup"])
    assert peak["preset"] == "peak" and "GFLOP/s" in peak["ours_mfu"]
    table = bench_reference.format_table(rows)
    assert table.splitlines()[0].startswith("| preset | dtype | mode | reference_s | ours_s")


def test_reference_optimizer_is_fused_as_llamagen_chooses():
    """LlamaGen's creat_optimizer passes fused=True wherever AdamW takes it, on any device: the
    reference runs the fused kernel on CPU too, as ours does."""
    with torch.device("cpu"):
        opt = reference_optimizer(LlamaGenT2I(tiny()))
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
