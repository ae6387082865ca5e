"""The shared command line of every job: ``--config FILE`` plus dotted ``key=value`` overrides,
and :func:`run_main`, through which every job's ``__main__`` runs: the mistakes a person can fix
(a config error, a missing file, no S3 credentials) end in one line and an exit status instead
of a traceback (which goes to the DEBUG log: ``T2I_LOG_LEVEL=debug``)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from pipeline.config import ConfigError, describe, dump_config, load_config
from pipeline.errortext import InUseError
from pipeline.launch_env import LaunchError
from pipeline.log import get_logger, setup_logging
from pipeline.storage import BadURIError

C = TypeVar("C")

log = get_logger(__name__)

EXIT_STATUS = """\
exit status:
  0  success
  1  failure (a missing file, no S3 credentials, an unreachable endpoint, an error)
  2  config error (an unknown key, a wrong type, a missing required key), or a launcher's
     variables that do not describe a job (launch error)
  3  download, score, pretokenize: some shards failed (rerun the same command: done shards
     are skipped)"""

CREDENTIALS_HINT = (
    "set AWS_PROFILE (or the standard AWS credential environment variables), or run where an "
    "instance role (or a pod's IRSA role) grants S3 access"
)


# One command line per job for its --help, by the name of the config class the job parses (each
# job calls parse_job with it), as the lines it is printed on. The paths follow
# infra/S3_LAYOUT.md, each job reading what the one before it wrote; tests/test_cli.py loads
# every example's config and overrides.
_S3 = "s3://BUCKET/t2i"
_CLIP = f"{_S3}/models/clip-vit-l-14/open_clip_pytorch_model.bin"
_VQ = f"{_S3}/models/vq_ds16_t2i.pt"
JOB_EXAMPLES: dict[str, tuple[str, ...]] = {
    "DemoConfig": ("python jobs/demo.py --config configs/demo.yaml stage1_steps=1000",),
    "DownloadConfig": (
        "python jobs/download.py --config configs/data/download.yaml",
        f"input={_S3}/metadata/laion-coco/ output={_S3}/raw/laion-coco",
    ),
    "SelectHQConfig": (
        "python jobs/select_hq.py --config configs/data/select_hq.yaml",
        f"input={_S3}/raw/laion-coco scores={_S3}/scores/laion-coco",
        f"output={_S3}/metadata/laion-hq",
    ),
    "ScoreConfig": (
        "python jobs/score.py --config configs/data/score.yaml",
        f"input={_S3}/raw/laion-coco output={_S3}/scores/laion-coco",
        f"aesthetic.clip_weights={_CLIP}",
        f"aesthetic.head_weights={_S3}/models/aesthetic/sac+logos+ava1-l14-linearMSE.pth",
    ),
    "PretokenizeConfig": (
        "python jobs/pretokenize.py --config configs/data/pretokenize_stage1.yaml",
        f"input={_S3}/raw/laion-coco scores={_S3}/scores/laion-coco",
        f"output={_S3}/tokens/stage1-256",
        f"vq.uri={_VQ} text.uri={_S3}/models/flan-t5-xl",
    ),
    "TokenizerTrainConfig": (
        "torchrun --nproc_per_node 8 jobs/train_tokenizer.py",
        "--config configs/tokenizer/vq16_256.yaml",
        # raw/laion-hq (512 px, download_hq.yaml): raw/laion-coco's 256 px centre crops would
        # be enlarged by vq16_256.yaml's max_scale 1.25
        f"data={_S3}/raw/laion-hq run_dir={_S3}/runs/vq16-256",
    ),
    "TokenizerEvalConfig": (
        "python jobs/eval_tokenizer.py --config configs/tokenizer/eval.yaml",
        f"model={_S3}/runs/vq16-256/export data={_S3}/raw/laion-coco-val",
        f"output={_S3}/eval/vq16-256.json",
    ),
    "TrainConfig": (
        "deepspeed --hostfile ~/hostfile jobs/train.py --config configs/train/stage1.yaml",
        f'run_dir={_S3}/runs/stage1 "data.shards=[{_S3}/tokens/stage1-256]"',
    ),
    "SampleConfig": (
        "python jobs/sample.py --config configs/sample/t2i.yaml",
        f"checkpoint={_S3}/runs/stage2/export vq={_VQ} vq_preset=VQ-16",
        f"text_encoder={_S3}/models/flan-t5-xl output={_S3}/samples/stage2",
        'prompt="a red apple on a wooden table"',
    ),
    "EvalConfig": (
        "python jobs/evaluate.py --config configs/evaluate/coco.yaml",
        f"checkpoint={_S3}/runs/stage2/export vq={_VQ} vq_preset=VQ-16",
        f"text_encoder={_S3}/models/flan-t5-xl captions=coco_captions.txt",
        f"clip_weights={_CLIP} output={_S3}/eval/stage2",
    ),
    "HostfileConfig": (
        "python jobs/hostfile.py out=~/hostfile wait_for_gpus=32 deepspeed_env=~/.deepspeed_env",
    ),
}


def _epilog(example: Sequence[str] | None) -> str:
    head = ("example:\n  " + " \\\n      ".join(example) + "\n\n") if example else ""
    overrides = (
        "Any further arguments are dotted overrides: key=value, key.sub=value (--show-config\n"
        "lists the fields)."
    )
    return f"{head}{overrides}\n\n{EXIT_STATUS}"


def job_parser(description: str, example: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The shared parser; ``example`` (a command line, as the lines to print it on) heads the
    --help epilog. Left out, :func:`parse_job` fills in the job's own from ``JOB_EXAMPLES``."""
    p = argparse.ArgumentParser(
        description=description,
        epilog=_epilog(example),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.job_example = example  # type: ignore[attr-defined]  # parse_job: whether to fill it in
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.add_argument(
        "--show-config",
        action="store_true",
        help="list the config fields and exit; with --config or overrides, also print the "
        "resolved config",
    )
    # the deepspeed launcher appends --local_rank=N to every rank's command line; the rank's
    # place comes from the environment (pipeline.launch_env), so it is accepted and ignored
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_job(
    cls: type[C],
    description: str,
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> tuple[C, argparse.Namespace]:
    """Parse ``argv`` into (config, extra args); exits with a clear message on config errors.
    A parser from :func:`job_parser` without an example gets ``cls``'s from ``JOB_EXAMPLES``."""
    p = parser or job_parser(description)
    if getattr(p, "job_example", "") is None and cls.__name__ in JOB_EXAMPLES:
        p.job_example = JOB_EXAMPLES[cls.__name__]  # type: ignore[attr-defined]
        p.epilog = _epilog(p.job_example)  # type: ignore[attr-defined]
    args, overrides = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    bad = [o for o in overrides if o.startswith("-") and "=" not in o]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.show_config:
        resolved = args.config or overrides
        cfg = _load_or_exit(p, cls, args.config, overrides) if resolved else None
        print(f"{cls.__name__} fields (a dotted name is also an override: key.sub=value):")
        print(describe(cls))
        if cfg is not None:
            source = " ".join([*([args.config] if args.config else []), *overrides])
            print(f"\nresolved config ({source}):\n{dump_config(cfg)}", end="")
        raise SystemExit(0)
    setup_logging()
    return _load_or_exit(p, cls, args.config, overrides), args


def _load_or_exit(
    p: argparse.ArgumentParser, cls: type[C], path: str | None, overrides: Sequence[str]
) -> C:
    try:
        return load_config(cls, path, overrides)
    except ConfigError as e:
        p.exit(2, f"config error: {_one_line(e)}\n")


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(exc)).strip()


def _no_credentials(exc: BaseException | None) -> bool:
    """botocore's NoCredentialsError, raised or as the cause of what was raised."""
    try:
        from botocore.exceptions import NoCredentialsError
    except ImportError:  # no S3 support installed: nothing can have raised it
        return False
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NoCredentialsError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def report_failure(exc: BaseException) -> int | None:
    """For a mistake a person can fix: print one line to stderr, log the traceback at DEBUG and
    return the exit status (2: a config error, 1: the others). None for anything else."""
    if isinstance(exc, (ConfigError, BadURIError)):
        status, line = 2, f"config error: {_one_line(exc)}"
    elif isinstance(exc, LaunchError):
        status, line = 2, f"launch error: {_one_line(exc)}"
    elif isinstance(exc, InUseError):
        status, line = 1, f"error: {_one_line(exc)}"
    elif _no_credentials(exc):
        status, line = 1, f"error: no AWS credentials found ({_one_line(exc)}): {CREDENTIALS_HINT}"
    elif isinstance(exc, FileNotFoundError):
        status, line = 1, f"error: not found: {_one_line(exc)}"
    elif isinstance(exc, PermissionError):
        status, line = 1, f"error: permission denied: {_one_line(exc)}"
    elif isinstance(exc, ConnectionError):
        status, line = 1, f"error: cannot connect: {_one_line(exc)}"
    else:
        return None
    log.debug("the traceback of: %s", line, exc_info=exc)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return status


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run a job's ``main()`` and exit with its status (None: 0). A config error exits 2, a
    missing file, missing S3 credentials or an unreachable endpoint 1, each as one line on
    stderr; anything else raises as usual (a traceback, status 1)."""
    try:
        status = main()
    except Exception as e:  # noqa: BLE001 - classified by report_failure
        code = report_failure(e)
        if code is None:
            raise
        raise SystemExit(code) from None
    raise SystemExit(status or 0)
