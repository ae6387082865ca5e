"""Where a data job's workers write, as its driver sees it: local paths under ``ray job submit``
(each process starts in its own node's temporary copy of the package), and a unit's output that
the driver cannot see (workers writing to their own node's disk)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.errortext import chain

# How long a done marker a unit reported written may take to appear to the driver before it
# counts as not visible: an NFS client caches a folder's entries for up to a minute (acdirmax)
VISIBLE_WAIT_S = 60.0
# Set by Ray's job supervisor (2.x) in the environment of a `ray job submit` entrypoint: the job's
# runtime_env (its working_dir) and metadata (job_submission_id). RAY_JOB_ID is not set there
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_submission() -> str | None:
    """The submission id when this process runs under ``ray job submit`` (``"unknown"`` when Ray
    gives none), else None."""
    raw = os.environ.get(RAY_JOB_ENV)
    if raw is None:
        return None
    try:
        return str(json.loads(raw)["metadata"]["job_submission_id"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


def check_paths_for_ray_job(locations: Mapping[str, str | None]) -> None:
    """Under ``ray job submit``, refuse the relative local paths among ``locations`` (config
    field -> path or URI; None: unset): every process of the job, this driver and each actor,
    starts in its own node's temporary copy of the uploaded package, so each would read and
    write a folder of its own there, which Ray deletes after the job."""
    if ray_job_submission() is None:
        return
    relative = [
        f"{name}={where!r}"
        for name, where in locations.items()
        if where and not storage.is_remote(where) and not os.path.isabs(storage.normalize(where))
    ]
    if relative:
        raise ConfigError(
            f"{', '.join(relative)}: a relative local path under `ray job submit`, where the "
            "working directory is Ray's temporary copy of the package on each node (here "
            f"{os.getcwd()}, deleted after the job): the workers would write their results into "
            "their own node's copy and this driver would not see them. Use s3://... or an "
            "absolute path on a file system every node mounts"
        )


class OutputNotVisibleError(FileNotFoundError):
    """Units reported success, but the driver does not see what they wrote: the workers write
    to their own node's disk."""


# why a worker's output may not reach the driver, and what to do, for a message
NOT_VISIBLE_HINT = (
    "the workers likely write to their own node's disk (a relative path, or a local path on "
    "nodes that share no file system): use s3://... or a file system every node mounts"
)


def as_seen_here(uri: str) -> str:
    """``uri`` for a message, with the absolute path this process resolves a relative one to."""
    if storage.is_remote(uri) or os.path.isabs(storage.normalize(uri)):
        return uri
    return f"{uri} ({os.path.abspath(storage.normalize(uri))})"


def appears(is_there: Callable[[], bool]) -> bool:
    """Whether ``is_there()`` holds now or within ``VISIBLE_WAIT_S`` (one call when it does)."""
    deadline = time.monotonic() + VISIBLE_WAIT_S
    delay = 0.5
    while not is_there():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))  # a cached listing expiring: nothing to wait on
        delay *= 2
    return True


class OutputCheck:
    """Whether a unit that reported success left its done marker where the driver sees it."""

    def __init__(self, done_marker: Callable[[int], str] | None, desc: str) -> None:
        self.done_marker, self.desc = done_marker, desc
        self.seen = False  # a unit's output has been seen: the workers write where we read

    def __call__(self, unit: int) -> str | None:
        """None when ``unit``'s done marker is visible, else why not (a failed attempt); raises
        :class:`OutputNotVisibleError` while no unit's has been seen: every unit would be lost
        the same way, so the run stops at the first one instead of in hours."""
        if self.done_marker is None:
            return None
        uri = self.done_marker(unit)
        try:
            if appears(lambda: storage.exists(uri)):
                self.seen = True
                return None
        except Exception as exc:  # noqa: BLE001 - a store error: this attempt, not the run
            return f"its done marker {uri} could not be checked: {chain(exc)}"
        why = (
            f"unit {unit} reported success, but its done marker {as_seen_here(uri)} is not there "
            f"as this driver sees it (after {VISIBLE_WAIT_S:.0f}s): {NOT_VISIBLE_HINT}"
        )
        if not self.seen:
            raise OutputNotVisibleError(f"{self.desc}: {why}; stopped at the first unit")
        return why
