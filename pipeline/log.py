"""One logger per process: rank 0 logs at INFO by default, other ranks only warnings.

``get_logger(__name__)`` everywhere; ``setup_logging()`` once at the top of a job. Long work shows
a progress bar through ``progress(...)`` (tqdm, disabled off rank 0 and when not a terminal unless
``T2I_PROGRESS=1``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_FORMAT = "%(asctime)s %(levelname).1s [%(name)s%(rank)s] %(message)s"


def rank() -> int:
    """This process's global rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        r = rank()
        record.rank = (
            f" r{r}" if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        )
        return True


def _level(level: str | int) -> tuple[int, str | None]:
    """A logging level from a number or a name in any case (``debug``, ``Info``); INFO and a
    warning for a name logging does not know."""
    if isinstance(level, int):
        return level, None
    name = level.strip().upper()
    if name.isdigit():
        return int(name), None
    number = logging.getLevelName(name)  # the number for a known name
    if isinstance(number, int):
        return number, None
    return logging.INFO, f"unknown log level {level!r} (T2I_LOG_LEVEL?): using INFO"


def setup_logging(level: str | int | None = None, all_ranks: bool = False) -> None:
    """Configure the root logger once: INFO on rank 0, WARNING elsewhere (unless ``all_ranks``).
    ``level`` (default ``$T2I_LOG_LEVEL``) is a name in any case or a number."""
    if level is None:
        level = os.environ.get("T2I_LOG_LEVEL", "INFO")
    number, problem = _level(level)
    if rank() != 0 and not all_ranks:
        number = logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_t2i", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._t2i = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(number)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if problem:
        logging.getLogger(__name__).warning(problem)


def flush_logging() -> None:
    """Flush every log handler and the standard streams (before ``os._exit``, which skips it)."""
    for stream in [*logging.getLogger().handlers, sys.stdout, sys.stderr]:
        with contextlib.suppress(Exception):  # a closed stream must not stop the exit
            stream.flush()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def progress(
    it: Iterable[T], desc: str, total: int | None = None, unit: str = "it", initial: int = 0
) -> Iterator[T]:
    """A tqdm bar on rank 0 (to stderr); plain iteration elsewhere. ``initial``: items done
    before (a resumed run's bar starts where the run is)."""
    enabled = rank() == 0 and (sys.stderr.isatty() or os.environ.get("T2I_PROGRESS") == "1")
    yield from tqdm(
        it,
        desc=desc,
        total=total,
        unit=unit,
        initial=initial,
        disable=not enabled,
        dynamic_ncols=True,
    )
