"""Score stage: raw shards -> per-shard parquet of filter results and aesthetic scores.

    python jobs/score.py --config configs/data/score.yaml input=s3://b/raw/ output=s3://b/scores/
    ray job submit --working-dir . -- python jobs/score.py --config configs/data/score.yaml ... \
        aesthetic.clip_weights=s3://b/models/clip-vit-l-14/open_clip_pytorch_model.bin \
        aesthetic.head_weights=s3://b/models/aesthetic/sac+logos+ava1-l14-linearMSE.pth

On a cluster give the weights' URIs: the YAML's local ``models/...`` paths are not shipped by
``--working-dir .``.

Exit status 0 when every shard is scored, 3 when some failed (rerun the same command: scored
shards are skipped). A rerun into the same output with other filters or another aesthetic model
(or new weights at its URIs) is refused with an error naming what changed: score into a new
output folder instead.
"""

from __future__ import annotations

from pipeline.cli import parse_job, run_main
from pipeline.data.filter import ScoreConfig, run_score


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job(ScoreConfig, __doc__.splitlines()[0], argv)
    summary = run_score(cfg)
    return 3 if summary["failed_shards"] else 0


if __name__ == "__main__":
    run_main(main)
