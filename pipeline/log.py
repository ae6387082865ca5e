"""One logger per process: rank 0 logs at INFO by default, other ranks only warnings.

``get_logger(__name__)`` everywhere; ``setup_logging()`` once at the top of a job. Long work shows
a progress bar through ``progress(...)`` (tqdm, disabled off rank 0 and when not a terminal unless
``T2I_PROGRESS=1``).
"""

from __future__ import annotations

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
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
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


def setup_logging(level: str | int | None = None, all_ranks: bool = False) -> None:
    """Configure the root logger once: INFO on rank 0, WARNING elsewhere (unless ``all_ranks``)."""
    if level is None:
        level = os.environ.get("T2I_LOG_LEVEL", "INFO")
    if rank() != 0 and not all_ranks:
        level = "WARNING"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_t2i", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._t2i = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
