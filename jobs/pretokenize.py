"""Pretokenize stage: raw shards (+ score parquets) -> token shards of VQ codes + T5 features.

    python jobs/pretokenize.py --config configs/data/pretokenize_stage1.yaml \
        input=s3://b/raw/ scores=s3://b/scores/ output=s3://b/tokens256/
    ray job submit --working-dir . -- python jobs/pretokenize.py \
        --config configs/data/pretokenize_stage2.yaml ... \
        vq.uri=s3://b/models/vq_ds16_t2i.pt text.uri=s3://b/models/flan-t5-xl

On a cluster give the model URIs: the YAML's local ``models/...`` paths are not shipped by
``--working-dir .``.

Exit status 0 when every shard is done, 3 when some failed (rerun the same command: done shards
are skipped, the others redone from scratch; a done shard whose raw shard or score parquet has
changed since is redone, one whose raw shard is gone removed). Raw shards without a score parquet yet are not
failures: they are left for a later run, listed in the manifest (``unscored_shards``; those whose
parquet scored an earlier download of the shard also in ``stale_score_shards``) and named in a
warning on stderr; the exit status stays 0.
"""

from __future__ import annotations

import sys

from pipeline.cli import parse_job, run_main
from pipeline.data.pretokenize import PretokenizeConfig, run_pretokenize


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job(PretokenizeConfig, __doc__.splitlines()[0], argv)
    manifest = run_pretokenize(cfg)
    unscored = manifest["unscored_shards"]
    if unscored:
        print(
            f"WARNING: {len(unscored)} raw shards under {cfg.input} have no score parquet in "
            f"{cfg.scores} (or one of an earlier download of the shard: "
            f"{len(manifest.get('stale_score_shards', []))}) and were NOT pretokenized: "
            f"{unscored[:20]}"
            f"{' ...' if len(unscored) > 20 else ''}. Score them, then rerun this command.",
            file=sys.stderr,
        )
    return 3 if manifest["failed_shards"] else 0


if __name__ == "__main__":
    run_main(main)
