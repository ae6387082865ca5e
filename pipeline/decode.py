"""Fast cached decoding: one static-shape decode step over buffers sized once, optionally compiled.

``GPT.prefill`` / ``GPT.decode_step`` (in gpt.py) attend to a growing slice of their cache, so each
step has a new shape: fine in eager mode, but ``torch.compile`` would recompile (or go dynamic) at
every position. ``StaticDecoder`` can run every step with the same shapes: the new token's
position is a tensor, its key/value go into the cache with ``index_copy_``, and attention covers
the whole buffer under an additive mask (0 = visible, -inf = padded prefix or not yet written) that
is opened one position per step. One compiled graph (or CUDA graph, ``mode="reduce-overhead"``)
then serves all 256 steps and every batch. Eagerly, the same code reads the cache only up to the
current position (a view, no copy), which saves reading the unwritten part. Nothing is allocated
per step but the activations themselves: no masks, no concatenated caches.

The math is the model's own (its modules and weights, ``apply_rope``, the same masks), except that
on CPU a one-token step attends through ``gpt.matmul_attention`` instead of SDPA; the parity
tests check its tokens against ``generate(use_cache=False)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.log import get_logger
from pipeline.models.gpt import GPT, Block, apply_rope, matmul_attention

log = get_logger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``torch.compile`` can run on ``device``, and why not (checked by compiling a tiny
    function on that device: on a GPU inductor goes through triton, on a CPU through its C++
    backend, and either can be missing while the other works). Checked once per device type."""
    device = torch.device(device)
    key = device.type
    if key not in _COMPILE_CHECKED:
        _COMPILE_CHECKED[key] = _try_compile(device)
    return _COMPILE_CHECKED[key]


# compile_available's answers by device type: each check compiles (seconds), the answer holds
# for the whole process
_COMPILE_CHECKED: dict[str, tuple[bool, str]] = {}


def _try_compile(device: torch.device) -> tuple[bool, str]:
    try:
        import torch._dynamo  # noqa: F401

        fn = torch.compile(lambda x: x * 2 + 1, fullgraph=True, dynamic=False)
        ok = bool(torch.equal(fn(torch.ones(2, device=device)).cpu(), torch.full((2,), 3.0)))
        return ok, "" if ok else "compiled function gave a wrong result"
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class StaticDecoder(nn.Module):
    """Static KV cache + mask for ``rows`` sequences of a GPT; ``prefill`` then ``step`` per token.

    ``rows`` counts every row the model runs, CFG's unconditional half included. Buffers take the
    model's dtype and device; the model should be in eval mode (``Sampler`` sees to it). ``compile_mode`` (one of ``COMPILE_MODES``) compiles ``step``; if
    compiling fails the decoder logs why and stays eager. ``freeze`` lets a bf16 CPU decoder in
    mode ``default`` compile its weights in as constants (see ``_freezes``); every such decoder
    compiles anew, so a one-off decoder is better without.
    """

    def __init__(
        self,
        model: GPT,
        rows: int,
        grid_size: int | None = None,
        compile_mode: str | None = None,
        freeze: bool = True,
    ):
        super().__init__()
        cfg = model.cfg
        w = model.head.weight
        self.model = model
        self.rows = rows
        self.grid_size = g = grid_size or cfg.grid_size
        self.prefix_len = P = cfg.prefix_len
        self.max_len = L = P + g * g  # the last image token is never fed back, one spare slot
        shape = (rows, cfg.kv_heads, L, cfg.head_dim)
        for i in range(cfg.n_layer):
            self.register_buffer(
                f"k{i}", torch.zeros(shape, dtype=w.dtype, device=w.device), persistent=False
            )
            self.register_buffer(
                f"v{i}", torch.zeros(shape, dtype=w.dtype, device=w.device), persistent=False
            )
        # additive attention bias of the next decode query: (rows, 1, 1, L)
        self.register_buffer(
            "bias", torch.zeros(rows, 1, 1, L, dtype=w.dtype, device=w.device), persistent=False
        )
        self.register_buffer("rope", model.rope(g, w.device), persistent=False)  # (L, hd/2, 2)
        self.register_buffer("positions", torch.arange(L, device=w.device), persistent=False)
        self._all_valid = True  # no padded prefix key in any row (set by prefill)
        self.compile_mode = None
        # the weights as compiled in as constants (see _freezes); None: not frozen
        self._frozen_state: list[tuple[int, int]] | None = None
        # the compiled step; None: eager (``self._step_eager`` is a new bound method at each
        # access, so ``is`` against it can never tell the two apart)
        self._compiled_step = None
        if compile_mode:
            if compile_mode not in COMPILE_MODES:
                raise ValueError(f"compile mode {compile_mode!r} is not one of {COMPILE_MODES}")
            ok, why = compile_available(w.device)
            if ok:
                self._compiled_step = torch.compile(
                    self._step_eager, mode=compile_mode, fullgraph=True, dynamic=False
                )
                self.compile_mode = compile_mode
                if freeze and self._freezes(compile_mode, w):
                    self._compiled_step = self._frozen_step(self._compiled_step)
                    self._frozen_state = self._weights_state()
            else:
                log.warning("torch.compile unavailable (%s): decoding eagerly", why)

    @property
    def frozen(self) -> bool:
        """Whether the compiled step has the weights as constants."""
        return self._frozen_state is not None

    @staticmethod
    def _freezes(compile_mode: str, w: torch.Tensor) -> bool:
        """bf16 on CPU in the default mode: inductor's freezing makes the weights constants and
        packs them for oneDNN's linear, whose one-row products read them about 1.5x faster than
        the plain matmul (GPT-B bf16 decode with CFG, batch 1: 9.1-9.5 against 11.1-11.4 ms/token
        on 2 AMD EPYC cores). It holds a packed copy of every weight, and the compiled step keeps the values it
        was compiled with, so ``prefill`` refuses to go on once the weights change in place."""
        return compile_mode == "default" and w.device.type == "cpu" and w.dtype == torch.bfloat16

    @staticmethod
    def _frozen_step(compiled):
        import torch._inductor.config as inductor_config

        def step(*args):
            with inductor_config.patch(freezing=True):  # read when (re)compiling
                return compiled(*args)

        return step

    def _weights_state(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

    # -- the model's math on static buffers

    def _block(
        self,
        i: int,
        block: Block,
        x: torch.Tensor,
        pos: torch.Tensor,
        bias: torch.Tensor,
        end: int | None,
    ) -> torch.Tensor:
        """One transformer block for tokens at positions ``pos`` (T,); x: (R, T, C).

        Attention reads the cache up to ``end`` (None: the whole buffer, a static shape).
        """
        a = block.attn
        R, T, C = x.shape
        q, k, v = a.qkv(block.attn_norm(x)).split(
            [a.n_head * a.hd, a.n_kv * a.hd, a.n_kv * a.hd], -1
        )
        rope = self.rope.index_select(0, pos)  # (T, hd/2, 2)
        q = apply_rope(q.view(R, T, a.n_head, a.hd), rope).transpose(1, 2)  # (R, H, T, hd)
        k = apply_rope(k.view(R, T, a.n_kv, a.hd), rope).transpose(1, 2)
        v = v.view(R, T, a.n_kv, a.hd).transpose(1, 2)
        kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        mask: torch.Tensor | None = bias
        if end is not None:
            kc, vc, mask = kc[:, :, :end], vc[:, :, :end], bias[..., :end]
            if self._all_valid:  # no padded prefix: plain causal (prefill) or no mask (decode)
                mask = None
        if a.n_kv != a.n_head:
            kc = kc.repeat_interleave(a.n_head // a.n_kv, dim=1)
            vc = vc.repeat_interleave(a.n_head // a.n_kv, dim=1)
        if T == 1 and q.device.type == "cpu":
            y = matmul_attention(q, kc, vc, mask)  # the bias buffer: additive
        else:
            y = F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, is_causal=mask is None and T > 1
            )  # (R, H, T, hd)
        x = x + a.proj(y.transpose(1, 2).reshape(R, T, C))
        return x + block.mlp(block.mlp_norm(x))

    def _forward(
        self, x: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor, end: int | None = None
    ) -> torch.Tensor:
        for i, block in enumerate(self.model.blocks):
            x = self._block(i, block, x, pos, bias, end)
        return self.model.head(self.model.norm(x[:, -1])).float()  # (R, V)

    def _step_eager(
        self, tokens: torch.Tensor, pos: torch.Tensor, end: int | None = None
    ) -> torch.Tensor:
        self.bias.index_fill_(-1, pos, 0.0)  # the new token sees itself from now on
        return self._forward(self.model.tok_embed(tokens[:, None]), pos, self.bias, end)

    # -- public steps

    @torch.no_grad()
    def prefill(
        self, cond: torch.Tensor, cond_mask: torch.Tensor | None, drop: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the condition prefix of all rows; returns logits (rows, V) for image token 0."""
        if cond.size(0) != self.rows:
            raise ValueError(f"decoder holds {self.rows} rows, got a batch of {cond.size(0)}")
        if self.model.training:
            raise ValueError(
                "the model is in training mode (dropout would act in every step): model.eval()"
            )
        if self._frozen_state is not None and self._weights_state() != self._frozen_state:
            raise RuntimeError(
                "the model's weights changed after this decoder compiled them in as constants "
                "(bf16 on CPU, compile mode 'default'): build a new Sampler / StaticDecoder"
            )
        prefix, pmask = self.model.embed_condition(cond, cond_mask, drop)
        P, L, dev = self.prefix_len, self.max_len, self.bias.device
        key_valid = torch.ones(self.rows, L, dtype=torch.bool, device=dev)
        if pmask is not None:
            key_valid[:, :P] = pmask
        self._all_valid = pmask is None
        j = torch.arange(L, device=dev)
        pos = torch.arange(P, device=dev)
        seen = (j[None, :] <= pos[:, None])[None] & key_valid[:, None, :]  # (R, P, L)
        seen[:, pos, pos] = True  # a padded query still sees itself: no all -inf rows
        neg = float("-inf")
        bias = torch.zeros(seen.shape, dtype=self.bias.dtype, device=dev).masked_fill_(~seen, neg)
        # the first decode query sees the valid prefix; its own slot opens in step()
        self.bias.copy_(torch.where(key_valid & (j < P), 0.0, neg)[:, None, None, :])
        # unwritten slots get zero attention weight, but 0 * a stale NaN would still be NaN
        for i in range(self.model.cfg.n_layer):
            getattr(self, f"k{i}").zero_()
            getattr(self, f"v{i}").zero_()
        return self._forward(prefix.to(self.bias.dtype), pos, bias[:, None], P)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed ``tokens`` (rows,) at sequence position ``pos``; returns logits (rows, V).

        Eagerly, attention reads the cache up to ``pos`` only; compiled, the whole buffer (one
        static shape for every step, so one graph).
        """
        p = self.positions[pos : pos + 1]
        if self._compiled_step is None:
            return self._step_eager(tokens, p, pos + 1)
        try:
            return self._compiled_step(tokens, p)
        except Exception as exc:  # noqa: BLE001 - a compile failure must not end the run
            # a step is idempotent (same cache slot, same bias entry): rerunning it eagerly is safe
            log.warning(
                "compiled decode step failed (%s: %s); falling back to eager",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            self._compiled_step = None
            self.compile_mode = None
            self._frozen_state = None
            return self._step_eager(tokens, p, pos + 1)
