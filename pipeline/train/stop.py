"""Stop a training run on request, with a checkpoint of the step it stopped at.

SIGTERM (a Slurm preemption or time limit, ``kill``) and SIGUSR1 (Slurm's
``--signal=USR1@600`` warning, or ``kill -USR1`` by hand) only set a flag here. They must reach
the ranks: Slurm signals every process of a job step; by hand, signal the launcher's process
group (``kill -TERM -- -PGID``) or the ranks, since the ``deepspeed`` command on one node ends
at a SIGTERM of its own and leaves its ranks running (its launch.py child passes a SIGTERM it
gets on to the ranks). The trainer all-reduces it with each step's loss (no collective of its own), so
every rank sees it after the same step: they save that step's checkpoint together and end with
:data:`EXIT_STOPPED`; ``--resume auto`` continues from there. The time between the signal and
the end is one step plus one checkpoint save (local write and upload): DeepSpeed's launch.py
kills its ranks 30 s after passing on SIGTERM, and Slurm after its ``KillWait`` (often 30 s), so
where a save takes longer ask for the warning earlier (``--signal=USR1@600``). SIGINT (Ctrl-C)
still ends the run at once, without a save.

DataLoader workers ignore both signals (:func:`ignore_in_worker`): the launcher and Slurm signal
every process of the rank, and a worker that died of it would end the rank with an error before
its save.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# sysexits' EX_TEMPFAIL ("try again later"): stopped on request with a checkpoint, not finished
EXIT_STOPPED = 75


class TrainingStopped(Exception):
    """Every rank stopped after ``step`` on a signal, with that step's checkpoint ``tag``."""

    def __init__(self, signame: str, step: int, tag: str) -> None:
        self.signame, self.step, self.tag = signame, step, tag
        super().__init__(
            f"stopped by {signame} after step {step} with checkpoint {tag}: run it again "
            "(--resume auto, the default) to continue"
        )


class StopRequest:
    """Turns :data:`STOP_SIGNALS` into :attr:`signame` from :meth:`install` to :meth:`restore`
    (or as a context; main thread only: elsewhere Python cannot install handlers, and nothing
    is installed)."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signame is None:
            self.signame = signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __enter__(self) -> StopRequest:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves stopping to its rank (it still ends
    when the rank does: torch's workers watch their parent)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
