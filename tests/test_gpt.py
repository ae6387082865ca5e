import argparse

import pytest
import torch

import pipeline.models.gpt as gpt_module
from pipeline.decode import compile_available
from pipeline.models.gpt import GPT, GPTConfig, apply_rope, matmul_attention, rope_2d_table
from pipeline.models.gpt_import import from_llamagen, load_llamagen_gpt, to_llamagen
from tests.llamagen_reference import reference_t2i_logits

# LlamaGen's published parameter counts (millions), to the precision they were published.
PAPER_COUNTS = [
    ("B", "text", 112.3),
    ("L", "text", 345.0),
    ("XL", "text", 777.7),
    ("B", "class", 110.9),
    ("L", "class", 342.9),
    ("XL", "class", 774.7),
    ("XXL", "class", 1410.0),  # 1.41B
    ("3B", "class", 3100.0),  # 3.10B
]
# LlamaGen's GPT sizes (n_layer, dim), from its model code's GPT_B ... GPT_3B.
LLAMAGEN_SIZES = {
    "B": (12, 768),
    "L": (24, 1024),
    "XL": (36, 1280),
    "XXL": (48, 1536),
    "3B": (24, 3200),
}


def llamagen_param_count(
    n_layer: int,
    dim: int,
    cond: str,
    multiple_of: int = 256,
    vocab_size: int = 16384,
    caption_dim: int = 2048,
    num_classes: int = 1000,
) -> int:
    """Trainable parameters of LlamaGen's GPT, counted from the shapes of its modules (not from
    our model): no biases, n_kv_head = n_head."""
    hidden = 2 * 4 * dim // 3  # FeedForward: int(2 * 4 * dim / 3) rounded up to multiple_of
    hidden = -(-hidden // multiple_of) * multiple_of
    attention = dim * 3 * dim + dim * dim  # wqkv, wo
    feed_forward = 3 * dim * hidden  # w1, w3, w2
    layer = attention + feed_forward + 2 * dim  # + attention_norm, ffn_norm
    if cond == "text":  # CaptionEmbedder.cap_proj: fc1, fc2 (uncond_embedding is a buffer)
        cond_embedding = caption_dim * dim + dim * dim
    else:  # LabelEmbedder: num_classes + 1 (the CFG null class)
        cond_embedding = (num_classes + 1) * dim
    # tok_embeddings, layers, norm, output
    return cond_embedding + vocab_size * dim + n_layer * layer + dim + dim * vocab_size


def _published_precision(millions: float) -> float:
    # counts under a billion were published to 0.1M, larger ones to 0.01B
    return 0.05 if millions < 1000 else 5.0


@pytest.mark.parametrize("name,cond,millions", PAPER_COUNTS)
def test_llamagen_count_reproduces_the_published_figures(name, cond, millions):
    """The count above, from LlamaGen's architecture, gives its paper's figures: a check on the
    independent count that the next test holds our model to."""
    n_layer, dim = LLAMAGEN_SIZES[name]
    count = llamagen_param_count(n_layer, dim, cond) / 1e6
    assert abs(count - millions) < _published_precision(millions)


@pytest.mark.parametrize("name,cond,millions", PAPER_COUNTS)
def test_preset_parameter_counts(name, cond, millions):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(name, cond=cond))
    n_layer, dim = LLAMAGEN_SIZES[name]
    assert model.num_params() == llamagen_param_count(n_layer, dim, cond)
    assert abs(model.num_params() / 1e6 - millions) < _published_precision(millions)


@pytest.mark.parametrize(
    "kw",
    [
        dict(cond="text", caption_dim=16, max_text_tokens=8),
        dict(cond="text", caption_dim=16, max_text_tokens=8, n_head=4, n_kv_head=2),
        dict(cond="class", num_classes=10),
    ],
    ids=["t2i", "t2i-gqa", "c2i"],
)
def test_train_flops_per_sample_counts_the_matmuls_torch_counts(kw):
    """MFU's numerator against ``torch.utils.flop_counter`` over a real forward + backward: every
    matmul of the step (the counter sees CPU attention only as a fused op it does not count, so
    the causal-as-full attention term, 12 x layers x T^2 x dim, is added by hand)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.gpt import train_flops_per_sample

    cfg = GPTConfig.from_name("debug", vocab_size=64, grid_size=4, **kw)
    model, B = GPT(cfg).train(), 2
    codes = torch.randint(0, cfg.vocab_size, (B, cfg.grid_size**2))
    cond = torch.randn(B, 8, 16) if cfg.cond == "text" else torch.tensor([1, 2])
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(codes, cond, None).flatten(0, 1), codes.flatten()).backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"aten.mm"}, counts  # else the attention term below counts twice
    T = cfg.prefix_len + cfg.grid_size**2 - 1
    attention = 6 * cfg.n_layer * 2 * T * T * cfg.dim
    assert counts["aten.mm"] / B + attention == train_flops_per_sample(cfg)


def test_3b_has_head_dim_100_and_swiglu_hidden():
    cfg = GPTConfig.from_name("3B")
    assert cfg.head_dim == 100
    assert cfg.ffn_hidden == 8704  # multiple_of_256(int(8*3200/3) = 8533)
    assert GPTConfig.from_name("XL").ffn_hidden == 3584


def test_unknown_preset_is_named():
    with pytest.raises(KeyError, match="unknown GPT preset 'XS'"):
        GPTConfig.from_name("XS")


def tiny(**kw):
    base = dict(
        caption_dim=16,
        max_text_tokens=6,
        grid_size=4,
        vocab_size=64,
        token_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
    )
    return GPTConfig.from_name("debug", **{**base, **kw})


def random_batch(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.vocab_size, (B, cfg.image_tokens), generator=g)
    feats = torch.randn(B, cfg.max_text_tokens, cfg.caption_dim, generator=g)
    lengths = torch.tensor([cfg.max_text_tokens, 3, 1][:B])
    mask = torch.arange(cfg.max_text_tokens)[None] >= cfg.max_text_tokens - lengths[:, None]
    return codes, feats, mask


def test_rope_relative_position_property():
    cfg = GPTConfig(dim=64, n_head=2, grid_size=8, max_text_tokens=3)
    table = rope_2d_table(cfg)
    P, g = cfg.prefix_len, cfg.grid_size
    q = torch.randn(1, 1, 1, cfg.head_dim)
    k = torch.randn(1, 1, 1, cfg.head_dim)

    def score(pos_q, pos_k):
        idx_q, idx_k = P + pos_q[0] * g + pos_q[1], P + pos_k[0] * g + pos_k[1]
        return (
            apply_rope(q, table[idx_q : idx_q + 1]) * apply_rope(k, table[idx_k : idx_k + 1])
        ).sum()

    base = score((1, 2), (3, 1))
    for dy, dx in [(1, 0), (0, 3), (2, 2), (4, 1)]:
        shifted = score((1 + dy, 2 + dx), (3 + dy, 1 + dx))
        assert torch.allclose(base, shifted, atol=1e-5)
    assert not torch.allclose(base, score((1, 2), (3, 2)), atol=1e-3)  # positions matter
    # two-dimensional, not a 1-D rotation of the raster index: the same raster offset (7) as
    # another 2-D offset scores differently, and so does a shift along the rows alone
    assert not torch.allclose(score((1, 0), (1, 1)), score((0, 7), (1, 0)), atol=1e-3)
    assert not torch.allclose(base, score((1, 2), (4, 1)), atol=1e-3)


def test_prefix_rope_identity_by_default_and_zero_in_llamagen_mode():
    cfg = GPTConfig(dim=64, n_head=2, grid_size=4, max_text_tokens=5)
    x = torch.randn(1, 5, 2, 32)
    assert torch.equal(apply_rope(x, rope_2d_table(cfg)[:5]), x)
    zero = rope_2d_table(cfg.replace(rope_prefix="llamagen"))[:5]
    assert torch.count_nonzero(apply_rope(x, zero)) == 0  # q and k of the prefix vanish


def test_grid_can_grow_for_stage_two():
    model = GPT(tiny()).eval()
    codes = torch.randint(0, 64, (1, 64))
    feats = torch.randn(1, 6, 16)
    assert model(codes, feats, grid_size=8).shape == (1, 64, 64)


def test_causal_masking():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # zero-init head would hide everything
    codes, feats, mask = random_batch(cfg)
    out = model(codes, feats, mask)
    for j in range(cfg.image_tokens - 1):  # every position: edited, then predicted from
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 1) % cfg.vocab_size
        out2 = model(changed, feats, mask)
        assert torch.allclose(out[:, : j + 1], out2[:, : j + 1], atol=1e-6), j  # up to j
        assert not torch.allclose(out[:, j + 1], out2[:, j + 1], atol=1e-4), j  # the next sees it


@pytest.mark.parametrize("kind", ["causal", "padded prefix", "all keys", "cached block"])
def test_matmul_attention_equals_sdpa(kind):
    """The CPU bf16 attention path: the same outputs and gradients as SDPA (fp32 to the
    rounding; bf16 as close to an fp32 reference as SDPA's own bf16 kernel)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    B, H, T, hd = 2, 3, 11, 8
    S = T + 5 if kind == "cached block" else T
    mask, causal = None, kind == "causal"
    if kind == "padded prefix":
        pmask = torch.ones(B, 4, dtype=torch.bool)
        pmask[0, :2] = False
        mask = GPT.attention_mask(pmask, T, "cpu")
    elif kind == "cached block":  # T new queries after S - T cached keys, key 1 padded
        mask = (
            torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)[None, None].repeat(B, 1, 1, 1)
        )
        mask[0, :, :, 1] = False
    q, k, v = (torch.randn(B, H, n, hd, dtype=torch.float64) for n in (T, S, S))

    def run(fn, dtype):
        qq, kk, vv = (t.to(dtype).clone().requires_grad_() for t in (q, k, v))
        y = fn(qq, kk, vv)
        y.backward(torch.ones_like(y))
        return [t.double() for t in (y, qq.grad, kk.grad, vv.grad)]

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=mask, is_causal=causal)

    def ours(a, b, c):
        return matmul_attention(a, b, c, mask, causal)

    ref = run(sdpa, torch.float64)
    for got, want in zip(run(ours, torch.float32), ref):
        assert torch.allclose(got, want, atol=1e-5)
    for got, theirs, want in zip(run(ours, torch.bfloat16), run(sdpa, torch.bfloat16), ref):
        assert (got - want).abs().max() <= 2 * (theirs - want).abs().max() + 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matmul_attention_runs_atens_softmax_and_matches_eager(dtype):
    """Under torch.compile a query block's masked softmax is the opaque ``biased_softmax`` op
    (inductor's own CPU kernel for it was 2-3x slower): one graph, eager's outputs and gradients,
    and padded keys still get no weight."""
    from torch.profiler import ProfilerActivity, profile

    ok, why = compile_available()
    assert ok, f"torch.compile unavailable here: {why}"
    torch.manual_seed(0)
    B, H, T, hd = 2, 3, 13, 8
    pmask = torch.ones(B, 5, dtype=torch.bool)
    pmask[0, :3] = False  # row 0: three padded caption keys
    mask = GPT.attention_mask(pmask, T, "cpu")
    q, k, v = (torch.randn(B, H, T, hd, dtype=dtype) for _ in range(3))

    def attn(a, b, c):
        return matmul_attention(a, b, c, mask)

    def run(fn, k=k, v=v):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        y = fn(qq, kk, vv)
        y.backward(torch.arange(y.numel(), dtype=dtype).view_as(y).cos())
        return y.detach(), qq.grad, kk.grad, vv.grad

    ref = run(attn)
    compiled = torch.compile(attn, fullgraph=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = run(compiled)
    assert "aten::_softmax" in {e.name for e in prof.events()}  # ATen's kernel, not inductor's
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, **tol)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :3], v2[0, :, :3] = 50.0, 50.0
    hidden = run(compiled, k2, v2)[0]
    # a padded query still sees itself; every later one ignores them, bit for bit
    assert torch.equal(hidden[0, :, 3:], out[0][0, :, 3:]) and torch.equal(hidden[1], out[0][1])
    assert not torch.equal(hidden[0, :, :3], out[0][0, :, :3])


def test_compiled_token_embedding_backward_is_atens_and_matches_eager():
    """Compiled on CPU, the token embedding's gradient comes from ATen's kernel (the opaque
    ``pipeline::embedding``; inductor's own was 15 ms of a GPT-B step) and equals eager's, with
    repeated tokens accumulated."""
    from torch.profiler import ProfilerActivity, profile

    ok, why = compile_available()
    assert ok, f"torch.compile unavailable here: {why}"
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).eval()  # eval: no dropout, so eager and compiled see the same function
    torch.nn.init.normal_(model.head.weight, std=0.02)
    codes, feats, mask = random_batch(cfg)
    codes[:, ::3] = 5  # a token seen many times: its row sums every occurrence's gradient

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn(codes, feats, mask).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads(model)
    compiled = torch.compile(model)
    grads(compiled)  # compile outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = grads(compiled)
    assert "aten::embedding_dense_backward" in {e.name for e in prof.events()}
    assert ref["tok_embed.weight"][5].abs().sum() > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_compiled_model_compiles_once():
    """The RoPE table cache is not filled from inside a compiled forward (that failed the
    graph's own guard on the cache: a second full compile, minutes at GPT-XL)."""
    import torch._dynamo

    ok, why = compile_available()
    assert ok, f"torch.compile unavailable here: {why}"
    torch._dynamo.reset()
    cfg = tiny()
    model = GPT(cfg).eval()
    compiled = torch.compile(model, backend="eager")
    codes, feats, mask = random_batch(cfg)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        first = compiled(codes, feats, mask)
        second = compiled(codes, feats, mask)  # a recompile raises here
    assert torch.equal(first, second)


def test_bf16_model_on_cpu_uses_matmul_attention_and_keeps_its_masks(monkeypatch):
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    codes, feats, mask = random_batch(cfg)
    calls = []
    real = gpt_module.matmul_attention
    monkeypatch.setattr(gpt_module, "matmul_attention", lambda *a: calls.append(1) or real(*a))
    model(codes, feats, mask)
    assert calls == []  # fp32 stays on SDPA
    model = model.to(torch.bfloat16)
    feats = feats.to(torch.bfloat16)
    out = model(codes, feats, mask)
    assert len(calls) == cfg.n_layer
    j = 7  # causal: a changed token changes no earlier prediction, bit for bit
    changed = codes.clone()
    changed[:, j] = (changed[:, j] + 1) % cfg.vocab_size
    out2 = model(changed, feats, mask)
    assert torch.equal(out[:, : j + 1], out2[:, : j + 1])
    assert not torch.equal(out[:, j + 1 :], out2[:, j + 1 :])
    noisy = torch.where(mask[..., None], feats, torch.randn_like(feats) * 10)
    assert torch.equal(model(codes, noisy, mask), out)  # padded caption tokens are ignored


def test_padded_caption_tokens_are_ignored():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    codes, feats, mask = random_batch(cfg)
    noisy = torch.where(mask[..., None], feats, torch.randn_like(feats) * 10)
    assert torch.allclose(model(codes, feats, mask), model(codes, noisy, mask), atol=1e-5)
    # and shorter unpadded input is left-padded the same way
    short = feats[1:2, -3:]
    assert torch.allclose(
        model(codes[1:2], short), model(codes[1:2], feats[1:2], mask[1:2]), atol=1e-5
    )


def test_output_head_is_zero_initialised():
    model = GPT(tiny())
    assert torch.count_nonzero(model.head.weight) == 0


def test_cfg_dropout_uses_unconditional_caption():
    cfg = tiny(cond_dropout_p=1.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    codes, feats, mask = random_batch(cfg)
    model.train()
    dropped = model(codes, feats, mask)  # every row dropped (p=1)
    model.eval()
    all_drop = torch.ones(3, dtype=torch.bool)
    assert torch.allclose(dropped, model(codes, feats, mask, drop=all_drop), atol=1e-6)
    assert torch.allclose(
        dropped, model(codes, torch.randn_like(feats), mask, drop=all_drop), atol=1e-6
    )
    assert not torch.allclose(dropped, model(codes, feats, mask), atol=1e-4)


def test_null_caption_keeps_the_models_precision_under_fp16_features():
    """The token shards (and the sampler) give fp16 features; an fp32 model's null caption must
    not be rounded to fp16 on its way in (dropped rows, and rows with no valid token)."""
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # a null caption with bits fp16 cannot hold
        model.cond_embed.uncond.copy_(torch.randn_like(model.cond_embed.uncond) / 3)
    _, feats, mask = random_batch(cfg)
    want = model.cond_embed(model.cond_embed.uncond.expand(3, -1, -1))
    drop = torch.ones(3, dtype=torch.bool)
    for f in (feats, feats.half()):
        got, _ = model.embed_condition(f, mask, drop)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        empty, _ = model.embed_condition(f, torch.zeros_like(mask), None)
        torch.testing.assert_close(empty, want, rtol=0, atol=0)


def test_drop_rate_is_about_ten_percent():
    model = GPT(tiny()).train()
    torch.manual_seed(1)
    rate = (
        torch.cat([model.cfg_drop_mask(1000, torch.device("cpu")) for _ in range(10)])
        .float()
        .mean()
    )
    assert 0.08 < rate < 0.12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_rate_scale_and_gradient(dtype):
    p, n = 0.1, 1 << 22
    drop = gpt_module.Dropout(p).train()
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    y = drop(x)
    kept = y != 0
    sigma = (p * (1 - p) / (n / 4)) ** 0.5
    # each of the four 16-bit slices of a 64-bit draw is uniform (int64 random_() without a
    # lower bound never sets the sign bit: one slice in four would then never drop)
    for slot in range(4):
        rate = 1 - kept.view(-1, 4)[:, slot].float().mean().item()
        assert abs(rate - p) < 5 * sigma, (slot, rate)
    scale = torch.ones((), dtype=dtype).div(1 - p)  # the scale in x's dtype, as torch's CPU dropout
    assert torch.equal(y[kept], scale.expand(int(kept.sum())))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x is the same scaled mask
    assert drop.eval()(x) is x
    assert gpt_module.Dropout(0.0).train()(x) is x
    assert not gpt_module.Dropout(1.0).train()(x).any()


def test_cpu_dropout_masks_follow_the_seed():
    drop = gpt_module.Dropout(0.1).train()
    x = torch.randn(4, 375, 64)
    torch.manual_seed(5)
    a, b = drop(x), drop(x)
    assert not torch.equal(a, b)  # a new mask every call
    torch.manual_seed(5)
    assert torch.equal(drop(x), a)
    state = torch.get_rng_state()
    c = drop(x)
    torch.set_rng_state(state)
    assert torch.equal(drop(x), c)  # a restored RNG state (resume) replays the mask


def test_activation_checkpointing_replays_the_dropout_masks():
    """The recomputed blocks must draw the same masks as the forward pass (checkpoint restores
    the CPU RNG state), or the gradients would belong to another network."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = tiny(
            token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1, grad_checkpointing=ckpt
        )
        model = GPT(cfg).train()
        torch.nn.init.normal_(model.head.weight, std=0.02)
        codes, feats, mask = random_batch(cfg)
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(
            model(codes, feats, mask).flatten(0, 1), codes.flatten()
        ).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_compiled_dropout_draws_a_mask_per_call_and_keeps_it_for_backward():
    ok, why = compile_available()
    assert ok, f"torch.compile unavailable here: {why}"
    d1, d2 = gpt_module.Dropout(0.5).train(), gpt_module.Dropout(0.5).train()

    def f(x):
        return d1(x), d2(x)  # same shape and p: must not be merged into one draw

    x = torch.ones(64, 64, requires_grad=True)
    torch.manual_seed(0)
    a, b = torch.compile(f, fullgraph=True)(x)  # fullgraph: the mask op splits no graph
    assert not torch.equal(a != 0, b != 0)
    (a * 1 + b * 2).sum().backward()
    assert torch.equal(x.grad, (a + 2 * b).detach())  # the backward uses the forward's masks
    torch.manual_seed(0)
    ea, eb = f(x)
    assert torch.equal(ea, a) and torch.equal(eb, b)  # same draws as eager, same order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_model_compiles_to_one_graph_and_matches_eager(dtype):
    """fullgraph=True: no data-dependent check on the caption mask splits the forward (in eager
    two of them skip work); padded, full and empty captions and CFG drop give eager's logits and
    gradients. In bf16 the attention is matmul_attention with the mask folded into its softmax."""
    ok, why = compile_available()
    assert ok, f"torch.compile unavailable here: {why}"
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    codes, feats, mask = random_batch(cfg)
    feats = feats.to(dtype)
    mask[2] = False  # an empty caption: the model treats it as the null caption
    drop = torch.tensor([False, True, False])
    compiled = torch.compile(model, fullgraph=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for m in (mask, None):  # None: every caption token valid (the causal-only path)
        ref = model(codes, feats, m, drop=drop)
        out = compiled(codes, feats, m, drop=drop)
        torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(
        (model(codes, feats, mask, drop=drop) * g).sum(), model.parameters()
    )
    grads = torch.autograd.grad(
        (compiled(codes, feats, mask, drop=drop) * g).sum(), model.parameters()
    )
    for a, b in zip(grads, ref_grads):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **tol)
        else:  # bf16 rounds differently in fused kernels: both are within ~1% of fp32 here
            assert (a.float() - b.float()).norm() <= 3e-2 * b.float().norm()


def test_class_conditional_null_class():
    cfg = tiny(cond="class", num_classes=10)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    codes = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([3, 7])
    out = model(codes, labels)
    assert out.shape == (2, 16, 64)
    dropped = model(codes, labels, drop=torch.tensor([True, True]))
    assert torch.allclose(dropped, model(codes, torch.tensor([10, 10])), atol=1e-6)


@pytest.mark.parametrize("cond", ["text", "class"])
def test_kv_cache_matches_full_forward(cond):
    cfg = tiny(cond=cond, num_classes=10, n_kv_head=1)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    codes, feats, mask = random_batch(cfg)
    c, m = (feats, mask) if cond == "text" else (torch.tensor([1, 2, 3]), None)
    full = model(codes, c, m)
    model.setup_cache(3)
    steps = [model.prefill(c, m)]
    for i in range(cfg.image_tokens - 1):
        steps.append(model.decode_step(codes[:, i], i))
    model.clear_cache()
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_llamagen_import_matches_reference_forward(tmp_path):
    cfg = tiny(rope_prefix="llamagen")
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    for name, p in ours.named_parameters():  # large q/k so attention is far from uniform
        torch.nn.init.normal_(p, std=0.5 if "qkv" in name else 0.05)
    theirs = to_llamagen(ours.state_dict())
    assert "layers.0.attention.wqkv.weight" in theirs and "cls_embedding.uncond_embedding" in theirs
    # as LlamaGen's training scripts save it: its argparse arguments beside the weights
    args = argparse.Namespace(gpt_model="GPT-B", lr=1e-4)
    torch.save({"model": theirs, "steps": 10, "args": args}, tmp_path / "ckpt.pt")
    loaded = load_llamagen_gpt(str(tmp_path / "ckpt.pt"), cfg).eval()
    codes, feats, mask = random_batch(cfg)
    ref = reference_t2i_logits(theirs, cfg.n_head, cfg.grid_size, feats, mask, codes)
    assert torch.allclose(loaded(codes, feats, mask), ref, atol=1e-4)
    # CFG's unconditional rows: LlamaGen puts its null caption under the caption's own mask
    drop = torch.tensor([True, False, True])[: codes.shape[0]]
    uncond = theirs["cls_embedding.uncond_embedding"]
    dropped = torch.where(drop[:, None, None], uncond.expand_as(feats), feats)
    ref_u = reference_t2i_logits(theirs, cfg.n_head, cfg.grid_size, dropped, mask, codes)
    assert not mask[drop].all()  # a padded caption among the dropped rows
    assert torch.allclose(loaded(codes, feats, mask, drop=drop), ref_u, atol=1e-4)
    assert from_llamagen(to_llamagen(ours.state_dict())).keys() == ours.state_dict().keys()
    # the default (identity) prefix rotation is a different model: it must differ
    default = GPT(cfg.replace(rope_prefix="identity")).eval()
    default.load_state_dict(loaded.state_dict())
    assert not torch.allclose(default(codes, feats, mask), ref, atol=1e-3)


def test_class_checkpoint_without_a_null_class_row_imports(tmp_path):
    """LlamaGen sizes its class table num_classes + (class dropout > 0): a model trained
    without class dropout has no null row; ours always has one (a zero row is added)."""
    cfg = tiny(cond="class", num_classes=5, rope_prefix="llamagen")
    torch.manual_seed(0)
    theirs = to_llamagen(GPT(cfg).state_dict())
    table = theirs["cls_embedding.embedding_table.weight"]
    assert table.shape[0] == 6
    theirs["cls_embedding.embedding_table.weight"] = table[:5].clone()
    torch.save({"model": theirs}, tmp_path / "ckpt.pt")
    loaded = load_llamagen_gpt(str(tmp_path / "ckpt.pt"), cfg)
    got = loaded.cond_embed.table.weight
    assert torch.equal(got[:5], table[:5]) and not got[5].any()


def test_class_import_checks_num_classes_against_the_saved_arguments(tmp_path):
    """A 5-class table with its null row (6 rows) also fits num_classes=6 without dropout: the
    null row would become class 5. LlamaGen's training checkpoints save their arguments; the
    import reads num_classes there and refuses the other count, naming the right one."""
    import argparse

    cfg = tiny(cond="class", num_classes=5, rope_prefix="llamagen")
    theirs = to_llamagen(GPT(cfg).state_dict())
    args = argparse.Namespace(num_classes=5, class_dropout_prob=0.1, gpt_model="GPT-B")
    torch.save({"model": theirs, "args": args, "steps": 10}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"num_classes=5 .*set model.num_classes=5, not 6"):
        load_llamagen_gpt(str(tmp_path / "ckpt.pt"), cfg.replace(num_classes=6))
    loaded = load_llamagen_gpt(str(tmp_path / "ckpt.pt"), cfg)
    assert torch.equal(
        loaded.cond_embed.table.weight, theirs["cls_embedding.embedding_table.weight"]
    )


def test_import_rejects_mismatched_checkpoint(tmp_path):
    theirs = to_llamagen(GPT(tiny()).state_dict())
    torch.save({"model": theirs}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_llamagen_gpt(str(tmp_path / "ckpt.pt"), tiny(dim=128, n_head=4))


def test_decode_reads_the_blocks_and_head_not_the_condition_embedder():
    """The weight bytes a decode step reads: not the caption projector or class table (the
    prefill's alone), and of the token embedding one row a token, not the table."""
    from pipeline.models.gpt import decode_bytes_per_token

    def decode_bytes(**kw):
        with torch.device("meta"):
            return decode_bytes_per_token(GPT(GPTConfig.from_name("B", **kw)).bfloat16())

    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("B")).bfloat16()
    blocks_and_head = sum(
        p.numel() * 2
        for n, p in model.named_parameters()
        if n.startswith(("blocks.", "head", "norm"))
    )
    assert decode_bytes() == blocks_and_head
    assert decode_bytes(caption_dim=16) == decode_bytes(caption_dim=4096)
    assert decode_bytes(cond="class", num_classes=10) == decode_bytes(
        cond="class", num_classes=1000
    )
