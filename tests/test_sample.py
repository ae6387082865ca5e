import pytest
import torch

from pipeline.decode import StaticDecoder, compile_available
from pipeline.models.gpt import GPT, GPTConfig, matmul_attention
from pipeline.sample import Sampler, SamplingParams, cfg_mix, draw, filter_logits, generate


def small_model(**kw) -> GPT:
    cfg = GPTConfig.from_name(
        "debug", caption_dim=16, max_text_tokens=6, grid_size=4, vocab_size=64, **kw
    )
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a peaked but not degenerate distribution
    return model


def model_and_cond(cond="text"):
    model = small_model(cond=cond, num_classes=10)
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
    rows = []
    real_forward = model.forward
    model.forward = lambda codes, *a, **k: (
        rows.append(codes.size(0)) or real_forward(codes, *a, **k)
    )
    tokens = generate(model, feats, mask, greedy, use_cache=False)
    assert set(rows) == {3}  # the conditional rows alone, every step
    rows.clear()
    generate(model, feats, mask, SamplingParams(cfg_scale=3.0, temperature=0.0), use_cache=False)
    assert set(rows) == {6}  # guided: conditional and unconditional rows
    model.forward = real_forward
    assert torch.equal(generate(model, feats, mask, greedy), tokens)  # the cached decoder too
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


# --- the fast decoder ---------------------------------------------------------------------------


def test_static_decoder_matches_uncached_with_gqa_and_padding():
    model = small_model(n_head=4, n_kv_head=2)
    feats = torch.randn(2, 6, 16)
    mask = torch.arange(6)[None] >= torch.tensor([[2], [5]])
    fast = generate(model, feats, mask, PARAMS, seeds=[3, 4])
    slow = generate(model, feats, mask, PARAMS, seeds=[3, 4], use_cache=False)
    assert torch.equal(fast, slow)
    # teacher-forced logits through the decoder equal the full forward pass
    dec = StaticDecoder(model, 2)
    steps = [dec.prefill(feats, mask, None)]
    for i in range(15):
        steps.append(dec.step(fast[:, i], model.cfg.prefix_len + i))
    full = model(fast, feats, mask, drop=torch.zeros(2, dtype=torch.bool))
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_sampler_reuse_and_padding_of_a_short_batch():
    model, feats, mask = model_and_cond()
    sampler = Sampler(model, batch_size=3, cfg=True)
    full = sampler.sample(feats, mask, PARAMS, seeds=[7, 8, 9])
    assert torch.equal(full, generate(model, feats, mask, PARAMS, seeds=[7, 8, 9]))
    # one condition through a sampler sized for 3: padded rows do not touch the real one
    one = sampler.sample(feats[1:2], mask[1:2], PARAMS, seeds=[8])
    assert torch.equal(one[0], full[1])
    with pytest.raises(ValueError, match="cfg=True"):
        sampler.sample(feats, mask, SamplingParams(cfg_scale=1.0), seeds=[1, 2, 3])


def test_draw_follows_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    n = 4000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    rows = logits.expand(n, -1)
    for params, expect in [
        (SamplingParams(top_k=0, top_p=1.0), [0.4, 0.3, 0.2, 0.06, 0.04]),
        (SamplingParams(top_k=2, top_p=1.0), [4 / 7, 3 / 7, 0, 0, 0]),
        (SamplingParams(top_k=0, top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0, 0]),
        (SamplingParams(top_k=4, top_p=0.75, temperature=1.0), [4 / 9, 3 / 9, 2 / 9, 0, 0]),
    ]:
        freq = torch.bincount(draw(rows, params, gens), minlength=5).float() / n
        assert torch.allclose(freq, torch.tensor(expect), atol=0.03), (params, freq)
        # the same filter as filter_logits: zero-probability tokens are never drawn
        allowed = torch.isfinite(filter_logits(logits[None], params.top_k, params.top_p))[0]
        assert allowed[draw(rows, params, gens)].all()
    # temperature sharpens: T=0.25 picks the top token far more often than T=1
    cold = draw(rows, SamplingParams(top_k=0, temperature=0.25), gens)
    assert (cold == 0).float().mean() > 0.6


def test_top_p_keeps_the_sorted_prefix_even_on_ties():
    """The nucleus is a prefix of the sorted tokens, as in LlamaGen: a cutoff by value kept every
    token tied with the last one in it, so top_p 0 was not greedy when the top logits tied."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(300)]
    rows = logits.expand(300, -1)
    for k in (0, 4):
        greedy = draw(rows, SamplingParams(top_k=k, top_p=0.0), gens)
        assert len(set(greedy.tolist())) == 1 and greedy[0].item() in (1, 2, 4)
        # the three tied tokens hold 3 x 0.30 of the mass: top_p 0.35 keeps two of them
        two = set(draw(rows, SamplingParams(top_k=k, top_p=0.35), gens).tolist())
        assert len(two) == 2 and two < {1, 2, 4}
    assert torch.isfinite(filter_logits(logits, top_p=0.0)).sum() == 1


def test_top_k_with_top_p_keeps_the_tokens_tied_with_the_kth():
    """With top-p on, draw kept exactly the k tokens torch.topk returns; LlamaGen and
    filter_logits keep every token tied with the k-th (bf16 logits tie often: most rows at
    k=1000 of 16384), and the tied ones' mass moves the nucleus. The support is filter_logits'
    now, rows with and without ties in one batch."""
    logits = torch.tensor([[4.0, 2.0, 2.0, 2.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.5, 0.0]])
    n = 3000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    rows = logits.repeat_interleave(n // 2, 0)
    params = SamplingParams(top_k=2, top_p=0.99, temperature=1.0)
    got = draw(rows, params, gens)
    allowed = torch.isfinite(filter_logits(logits, params.top_k, params.top_p))
    assert allowed.tolist() == [[True] * 4 + [False] * 2, [True] * 2 + [False] * 4]
    for r in range(2):
        picks = got[r * (n // 2) : (r + 1) * (n // 2)]
        assert allowed[r][picks].all()
        assert set(picks.tolist()) == set(allowed[r].nonzero().flatten().tolist()), r


def test_top_k_with_top_p_is_the_rows_own_whatever_its_batch_mates_tie():
    """The top-k candidates' width is the batch's (the row with most ties at its k-th value),
    and torch.topk orders tied values differently at other widths: which tied tokens the
    nucleus kept, and so the token drawn, changed with the batch-mates (221 of 1,500 draws in
    a review's repro). Ties now go by index, the row's own order: the same token alone or
    beside a row of many ties, and top_p 0 keeps the lowest-indexed of the tied top tokens."""
    torch.manual_seed(0)
    V, k = 4096, 300
    params = SamplingParams(top_k=k, top_p=0.9, temperature=1.0)
    changed = 0
    for _ in range(40):
        a = (torch.randn(1, V) * 2).bfloat16().float()  # bf16 logits tie often
        b = (torch.randn(1, V) * 2).bfloat16().float()
        b[0, torch.randperm(V)[: V // 4]] = b[0].topk(k).values[-1]  # many ties at its k-th
        for seed in range(5):
            alone = draw(a, params, [torch.Generator().manual_seed(seed)])
            both = draw(
                torch.cat([a, b]),
                params,
                [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(1)],
            )
            changed += int(alone[0] != both[0])
    assert changed == 0
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]])
    for k in (0, 4):
        greedy = draw(tied, SamplingParams(top_k=k, top_p=0.0), [torch.Generator()])
        assert greedy.tolist() == [1]


def test_temperatures_that_break_the_softmax_are_floored_or_refused():
    """A temperature of 1e-37 made every kept logit infinite and the softmax NaN: every token
    came out the last of the vocabulary. Floored at 1e-5 as LlamaGen's max(T, 1e-5): the top
    token; NaN or infinite temperatures are refused."""
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0]]).expand(4, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    for top_p in (1.0, 0.9):
        tiny = SamplingParams(top_k=0, top_p=top_p, temperature=1e-37)
        assert draw(logits, tiny, gens).tolist() == [1, 1, 1, 1]
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=t)


def test_bf16_cpu_decoder_freezes_its_weights_and_refuses_changed_ones():
    """bf16 on CPU, mode 'default': the compiled step has the weights as constants (inductor's
    freezing, for oneDNN's packed linear). Its logits are eager's up to bf16 rounding; once the
    weights change in place the decoder refuses to go on (it would use the old ones), and a new
    decoder compiles the new ones in."""
    ok, why = compile_available()
    assert ok, f"torch.compile unavailable here: {why}"
    model, feats, mask = model_and_cond()
    model = model.to(torch.bfloat16)
    feats, tokens, P = feats.to(torch.bfloat16), torch.tensor([3, 5, 7]), model.cfg.prefix_len

    def first_logits(decoder):
        decoder.prefill(feats, mask, None)
        return decoder.step(tokens, P)

    assert not StaticDecoder(model_and_cond()[0], 3, compile_mode="default").frozen  # not fp32
    assert not StaticDecoder(model, 3, compile_mode="default", freeze=False).frozen
    frozen = StaticDecoder(model, 3, compile_mode="default")
    assert frozen.frozen and frozen.compile_mode == "default"
    ref = first_logits(StaticDecoder(model, 3))
    with torch.profiler.profile() as prof:
        out = first_logits(frozen)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.1)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # frozen for real: the packed linear ran
        assert any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    with pytest.raises(RuntimeError, match="weights changed"):
        frozen.prefill(feats, mask, None)
    changed = first_logits(StaticDecoder(model, 3))
    assert (changed - ref).abs().max() > 1.0  # a change the check below can see
    torch.testing.assert_close(
        first_logits(StaticDecoder(model, 3, compile_mode="default")), changed, rtol=0.05, atol=0.3
    )


def test_compile_check_runs_on_the_decoders_device_once_per_device_type(monkeypatch):
    """compile_available compiled its probe on a CPU tensor whatever the device: on a GPU machine
    that tests inductor's C++ backend, not triton. It runs the probe on the device it is given
    (a tensor there), once per device type, and the decoder asks about its own device."""
    from pipeline import decode

    monkeypatch.setattr(decode, "_COMPILE_CHECKED", {})
    # the real probe: its tensor is on the device asked about (meta holds no data to check)
    ok, why = compile_available("meta")
    assert not ok and "meta" in why
    probed = []

    def probe(device):
        probed.append(device)
        return device.type == "cuda", "" if device.type == "cuda" else "no C++ compiler"

    monkeypatch.setattr(decode, "_try_compile", probe)
    assert compile_available("cuda:1") == (True, "")
    assert compile_available(torch.device("cuda", 0)) == (True, "")  # cached by type
    assert compile_available("meta")[0] is False  # the real probe's answer, kept
    assert probed == [torch.device("cuda", 1)]
    # a CPU decoder asks about the CPU: told no, it decodes eagerly
    model, feats, mask = model_and_cond()
    decoder = StaticDecoder(model, 3, compile_mode="default")
    assert probed[1:] == [torch.device("cpu")] and decoder.compile_mode is None
    assert compile_available() == (False, "no C++ compiler")
    assert len(probed) == 2


def test_eager_step_reads_the_cache_up_to_its_position_and_raises_its_own_errors(
    monkeypatch, caplog
):
    """An eager decoder attends to the cache up to ``pos`` only (``end=pos+1``): the decoder told
    eager from compiled with ``self._step is self._step_eager``, always False for bound methods,
    so it ran the whole-buffer path and reported its own errors as a failed compiled step."""
    model, feats, mask = model_and_cond()
    decoder = StaticDecoder(model, 3)
    decoder.prefill(feats, mask, None)
    ends = []
    real = StaticDecoder._step_eager

    def spy(self, tokens, pos, end=None):
        ends.append(end)
        return real(self, tokens, pos, end)

    monkeypatch.setattr(StaticDecoder, "_step_eager", spy)
    P = model.cfg.prefix_len
    decoder.step(torch.zeros(3, dtype=torch.long), P)
    decoder.step(torch.zeros(3, dtype=torch.long), P + 1)
    assert ends == [P + 1, P + 2]

    def broken(self, tokens, pos, end=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(StaticDecoder, "_step_eager", broken)
    with pytest.raises(RuntimeError, match="boom"):
        decoder.step(torch.zeros(3, dtype=torch.long), P + 2)
    assert "falling back" not in caplog.text


def test_a_failing_compiled_step_falls_back_to_eager_once(caplog):
    model, feats, mask = model_and_cond()
    ref = StaticDecoder(model, 3)
    decoder = StaticDecoder(model, 3)
    calls = []

    def failing(tokens, pos):
        calls.append(pos)
        raise RuntimeError("compiled graph broke")

    decoder._compiled_step, decoder.compile_mode = failing, "default"
    P = model.cfg.prefix_len
    tok = torch.tensor([1, 2, 3])
    torch.testing.assert_close(decoder.prefill(feats, mask, None), ref.prefill(feats, mask, None))
    torch.testing.assert_close(decoder.step(tok, P), ref.step(tok, P))
    torch.testing.assert_close(decoder.step(tok, P + 1), ref.step(tok, P + 1))
    assert len(calls) == 1 and decoder.compile_mode is None
    assert caplog.text.count("falling back to eager") == 1


def test_compile_mode_gives_the_same_tokens():
    ok, why = compile_available()
    assert ok, f"torch.compile unavailable here: {why}"
    model, feats, mask = model_and_cond()
    sampler = Sampler(model, batch_size=3, cfg=True, compile_mode="default")
    compiled = sampler.sample(feats, mask, PARAMS, seeds=[1, 2, 3])
    assert sampler.compile_mode == "default"  # it really compiled (no silent eager fallback)
    assert torch.equal(
        compiled, generate(model, feats, mask, PARAMS, seeds=[1, 2, 3], use_cache=False)
    )
    with pytest.raises(ValueError, match="compile mode"):
        Sampler(model, 1, compile_mode="fastest")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_with_a_bias_equals_sdpa(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g).to(dtype) for n in (1, 37, 37))
    bias = torch.zeros(3, 1, 1, 37)
    bias[0, ..., :10] = float("-inf")  # a padded prefix
    bias[1, ..., 30:] = float("-inf")  # slots not yet written
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=bias
    )
    out = matmul_attention(q, k, v, bias.to(dtype))
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # a key behind -inf has no influence at all
    v2 = v.clone()
    v2[0, :, :10] = 1e4
    torch.testing.assert_close(matmul_attention(q, k, v2, bias.to(dtype))[0], out[0])


def test_bad_conditions_are_refused_with_their_shapes():
    model, feats, mask = model_and_cond()
    with pytest.raises(ValueError, match=r"3 seeds for 2 conditions"):
        generate(model, feats[:2], mask[:2], PARAMS, seeds=[1, 2, 3], use_cache=False)
    with pytest.raises(ValueError, match=r"\(batch, tokens, 16\)"):
        generate(model, feats[..., :8], mask, PARAMS, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match=r"\(batch, tokens, 16\)"):
        generate(model, feats[0], mask[0], PARAMS)
    with pytest.raises(ValueError, match=r"caption mask of shape \(\d+, 5\)"):
        generate(model, feats, mask[:, :5], PARAMS, seeds=[1, 2, 3])
    # right-padded (Hugging Face's layout): the first image token would see only padding
    right = torch.arange(6)[None] < torch.tensor([[6], [3], [1]])
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=r"rows \[1, 2\] have padding after a valid token"):
            generate(model, feats, right, PARAMS, use_cache=use_cache)
    # label 10 is the null class of a 10-class model: an unconditional sample, not a class
    c2i = small_model(cond="class", num_classes=10)
    for labels in (torch.tensor([3, 10]), torch.tensor([-1, 2])):
        for use_cache in (True, False):
            with pytest.raises(ValueError, match=r"outside 0..9"):
                generate(c2i, labels, None, PARAMS, use_cache=use_cache)
    assert generate(c2i, torch.tensor([3, 9]), None, PARAMS).shape == (2, 16)
    # a decoder over a model left in training mode would apply dropout at every step
    decoder = StaticDecoder(model.train(), 3)
    with pytest.raises(ValueError, match="training mode"):
        decoder.prefill(feats, mask, None)
