"""The VQGAN image tokenizer of LlamaGen: encoder, l2-normalised vector quantizer, decoder.

Written leaf to root: blocks (norm, resnet, attention, resampling), encoder, decoder,
quantizer, model. Module and parameter names follow LlamaGen's
``tokenizer/tokenizer_image/vq_model.py`` (``encoder.conv_blocks.{i}.res.{j}``,
``quantize.embedding.weight``, ``quant_conv``, ...) so their released checkpoints load as an
identity mapping: ``VQModel.from_pretrained("vq_ds16_c2i.pt", "VQ-16")``.

Codes are int64 tensors of shape (B, h, w) with values < ``codebook_size`` <= 65536, so they
fit the uint16 ``codes.npy`` of token shards (``codes_to_uint16``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import storage
from pipeline.config import doc
from pipeline.export_stamp import ID_KEY, begin_export, check_export
from pipeline.export_stamp import MARKER as EXPORT_MARKER
from pipeline.log import get_logger

log = get_logger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class VQConfig:
    """Hyperparameters of a VQ tokenizer (defaults: LlamaGen VQ-16)."""

    codebook_size: int = doc(
        "number of codebook entries (<= 65536: codes are stored as uint16)", 16384
    )
    codebook_embed_dim: int = doc("dimension of each code vector", 8)
    codebook_l2_norm: bool = doc("l2-normalise codes and encoder outputs before matching", True)
    commit_loss_beta: float = doc("commitment loss weight", 0.25)
    entropy_loss_ratio: float = doc("weight of the codebook entropy loss (0 = off)", 0.0)
    ch: int = doc("base channel count", 128)
    ch_mult: tuple[int, ...] = doc("channel multiplier per resolution level", (1, 1, 2, 2, 4))
    num_res_blocks: int = doc("resnet blocks per encoder level (decoder has one more)", 2)
    z_channels: int = doc("channels of the latent before quant_conv", 256)
    dropout: float = doc("dropout inside resnet blocks", 0.0)
    norm_groups: int = doc("GroupNorm groups", 32)

    def __post_init__(self) -> None:
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(
                f"codebook_size must be in [2, 65536] (uint16 codes), got {self.codebook_size}"
            )
        for c in {self.ch * m for m in self.ch_mult} | {self.ch}:
            if c % self.norm_groups:
                raise ValueError(
                    f"channel count {c} is not divisible by norm_groups={self.norm_groups}"
                )

    @property
    def downsample(self) -> int:
        """Image pixels per code along each side (16 for VQ-16)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VQConfig:
        """A preset (``VQ-16``, ``VQ-8``, ``tiny``) with optional field overrides."""
        if name not in VQ_PRESETS:
            raise KeyError(f"unknown VQ preset {name!r}; known: {', '.join(VQ_PRESETS)}")
        return dataclasses.replace(VQ_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQConfig keys {unknown}")
        d = dict(d)
        if "ch_mult" in d:
            d["ch_mult"] = tuple(d["ch_mult"])
        return cls(**d)


VQ_PRESETS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(ch_mult=(1, 2, 2, 4)),
    # CPU-sized, downsample 8: learns 32-64 px shapes in a few hundred steps. Small channel
    # groups keep a flat image's colour (32 groups of 1 channel would normalise it away), and
    # the entropy loss keeps the codebook from collapsing onto a handful of codes early on.
    "tiny": VQConfig(
        codebook_size=512,
        ch=16,
        ch_mult=(1, 2, 2, 4),
        num_res_blocks=1,
        z_channels=64,
        norm_groups=8,
        entropy_loss_ratio=0.1,
    ),
}


# --- blocks ---------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # a 1x1 projection only where the channel count changes (LlamaGen's "nin_shortcut")
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head of width C
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C) as in LlamaGen
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric (right/bottom) padding, as in taming-transformers and LlamaGen
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, ``attn`` blocks (deepest level only), resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


# --- encoder / decoder ----------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level()
            block_out = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if i == n - 1:
                    level.attn.append(AttnBlock(block_in, g))
            if i != n - 1:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, cfg.dropout, g),
                AttnBlock(block_in, g),
                ResnetBlock(block_in, block_in, cfg.dropout, g),
            ]
        )
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z, H/ds, W/ds)


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, cfg.dropout, g),
                AttnBlock(block_in, g),
                ResnetBlock(block_in, block_in, cfg.dropout, g),
            ]
        )
        # conv_blocks[0] is the deepest (lowest resolution) level
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if i == n - 1:
                    level.attn.append(AttnBlock(block_in, g))
            if i != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The output conv weight (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- quantizer ------------------------------------------------------------------------------


class VQLosses(NamedTuple):
    codebook: torch.Tensor  # pulls codes towards encoder outputs
    commit: torch.Tensor  # pulls encoder outputs towards codes (already x beta)
    entropy: torch.Tensor  # (already x entropy_loss_ratio; 0 when off)

    def total(self) -> torch.Tensor:
        return self.codebook + self.commit + self.entropy


def entropy_loss(logits: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus entropy of the mean assignment: confident yet diverse codes."""
    logits = logits / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits, dim=-1)
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    # rows per distance block: bounds memory at (chunk x codebook_size) floats for big batches
    CHUNK = 8192

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            if cfg.codebook_l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cfg.codebook_l2_norm else w

    def nearest(self, z_flat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Index of the closest code for each row of ``z_flat`` (N, D) -> (N,)."""
        e_sq = (emb**2).sum(1)
        out = []
        for chunk in z_flat.split(self.CHUNK):
            # ||z||^2 is constant per row, so it does not change the argmin
            d = e_sq - 2 * chunk @ emb.t()
            out.append(d.argmin(1))
        return torch.cat(out) if out else z_flat.new_zeros(0, dtype=torch.long)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, VQLosses, torch.Tensor]:
        """(B, D, h, w) -> straight-through quantized (B, D, h, w), losses, codes (B, h, w)."""
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.cfg.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        emb = self.codebook()
        z_flat = z.reshape(-1, d)
        # Distances in fp32 even under autocast: l2-normalised vectors have z.e near 1, where
        # bf16's step (~0.004) cannot tell 16384 codes apart (a bf16 matmul picked another
        # code than fp32 for 6% of random vectors), and the entropy loss divides the logits
        # by a temperature of 0.01
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            idx = self.nearest(z_flat.detach().float(), emb.detach().float())
        z_q = emb[idx].view(b, h, w, d).to(z.dtype)
        zero = z.new_zeros(())
        codebook = F.mse_loss(z_q, z.detach())
        commit = self.cfg.commit_loss_beta * F.mse_loss(z, z_q.detach())
        ent = zero
        if self.cfg.entropy_loss_ratio > 0 and self.training:
            with torch.autocast(z.device.type, enabled=False):
                zf, ef = z_flat.float(), emb.float()
                logits = -((zf**2).sum(1, keepdim=True) + (ef**2).sum(1) - 2 * zf @ ef.t())
                ent = self.cfg.entropy_loss_ratio * entropy_loss(logits)
        # straight-through estimator: forward uses the code, backward copies the gradient to z
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), VQLosses(codebook, commit, ent), idx.view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> code vectors (B, D, h, w)."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()


# --- model ----------------------------------------------------------------------------------


class VQModel(nn.Module):
    """Image <-> code grid. Images are (B, 3, H, W) in [-1, 1] with H, W multiples of 2^levels."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQLosses, torch.Tensor]:
        """Training pass: (reconstruction, VQ losses, codes)."""
        z_q, losses, codes = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decode_latent(z_q), losses, codes

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/ds, W/ds), int64."""
        ds = self.config.downsample
        if x.shape[-1] % ds or x.shape[-2] % ds:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {ds}")
        h = self.encoder(x)
        return self.quantize(self.quant_conv(h.to(self.quant_conv.weight.dtype)))[2]

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h*ds, w*ds), roughly in [-1, 1] (not clamped)."""
        codes = codes.long()
        if codes.numel() and (
            int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size
        ):
            raise ValueError(f"codes out of range [0, {self.config.codebook_size})")
        z_q = self.quantize.lookup(codes).to(self.post_quant_conv.weight.dtype)
        return self.decode_latent(z_q)

    # --- weights in and out ---

    def save_pretrained(self, uri: str) -> None:
        """Write ``model.safetensors`` + ``config.json`` + ``export.json`` (last) under ``uri``
        (local dir or s3://), as :mod:`pipeline.export_stamp` describes: a save killed over an
        older one is refused at load, not read as the new weights with the old config.

        The export id is a digest of the weights and config, so the same model saved again is
        the same bytes (and keeps its :func:`pipeline.storage.fingerprint`)."""
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config = self.config.to_dict()
        export_id = begin_export(uri, _content_id(state, config))
        storage.write_bytes(storage.join(uri, WEIGHTS_NAME), save(state, {ID_KEY: export_id}))
        storage.write_json(storage.join(uri, CONFIG_NAME), config)
        info = {ID_KEY: export_id, "num_tensors": len(state)}
        storage.write_json(storage.join(uri, EXPORT_MARKER), info)

    @classmethod
    def from_pretrained(
        cls, uri: str, config: VQConfig | str | None = None, map_location: str = "cpu"
    ) -> VQModel:
        """Load our export (a dir with config.json) or a LlamaGen checkpoint file.

        An export whose weights are not the ones its ``export.json`` names (a save killed over
        an older one) is refused (:func:`pipeline.export_stamp.check_export`); one saved before
        ``export.json`` was written (no id on either side) loads.

        A LlamaGen ``.pt`` holds ``{"model": state_dict}`` (loaded with ``weights_only=True``);
        its preset comes from ``config`` (default ``VQ-16``).
        """
        path = storage.local_copy(uri)
        asked = VQConfig.from_name(config) if isinstance(config, str) else config
        if os.path.isdir(path):
            weights, marker = os.path.join(path, WEIGHTS_NAME), os.path.join(path, EXPORT_MARKER)
            if os.path.exists(weights):  # (none: the load below says so)
                # folders saved before export.json was written have none: no warning for them
                info = storage.read_json(marker) if os.path.exists(marker) else None
                check_export(uri, weights, info, warn_unmarked=False)
            with open(os.path.join(path, CONFIG_NAME)) as f:
                saved = VQConfig.from_dict(json.load(f))
            # a preset that keeps every tensor's shape (e.g. codebook_l2_norm) would load
            # strictly and give other codes for every image: the folder's own config decides
            if asked is not None and asked != saved:
                want = asked.to_dict()
                diff = ", ".join(
                    f"{k}={v!r} (preset: {want[k]!r})"
                    for k, v in saved.to_dict().items()
                    if v != want[k]
                )
                raise ValueError(
                    f"{uri} holds a VQ tokenizer whose config.json differs from the preset "
                    f"given ({config if isinstance(config, str) else 'a VQConfig'}): {diff}. "
                    "Give no preset (null) for a saved folder: its config.json is read"
                )
            asked = saved
            path = weights
        cfg = asked or VQConfig()
        model = cls(cfg)
        model.load_state_dict(load_vq_state_dict(path, map_location))
        log.info(
            "loaded VQ tokenizer (%s codes, downsample %d) from %s",
            cfg.codebook_size,
            cfg.downsample,
            uri,
        )
        return model.eval()


def _content_id(state: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """A digest of a (contiguous, CPU) state dict and its config: the id of their export."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def load_vq_state_dict(path: str, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """A VQ state dict from a safetensors or torch file, LlamaGen's wrapping removed."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path, device=map_location)
    else:
        import argparse

        # weights_only: a checkpoint is data, never code. LlamaGen's vq_train.py saves its
        # argparse arguments ("args") beside the weights: that one class is allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, map_location=map_location, weights_only=True)
    return llamagen_to_state_dict(sd)


def llamagen_to_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our state dict from a LlamaGen checkpoint: unwrap ``model``/``ema``, drop usage buffers.

    A training checkpoint of LlamaGen's ``--ema`` runs holds both: ``model`` is taken, as
    LlamaGen's sampling scripts (and its released tokenizers) do; its reconstruction script
    evaluates ``ema`` instead, so say which."""
    if isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("ema"), dict):
        log.info("the checkpoint holds 'model' and 'ema' weights: loading 'model'")
    for key in ("model", "ema", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    sd = {k.removeprefix("module."): v for k, v in ckpt.items()}
    # LlamaGen keeps a rolling buffer of recent code ids for its usage log; not model state
    sd.pop("quantize.codebook_used", None)
    return sd


def codes_to_uint16(codes: torch.Tensor) -> np.ndarray:
    """Codes as a numpy uint16 array (the token-shard format), range checked."""
    arr = codes.detach().cpu().numpy()
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError("codes do not fit uint16")
    return arr.astype(np.uint16)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
