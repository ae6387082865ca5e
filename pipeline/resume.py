"""The rule both checkpoint managers (GPT training, tokenizer training) apply before a run starts.

Each keeps the checkpoints with the highest step numbers. A run started afresh (``--resume
none``) in a run dir that already holds checkpoints, or resumed from an older step than the
newest there, would have its own checkpoints pruned as the oldest, and a later ``--resume auto``
would go back to the other run: its work would be lost. Such a start is refused, with what to do.
"""

from __future__ import annotations


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
