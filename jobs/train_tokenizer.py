"""Train the VQ image tokenizer on raw img2dataset shards.

    python jobs/train_tokenizer.py --config configs/tokenizer/tiny.yaml data=DIR run_dir=DIR
    torchrun --nproc_per_node 8 jobs/train_tokenizer.py --config configs/tokenizer/vq16_256.yaml \
        data=s3://BUCKET/t2i/raw/laion-hq run_dir=s3://BUCKET/t2i/runs/vq16-256

Train on raw shards stored larger than the crops (raw/laion-hq: 512 px, written by
configs/data/download_hq.yaml); raw/laion-coco holds 256 px centre crops, which vq16_256.yaml's
max_scale 1.25 would enlarge: there set max_scale=1.0. The run warns when most crops are enlarged.

``--resume auto`` (default) continues from the newest complete checkpoint; ``none`` starts afresh
(refused where the run dir already has checkpoints); a step number resumes from that complete
checkpoint (refused if a newer one exists). SIGTERM or SIGUSR1 (a scheduler's preemption or time
limit; torchrun passes its SIGTERM on) stops every rank after the same step, with a checkpoint of
it: status 75, and a rerun continues there.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline.cli import job_parser, parse_job, run_main
from pipeline.log import flush_logging
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from pipeline.train.stop import EXIT_STOPPED, TrainingStopped


def main(argv: list[str] | None = None) -> None:
    parser = job_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--resume", default="auto", help="auto | none | STEP")
    cfg, args = parse_job(TokenizerTrainConfig, "", argv, parser=parser)
    try:
        train_tokenizer(cfg, resume=args.resume)
    except TrainingStopped as e:  # every rank, after the same step's checkpoint
        if int(os.environ.get("RANK", "0")) == 0:
            logging.getLogger("jobs.train_tokenizer").warning("%s", e)
        flush_logging()
        os._exit(EXIT_STOPPED)  # no gloo teardown (see below)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo under torch 2.14 sometimes aborts at interpreter exit after all work is done;
        # everything is written and synced here, so leave without the teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    run_main(main)
