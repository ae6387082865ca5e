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

Its models give the condition prefix a zero rotation; they are loaded with
``rope_prefix="llamagen"``, which reproduces their outputs exactly. ``jobs/export.py --llamagen``
writes such a checkpoint as our export (``model.safetensors`` + ``gpt_config.json``), which
sampling, evaluation and ``init_from`` read.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

import torch

from pipeline import storage
from pipeline.log import get_logger
from pipeline.models.gpt import GPT, GPTConfig

log = get_logger(__name__)


@dataclass(frozen=True)
class ImportConfig:
    """The model a LlamaGen checkpoint holds (``jobs/export.py --llamagen``'s overrides)."""

    model: GPTConfig = field(default_factory=GPTConfig, metadata={"doc": "GPT preset + overrides"})


# (LlamaGen prefix, our prefix); "{i}" stands for a layer index. One table serves both directions.
_NAME_PAIRS: list[tuple[str, str]] = [
    ("cls_embedding.cap_proj.fc1.", "cond_embed.fc1."),
    ("cls_embedding.cap_proj.fc2.", "cond_embed.fc2."),
    ("cls_embedding.uncond_embedding", "cond_embed.uncond"),
    ("cls_embedding.embedding_table.", "cond_embed.table."),
    ("tok_embeddings.", "tok_embed."),
    ("output.", "head."),
    ("norm.", "norm."),
    ("layers.{i}.attention.wqkv.", "blocks.{i}.attn.qkv."),
    ("layers.{i}.attention.wo.", "blocks.{i}.attn.proj."),
    ("layers.{i}.feed_forward.w1.", "blocks.{i}.mlp.w_gate."),
    ("layers.{i}.feed_forward.w3.", "blocks.{i}.mlp.w_up."),
    ("layers.{i}.feed_forward.w2.", "blocks.{i}.mlp.w_down."),
    ("layers.{i}.attention_norm.", "blocks.{i}.attn_norm."),
    ("layers.{i}.ffn_norm.", "blocks.{i}.mlp_norm."),
]


def _compile(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Prefix pairs -> (regex, replacement); a name without a trailing dot must match whole."""
    rules = []
    for src, dst in pairs:
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        pattern += "" if src.endswith(".") else "$"
        rules.append((pattern, dst.replace("{i}", r"\1")))
    return rules


_RULES = _compile(_NAME_PAIRS)
_INVERSE = _compile([(ours, theirs) for theirs, ours in _NAME_PAIRS])


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


def load_llamagen_gpt(
    uri: str, cfg: GPTConfig, strict: bool = True, keep_rope_prefix: bool = False
) -> GPT:
    """Build ``GPT(cfg)`` and load a LlamaGen ``.pt`` checkpoint from a local path or s3://.

    LlamaGen's weights were trained with its zero rotation of the condition prefix, so the
    model is built with ``rope_prefix="llamagen"`` whatever ``cfg`` says: with our identity
    rotation the same weights are another model (logits off by up to ~20 on a released-size
    model). ``keep_rope_prefix=True`` keeps ``cfg``'s choice, for fine-tuning on purpose."""
    if cfg.rope_prefix != "llamagen" and not keep_rope_prefix:
        log.info(
            "LlamaGen weights: rope_prefix=%r -> 'llamagen' (as they were trained)", cfg.rope_prefix
        )
        cfg = cfg.replace(rope_prefix="llamagen")
    path = storage.local_copy(uri)
    # LlamaGen's training checkpoints hold its argparse arguments ("args") beside the weights:
    # allow that one class, nothing else is unpickled
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    state = from_llamagen(unwrap_checkpoint(raw))
    trained = getattr(raw.get("args"), "num_classes", None) if isinstance(raw, dict) else None
    if cfg.cond == "class" and isinstance(trained, int) and trained != cfg.num_classes:
        # a table one row longer than num_classes fits either way (a null row, or one more
        # class): the training arguments LlamaGen saves beside its weights settle which
        raise ValueError(
            f"{uri} was trained with num_classes={trained} (its saved arguments); "
            f"set model.num_classes={trained}, not {cfg.num_classes}"
        )
    model = GPT(cfg)
    table = state.get("cond_embed.table.weight")
    if cfg.cond == "class" and table is not None and table.shape[0] == cfg.num_classes:
        # trained without class dropout, LlamaGen has no null-class row: add a zero one (our
        # table always has it; only CFG sampling reads it)
        state["cond_embed.table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
        log.warning(
            "%s: a class table of num_classes=%d rows, taken as trained without class dropout "
            "(no null-class row): a zero null row added. If it was trained with dropout on %d "
            "classes, its last row is the null class: set model.num_classes=%d",
            uri, cfg.num_classes, cfg.num_classes - 1, cfg.num_classes - 1,
        )  # fmt: skip
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
        log.warning(
            "LlamaGen weights were trained with rope_prefix='llamagen'; kept %r on request: "
            "this model's outputs are not LlamaGen's",
            cfg.rope_prefix,
        )
    return model
