"""Train the GPT (stage 1, stage 2, class-conditional, tiny) under DeepSpeed ZeRO.

    deepspeed [--hostfile ~/hostfile] jobs/train.py --config configs/train/stage1.yaml \
        run_dir=s3://b/runs/stage1 "data.shards=[s3://b/tokens/stage1-256]"  # b: your bucket
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port 29500 \
        jobs/train.py --config configs/train/tiny.yaml steps=50      # on CPU, gloo (the toy
        shards first: pipeline.train.toy_data.write_toy_token_shards("outputs/tokens/toy"))
    torchrun --nproc_per_node 2 jobs/train.py --config configs/train/tiny.yaml

``--resume auto`` (the default) continues from the newest complete checkpoint in the run dir;
``--resume X`` is the override ``resume=X`` where it stands (a later ``resume=`` wins).

SIGTERM or SIGUSR1 to the ranks (Slurm's preemption, time limit or ``--signal=USR1@600``
warning; by hand ``kill -TERM -- -PGID`` of the launcher's process group): every rank finishes
its step, they save that step's checkpoint and end with status 75 (``pipeline/train/stop.py``);
a rerun with ``--resume auto`` continues there. Ctrl-C still stops at once, without a save.

Every rank runs this file. A rank that fails ends at once (``os._exit``: no barrier, no exit
handlers that could hang on the other ranks, which the launcher then stops) after flushing its
logs: a config error with status 2, a missing file or missing S3 credentials with status 1, each
as one line; anything else with status 1 and the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline.cli import job_parser, parse_job, report_failure, run_main
from pipeline.log import flush_logging
from pipeline.train import engine
from pipeline.train.stop import EXIT_STOPPED, TrainingStopped
from pipeline.train.trainer import TrainConfig, train


def _resume_as_override(argv: list[str]) -> list[str]:
    """``--resume X`` (or ``--resume=X``) as the override ``resume=X`` in its place: overrides
    apply in order, so of ``--resume auto ... resume=step_N`` (a launch script's flag, then the
    user's override) the later one wins, as it does for any repeated override."""
    out, it = [], iter(argv)
    for a in it:
        if a == "--resume":
            value = next(it, None)
            if value is None or value.startswith("-"):
                raise SystemExit("train: --resume needs a value: auto, none or step_NNNNNNNN")
            out.append(f"resume={value}")
        elif a.startswith("--resume="):
            out.append(f"resume={a.removeprefix('--resume=')}")
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument(  # for --help only: _resume_as_override takes it first
        "--resume", default=None, help="auto (newest complete checkpoint), none, or step_NNNNNNNN"
    )
    argv = _resume_as_override(list(sys.argv[1:] if argv is None else argv))
    cfg, _ = parse_job(TrainConfig, __doc__.splitlines()[0], argv, parser=parser)
    try:
        train(cfg)
    except TrainingStopped as e:  # every rank, after the same step's checkpoint
        if int(os.environ.get("RANK", "0")) == 0:
            logging.getLogger("jobs.train").warning("%s", e)
        engine.shutdown(EXIT_STOPPED)
    except BaseException as e:  # noqa: BLE001 - this rank ends here whatever it was
        status = report_failure(e) if isinstance(e, Exception) else None
        if status is None:
            logging.getLogger("jobs.train").exception("training failed")
            status = 1
        flush_logging()
        # DeepSpeed's CPU all-reduce buffer (~66 MB of /dev/shm a rank) goes with the rank
        engine.remove_shm_buffers(os.environ.get("MASTER_PORT"), os.environ.get("RANK"))
        os._exit(status)  # the other ranks are stopped by the launcher
    engine.shutdown(0)


if __name__ == "__main__":
    run_main(main)
