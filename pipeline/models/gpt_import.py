"""Import LlamaGen GPT checkpoints (their state-dict key names) into ``pipeline.models.gpt.GPT``.

LlamaGen saves ``{"model": state_dict, ...}`` (sometimes ``"module"`` or ``"state_dict"``; keys
may carry ``module.`` or ``_orig_mod.`` prefixes). Its layout maps one to one onto ours:

  cls_embedding.cap_proj.fc{1,2}        -> cond_embed.fc{1,2}        (text)
  cls_embedding.uncond_embedding        -> cond_embed.uncond         (text, a buffer)
  cls_embedding.embedding_table         -> cond_embed.table          (class)
  tok_embeddings / norm / output        -> tok_embed / norm / head
  layers.i.attention.{wqkv,wo}          -> blocks.i.attn.{qkv,proj}
  layers.i.feed_forward.{w1,w3,w2}      -> blocks.i.mlp.{w_gate,w_up,w_down}
  layers.i.{attention,ffn}_norm         -> blocks.i.{attn,mlp}_norm

Its models give the condition prefix a zero rotation; load them with ``rope_prefix="llamagen"``
to reproduce their outputs exactly.
"""

from __future__ import annotations

import re

import torch

from pipeline import storage
from pipeline.log import get_logger
from pipeline.models.gpt import GPT, GPTConfig

log = get_logger(__name__)

_RULES: list[tuple[str, str]] = [
    (r"^cls_embedding\.cap_proj\.(fc[12])\.", r"cond_embed.\1."),
    (r"^cls_embedding\.uncond_embedding$", "cond_embed.uncond"),
    (r"^cls_embedding\.embedding_table\.", "cond_embed.table."),
    (r"^tok_embeddings\.", "tok_embed."),
    (r"^output\.", "head."),
    (r"^norm\.", "norm."),
    (r"^layers\.(\d+)\.attention\.wqkv\.", r"blocks.\1.attn.qkv."),
    (r"^layers\.(\d+)\.attention\.wo\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"blocks.\1.mlp.w_gate."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"blocks.\1.mlp.w_up."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"blocks.\1.mlp.w_down."),
    (r"^layers\.(\d+)\.attention_norm\.", r"blocks.\1.attn_norm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"blocks.\1.mlp_norm."),
]
# Inverse rules, for exporting to LlamaGen's layout.
_INVERSE: list[tuple[str, str]] = [
    (r"^cond_embed\.(fc[12])\.", r"cls_embedding.cap_proj.\1."),
    (r"^cond_embed\.uncond$", "cls_embedding.uncond_embedding"),
    (r"^cond_embed\.table\.", "cls_embedding.embedding_table."),
    (r"^tok_embed\.", "tok_embeddings."),
    (r"^head\.", "output."),
    (r"^norm\.", "norm."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"layers.\1.attention.wqkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.wo."),
    (r"^blocks\.(\d+)\.mlp\.w_gate\.", r"layers.\1.feed_forward.w1."),
    (r"^blocks\.(\d+)\.mlp\.w_up\.", r"layers.\1.feed_forward.w3."),
    (r"^blocks\.(\d+)\.mlp\.w_down\.", r"layers.\1.feed_forward.w2."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"layers.\1.attention_norm."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"layers.\1.ffn_norm."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def unwrap_checkpoint(obj: dict) -> dict[str, torch.Tensor]:
    """The state dict inside a LlamaGen checkpoint, with wrapper prefixes removed."""
    for k in ("model", "module", "state_dict"):
        if k in obj and isinstance(obj[k], dict):
            obj = obj[k]
            break
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def from_llamagen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen keys -> ours. Unknown keys (e.g. ``freqs_cis``) are reported and dropped."""
    out, skipped = {}, []
    for key, value in state.items():
        new = _rename(key, _RULES)
        if new is None:
            skipped.append(key)
        else:
            out[new] = value
    if skipped:
        log.warning("ignored %d LlamaGen keys with no counterpart: %s", len(skipped), skipped[:5])
    return out


def to_llamagen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> LlamaGen's (for sharing weights with tools built on the reference)."""
    out = {}
    for key, value in state.items():
        new = _rename(key, _INVERSE)
        if new is None:
            raise KeyError(f"no LlamaGen name for {key!r}")
        out[new] = value
    return out


def load_llamagen_gpt(uri: str, cfg: GPTConfig, strict: bool = True) -> GPT:
    """Build ``GPT(cfg)`` and load a LlamaGen ``.pt`` checkpoint from a local path or s3://."""
    path = storage.local_copy(uri)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = from_llamagen(unwrap_checkpoint(raw))
    model = GPT(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{uri} does not fit {cfg}: {e}") from None
    if strict and (missing or unexpected):
        raise ValueError(
            f"{uri} does not fit {cfg}: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(check the preset, cond type, vocab_size and caption_dim)"
        )
    if cfg.rope_prefix != "llamagen":
        log.warning("LlamaGen weights were trained with rope_prefix='llamagen'; you chose %r",
                    cfg.rope_prefix)
    return model
