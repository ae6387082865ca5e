"""Pretokenize throughput: images/s, and the share of wall time inside the VQ and T5 forward passes.

One ``PretokenizeWorker`` (what each Ray actor runs) pretokenizes raw shards of generated 256 px
JPEGs (img2dataset's layout) into token shards in a temporary folder, with codes of the flipped
image too (as configs/data/pretokenize_stage1.yaml). Models have the real architectures with
random weights: VQ-16 (LlamaGen's tokenizer) and a T5 encoder of FLAN-T5-XL's shape (2048-d,
24 layers on a GPU; on a CPU only ``--t5-layers`` of them, default 2, to keep the run short) with
a word-level tokenizer, so captions cost about as many tokens as with T5's SentencePiece.
Reported per run: images/s, seconds in VQ encode and T5 encode (tokenising included), seconds
waiting for decoded images, and ``model_share`` = (VQ + T5) / wall time of the worker calls
(reading, decoding, writing and committing the shard included). Goal: model_share >= 0.9.

    python benchmarks/bench_pretokenize.py [--images 1024] [--device cuda] [--resolution 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import synthetic  # noqa: E402
from pipeline.data.pretokenize import PretokenizeConfig, PretokenizeWorker  # noqa: E402
from pipeline.models.text_encoder import TextEncoder  # noqa: E402
from pipeline.models.vq import VQConfig, VQModel  # noqa: E402
from tests.rawshards import write_raw_shards  # noqa: E402


def word_tokenizer():
    """A word-level stand-in for T5's tokenizer (pad 0, EOS 1 appended, unknown words -> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(
        {w for s in synthetic.make_samples(500) for w in s.caption.replace(",", " ").split()}
    )
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def t5_encoder(
    layers: int, device: str, dtype: torch.dtype, d_model: int = 2048
) -> torch.nn.Module:
    """A T5 encoder of FLAN-T5-XL's shape at d_model 2048 (d_ff 5120, 32 heads of 64)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_model * 5 // 2, num_layers=layers,
        num_heads=d_model // 64, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False,
    )  # fmt: skip
    with torch.device(device):  # initialised where it runs: fast on a GPU
        return T5EncoderModel(cfg).to(dtype).eval()


def run_one(
    images: int, device: str, resolution: int, batch_size: int, decode_threads: int,
    vq_preset: str = "VQ-16", t5_layers: int = 24, t5_dim: int = 2048, per_shard: int = 256,
) -> dict:  # fmt: skip
    """Pretokenize ``images`` images (plus one warm-up shard) and time the worker calls."""
    per_shard = min(per_shard, images)
    n_shards = max(1, images // per_shard)
    gpu = device.startswith("cuda")
    dtype_name = "bfloat16" if gpu else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = os.path.join(tmp, "raw"), os.path.join(tmp, "tokens")
        write_raw_shards(raw, n_shards + 1, per_shard, size=resolution, seed=1)  # +1: warm-up
        cfg = load_config(PretokenizeConfig, None, [
            f"input={raw}", f"output={out}", f"resolution={resolution}", "flip=true",
            f"batch_size={batch_size}", f"decode_threads={decode_threads}",
            f"vq.device={device}", f"vq.dtype={dtype_name}", f"text.device={device}",
            f"text.dtype={dtype_name}", f"text.batch_size={batch_size}",
        ])  # fmt: skip
        torch.manual_seed(0)
        with torch.device(device):
            vq = VQModel(VQConfig.from_name(vq_preset))
        t5 = t5_encoder(t5_layers, device, getattr(torch, dtype_name), t5_dim)
        text = TextEncoder(t5, word_tokenizer(), 120, batch_size)
        worker = PretokenizeWorker(cfg, vq=vq, text=text)
        worker(n_shards)  # warm-up shard: kernels, allocator, thread pools
        wall = vq_s = t5_s = wait_s = 0.0
        n, tokens = 0, []
        for i in range(n_shards):
            t0 = time.perf_counter()
            stats = worker(i)
            wall += time.perf_counter() - t0
            vq_s += stats["vq_s"]
            t5_s += stats["t5_s"]
            wait_s += stats["wait_s"]
            n += stats["written"]
            tokens.append(stats["t5_tokens_mean"])
    return {
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu x{torch.get_num_threads()}",
        "models": f"{vq_preset} + T5 {t5_dim}-d x{t5_layers}",
        "resolution": resolution,
        "images": n,
        "t5_tokens_mean": round(sum(tokens) / len(tokens), 1),
        "images_per_s": n / wall,
        "vq_s": vq_s,
        "t5_s": t5_s,
        "wait_decode_s": wait_s,
        "wall_s": wall,
        "model_share": (vq_s + t5_s) / wall,
        "goal": ">= 0.9",
    }


def run(images: int | None = None, device: str | None = None) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        n = images or 2048
        return [
            run_one(n, device, 256, 64, 12),
            run_one(n // 2, device, 512, 32, 12),
        ]
    # CPU: the real VQ-16 takes seconds per image here, so few images and a 2-layer T5; then
    # the demo's tiny models, where decoding and writing weigh most against the models
    return [
        run_one(images or 4, device, 256, 4, 1, t5_layers=2, per_shard=4),
        run_one(images or 256, device, 64, 32, 1, "tiny", 2, 64, per_shard=128),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    rows = run(args.images, args.device)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_all import table

    print(table(rows))


if __name__ == "__main__":
    main()
