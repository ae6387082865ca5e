"""LlamaGen's autoregressive image generator: a Llama decoder over VQ codes with a condition prefix.

Written leaf to root (norm, rotary embedding, attention, MLP, block, model). The architecture is
the paper's: RMSNorm pre-norm, SwiGLU with hidden = multiple_of_256(8*dim/3), no biases, untied
and zero-initialised output head, 2D RoPE over the image grid. Text conditioning projects
FLAN-T5 features (up to 120 tokens, left-padded with a mask) through an MLP into prefix tokens;
class conditioning is a one-token learned class embedding with an extra "null" class.

One deliberate difference from the reference release: LlamaGen gives the condition prefix a zero
rotation, which multiplies the prefix's q and k by zero, so image tokens can never attend to the
caption by content (only through the residual stream of later positions). Our default gives the
prefix the identity rotation (q and k pass unchanged); ``rope_prefix="llamagen"`` reproduces the
reference bit for bit, for importing its checkpoints.

A second, tied to the first: a row whose caption is dropped for classifier-free guidance sees the
whole 120-token null caption (every prefix key valid), in training and in sampling alike. LlamaGen
keeps the dropped caption's own padding mask over the null caption (the unconditional branch then
depends on the caption's length); ``rope_prefix="llamagen"`` does the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of the generator; named presets via ``GPTConfig.from_name``."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    vocab_size: int = 16384
    cond: Literal["text", "class"] = "text"
    caption_dim: int = 2048
    max_text_tokens: int = 120
    num_classes: int = 1000
    cond_dropout_p: float = 0.1
    grid_size: int = 16
    rope_prefix: Literal["identity", "llamagen"] = "identity"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def prefix_len(self) -> int:
        """Condition tokens before the image: the text length, or 1 class token."""
        return self.max_text_tokens if self.cond == "text" else 1

    @property
    def image_tokens(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """A preset (``debug``, ``B``, ``L``, ``XL``, ``XXL``, ``3B``; ``GPT-`` prefix allowed)."""
        key = name.removeprefix("GPT-")
        if key not in PRESETS:
            raise KeyError(f"unknown GPT preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    "debug": dict(n_layer=2, n_head=2, dim=64, multiple_of=32),
    "B": dict(n_layer=12, n_head=12, dim=768),
    "L": dict(n_layer=24, n_head=16, dim=1024),
    "XL": dict(n_layer=36, n_head=20, dim=1280),
    "XXL": dict(n_layer=48, n_head=24, dim=1536),
    "3B": dict(n_layer=24, n_head=32, dim=3200),
}


# --- leaves ----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: bf16 sums of squares lose too much precision
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _dropout_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    return words.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768


# Under torch.compile the mask is one opaque op: inductor would otherwise turn ``random_`` into its
# own per-element Philox draw (about 4.5 ms a GPT-B mask) and split the graph around the int64 ->
# int16 view. ``nondeterministic_seeded`` keeps it from being merged with another call of the
# same shape or recomputed in the backward pass.
cpu_dropout_keep = torch.library.custom_op(
    "pipeline::cpu_dropout_keep",
    _dropout_keep,
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)


@cpu_dropout_keep.register_fake
def _(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from 16-bit slices of 64-bit random words.

    PyTorch's CPU ``bernoulli_`` is vectorised (through MKL) only on Intel CPUs; elsewhere it draws
    one float per element: 2.6 ms for a 576k-element GPT-B activation on the AMD reference
    machine, against 0.4 ms for ``random_`` filling the same number of 16-bit slices (forward +
    backward: 0.9 against 2.8 ms; GPT-B has 25 dropouts a step). Every slice is uniform on
    [-32768, 32767] (the int64 draw covers the full 64-bit range), so an element is dropped with
    probability round(p * 65536) / 65536 (within 8e-6 of p); kept elements are scaled by
    1 / (1 - p) in x's dtype, as PyTorch's own CPU dropout does. The draw uses the default CPU
    generator, so ``torch.manual_seed`` and a restored RNG state reproduce the masks. Other
    devices use ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or self.p >= 1.0:
            return F.dropout(x, self.p, True, self.inplace)
        if torch.compiler.is_compiling():
            keep = cpu_dropout_keep(x, self.p)
        else:
            keep = _dropout_keep(x, self.p)
        return x * keep.to(x.dtype).div_(1.0 - self.p)


def rope_2d_table(cfg: GPTConfig, grid_size: int | None = None) -> torch.Tensor:
    """cos/sin of every sequence position: (prefix_len + grid**2, head_dim // 2, 2).

    Half the rotary pairs encode the image row, half the column (LlamaGen's layout: pair i
    uses frequency base^(-4i/head_dim) over the row for i < head_dim/4, then over the column).
    Prefix rows are the identity rotation (cos 1, sin 0), or zeros in ``llamagen`` mode.
    """
    g = grid_size or cfg.grid_size
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(g, dtype=torch.float32)
    f = torch.outer(t, freqs)  # (g, head_dim // 4)
    grid = torch.cat([f[:, None, :].expand(-1, g, -1), f[None, :, :].expand(g, -1, -1)], dim=-1)
    image = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # (g*g, half, 2)
    prefix = torch.zeros(cfg.prefix_len, half, 2)
    if cfg.rope_prefix == "identity":
        prefix[..., 0] = 1.0
    return torch.cat([prefix, image])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` (B, T, H, D) by ``table`` (T, D // 2, 2), in fp32.

    Eager, the pairs are complex numbers and the rotation one complex multiply (the same four
    products and two sums): 0.54 against 1.7 ms forward + backward for a bf16 GPT-B q on CPU.
    Under ``torch.compile`` the real form below, which inductor fuses into one loop."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    if not torch.compiler.is_compiling():
        t = torch.view_as_complex(table.float().contiguous()).view(1, xs.size(1), 1, xs.size(3))
        return torch.view_as_real(torch.view_as_complex(xs) * t).flatten(3).type_as(x)
    t = table.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
            xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Static per-layer key/value buffers, sized once before generation."""

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# --- attention, MLP, block --------------------------------------------------------------------


def _biased_softmax(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (scores + bias).softmax(-1)


# Under torch.compile the block softmax of ``matmul_attention`` is one opaque op running ATen's CPU
# kernel, which takes each row through max, exp and sum while it is in cache. Inductor's own kernel
# for it (bias add, max, exp into a full-size fp32 buffer, then sum and scale in a second loop
# nest) took 3.6-4.4 ms a GPT-B bf16 layer (batch 2, 375 positions, padded captions) against
# 1.5 ms; a compiled GPT-B bf16 training step spent 43.5 instead of 23 ms on them. The backward
# (``_softmax_backward_data``, 0.35 ms a layer) is left to inductor.
biased_softmax = torch.library.custom_op(
    "pipeline::biased_softmax", _biased_softmax, mutates_args=()
)


@biased_softmax.register_fake
def _(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return scores.new_empty(
        torch.broadcast_shapes(scores.shape, bias.shape), dtype=torch.result_type(scores, bias)
    )


def _biased_softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _biased_softmax_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch._softmax_backward_data(grad, y, -1, y.dtype), None


biased_softmax.register_autograd(_biased_softmax_backward, setup_context=_biased_softmax_setup)


def _embedding_grad(grad: torch.Tensor, indices: torch.Tensor, num_weights: int) -> torch.Tensor:
    return torch.ops.aten.embedding_dense_backward(grad, indices, num_weights, -1, False)


# Under torch.compile on CPU the token embedding's backward is ATen's kernel, opaque to inductor.
# Inductor's own kernel for it (the 16384 x 768 table zeroed, then an atomic add per looked-up
# element) took 15 ms of a compiled GPT-B bf16 training step (batch 2); ATen's 0.4 ms after the
# zeroing. The step, old and new alternating in one process: 0.980, 0.990 and 0.998.
embedding_grad = torch.library.custom_op(
    "pipeline::embedding_grad", _embedding_grad, mutates_args=()
)


@embedding_grad.register_fake
def _(grad: torch.Tensor, indices: torch.Tensor, num_weights: int) -> torch.Tensor:
    return grad.new_empty((num_weights, grad.shape[-1]))


def _embedding(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return F.embedding(indices, weight)


embedding = torch.library.custom_op("pipeline::embedding", _embedding, mutates_args=())


@embedding.register_fake
def _(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return weight.new_empty((*indices.shape, weight.shape[1]))


def _embedding_setup(ctx, inputs, output):
    weight, indices = inputs
    ctx.save_for_backward(indices)
    ctx.num_weights = weight.shape[0]


def _embedding_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return embedding_grad(grad.contiguous(), indices, ctx.num_weights), None


embedding.register_autograd(_embedding_backward, setup_context=_embedding_setup)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose compiled CPU forward goes through the opaque :func:`embedding`.
    It is the module's forward (not a function given the table), so the module's hooks run
    first: ZeRO-3 gathers a partitioned weight there (given the table's weight directly, the
    compiled step saw ZeRO-3's empty placeholder and failed at its first step)."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.weight.device.type == "cpu":
            return embedding(self.weight, indices)
        return super().forward(indices)


def matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention as two matmuls and a softmax: q (B, H, T, hd), k/v (B, H, S, hd).

    ``mask`` is SDPA's ``attn_mask``, broadcast to (B, H, T, S): boolean (True: may attend) or
    an additive float bias; None: top-left-aligned causal if ``causal``, else every key. On CPU
    PyTorch's flash-attention kernel is the slower one: about twice as long for a bf16 GPT-B
    layer, forward + backward (19 vs 9.5 ms at 375 tokens, batch 2), and 4x for one bf16 decode
    query over 376 keys (400 vs 93 us). Every row must see at least one key (the model's masks
    let each position see itself).

    For a block of queries (training, prefill) the scores stay in q's dtype: a boolean mask
    becomes a 0 / -inf bias of that dtype (exact in bf16), and PyTorch's CPU softmax of bf16
    computes in fp32 and rounds once, as an fp32 softmax followed by a cast does (1.5e-5 of the
    bf16 probabilities differ by one unit in the last place; gradients as close to an fp64
    reference as SDPA's, in the tests). Without the fp32 round trip a bf16 GPT-B layer's attention
    takes 7.2-7.4 instead of 9.5 ms, forward + backward. One query (a decode step) keeps fp32
    scores: its rows are short, and there the fp32 softmax is the faster kernel (13.5 against 13.7
    ms a GPT-B bf16 token). A float bias of another dtype promotes the scores to it. Under
    ``torch.compile`` a block's masked softmax is the opaque :func:`biased_softmax`.
    """
    if mask is None and causal:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))
    if q.size(-2) == 1:
        scores = scores.float()
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device)
            mask = bias.masked_fill_(~mask, float("-inf"))
        if torch.compiler.is_compiling() and q.size(-2) > 1 and not mask.requires_grad:
            return torch.matmul(biased_softmax(scores, mask).to(v.dtype), v)
        scores = scores + mask
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = Dropout(cfg.resid_dropout_p)
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None,
        start: int | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1
        )
        q = apply_rope(q.view(B, T, self.n_head, self.hd), rope).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rope(k.view(B, T, self.n_kv, self.hd), rope).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.cache is not None and start is not None:
            k, v = self.cache.update(start, k, v)  # (B, Hkv, start+T, hd)
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        # is_causal is top-left aligned in SDPA: only right for a square (uncached) block
        causal = mask is None and q.size(2) == k.size(2) and q.size(2) > 1
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0:
            y = matmul_attention(q, k, v, mask, causal)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p
            )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.dropout = Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, rope, mask, start=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, start)
        return x + self.mlp(self.mlp_norm(x))


# --- condition embedders ----------------------------------------------------------------------


class CaptionProjector(nn.Module):
    """T5 features -> prefix tokens (MLP with tanh-GELU); a fixed null caption for CFG."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.caption_dim, cfg.dim, bias=False)
        self.fc2 = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # A buffer, as in LlamaGen: the "unconditional caption" is fixed random features.
        uncond = torch.randn(cfg.max_text_tokens, cfg.caption_dim) / cfg.caption_dim**0.5
        self.register_buffer("uncond", uncond)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(feats), approximate="tanh"))


class ClassEmbedder(nn.Module):
    """One learned vector per class plus a null class (index ``num_classes``) for CFG."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.table = nn.Embedding(cfg.num_classes + 1, cfg.dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).unsqueeze(1)  # (B, 1, C)


# --- the model --------------------------------------------------------------------------------


class GPT(nn.Module):
    """Condition prefix + image tokens -> next-token logits over the VQ codebook."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.cond_embed = CaptionProjector(cfg) if cfg.cond == "text" else ClassEmbedder(cfg)
        self.tok_embed = Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = Dropout(cfg.token_dropout_p)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope: dict[tuple[int, str], torch.Tensor] = {}
        self.apply(self._init_weights)
        nn.init.zeros_(self.head.weight)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.initializer_range)

    def num_params(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def rope(self, grid_size: int, device: torch.device) -> torch.Tensor:
        """The fp32 RoPE table of ``grid_size`` on ``device``, cached. Under torch.compile a
        missing one is built in the graph and not cached: filling the cache from a compiled
        forward would fail its own guard on the cache and compile the model a second time."""
        key = (grid_size, str(device))
        if key not in self._rope:
            table = rope_2d_table(self.cfg, grid_size).to(device)
            if torch.compiler.is_compiling():
                return table
            self._rope[key] = table
        return self._rope[key]

    # -- conditioning

    def embed_condition(
        self, cond: torch.Tensor, cond_mask: torch.Tensor | None, drop: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefix embeddings (B, P, C) and the prefix key mask (B, P) (None: all valid).

        ``drop`` (B,) bool replaces a row's condition with the unconditional one (CFG).
        """
        if self.cfg.cond == "class":
            labels = cond.long()
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
            return self.cond_embed(labels), None
        if cond.dim() != 3 or cond.size(-1) != self.cfg.caption_dim:
            raise ValueError(
                f"caption features of shape {tuple(cond.shape)}: the model takes (batch, tokens, "
                f"{self.cfg.caption_dim})"
            )
        B, L, _ = cond.shape
        if cond_mask is not None and tuple(cond_mask.shape) != (B, L):
            raise ValueError(
                f"caption mask of shape {tuple(cond_mask.shape)} for features of {(B, L)} tokens"
            )
        P = self.cfg.max_text_tokens
        if L > P:
            raise ValueError(f"caption features have {L} tokens; the model takes at most {P}")
        mask = (
            torch.ones(B, L, dtype=torch.bool, device=cond.device)
            if cond_mask is None
            else cond_mask.bool()
        )
        # in the model's dtype before the null caption goes in: the token shards' fp16 features
        # must not round the fp32 null caption of an fp32 model (LlamaGen keeps its precision)
        cond = cond.to(self.cond_embed.fc1.weight.dtype)
        if L < P:  # left-pad: valid tokens end right before the image
            cond = F.pad(cond, (0, 0, P - L, 0))
            mask = F.pad(mask, (P - L, 0), value=False)
        if drop is not None:
            uncond = self.cond_embed.uncond.to(cond.dtype)
            cond = torch.where(drop[:, None, None], uncond, cond)
            if self.cfg.rope_prefix != "llamagen":  # LlamaGen keeps the caption's mask
                mask = mask | drop[:, None]
        # a row with no valid token would attend to nothing: treat it as the null caption.
        # Eager, two data-dependent checks skip work (and keep SDPA's is_causal fast path when
        # every token is valid); torch.compile would split the graph at each, so it does the
        # same work unconditionally (the same result)
        compiling = torch.compiler.is_compiling()
        empty = ~mask.any(dim=1)
        if compiling or empty.any():
            cond = torch.where(empty[:, None, None], self.cond_embed.uncond.to(cond.dtype), cond)
            mask = mask | empty[:, None]
        emb = self.cond_embed(cond)
        all_valid = cond_mask is None and L == P  # known without reading the mask
        if not all_valid and not compiling:
            all_valid = bool(mask.all())
        return emb, (None if all_valid else mask)

    def cfg_drop_mask(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Which rows lose their condition in this training step (probability cond_dropout_p)."""
        if not self.training or self.cfg.cond_dropout_p <= 0:
            return None
        return torch.rand(batch, device=device) < self.cfg.cond_dropout_p

    @staticmethod
    def attention_mask(prefix_mask: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
        """Causal mask with padded prefix keys hidden; each row always sees itself (no NaNs)."""
        if prefix_mask is None:
            return None
        B, P = prefix_mask.shape
        # From position comparisons, not tril() / eye(): torch.compile folds the mask into each
        # layer's softmax, and on CPU inductor could not vectorize that loop with eye() in it
        # (GPT-B bf16, padded captions: 5.8 -> 3.0 ms a layer; a compiled autocast training
        # step 0.835 -> 0.808 s side by side)
        pos = torch.arange(T, device=device)
        causal = pos[None, :] <= pos[:, None]  # (query, key): key at or before the query
        keys = torch.cat([prefix_mask, prefix_mask.new_ones(B, T - P)], dim=1)  # (B, T)
        itself = pos[None, :] == pos[:, None]
        return ((causal & keys[:, None, :]) | itself)[:, None]  # (B, 1, T, T)

    # -- training / full forward

    def forward(
        self,
        codes: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        grid_size: int | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, N, V); ``logits[:, i]`` predicts ``codes[:, i]``.

        codes: (B, N) image tokens in raster order, N <= grid_size**2 (a prefix of the image).
        cond: T5 features (B, L, caption_dim) with ``cond_mask`` (B, L), or class labels (B,).
        drop: rows whose condition is replaced by the unconditional one; by default drawn with
        probability ``cond_dropout_p`` in training mode and none in eval mode.
        """
        g = grid_size or self.cfg.grid_size
        B, N = codes.shape
        if not 1 <= N <= g * g:
            raise ValueError(f"expected 1..{g * g} codes for a {g}x{g} grid, got {N}")
        if drop is None:
            drop = self.cfg_drop_mask(B, codes.device)
        prefix, pmask = self.embed_condition(cond, cond_mask, drop)
        P = prefix.size(1)
        x = torch.cat([prefix, self.tok_embed(codes[:, :-1])], dim=1)  # (B, P + N - 1, C)
        x = self.tok_dropout(x)
        T = x.size(1)
        rope = self.rope(g, x.device)[:T]
        mask = self.attention_mask(pmask, T, x.device)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask)
        x = self.norm(x[:, P - 1 :])  # only positions that predict image tokens
        return self.head(x)

    # -- cached generation

    def setup_cache(
        self, batch: int, grid_size: int | None = None, dtype=None, device=None
    ) -> None:
        """Allocate static KV buffers for ``batch`` rows of prefix + grid**2 tokens."""
        g = grid_size or self.cfg.grid_size
        max_len = find_multiple(self.cfg.prefix_len + g * g, 8)
        w = self.head.weight
        for b in self.blocks:
            b.attn.cache = KVCache(
                batch,
                max_len,
                self.cfg.kv_heads,
                self.cfg.head_dim,
                dtype or w.dtype,
                device or w.device,
            )
        self._key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device or w.device)
        self._all_valid = True
        self._cache_grid = g

    def clear_cache(self) -> None:
        for b in self.blocks:
            b.attn.cache = None
        self._key_valid = None

    def _run_cached(self, x: torch.Tensor, start: int) -> torch.Tensor:
        T = x.size(1)
        end = start + T
        rope = self.rope(self._cache_grid, x.device)[start:end]
        if T == 1:  # one new token sees every cached key but the padded prefix
            mask = None if self._all_valid else self._key_valid[:, None, None, :end]
        elif self._all_valid and start == 0:
            mask = None  # plain causal
        else:
            rows = torch.arange(T, device=x.device)
            causal = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            mask = causal[None] & self._key_valid[:, None, :end]
            mask[:, rows, rows + start] = True  # a padded query still sees itself: no NaN rows
            mask = mask[:, None]
        for block in self.blocks:
            x = block(x, rope, mask, start)
        return self.head(self.norm(x[:, -1:]))[:, 0]  # (B, V)

    @torch.no_grad()
    def prefill(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the condition prefix into the cache; returns logits for the first image token."""
        prefix, pmask = self.embed_condition(cond, cond_mask, drop)
        self._key_valid.fill_(True)
        if pmask is not None:
            self._key_valid[:, : pmask.size(1)] = pmask
        self._all_valid = pmask is None
        return self._run_cached(prefix.to(self.head.weight.dtype), 0)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed image token ``pos`` (0-based, shape (B,)); returns logits for token ``pos + 1``."""
        x = self.tok_embed(token[:, None])
        return self._run_cached(x, self.cfg.prefix_len + pos)


def train_flops_per_sample(cfg: GPTConfig, grid_size: int | None = None) -> float:
    """Matmul FLOPs of forward + backward for one sample (6 x params x tokens + attention)."""
    g = grid_size or cfg.grid_size
    T = cfg.prefix_len + g * g - 1
    per_layer = (
        cfg.dim * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
        + cfg.dim**2
        + 3 * cfg.dim * cfg.ffn_hidden
    )
    text = cfg.cond == "text"
    # the caption projector's first matmul has no input gradient (T5 features are data): forward
    # and weight gradient only, 4 FLOPs a weight and token instead of 6
    cond_in = cfg.caption_dim * cfg.dim * cfg.prefix_len if text else 0
    cond = cfg.dim**2 * cfg.prefix_len if text else 0
    dense = cfg.n_layer * per_layer * T + cfg.dim * cfg.vocab_size * g * g + cond
    attn = cfg.n_layer * 2 * T * T * cfg.dim  # q.k and att.v, causal counted as full (as PaLM)
    return 3 * 2 * (dense + attn) + 4 * cond_in


def decode_bytes_per_token(model: GPT) -> int:
    """Weight bytes a decode step must read at least once: every matrix but the embeddings
    (one row each is read) and the condition embedder (the caption projector or class table,
    used by the prefill alone)."""
    skip = {id(model.tok_embed.weight), *(id(p) for p in model.cond_embed.parameters())}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
