"""Stage-2 metadata: stage 1's kept, high-aesthetic, large samples -> metadata parquet.

    python jobs/select_hq.py --config configs/data/select_hq.yaml \
        input=s3://b/raw/laion-coco scores=s3://b/scores/laion-coco \
        output=s3://b/metadata/laion-hq

Reads stage 1's score parquets and raw shards' parquets (no image), writes
``part-NNNNN.parquet`` files plus ``_select_hq_summary.json`` (written last) under ``output``;
the stage-2 download then takes that folder as its input:

    python jobs/download.py --config configs/data/download_hq.yaml \
        input=s3://b/metadata/laion-hq/ output=s3://b/raw/laion-hq

Run the download after this job has exited 0. A rerun over the same inputs writes nothing
again; one into a folder selected with other settings is refused (exit 2): use a new folder.
"""

from __future__ import annotations

from pipeline.cli import parse_job, run_main
from pipeline.data.select_hq import SelectHQConfig, run_select_hq


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job(SelectHQConfig, __doc__.splitlines()[0], argv)
    run_select_hq(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
