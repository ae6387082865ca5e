"""The VQ tokenizer model: shapes, presets, straight-through gradients, weight import/export."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.vq import (
    VQConfig,
    VQModel,
    codes_to_uint16,
    count_params,
    llamagen_to_state_dict,
)


def tiny(**kw) -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQConfig.from_name("tiny", **kw)).eval()


def test_codes_shape_dtype_and_range():
    m = tiny()
    x = torch.rand(2, 3, 32, 64) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (2, 4, 8)  # downsample 8
    assert codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < m.config.codebook_size
    arr = codes_to_uint16(codes)
    assert arr.dtype == np.uint16 and arr.shape == (2, 4, 8)
    assert np.array_equal(arr.astype(np.int64), codes.numpy())
    out = m.decode(codes)
    assert out.shape == (2, 3, 32, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        m.encode(torch.zeros(1, 3, 36, 36))
    with pytest.raises(ValueError, match="out of range"):
        m.decode(torch.full((1, 2, 2), m.config.codebook_size))


def test_quantizer_picks_nearest_normalised_code():
    m = tiny()
    q = m.quantize
    z = torch.randn(3, 8, 2, 2)
    z_q, losses, idx = q(z)
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    emb = F.normalize(q.embedding.weight, dim=-1)
    # for unit vectors the nearest code is the one with the largest cosine
    assert torch.equal(idx.flatten(), (zn @ emb.t()).argmax(1))
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 8), emb[idx.flatten()], atol=1e-6)
    assert torch.allclose(losses.commit, 0.25 * losses.codebook)
    # chunked distance computation gives the same answer as one block
    q.CHUNK = 5
    assert torch.equal(q(z)[2], idx)


def test_quantizer_under_bf16_autocast_picks_the_fp32_codes():
    """Training runs the VQ under bf16 autocast: the code search and the entropy loss's logits
    must stay fp32 (bf16 distances between unit vectors pick another code for ~6% of them)."""
    from pipeline.models.vq import VectorQuantizer, VQConfig

    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=16384, codebook_embed_dim=8, entropy_loss_ratio=0.05)
    q = VectorQuantizer(cfg).train()
    with torch.no_grad():  # a spread-out codebook, as after training
        q.embedding.weight.copy_(F.normalize(torch.randn(16384, 8), dim=-1))
    z = torch.randn(2, 8, 32, 32)
    _, losses32, idx32 = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses16, idx16 = q(z)
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    assert torch.equal(idx32.flatten(), (zn @ q.codebook().t()).argmax(1))
    assert torch.equal(idx16, idx32)
    assert losses16.entropy.dtype == torch.float32
    assert torch.allclose(losses16.entropy, losses32.entropy, rtol=1e-5)


def test_presets_and_parameter_count_on_meta():
    with torch.device("meta"):
        vq16 = VQModel(VQConfig.from_name("VQ-16"))
        vq8 = VQModel(VQConfig.from_name("VQ-8"))
    # LlamaGen reports 72M parameters for VQ-16
    assert 71_500_000 < count_params(vq16) < 72_500_000
    assert vq16.config.downsample == 16 and vq8.config.downsample == 8
    assert vq16.quantize.embedding.weight.shape == (16384, 8)
    assert VQConfig.from_name("tiny").codebook_size <= 1024
    with pytest.raises(ValueError, match="65536"):
        VQConfig(codebook_size=70000)
    with pytest.raises(KeyError, match="VQ-16"):
        VQConfig.from_name("VQ-32")


@pytest.fixture(scope="module")
def vq16() -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQConfig.from_name("VQ-16")).eval()


@pytest.mark.parametrize("size", [256, 512])
def test_vq16_roundtrip_runs(vq16, size):
    m = vq16
    x = torch.rand(1, 3, size, size) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (1, size // 16, size // 16)
    out = m.decode(codes)
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()


def test_straight_through_gradient_reaches_encoder():
    m = tiny().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, losses, _ = m(x)
    # reconstruction loss alone: its only route to the encoder is the straight-through copy
    F.mse_loss(recon, x).backward()
    g = m.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.quantize.embedding.weight.grad is None  # codes get no gradient from the output
    m.zero_grad()
    losses.codebook.backward()
    assert m.quantize.embedding.weight.grad.abs().sum() > 0


def test_entropy_loss_is_used_when_enabled():
    m = tiny(entropy_loss_ratio=0.1).train()
    _, losses, _ = m(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert losses.entropy.requires_grad and float(losses.entropy.detach()) != 0.0
    _, off, _ = tiny(entropy_loss_ratio=0.0).train()(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert float(off.entropy) == 0.0


# Key names and shapes of LlamaGen's VQ-16 (tokenizer/tokenizer_image/vq_model.py).
LLAMAGEN_VQ16_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.res.0.norm1.weight": (128,),
    "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.4.res.1.conv2.weight": (512, 512, 3, 3),
    "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (8, 256, 1, 1),
    "quantize.embedding.weight": (16384, 8),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.2.conv1.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


def test_state_dict_uses_llamagen_key_names():
    with torch.device("meta"):
        sd = VQModel(VQConfig.from_name("VQ-16")).state_dict()
    for k, shape in LLAMAGEN_VQ16_KEYS.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd  # no upsampling at full size
    assert not any(".attn." in k for k in sd if k.startswith("encoder.conv_blocks.3"))


def test_llamagen_checkpoint_import_roundtrip(tmp_path):
    src = tiny()
    sd = src.state_dict()
    # a LlamaGen checkpoint: {"model": ..., "optimizer": ...} plus its usage buffer
    ckpt = {
        "model": {**sd, "quantize.codebook_used": torch.zeros(65536)},
        "optimizer": {"state": {}, "param_groups": []},
        "steps": 100,
        "args": argparse.Namespace(vq_model="VQ-16", lr=1e-4),  # as LlamaGen's vq_train.py saves
    }
    path = tmp_path / "vq_tiny.pt"
    torch.save(ckpt, path)
    loaded = VQModel.from_pretrained(str(path), "tiny")
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), src.encode(x))
    assert "quantize.codebook_used" not in llamagen_to_state_dict(ckpt)
    # a file holding pickled code is refused (weights_only)
    bad = tmp_path / "bad.pt"
    torch.save({"model": sd, "evil": _Pickled()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        VQModel.from_pretrained(str(bad), "tiny")


class _Pickled:
    pass


def test_save_pretrained_roundtrip_local_and_s3(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    src = tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = src.decode(src.encode(x))
    for uri in (str(tmp_path / "export"), f"{s3_bucket}/vq/export"):
        src.save_pretrained(uri)
        m = VQModel.from_pretrained(uri)
        assert m.config == src.config
        assert torch.equal(m.decode(m.encode(x)), expected)


def test_a_save_killed_over_an_older_one_is_refused_not_loaded(tmp_path, monkeypatch):
    """Saving again into a folder replaces its files one by one: killed after the weights, the
    new weights sat beside the old config.json and loaded without a word. Now the folder's
    export.json (written last) and the weights carry one export id: a mismatch is refused."""
    from pipeline import storage

    old = tiny()
    new = VQModel(VQConfig.from_name("tiny", codebook_l2_norm=False)).eval()
    with torch.no_grad():
        new.quantize.embedding.weight.mul_(-1.0)
    out = str(tmp_path / "vq")
    old.save_pretrained(out)
    real_write_json = storage.write_json

    def killed(uri, obj):  # the second save stops after model.safetensors
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(storage, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(out)
    monkeypatch.setattr(storage, "write_json", real_write_json)
    with pytest.raises(RuntimeError, match=r"no export.json beside the weights.*did not finish"):
        VQModel.from_pretrained(out)
    # the old export.json put back (or a writer that removed none): the ids differ
    old.save_pretrained(str(tmp_path / "old"))
    (tmp_path / "vq" / "export.json").write_bytes((tmp_path / "old" / "export.json").read_bytes())
    with pytest.raises(RuntimeError, match=r"is not the export export.json describes"):
        VQModel.from_pretrained(out)
    with pytest.raises(RuntimeError, match=r"did not finish"):
        VQModel.from_pretrained(out, "tiny")  # refused before the config is compared
    new.save_pretrained(out)  # saved again: whole
    m = VQModel.from_pretrained(out)
    assert m.config == new.config
    assert torch.equal(m.quantize.embedding.weight, new.quantize.embedding.weight)


def test_a_fresh_save_is_stamped_and_the_same_model_saved_again_is_the_same_bytes(tmp_path, caplog):
    from safetensors import safe_open

    from pipeline import storage

    out = tmp_path / "vq"
    tiny().save_pretrained(str(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "export.json",
        "model.safetensors",
    ]
    info = storage.read_json(str(out / "export.json"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["export_id"] == info["export_id"]
    before = storage.fingerprint(str(out))
    caplog.clear()
    with caplog.at_level("WARNING"):
        m = VQModel.from_pretrained(str(out), "tiny")
    assert m.config == VQConfig.from_name("tiny") and "export.json" not in caplog.text
    # an unchanged model exported again keeps its content (and what outputs saved of it)
    tiny().save_pretrained(str(out))
    assert storage.fingerprint(str(out)) == before
    other = tiny()
    with torch.no_grad():
        other.quantize.embedding.weight.mul_(-1.0)
    other.save_pretrained(str(out))
    assert storage.read_json(str(out / "export.json"))["export_id"] != info["export_id"]


def test_a_folder_saved_before_export_ids_still_loads_without_a_warning(tmp_path, caplog):
    """Folders written by older versions: config.json + model.safetensors with no id and no
    export.json (they never had one, so its absence says nothing: no warning)."""
    from safetensors.torch import save_file

    src = tiny()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(legacy / "model.safetensors"))
    (legacy / "config.json").write_text(json.dumps(src.config.to_dict()))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with caplog.at_level("WARNING"):
        m = VQModel.from_pretrained(str(legacy), "tiny")
    assert torch.equal(m.encode(x), src.encode(x))
    assert "export.json" not in caplog.text


def test_a_preset_that_disagrees_with_a_saved_folder_is_refused(tmp_path):
    """A preset beside a saved folder: one that keeps every tensor's shape (here the codebook
    lookup without L2 normalisation) would load strictly and give other codes for every image,
    so it is refused, naming the field; the same preset, or none, loads the folder's config."""
    torch.manual_seed(0)
    own = VQConfig.from_name("tiny", codebook_l2_norm=False)
    src = VQModel(own).eval()
    with torch.no_grad():  # codes of unequal norms: the lookup then depends on the setting
        src.quantize.embedding.weight.mul_(torch.rand(own.codebook_size, 1) * 3)
    src.save_pretrained(str(tmp_path / "vq"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match=r"codebook_l2_norm=False \(preset: True\).*no preset"):
        VQModel.from_pretrained(str(tmp_path / "vq"), "tiny")
    for config in (None, own):
        m = VQModel.from_pretrained(str(tmp_path / "vq"), config)
        assert m.config == own and torch.equal(m.encode(x), src.encode(x))
    # what the refusal prevents: the preset's lookup gives other codes from the same weights
    wrong = VQModel(VQConfig.from_name("tiny")).eval()
    wrong.load_state_dict(src.state_dict())
    assert not torch.equal(wrong.encode(x), src.encode(x))
