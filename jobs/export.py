"""Export consolidated fp32 weights (safetensors + gpt_config.json) from a training checkpoint.

    python jobs/export.py --checkpoint s3://bucket/runs/stage1 --out s3://bucket/models/stage1
    python jobs/export.py --checkpoint outputs/train/tiny/checkpoints/step_00000050 --out out/

``--checkpoint`` is a run dir (its newest complete checkpoint is used) or one checkpoint folder.
Needs no process group: DeepSpeed's ZeRO consolidation runs in this one process.
"""

from __future__ import annotations

import argparse

from pipeline.log import setup_logging
from pipeline.train.checkpoint import export_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run dir or checkpoint folder (local/s3)")
    p.add_argument("--out", required=True, help="export folder (local or s3://)")
    args = p.parse_args(argv)
    setup_logging()
    export_checkpoint(args.checkpoint, args.out)


if __name__ == "__main__":
    main()
