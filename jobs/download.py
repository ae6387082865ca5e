"""Download stage: metadata parquet -> raw WebDataset shards (img2dataset, Ray or one box).

    python jobs/download.py --config configs/data/download.yaml input=s3://b/laion-coco/ \
        output=s3://b/raw/
    ray job submit --working-dir . -- python jobs/download.py --config configs/data/download.yaml \
        distributor=ray ray_address=auto input=... output=...

Exit status 0 when every shard is done, 3 when some still failed (rerun the same command: done
shards are skipped).
"""

from __future__ import annotations

from pipeline.cli import parse_job, run_main
from pipeline.data.download import DownloadConfig, run_download


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job(DownloadConfig, __doc__.splitlines()[0], argv)
    result = run_download(cfg)
    return 3 if result.failed_shards else 0


if __name__ == "__main__":  # img2dataset's worker processes re-import this file
    run_main(main)
