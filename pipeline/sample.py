"""Autoregressive generation: prefill the condition, decode image tokens with a static KV cache.

Classifier-free guidance doubles the batch (conditional rows, then unconditional rows) and mixes
the two halves' logits as ``l_u + s * (l_c - l_u)``. Each image has its own random generator
seeded from its own seed, so an image comes out the same whether it is sampled alone or in a
batch. ``generate(..., use_cache=False)`` recomputes the whole sequence every step: the baseline
the cached path is checked and benchmarked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import doc
from pipeline.models.gpt import GPT


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn."""

    cfg_scale: float = doc("classifier-free guidance scale s (1 = no guidance)", 7.5)
    temperature: float = doc("softmax temperature (0 = greedy)", 1.0)
    top_k: int = doc("keep the k most likely tokens (0 = all)", 1000)
    top_p: float = doc("nucleus: keep the smallest set with this much mass (1 = all)", 1.0)


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``l_u + s * (l_c - l_u)``."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        remove = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def draw(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
         ) -> torch.Tensor:
    """One token per row, each row from its own generator. logits: (B, V) -> (B,)."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def _double_for_cfg(cond: torch.Tensor, cond_mask: torch.Tensor | None, use_cfg: bool):
    """Stack [conditional rows; unconditional rows] and the matching drop flags."""
    B = cond.size(0)
    if not use_cfg:
        return cond, cond_mask, torch.zeros(B, dtype=torch.bool, device=cond.device)
    cond2 = torch.cat([cond, cond])
    mask2 = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(cond.device)
    return cond2, mask2, drop


@torch.no_grad()
def generate(
    model: GPT,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None = None,
    params: SamplingParams = SamplingParams(),
    seeds: list[int] | None = None,
    grid_size: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample image tokens (B, grid**2) for a batch of conditions.

    cond: T5 features (B, L, D) with ``cond_mask`` (B, L), or class labels (B,).
    seeds: one per row (default 0..B-1); row i's tokens depend only on its own seed.
    """
    was_training = model.training
    model.eval()
    g = grid_size or model.cfg.grid_size
    B = cond.size(0)
    device = model.head.weight.device
    cond = cond.to(device)
    cond_mask = None if cond_mask is None else cond_mask.to(device)
    gens = _generators(list(range(B)) if seeds is None else seeds, device)
    use_cfg = params.cfg_scale != 1.0
    cond2, mask2, drop = _double_for_cfg(cond, cond_mask, use_cfg)

    def mix(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return cfg_mix(logits[:B], logits[B:], params.cfg_scale) if use_cfg else logits

    tokens = torch.zeros(B, g * g, dtype=torch.long, device=device)
    try:
        if use_cache:
            model.setup_cache(cond2.size(0), g)
            logits = model.prefill(cond2, mask2, drop)
            for i in range(g * g):
                tokens[:, i] = draw(mix(logits), params, gens)
                if i + 1 < g * g:
                    step = torch.cat([tokens[:, i], tokens[:, i]]) if use_cfg else tokens[:, i]
                    logits = model.decode_step(step, i)
        else:
            for i in range(g * g):
                seq = tokens[:, : i + 1]  # the last column is a placeholder: it is never read
                seq = torch.cat([seq, seq]) if use_cfg else seq
                logits = model(seq, cond2, mask2, drop=drop, grid_size=g)[:, -1]
                tokens[:, i] = draw(mix(logits), params, gens)
    finally:
        model.clear_cache()
        model.train(was_training)
    return tokens
