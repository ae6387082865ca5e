"""Exception text for logs and reports: the whole chain of causes, short enough for one line
or one manifest entry (the executor's failure messages), and which errors break a process."""

from __future__ import annotations

import re
import traceback


class InUseError(RuntimeError):
    """An output another run is writing into now: the CLI says so in one line (status 1)."""


# Errors after which a process's CUDA context (or NCCL communicator) stays broken: every later
# kernel fails too, so the actor would burn the retries of every unit it is given.
_STICKY = re.compile(
    r"CUDA error|device-side assert|illegal memory access|CUBLAS_STATUS_|CUDNN_STATUS_|"
    r"cuDNN error|NCCL error|uncorrectable ECC"
)


def poisons_process(text: str) -> bool:
    return bool(_STICKY.search(text))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the "ray::Actor.method()" header lines
# Python's lines between the exceptions of a chain
_SEPARATOR = re.compile(
    r"^(The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)$",
    re.MULTILINE,
)
# the line a traceback starts with (Ray's names the actor method and its process)
_HEADER = re.compile(r"Traceback \(most recent call last\):|ray::\S+\(\) \(pid=")


def message(exc: BaseException) -> str:
    """The text of ``exc``: for a Ray task error, the remote traceback with its whole chain."""
    text = str(exc) or "".join(traceback.format_exception_only(type(exc), exc))
    return _ANSI.sub("", text)


def _fit(parts: list[str], limit: int) -> list[str]:
    """``parts`` cut in their middles, each to its share of ``limit`` characters."""
    share = max(200, limit // max(1, len(parts)))
    return [p if len(p) <= share else p[: share // 2] + " ... " + p[-share // 2 :] for p in parts]


def short(exc: BaseException, limit: int = 2000) -> str:
    """The message of ``exc`` for a log line or a report, within about ``limit`` characters:
    past it, the frames of its tracebacks go first (each run of indented lines becomes "  ...");
    the exception lines of every link of the chain stay. Past it still (a message carrying a C++
    backtrace), each exception of the chain is cut in its middle to its share."""
    text = message(exc)
    if len(text) <= limit:
        return text
    lines: list[str] = []
    for line in text.splitlines():
        if not line[:1].isspace():
            lines.append(line)
        elif not lines or lines[-1] != "  ...":
            lines.append("  ...")
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    pieces = _SEPARATOR.split(text)  # exception, separator, exception, ...
    blocks = _fit(pieces[::2], limit - sum(len(p) for p in pieces[1::2]))
    pieces[::2] = blocks
    return "".join(pieces)


def _exception_line(block: str) -> str:
    """The first line of the exception in ``block`` (one exception of a traceback's chain): the
    first line after its frames, or the first that is no header where it has none."""
    lines = block.strip("\n").splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    rest = lines[frames[-1] + 1 :] if frames else lines
    for line in rest:
        if line.strip() and not line[:1].isspace() and not _HEADER.match(line):
            return line
    return lines[-1] if lines else ""


def summary(exc: BaseException) -> str:
    """One line: the exceptions of ``exc``'s chain (for a Ray error, as its text shows them),
    the last raised first, "X <- caused by Y"."""
    blocks = _SEPARATOR.split(message(exc))[::2]
    return " <- caused by ".join(_exception_line(b) for b in reversed(blocks))


def chain(exc: BaseException, limit: int = 2000) -> str:
    """``exc`` and what caused it, "X <- caused by Y" (``__cause__``, or the exception being
    handled when it was raised), within about ``limit`` characters."""
    links, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        links.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    text = " <- caused by ".join(links)
    return text if len(text) <= limit else " <- caused by ".join(_fit(links, limit))


def carried_error(exc: BaseException) -> BaseException:
    """What ``make_worker`` raised in an actor, from the Ray error that carries it (the Ray
    error itself when it carries none: the process died)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
