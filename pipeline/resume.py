"""What GPT training and tokenizer training decide once, on rank 0, before a run starts.

:func:`decided_on_rank0` runs such a decision (which checkpoint to resume, which shards to read)
on rank 0 and gives every rank its answer, or its error. :func:`resume_conflict` is the rule
both checkpoint managers apply: each keeps the checkpoints with the highest step numbers. A run started afresh (``--resume
none``) in a run dir that already holds checkpoints, or resumed from an older step than the
newest there, would have its own checkpoints pruned as the oldest, and a later ``--resume auto``
would go back to the other run: its work would be lost. Such a start is refused, with what to do.
:func:`fsync` is what both managers call before a completion marker: the files it names must be
on disk first, or a power loss could leave a marker that points at truncated files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def decided_on_rank0(is_main: bool, broadcast: Callable[[Any], Any], decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its answer given to every rank through ``broadcast``
    (the job's broadcast-from-rank-0). An error it raises is raised on every rank: raised on rank
    0 alone, it would leave the others waiting in the broadcast until the collective timeout."""
    answer, error = None, None
    if is_main:
        try:
            answer = decide()
        except Exception as exc:  # noqa: BLE001 - handed to every rank and raised there
            error = exc
    answer, error = broadcast((answer, error))
    if error is not None:
        raise error
    return answer


def resume_conflict(resume: str, chosen: int | None, newest: int | None, where: str) -> str | None:
    """Why starting as asked would lose work, or None.

    ``resume``: ``auto``, ``none`` or an explicit step; ``chosen``: the step it resolved to
    (None: a fresh start); ``newest``: the newest complete checkpoint in ``where``."""
    if newest is None:
        return None
    if resume == "none":
        return (
            f"{where} already has checkpoints (newest: step {newest}); a fresh run there would "
            "mix two runs, and keeping the newest checkpoints would delete the new run's. "
            "Resume it (--resume auto), or give another run_dir (or remove those checkpoints)"
        )
    if chosen is not None and chosen < newest:
        return (
            f"asked to resume from step {chosen}, but {where} has a newer checkpoint (step "
            f"{newest}): the resumed run's checkpoints would be deleted as the oldest, and "
            f"--resume auto would go back to step {newest}. Move the newer checkpoints to "
            "another folder first"
        )
    return None


def fsync(path: str) -> None:
    """Put a local file's data (or a directory's entries: a rename or a new file in it) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
