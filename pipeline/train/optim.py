"""AdamW settings, parameter groups and the learning-rate schedule (plain PyTorch, no DeepSpeed).

Weight decay (0.05, the paper's) applies to every parameter with ``ndim >= 2``: the attention,
MLP, projector and output matrices, and, as in LlamaGen's release (nanoGPT's rule), the token and
class embedding tables. RMSNorm gains (1-d) are never decayed. ``decay_embeddings: false`` exempts
the embedding tables for those who prefer the other common choice.

The learning rate is ``lr_per_256 * global_batch / 256`` (the paper's 1e-4 per 256 images),
reached by a linear warmup, then held constant or cosine-decayed to ``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn

from pipeline.config import doc


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and learning-rate schedule."""

    lr_per_256: float = doc("peak learning rate per 256 samples of global batch", 1e-4)
    scale_lr: bool = doc(
        "scale the learning rate with the global batch (else lr_per_256 as is)", True
    )
    betas: tuple[float, float] = doc("AdamW betas", (0.9, 0.95))
    eps: float = doc("AdamW epsilon", 1e-8)
    weight_decay: float = doc("weight decay of matrices (ndim >= 2)", 0.05)
    decay_embeddings: bool = doc(
        "also decay the token/class embedding tables (LlamaGen does)", True
    )
    grad_clip: float = doc("global gradient-norm clipping (0: off)", 1.0)
    warmup_steps: int = doc("linear warmup steps", 0)
    schedule: Literal["constant", "cosine"] = doc(
        "after warmup: constant or cosine decay", "constant"
    )
    min_lr_ratio: float = doc("cosine floor as a fraction of the peak", 0.1)


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak learning rate for a global batch (samples per optimizer step)."""
    return cfg.lr_per_256 * global_batch / 256 if cfg.scale_lr else cfg.lr_per_256


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and everything else (norm gains, and optionally
    embeddings) without decay. Parameter names are recorded for logs and tests."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_decayed = p.ndim >= 2 and (cfg.decay_embeddings or id(p) not in embeddings)
        (decay if is_decayed else no_decay).append(p)
        (decay_names if is_decayed else no_decay_names).append(name)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimizer steps (for ``LambdaLR``)."""
    warm = max(0, cfg.warmup_steps)

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - warm)
        t = min(1.0, (step - warm) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return fn
