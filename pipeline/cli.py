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
from pipeline.launch_env import LaunchError
from pipeline.log import get_logger, setup_logging

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


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        epilog="Any further arguments are dotted overrides, e.g. optim.lr_per_256=2e-4 "
        f"data.batch_size=8.\n\n{EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    """Parse ``argv`` into (config, extra args); exits with a clear message on config errors."""
    p = parser or job_parser(description)
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
    if isinstance(exc, ConfigError):
        status, line = 2, f"config error: {_one_line(exc)}"
    elif isinstance(exc, LaunchError):
        status, line = 2, f"launch error: {_one_line(exc)}"
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
