"""Bytes per sample of our token shards against LlamaGen's per-sample .npy files.

Two LlamaGen baselines. The data issue's (``llamagen_B_per_sample``, the goal's): the codes as
int64 .npy (256 at 256 px) and the FLAN-T5-XL features as one float32 .npy padded to 120 x 2048
(983,040 B of data). What LlamaGen's ``language/extract_t5_feature.py`` actually writes
(``llamagen_files_B_per_sample``): only the caption's valid tokens
(``caption_embs[:, :emb_masks.sum()]``), in float32; its dataset pads them when it loads. Against
that one the saving is mostly fp16 against fp32 (about half), not a factor of ten. Ours is one tar per shard: uint16
codes (and the flipped image's codes), float16 features of the valid caption tokens only, the
caption and a small json, each a tar member. Both sides are measured as written here
(``np.save`` file sizes for LlamaGen; whole-shard bytes / samples for ours, tar headers and
padding included). Goal: at most a tenth of LlamaGen's bytes.

The T5 token count decides it. Without the real T5 vocabulary here (no model hub), rows use:
the generated captions' word count + 1 (EOS), a LAION-COCO-like mean of 20 tokens (BLIP
captions of about 10 words are ~1.3 SentencePiece tokens per word + EOS; drawn from a normal of
sd 6, clipped to 4..120), and the worst case, every caption at the 120-token cap.

    python benchmarks/bench_shards.py
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import synthetic  # noqa: E402
from pipeline.data.shards import TokenShardWriter, encode_token_sample  # noqa: E402

T5_DIM = 2048
MAX_TOKENS = 120
SAMPLES = 256


def npy_size(arr: np.ndarray) -> int:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return len(buf.getvalue())


def llamagen_bytes(grid: int) -> int:
    """One LlamaGen sample: int64 codes + float32 (1, 120, 2048) T5 features, as .npy files."""
    codes = np.zeros((1, grid * grid), dtype=np.int64)
    t5 = np.zeros((1, MAX_TOKENS, T5_DIM), dtype=np.float32)
    return npy_size(codes) + npy_size(t5)


def llamagen_files_bytes(grid: int, lengths: np.ndarray) -> float:
    """Mean bytes of LlamaGen's files as its scripts write them: int64 codes + float32 features
    of the valid tokens only, (1, n, 2048)."""
    codes = npy_size(np.zeros((1, grid * grid), dtype=np.int64))
    t5 = [npy_size(np.zeros((1, int(n), T5_DIM), dtype=np.float32)) for n in lengths]
    return codes + float(np.mean(t5))


def token_lengths(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    captions = [s.caption for s in synthetic.make_samples(n, seed=1)]
    if kind == "synthetic captions (words + 1)":
        lengths = np.array([len(c.replace(",", " ").split()) + 1 for c in captions])
    elif kind == "LAION-COCO-like (mean 20)":
        lengths = np.clip(np.rint(rng.normal(20, 6, n)), 4, MAX_TOKENS).astype(int)
    else:
        lengths = np.full(n, MAX_TOKENS)
    return lengths, captions


def ours_bytes(grid: int, lengths: np.ndarray, captions: list[str], flip: bool) -> float:
    """Whole-shard bytes per sample of a token shard holding these samples."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        with TokenShardWriter(tmp, 0) as w:
            for i, (n_tok, cap) in enumerate(zip(lengths, captions)):
                codes = rng.integers(0, 16384, (grid, grid))
                meta = {
                    "url": f"https://example.com/images/{i:09d}.jpg",
                    "width": 640,
                    "height": 480,
                    "scores": {"aesthetic": 5.1, "punsafe": 0.01, "pwatermark": 0.1,
                               "similarity": 0.31},
                    "source_shard": 0,
                    "t5_tokens": int(n_tok),
                }  # fmt: skip
                t5 = rng.standard_normal((int(n_tok), T5_DIM)).astype(np.float16)
                flipped = codes[:, ::-1] if flip else None
                w.write(encode_token_sample(f"{i:09d}", codes, t5, cap, meta, flipped))
            info = w.close()
    return info.num_bytes / info.num_samples


def run() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    kinds = ("synthetic captions (words + 1)", "LAION-COCO-like (mean 20)", "all at 120 (worst)")
    for res, grid in ((256, 16), (512, 32)):
        ref = llamagen_bytes(grid)
        for kind in kinds:
            lengths, captions = token_lengths(kind, SAMPLES, rng)
            for flip in (True, False):
                ours = ours_bytes(grid, lengths, captions, flip)
                files = llamagen_files_bytes(grid, lengths)
                rows.append(
                    {
                        "resolution": res,
                        "t5_tokens": kind,
                        "mean_tokens": float(lengths.mean()),
                        "flip_codes": flip,
                        "ours_B_per_sample": ours,
                        "llamagen_B_per_sample": ref,
                        "ratio": ours / ref,
                        "goal": "<= 0.1",
                        "llamagen_files_B_per_sample": files,
                        "ratio_to_files": ours / files,
                    }
                )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_all import table

    print(table(run()))
