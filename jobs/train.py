"""Train the GPT (stage 1, stage 2, class-conditional, tiny) under DeepSpeed ZeRO.

    deepspeed [--hostfile ~/hostfile] jobs/train.py --config configs/train/stage1.yaml
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port 29500 \
        jobs/train.py --config configs/train/tiny.yaml steps=50      # on CPU, gloo
    torchrun --nproc_per_node 2 jobs/train.py --config configs/train/tiny.yaml

``--resume auto`` (the default) continues from the newest complete checkpoint in the run dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from pipeline.cli import job_parser, parse_job
from pipeline.train import engine
from pipeline.train.trainer import TrainConfig, train


def main(argv: list[str] | None = None) -> None:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--resume", default=None, help="auto (newest complete checkpoint), none, or step_NNNNNNNN"
    )
    cfg, args = parse_job(TrainConfig, __doc__.splitlines()[0], argv, parser=parser)
    if args.resume is not None:
        cfg = dataclasses.replace(cfg, resume=args.resume)
    try:
        train(cfg)
    except BaseException:
        logging.getLogger("jobs.train").exception("training failed")
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stderr.flush()
        os._exit(1)  # the other ranks are stopped by the launcher
    engine.shutdown(0)


if __name__ == "__main__":
    main()
