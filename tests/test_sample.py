import torch

from pipeline.models.gpt import GPT, GPTConfig
from pipeline.sample import SamplingParams, cfg_mix, filter_logits, generate


def model_and_cond(cond="text"):
    cfg = GPTConfig.from_name("debug", caption_dim=16, max_text_tokens=6, grid_size=4,
                              vocab_size=64, cond=cond, num_classes=10)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a peaked but not degenerate distribution
    feats = torch.randn(3, 6, 16)
    mask = torch.arange(6)[None] >= torch.tensor([[0], [3], [5]])
    return model, feats, mask


PARAMS = SamplingParams(cfg_scale=3.0, temperature=1.0, top_k=20, top_p=0.95)


def test_deterministic_under_seed():
    model, feats, mask = model_and_cond()
    a = generate(model, feats, mask, PARAMS, seeds=[1, 2, 3])
    b = generate(model, feats, mask, PARAMS, seeds=[1, 2, 3])
    c = generate(model, feats, mask, PARAMS, seeds=[4, 5, 6])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (3, 16) and a.max() < 64


def test_batch_equals_one_by_one():
    model, feats, mask = model_and_cond()
    batch = generate(model, feats, mask, PARAMS, seeds=[7, 8, 9])
    for i, seed in enumerate([7, 8, 9]):
        one = generate(model, feats[i : i + 1], mask[i : i + 1], PARAMS, seeds=[seed])
        assert torch.equal(one[0], batch[i])


def test_cached_equals_uncached_tokens():
    for cond in ("text", "class"):
        model, feats, mask = model_and_cond(cond)
        c, m = (feats, mask) if cond == "text" else (torch.tensor([1, 2, 3]), None)
        fast = generate(model, c, m, PARAMS, seeds=[1, 2, 3], use_cache=True)
        slow = generate(model, c, m, PARAMS, seeds=[1, 2, 3], use_cache=False)
        assert torch.equal(fast, slow)


def test_cfg_math_and_scale_one_is_conditional():
    lc, lu = torch.randn(2, 10), torch.randn(2, 10)
    assert torch.allclose(cfg_mix(lc, lu, 1.0), lc)
    assert torch.allclose(cfg_mix(lc, lu, 0.0), lu)
    assert torch.allclose(cfg_mix(lc, lu, 4.0), lu + 4.0 * (lc - lu))
    # end to end: with s=1 no unconditional batch is run and greedy decoding follows l_c
    model, feats, mask = model_and_cond()
    greedy = SamplingParams(cfg_scale=1.0, temperature=0.0)
    tokens = generate(model, feats, mask, greedy)
    logits = model(tokens, feats, mask, drop=torch.zeros(3, dtype=torch.bool))
    assert torch.equal(logits.argmax(-1), tokens)


def test_guidance_changes_samples():
    model, feats, mask = model_and_cond()
    greedy1 = generate(model, feats, mask, SamplingParams(cfg_scale=1.0, temperature=0.0))
    greedy8 = generate(model, feats, mask, SamplingParams(cfg_scale=8.0, temperature=0.0))
    assert not torch.equal(greedy1, greedy8)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: the rest go
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_p=0.81)
    assert torch.isfinite(p).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1  # top token always stays
