"""VQ-16 tokenizer throughput on this machine: encode and decode images/s at 256 px, fp32 and bf16.

Random weights (speed does not depend on them), batch of ``--batch`` images, median of
``--repeats`` timed runs after one warm-up, NCHW and channels_last memory layouts. Encode is what the pretokenize stage runs per image;
decode is what sampling runs per generated image. Also reports how far bf16 codes agree with
fp32 codes (bf16 rounding can flip near-tied nearest-code choices).

    python benchmarks/bench_vq.py [--batch 2] [--repeats 2] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.models.vq import VQConfig, VQModel
from pipeline.precision import fast_dtypes


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def run(batch: int = 2, repeats: int = 2, size: int = 256, preset: str = "VQ-16") -> list[dict]:
    """One row per (dtype, memory format, direction) with images/s and ms/image."""
    torch.manual_seed(0)
    model = VQModel(VQConfig.from_name(preset)).eval()
    x = torch.rand(batch, 3, size, size) * 2 - 1
    rows, ref_codes = [], None
    # bf16 only where this CPU has it natively (emulated, VQ-16 would take many minutes)
    for dtype in fast_dtypes((torch.float32, torch.bfloat16)):
        for layout in (torch.contiguous_format, torch.channels_last):
            # channels_last spares oneDNN a reorder of every activation (large in bf16)
            m = model.to(dtype=dtype, memory_format=layout)
            xi = x.to(dtype).contiguous(memory_format=layout)
            codes = m.encode(xi)
            if ref_codes is None:
                ref_codes = codes
            agree = float((codes == ref_codes).float().mean())
            enc = _median_seconds(lambda m=m, xi=xi: m.encode(xi), repeats)
            dec = _median_seconds(lambda m=m, c=codes: m.decode(c), repeats)
            for what, sec in (("encode", enc), ("decode", dec)):
                rows.append(
                    {
                        "model": preset,
                        "px": size,
                        "dtype": str(dtype).removeprefix("torch."),
                        "layout": "channels_last" if layout == torch.channels_last else "NCHW",
                        "op": what,
                        "batch": batch,
                        "images_per_s": batch / sec,
                        "ms_per_image": 1000 * sec / batch,
                        "codes_equal_to_fp32": agree,
                        "threads": torch.get_num_threads(),
                    }
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--preset", default="VQ-16")
    a = ap.parse_args()
    rows = run(a.batch, a.repeats, a.size, a.preset)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values())
            + " |"
        )


if __name__ == "__main__":
    main()
