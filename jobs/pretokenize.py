"""Pretokenize stage: raw shards (+ score parquets) -> token shards of VQ codes + T5 features.

    python jobs/pretokenize.py --config configs/data/pretokenize_stage1.yaml \
        input=s3://b/raw/ scores=s3://b/scores/ output=s3://b/tokens256/
    ray job submit --working-dir . -- python jobs/pretokenize.py \
        --config configs/data/pretokenize_stage2.yaml ...

Exit status 0 when every shard is done, 3 when some failed (rerun the same command: done shards
are skipped, the others redone from scratch).
"""

from __future__ import annotations

import sys

from pipeline.cli import parse_job
from pipeline.data.pretokenize import PretokenizeConfig, run_pretokenize


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job(PretokenizeConfig, __doc__.splitlines()[0], argv)
    manifest = run_pretokenize(cfg)
    return 3 if manifest["failed_shards"] else 0


if __name__ == "__main__":
    sys.exit(main())
