"""Does a sampled image depend on what it is batched with? A check for a GPU, where GEMM and
attention kernels may pick another algorithm for another row count.

``sample_job`` decodes every batch with the job's full row count (a short last batch, a resumed
run or one part of several is padded with copies of its last row) so that an image is the same
however the job was split. This script checks on this device, with a random-weight preset in
bf16 and CFG, that:

- ``padded``: seed 0 alone, padded to 3 rows, gives the tokens that seed 0 gives in a batch of 3
  (the guarantee ``sample_job`` relies on);
- ``fewer rows``: seed 0 in a 1-row sampler against the same 3-row batch (what shrinking the rows
  would give; informational: it may differ on a GPU, and that is why the rows are padded).

    python benchmarks/check_batch_invariance.py [--preset B] [--device cuda] [--dtype bf16]
        [--deterministic] [--sdpa all|no-cudnn|math]

``--sdpa`` limits the attention kernels PyTorch may pick (``torch.nn.attention.sdpa_kernel``):
on the H200 bf16 decoding was not even repeatable (the same batch twice parted at token
169-172) and cuDNN's fused attention, which PyTorch picks there for bf16 only, is the first
suspect; ``no-cudnn`` leaves it out, ``math`` allows only the unfused reference kernel.

Prints one table row per check (tokens equal, the first differing position) and exits 1 when the
padded check fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.precision import torch_dtype  # noqa: E402
from pipeline.sample import Sampler, SamplingParams  # noqa: E402


def _backends(*names: str) -> list:
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, n) for n in names]


# --sdpa: the attention kernels PyTorch may choose from
SDPA = {
    "all": lambda: _backends("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
    "no-cudnn": lambda: _backends("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "math": lambda: _backends("MATH"),
}


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return int(diff[0, 0]) if len(diff) else None


def run(preset: str = "B", device: str = "cuda", dtype: str = "bf16") -> list[dict]:
    cfg = GPTConfig.from_name(preset)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a non-degenerate head
    model = model.to(device=device, dtype=torch_dtype(dtype))
    cond = torch.randn(3, cfg.max_text_tokens, cfg.caption_dim, device=device)
    params = SamplingParams(cfg_scale=4.0, top_k=1000)
    three = Sampler(model, 3, cfg.grid_size, cfg=True)
    batch = three.sample(cond, None, params, [0, 1, 2])
    again = three.sample(cond, None, params, [0, 1, 2])
    padded = three.sample(cond[:1], None, params, [0])
    del three
    one = Sampler(model, 1, cfg.grid_size, cfg=True).sample(cond[:1], None, params, [0])
    rows = []
    for what, got in (
        ("padded to 3 rows", padded),
        ("1-row sampler", one),
        ("the same batch of 3 again", again),
    ):
        first = _first_diff(batch[0], got[0])
        rows.append(
            {
                "what": f"GPT-{preset} {dtype} CFG, seed 0 {what} vs in a batch of 3",
                "tokens_equal": first is None,
                "first_diff": first,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="B")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms and CUBLAS_WORKSPACE_CONFIG=:4096:8",
    )
    ap.add_argument(
        "--sdpa",
        choices=sorted(SDPA),
        default="all",
        help="attention kernels allowed: all (PyTorch's choice), no-cudnn, math",
    )
    a = ap.parse_args(argv)
    if a.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    det = ", deterministic algorithms" if a.deterministic else ""
    print(f"\n### batch invariance ({name}, torch {torch.__version__}{det}, sdpa {a.sdpa})\n")
    print("| what | tokens_equal | first_diff |\n|---|---|---|")
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(SDPA[a.sdpa]()):
        rows = run(a.preset, a.device, a.dtype)
    for r in rows:
        print(f"| {r['what']} | {r['tokens_equal']} | {r['first_diff']} |", flush=True)
    return 0 if rows[0]["tokens_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
