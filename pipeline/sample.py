"""Autoregressive generation: prefill the condition, decode image tokens with a static KV cache.

Classifier-free guidance doubles the batch (conditional rows, then unconditional rows) and mixes
the two halves' logits as ``l_u + s * (l_c - l_u)``. Each image has its own random generator
seeded from its own seed, so an image comes out the same whether it is sampled alone or in a
batch. The cached path runs ``pipeline.decode.StaticDecoder`` (buffers sized once, one static
shape per step, optional ``torch.compile``); ``Sampler`` keeps one across batches.
``generate(..., use_cache=False)`` recomputes the whole sequence every step: the baseline the
cached path is checked and benchmarked against (benchmarks/bench_decode.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import doc
from pipeline.decode import StaticDecoder
from pipeline.models.gpt import GPT


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn."""

    cfg_scale: float = doc(
        "classifier-free guidance scale s: logits uncond + s (cond - uncond); 1 = no guidance. "
        "Any s != 1 mixes (0: unconditional, below 1: under-guided); LlamaGen guides only s > 1",
        7.5,
    )
    temperature: float = doc("softmax temperature (0 = greedy)", 1.0)
    top_k: int = doc("keep the k most likely tokens (0 = all)", 1000)
    top_p: float = doc(
        "nucleus: keep the smallest set with this much mass (1 = all; 0 = the top token only)", 1.0
    )
    cfg_interval: int = doc(
        "guide the first cfg_interval + 2 tokens only, then use the conditional logits alone, "
        "as LlamaGen's cfg_interval (-1: guide every token)",
        -1,
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} is outside [0, 1]")
        if self.top_k < 0 or not self.temperature >= 0 or not math.isfinite(self.temperature):
            raise ValueError(
                f"top_k {self.top_k} and temperature {self.temperature} must be >= 0 (and finite)"
            )
        if self.cfg_interval < -1:
            raise ValueError(f"cfg_interval {self.cfg_interval}: -1 (always) or a token index")

    def guided(self, i: int) -> bool:
        """Whether image token ``i`` (0-based) is drawn from the guided logits."""
        return self.cfg_interval < 0 or i <= self.cfg_interval + 1


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
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def draw(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row, each row from its own generator. logits: (B, V) -> (B,).

    The distribution is ``filter_logits``' (top-k, then top-p). Sampling is by inverse CDF in
    vocabulary order: each row draws one uniform number from its own generator and takes the
    first token whose cumulative probability exceeds it, so a tiny float difference in the logits
    (cached vs uncached, batch of 1 vs 8) moves a boundary a tiny bit instead of reordering
    tokens. Cheaper than ``filter_logits`` + per-row ``torch.multinomial``: one unsorted top-k
    for the threshold, and top-p sorts only the top-k survivors when top-k is on: every token
    tied with the k-th, as ``filter_logits`` and LlamaGen keep them (bf16 logits tie often: at
    k=1000 of 16384, most rows have a few more than k).
    """
    if params.temperature <= 0:
        return logits.argmax(-1)
    # LlamaGen's floor: a temperature of 1e-37 made every logit infinite and the softmax NaN
    logits = logits.float() / max(params.temperature, 1e-5)
    V = logits.size(-1)
    k = params.top_k if 0 < params.top_k < V else 0
    if params.top_p < 1.0:
        # sorted candidates: the top k and their ties (as many as the row with most), or the
        # whole vocabulary; a row's extra ones below its k-th value get no mass
        if k:
            kth = torch.topk(logits, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
            wide = int((logits >= kth).sum(-1).max())
            vals, idx = torch.topk(logits, wide, dim=-1)
            vals = vals.masked_fill(vals < kth, float("-inf"))
            # topk orders tied values differently at different widths, and the width is the
            # batch's: ties in the canonical order (value down, then index up), so which of
            # them the nucleus keeps is the row's own, not its batch-mates' (bf16 ties often)
            idx, by_index = idx.sort(-1)
            vals, by_value = vals.gather(-1, by_index).sort(dim=-1, descending=True, stable=True)
            idx = idx.gather(-1, by_value)
        else:
            vals, idx = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: index up
        p = vals.softmax(-1)
        keep = ((p.cumsum(-1) - p) < params.top_p) & (vals > float("-inf"))
        keep[:, 0] = True  # the top token always stays (top_p 0: greedy, as in LlamaGen)
        # the kept prefix by position, not by a cutoff value: tokens tied with the last kept one
        # stay out (top_p 0 keeps one token even on a tie, as LlamaGen's scatter does)
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, keep)
        logits = logits.masked_fill(~kept, float("-inf"))
    elif k:
        kth = torch.topk(logits, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators])
    u = u.to(cdf.device)[:, None] * total
    # strictly below the total: the pick then always has a non-zero probability
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).clamp_max_(V - 1).squeeze(-1)


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
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(
        cond.device
    )
    return cond2, mask2, drop


class Sampler:
    """Fast cached sampling for batches of up to ``batch_size`` conditions, reusable across calls.

    Holds one ``StaticDecoder`` (KV cache, mask, optionally a compiled step) sized once for
    ``batch_size`` rows, doubled when ``cfg`` is on. A smaller batch is padded with copies of its
    last row (their tokens are thrown away), so shapes never change and nothing recompiles.
    """

    def __init__(
        self,
        model: GPT,
        batch_size: int,
        grid_size: int | None = None,
        cfg: bool = True,
        compile_mode: str | None = None,
        freeze: bool = True,
    ):
        self.model = model.eval()
        self.batch_size = batch_size
        self.cfg = cfg
        self.grid_size = grid_size or model.cfg.grid_size
        self.decoder = StaticDecoder(
            model, batch_size * (2 if cfg else 1), self.grid_size, compile_mode, freeze
        )

    @property
    def compile_mode(self) -> str | None:
        """The compile mode in effect (None once compiling failed or when eager)."""
        return self.decoder.compile_mode

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        params: SamplingParams = SamplingParams(),
        seeds: list[int] | None = None,
    ) -> torch.Tensor:
        """Image tokens (B, grid**2) for B <= batch_size conditions; row i depends only on seeds[i]."""
        B, S = cond.size(0), self.batch_size
        if not 1 <= B <= S:
            raise ValueError(f"sampler takes 1..{S} conditions per call, got {B}")
        if (params.cfg_scale != 1.0) != self.cfg:
            raise ValueError(
                f"sampler built with cfg={self.cfg}, params.cfg_scale={params.cfg_scale}"
            )
        seeds = _row_seeds(seeds, B)
        _check_labels(self.model, cond)
        _check_caption_mask(cond, cond_mask)
        self.model.eval()
        device = self.model.head.weight.device
        cond = _pad_rows(cond.to(device), S)
        cond_mask = None if cond_mask is None else _pad_rows(cond_mask.to(device), S)
        gens = _generators(seeds + [0] * (S - B), device)
        cond2, mask2, drop = _double_for_cfg(cond, cond_mask, self.cfg)
        N = self.grid_size**2
        step_in = torch.zeros(self.decoder.rows, dtype=torch.long, device=device)
        tokens = torch.zeros(S, N, dtype=torch.long, device=device)
        logits = self.decoder.prefill(cond2, mask2, drop)
        finite = torch.ones(S, dtype=torch.bool, device=device)
        for i in range(N):
            mixed = _guide(logits, S, params, i) if self.cfg else logits
            finite &= torch.isfinite(mixed).all(-1)  # checked once at the end: no sync a step
            tokens[:, i] = draw(mixed, params, gens)
            if i + 1 < N:
                step_in[:S] = tokens[:, i]
                if self.cfg:
                    step_in[S:] = tokens[:, i]
                logits = self.decoder.step(step_in, self.decoder.prefix_len + i)
        _check_finite(finite[:B])
        return tokens[:B]


def _guide(logits: torch.Tensor, rows: int, params: SamplingParams, i: int) -> torch.Tensor:
    """Token ``i``'s logits from the doubled batch: guided, or past ``cfg_interval`` the
    conditional rows alone."""
    if params.guided(i):
        return cfg_mix(logits[:rows], logits[rows:], params.cfg_scale)
    return logits[:rows]


def _row_seeds(seeds: list[int] | None, rows: int) -> list[int]:
    """One seed per condition row (default 0..rows-1); a list of another length is refused."""
    seeds = list(range(rows)) if seeds is None else list(seeds)
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} conditions")
    return seeds


def _check_labels(model: GPT, cond: torch.Tensor) -> None:
    """Class labels must name a class: label ``num_classes`` is the model's null (CFG) class and
    would pass silently for an unconditional sample, and a larger one fails deep in the model."""
    if model.cfg.cond != "class":
        return
    n = model.cfg.num_classes
    if cond.dim() != 1 or cond.is_floating_point():
        raise ValueError(f"class labels must be a 1-D integer tensor, got {tuple(cond.shape)}")
    bad = cond[(cond < 0) | (cond >= n)]
    if len(bad):
        raise ValueError(f"class labels {bad.tolist()[:5]} are outside 0..{n - 1}")


def _check_caption_mask(cond: torch.Tensor, cond_mask: torch.Tensor | None) -> None:
    """A caption mask must be (B, L) like the features and left-padded (valid tokens last, right
    before the image, as the loader and the sample job pad): with a right-padded one (Hugging
    Face's ``attention_mask`` layout) the first image token would be predicted from a padding
    position that sees nothing, silently."""
    if cond_mask is None or cond_mask.dim() != 2 or cond.dim() != 3:
        return  # (shapes that do not fit are refused by the model, naming them)
    m = cond_mask.bool()
    bad = torch.nonzero((m[:, :-1] & ~m[:, 1:]).any(-1)).flatten().tolist()
    if bad:
        raise ValueError(
            f"cond_mask rows {bad[:5]} have padding after a valid token: captions must be "
            "left-padded (valid tokens last; Hugging Face's attention_mask pads on the right, "
            "so move each row's valid tokens and flags to the end)"
        )


def _check_finite(finite: torch.Tensor) -> None:
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten().tolist()
        raise FloatingPointError(
            f"non-finite logits while sampling rows {rows} (a diverged or corrupt checkpoint?): "
            "their tokens would be meaningless"
        )


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad the batch dimension to ``rows`` with copies of the last row."""
    if x.size(0) == rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - x.size(0), *x.shape[1:])])


@torch.no_grad()
def generate(
    model: GPT,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None = None,
    params: SamplingParams = SamplingParams(),
    seeds: list[int] | None = None,
    grid_size: int | None = None,
    use_cache: bool = True,
    compile_mode: str | None = None,
) -> torch.Tensor:
    """Sample image tokens (B, grid**2) for a batch of conditions.

    cond: T5 features (B, L, D) with ``cond_mask`` (B, L), left-padded (valid tokens last, as
    ``pipeline.data.loader.collate`` pads; a right-padded mask is refused), or class labels (B,).
    seeds: one per row (default 0..B-1); row i's tokens depend only on its own seed.
    use_cache: the static-cache decoder (a ``Sampler`` built for this batch; to sample many
    batches, build one ``Sampler`` and reuse it); False recomputes the whole sequence per step.
    compile_mode: torch.compile mode for the cached decode step (None: eager); a ``Sampler``
    also compiles a bf16 CPU model's weights in (faster, but it compiles once per Sampler).
    """
    was_training = model.training
    model.eval()
    g = grid_size or model.cfg.grid_size
    B = cond.size(0)
    use_cfg = params.cfg_scale != 1.0
    try:
        if use_cache:
            # one batch: a frozen-weight decoder would compile anew on every call
            sampler = Sampler(model, B, g, use_cfg, compile_mode, freeze=False)
            return sampler.sample(cond, cond_mask, params, seeds)
        seeds = _row_seeds(seeds, B)
        _check_labels(model, cond)
        _check_caption_mask(cond, cond_mask)
        device = model.head.weight.device
        cond = cond.to(device)
        cond_mask = None if cond_mask is None else cond_mask.to(device)
        gens = _generators(seeds, device)
        cond2, mask2, drop = _double_for_cfg(cond, cond_mask, use_cfg)
        tokens = torch.zeros(B, g * g, dtype=torch.long, device=device)
        finite = torch.ones(B, dtype=torch.bool, device=device)
        for i in range(g * g):
            seq = tokens[:, : i + 1]  # the last column is a placeholder: it is never read
            seq = torch.cat([seq, seq]) if use_cfg else seq
            logits = model(seq, cond2, mask2, drop=drop, grid_size=g)[:, -1].float()
            mixed = _guide(logits, B, params, i) if use_cfg else logits
            finite &= torch.isfinite(mixed).all(-1)
            tokens[:, i] = draw(mixed, params, gens)
        _check_finite(finite)
        return tokens
    finally:
        model.train(was_training)
