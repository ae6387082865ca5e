"""Learnable synthetic token shards for tests, benchmarks and the local demo (no VQ, no T5).

Each sample belongs to one of ``num_patterns`` classes: its codes are that class's fixed random
grid (``codes_flip`` the grid mirrored left-right), its "T5 features" a fixed class vector plus a
little noise over 1..``max_len`` tokens, and its json holds ``{"label": class}``. A model that
reads the caption can drive the loss towards zero, so overfitting and transfer (to an upsampled grid) are measurable.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.shards import ShardInfo, TokenShardWriter, encode_token_sample


def write_toy_token_shards(
    out_uri: str,
    num_shards: int = 4,
    per_shard: int = 16,
    grid_size: int = 4,
    caption_dim: int = 16,
    vocab_size: int = 64,
    num_patterns: int = 8,
    max_len: int = 6,
    seed: int = 0,
    first_index: int = 0,
    upsample: int = 1,
) -> list[ShardInfo]:
    """Write ``num_shards`` done token shards of ``per_shard`` samples each under ``out_uri``.

    ``upsample`` > 1 repeats every code in a block (grid ``grid_size * upsample``): the same
    "images" at a higher resolution, as stage 2 sees them.
    """
    base = np.random.default_rng(seed)
    patterns = base.integers(0, vocab_size, size=(num_patterns, grid_size, grid_size))
    if upsample > 1:
        patterns = np.kron(patterns, np.ones((1, upsample, upsample), dtype=patterns.dtype))
    class_vecs = base.standard_normal((num_patterns, caption_dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    infos = []
    for s in range(num_shards):
        index = first_index + s
        with TokenShardWriter(out_uri, index) as w:
            for j in range(per_shard):
                c = int(rng.integers(num_patterns))
                n = int(rng.integers(1, max_len + 1))
                t5 = class_vecs[c] + 0.1 * rng.standard_normal((n, caption_dim)).astype(np.float32)
                w.write(
                    encode_token_sample(
                        key=f"s{index:05d}_{j:05d}",
                        codes=patterns[c],
                        t5=t5,
                        caption=f"pattern {c}",
                        meta={"label": c, "shard": index},
                        codes_flip=patterns[c][:, ::-1],
                    )
                )
            infos.append(w.close({"toy": True}))
    return infos
