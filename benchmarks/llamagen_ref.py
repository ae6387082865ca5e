"""LlamaGen's text-to-image training step, restated as a baseline to time ours against.

The issue's reference figures for a GPT-B training step (2.78 s fp32, 1.17 s bf16) were measured on
another machine; this module lets ``bench_reference.py`` time the reference's step on the machine
at hand, side by side with ours. It is written from LlamaGen's published architecture and training
script (``autoregressive/models/gpt.py``, ``autoregressive/train/train_t2i.py``), keeping the
choices that decide its speed:

- modules and state-dict names as LlamaGen's (``wqkv``, ``w1``/``w3``/``w2``, ``cls_embedding``),
  so its weights import into ours (``pipeline.models.gpt_import``) and a test checks that both
  compute the same logits;
- attention through ``F.scaled_dot_product_attention`` with the dataset's boolean mask (causal,
  padded caption keys hidden, the diagonal always visible), or ``is_causal`` without one;
- RoPE as real-arithmetic pairs in fp32 with a zero rotation for the caption prefix; RMSNorm in
  fp32; ``nn.Dropout`` on the token embeddings, each attention output and each MLP output;
- the output head over every position (caption ones included), logits cast to fp32 and then cut
  to the image positions; the loss weighted by the per-sample ``valid`` flag;
- AdamW over two groups (weight decay on tensors of rank >= 2), fused wherever PyTorch's AdamW
  takes ``fused`` (LlamaGen's ``creat_optimizer``: ``fused_available`` alone, on any device;
  sessions up to the 10th ran it ``foreach`` on CPU, which flattered our speed-up); gradient
  clipping at 1.0; ``zero_grad(set_to_none=True)``.
  Its GradScaler is disabled outside fp16, so it is left out.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.gpt import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


def rope_pairs(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated pairwise by table (T, D/2, 2) = (cos, sin), in fp32.

    LlamaGen's stack form, which our compiled path happens to share (``gpt.apply_rope``); kept
    here on purpose: the baseline imports nothing of our model, so a change there cannot change
    what the reference costs."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
            xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def rope_table_2d(grid: int, head_dim: int, base: float, n_prefix: int) -> torch.Tensor:
    """(n_prefix + grid**2, head_dim/2, 2): zeros for the prefix, then row and column angles."""
    quarter = head_dim // 4
    inv = 1.0 / (base ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (head_dim // 2)))
    f = torch.outer(torch.arange(grid, dtype=torch.float32), inv)  # (grid, head_dim/4)
    angles = torch.cat([f[:, None].expand(-1, grid, -1), f[None].expand(grid, -1, -1)], dim=-1)
    image = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(n_prefix, head_dim // 2, 2), image])


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.dim, self.n_head, self.hd = cfg.dim, cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x, table, mask):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.dim, self.dim, self.dim], dim=-1)
        q = rope_pairs(q.view(B, T, self.n_head, self.hd), table).transpose(1, 2)
        k = rope_pairs(k.view(B, T, self.n_head, self.hd), table).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.hd).transpose(1, 2)
        # as LlamaGen's Attention always does, also at one KV head per query head (a contiguous
        # copy of the keys and values, and its backward)
        k, v = k.repeat_interleave(1, dim=1), v.repeat_interleave(1, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.resid_dropout(self.wo(y.transpose(1, 2).contiguous().view(B, T, self.dim)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, table, mask):
        h = x + self.attention(self.attention_norm(x), table, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class CapProj(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.caption_dim, cfg.dim, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cap_proj = CapProj(cfg)
        uncond = torch.randn(cfg.max_text_tokens, cfg.caption_dim) / cfg.caption_dim**0.5
        self.register_buffer("uncond_embedding", uncond)
        self.uncond_prob = cfg.cond_dropout_p

    def forward(self, caption, train: bool):
        if train and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding, caption)
        return self.cap_proj(caption)


class LlamaGenT2I(nn.Module):
    """The reference's text-to-image transformer, training path only (teacher forcing)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.cond != "text" or cfg.kv_heads != cfg.n_head:
            raise ValueError("the reference baseline is the text-conditional model without GQA")
        self.cfg = cfg
        self.cls_embedding = CaptionEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        table = rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.max_text_tokens)
        self.register_buffer("freqs_cis", table, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.output.weight)

    def forward(self, codes, captions, mask=None, valid=None):
        """codes (B, N) image tokens, captions (B, 120, caption_dim), mask (B, 1, T, T) bool
        over the T = 120 + N - 1 positions (None: causal). Returns (logits of the N image
        positions, loss)."""
        P = self.cfg.max_text_tokens
        cond = self.cls_embedding(captions, train=self.training)[:, :P]
        h = self.tok_dropout(torch.cat([cond, self.tok_embeddings(codes[:, :-1])], dim=1))
        table = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, table, mask)
        logits = self.output(self.norm(h)).float()[:, P - 1 :].contiguous()
        flat = F.cross_entropy(
            logits.view(-1, logits.size(-1)), codes.reshape(-1), reduction="none"
        )
        if valid is None:
            return logits, flat.mean()
        v = valid[:, None].repeat(1, codes.shape[1]).view(-1)
        return logits, (flat * v).sum() / max(v.sum(), 1)


def dataset_mask(emb_mask: torch.Tensor, T: int) -> torch.Tensor:
    """The attention mask LlamaGen's t2i dataset builds: causal, caption keys where the caption
    is padding hidden, the diagonal always visible. emb_mask (B, P) -> (B, 1, T, T) bool."""
    B, P = emb_mask.shape
    mask = torch.tril(torch.ones(T, T)).repeat(B, 1, 1)
    mask[:, :, :P] = mask[:, :, :P] * emb_mask[:, None, :].float()
    eye = torch.eye(T)
    return (mask * (1 - eye) + eye).bool()[:, None]


def reference_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused_available else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **extra)


def reference_train_step(
    cfg: GPTConfig,
    dtype: str,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    compiled: bool = False,
) -> Callable[[], float]:
    """One training step as ``train_t2i.py`` takes it: autocast forward (bf16) or fp32, backward,
    clip at 1.0, AdamW, gradients set to None. ``batch`` = (codes, captions, emb_mask or None);
    the mask is built once, as the reference's data loader does. Returns the step function."""
    torch.manual_seed(0)
    model = LlamaGenT2I(cfg).train()
    opt = reference_optimizer(model)
    fwd = torch.compile(model) if compiled else model
    codes, caps, emb_mask = batch
    mask = (
        None
        if emb_mask is None
        else dataset_mask(emb_mask, cfg.max_text_tokens + codes.shape[1] - 1)
    )
    valid = torch.ones(codes.shape[0])
    ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if dtype == "bf16"
        else contextlib.nullcontext
    )

    def step() -> float:
        with ctx():
            _, loss = fwd(codes, caps, mask, valid)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step
