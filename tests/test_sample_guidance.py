"""Sampling rules beyond the plain CFG mix: LlamaGen's cfg_interval, top_p 0, bad settings and
non-finite logits."""

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.sample import Sampler, SamplingParams, draw, filter_logits, generate
from pipeline.sample_job import SampleConfig
from tests.test_sample import model_and_cond


def _reference_greedy(model, feats, mask, scale: float, last_guided: int) -> torch.Tensor:
    """Full forward passes, guidance written out: tokens 0..last_guided guided, then the
    conditional logits alone."""
    B, N = feats.size(0), model.cfg.image_tokens
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)])
    tokens = torch.zeros(B, N, dtype=torch.long)
    with torch.no_grad():
        for i in range(N):
            seq = tokens[:, : i + 1].repeat(2, 1)
            logits = model(seq, feats.repeat(2, 1, 1), mask.repeat(2, 1), drop=drop)[:, -1]
            lc, lu = logits[:B], logits[B:]
            mixed = lu + scale * (lc - lu) if i <= last_guided else lc
            tokens[:, i] = mixed.argmax(-1)
    return tokens


def test_cfg_interval_guides_the_first_tokens_only():
    """LlamaGen guides the prefill's token and decode steps 0..cfg_interval: tokens
    0..cfg_interval + 1."""
    model, feats, mask = model_and_cond()
    scale = 6.0
    always = SamplingParams(cfg_scale=scale, temperature=0.0)
    interval = SamplingParams(cfg_scale=scale, temperature=0.0, cfg_interval=3)
    want = _reference_greedy(model, feats, mask, scale, last_guided=4)
    assert not torch.equal(want, _reference_greedy(model, feats, mask, scale, last_guided=99))
    for use_cache in (True, False):
        got = generate(model, feats, mask, interval, use_cache=use_cache)
        assert torch.equal(got, want), use_cache
    assert torch.equal(
        generate(model, feats, mask, always), _reference_greedy(model, feats, mask, scale, 99)
    )


def test_top_p_zero_keeps_the_top_token():
    """As LlamaGen's filter: the most likely token always stays, so top_p 0 is greedy."""
    logits = torch.randn(4, 50)
    kept = torch.isfinite(filter_logits(logits, top_p=0.0))
    assert kept.sum(-1).tolist() == [1] * 4
    assert torch.equal(kept.float().argmax(-1), logits.argmax(-1))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    for _ in range(5):
        got = draw(logits, SamplingParams(cfg_scale=1.0, top_k=10, top_p=0.0), gens)
        assert torch.equal(got, logits.argmax(-1))


def test_bad_sampling_settings_are_refused():
    for bad in (dict(top_p=1.5), dict(top_p=-0.1), dict(top_k=-1), dict(cfg_interval=-2)):
        with pytest.raises(ValueError, match=next(iter(bad))):  # the field is named
            SamplingParams(**bad)
    with pytest.raises((ConfigError, ValueError), match="top_p"):
        load_config(SampleConfig, None, ["sampling.top_p=2.0"])


def test_non_finite_logits_stop_sampling():
    """NaN weights give NaN logits, which inverse-CDF sampling would turn into the last token of
    the vocabulary for every position: refused instead."""
    model, feats, mask = model_and_cond()
    with torch.no_grad():
        model.head.weight[5, 0] = float("nan")
    params = SamplingParams(cfg_scale=2.0, temperature=1.0, top_k=0)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        Sampler(model, 3).sample(feats, mask, params, seeds=[0, 1, 2])
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate(model, feats, mask, params, use_cache=False)
