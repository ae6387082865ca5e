"""The T5 text encoder on a tiny random model: loading paths, valid lengths, truncation, batching."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline import storage
from pipeline.models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    build_tiny_text_encoder,
    clean_caption,
)

CAPTIONS = [
    "a red circle on a blue background",
    "",
    "two green squares",
    "x" * 300,  # byte-level tokenizer: 301 tokens with EOS, so it is truncated
    "a small yellow triangle next to a large purple star, drawn in the middle of the picture",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_text_encoder(str(tmp_path_factory.mktemp("t5") / "tiny-t5"), d_model=32)


def test_local_and_s3_give_same_features(tiny_dir, s3_bucket, tmp_path, caplog):
    uri = f"{s3_bucket}/models/tiny-t5"
    storage.put_dir(tiny_dir, uri)
    with caplog.at_level(logging.WARNING):
        local = TextEncoder.from_pretrained(tiny_dir, max_length=120)
        remote = TextEncoder.from_pretrained(uri, max_length=120, cache_dir=str(tmp_path / "c"))
    assert local.random_weights and remote.random_weights
    assert "RANDOM weights" in caplog.text
    assert local.dim == remote.dim == 32
    a = local.encode(CAPTIONS, out_dtype=torch.float32)
    b = remote.encode(CAPTIONS, out_dtype=torch.float32)
    assert a.lengths == b.lengths
    for fa, fb in zip(a.features, b.features):
        assert torch.equal(fa, fb)
    # features are not degenerate: different captions give different features
    assert not torch.allclose(a.features[0][0], a.features[2][0])


def test_build_tiny_directly_on_s3(s3_bucket, tmp_path):
    uri = build_tiny_text_encoder(f"{s3_bucket}/tiny", d_model=16, seed=3)
    assert "config.json" in storage.list_dir(uri)
    enc = TextEncoder.from_config(TextEncoderConfig(uri=uri, cache_dir=str(tmp_path)))
    assert enc.dim == 16


def test_lengths_truncation_and_dtype(tiny_dir):
    enc = TextEncoder.from_pretrained(tiny_dir, max_length=40)
    out = enc.encode(CAPTIONS)  # float16 by default
    token_lengths = [len(enc.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert token_lengths[1] == 1  # empty caption: EOS alone
    assert out.lengths == [min(n, 40) for n in token_lengths]
    assert out.n_truncated == sum(n > 40 for n in token_lengths) == 2
    for f, n in zip(out.features, out.lengths):
        assert f.shape == (n, 32) and f.dtype == torch.float16 and f.device.type == "cpu"
    assert out.nonfinite == []


def test_a_tokenizer_config_saying_left_keeps_the_start_of_a_long_caption(tiny_dir, tmp_path):
    """A model folder whose tokenizer_config.json says truncation_side / padding_side left: a
    long caption kept its end, not its start as LlamaGen's T5 does."""
    import json
    import shutil

    left = tmp_path / "left"
    shutil.copytree(tiny_dir, left)
    conf = json.loads((left / "tokenizer_config.json").read_text())
    conf.update(truncation_side="left", padding_side="left")
    (left / "tokenizer_config.json").write_text(json.dumps(conf))
    text = "abcdefghijklmnop"
    ours = TextEncoder.from_pretrained(str(left), max_length=8)
    ref = TextEncoder.from_pretrained(tiny_dir, max_length=8)
    assert ours.tokenizer.truncation_side == ours.tokenizer.padding_side == "right"
    ids = ours.tokenizer([text], max_length=8, truncation=True)["input_ids"][0]
    assert ids == ref.tokenizer([text], max_length=8, truncation=True)["input_ids"][0]
    assert ours.tokenizer.decode(ids, skip_special_tokens=True) == "abcdefg"
    a, b = ours.encode([text, "ab"]), ref.encode([text, "ab"])
    assert a.lengths == b.lengths == [8, 3]
    assert all(torch.equal(x, y) for x, y in zip(a.features, b.features, strict=True))


def test_batching_matches_one_by_one(tiny_dir):
    batched = TextEncoder.from_pretrained(tiny_dir, batch_size=3).encode(
        CAPTIONS, out_dtype=torch.float32
    )
    single = TextEncoder.from_pretrained(tiny_dir, batch_size=1)
    for i, caption in enumerate(CAPTIONS):
        one = single.encode([caption], out_dtype=torch.float32)
        assert one.lengths[0] == batched.lengths[i]
        torch.testing.assert_close(one.features[0], batched.features[i], atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_clear(tiny_dir, tmp_path):
    enc = TextEncoder.from_pretrained(tiny_dir)
    with pytest.raises(TypeError, match="indices \\[1\\]"):
        enc.encode(["ok", None])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_pretrained(str(tmp_path))
    assert enc.encode([]).features == []
    # float16 T5 gives finite but wrong features (HF clamps its overflows): refused, also in
    # the config (the pretokenize YAML's text.dtype)
    with pytest.raises(ValueError, match="finite but wrong"):
        TextEncoder.from_pretrained(tiny_dir, dtype="float16")
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="dtype"):
        load_config(TextEncoderConfig, None, ["dtype=float16"])


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("A RED Apple on a Table http://example.com/x.jpg", "a red apple on a table"),
        ("a red apple on a table", "a red apple on a table"),
        ("<b>Big</b> &amp; Bold", "big bold"),
        ("Photo by @someone of a cat", "photo by of a cat"),
        ("this-is-my-cute-cat", "this is my cute cat"),
        ("a well-known dog", "a well-known dog"),  # a few dashes stay
        ('  "A Dog"  ', "a dog"),
        ("Cats \u2014 dogs \u201cquoted\u201d", 'cats - dogs "quoted"'),
        ("IMG_1234.JPG a beach", "a beach"),
        ("see www.shop.com/item now", "see now"),
        ("\u732b a cat", "a cat"),
        ("a%20cat+on+a+mat", "a cat on a mat"),
        ("server 192.168.0.1 rack", "server rack"),
        ("order 12345678 shipped", "order shipped"),
        ("caf&eacute; table", "caf\u00e9 table"),  # entities decoded
        ("a cat,sitting", "a cat, sitting"),
        ("wait... what", "wait what"),
        ("http://example.com/only.png", ""),
        ("", ""),
    ],
)
def test_clean_caption_normalises_as_llamagen(raw, clean):
    assert clean_caption(raw) == clean
    assert clean_caption(clean) == clean  # a clean caption is left alone


def test_encode_cleans_captions_unless_told_not_to(tiny_dir):
    """FLAN-T5 is case-sensitive: a model trained on LlamaGen's cleaned captions must get the
    same tokens for a prompt written in capitals or with a URL; clean_captions=false keeps the
    text as given."""
    cleaned = TextEncoder.from_config(TextEncoderConfig(uri=tiny_dir))
    raw = TextEncoder.from_config(TextEncoderConfig(uri=tiny_dir, clean_captions=False))
    assert cleaned.clean_captions and not raw.clean_captions
    a = cleaned.encode(
        ["A RED Apple on a Table http://example.com/x.jpg", "a red apple on a table"]
    )
    assert a.lengths[0] == a.lengths[1] == len("a red apple on a table") + 1
    assert torch.equal(a.features[0], a.features[1])
    b = raw.encode(["A RED Apple on a Table", "a red apple on a table"])
    assert b.lengths[0] == b.lengths[1] and not torch.equal(b.features[0], b.features[1])
    assert torch.equal(b.features[1], a.features[1])  # an already clean caption: no change
