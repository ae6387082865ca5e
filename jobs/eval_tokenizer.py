"""Evaluate a VQ tokenizer (our export or a LlamaGen .pt) on raw shards: PSNR, SSIM, usage, rFID.

python jobs/eval_tokenizer.py --config configs/tokenizer/eval.yaml model=DIR data=DIR output=FILE.json
"""

from __future__ import annotations

from pipeline.cli import parse_job, run_main
from pipeline.tokenizer.evaluate import TokenizerEvalConfig, evaluate_tokenizer


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_job(TokenizerEvalConfig, __doc__.strip().splitlines()[0], argv)
    evaluate_tokenizer(cfg)


if __name__ == "__main__":
    run_main(main)
