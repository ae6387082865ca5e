"""The shared command line of every job: ``--config FILE`` plus dotted ``key=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from pipeline.config import ConfigError, describe, load_config
from pipeline.log import setup_logging

C = TypeVar("C")


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        epilog="Any further arguments are dotted overrides, e.g. optim.lr_per_256=2e-4 data.batch_size=8.",
    )
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.add_argument("--show-config", action="store_true", help="list the config fields and exit")
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
    if args.show_config:
        print(f"{cls.__name__} fields:\n{describe(cls)}")
        raise SystemExit(0)
    bad = [o for o in overrides if o.startswith("-") and "=" not in o]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    setup_logging()
    try:
        cfg = load_config(cls, args.config, overrides)
    except ConfigError as e:
        p.exit(2, f"config error: {e}\n")
    return cfg, args


def run_main(fn: Any) -> None:
    """Call ``fn()`` and turn ConfigError into exit code 2 with the message."""
    try:
        fn()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
