"""The download stage: metadata -> raw WebDataset shards, through img2dataset 1.47.

``run_download(cfg)`` does, each step resumable:

1. metadata -> work units (``pipeline.data.metadata``) in ``{output}/_meta/units/``;
2. the private-address guard (``pipeline.data.netguard``) -> img2dataset's input in
   ``{output}/_meta/input/``. A refused row stays in its unit with its URL rewritten to
   ``t2i-refused-<reason>:<url>``: urllib fails it at once with no network traffic, the shard's
   parquet keeps the row and its reason, and unit i stays shard i. In the workers the same
   policy is applied again at connect time (redirects, DNS rebinding);
3. img2dataset (``distributor`` multiprocessing on one box, ray on a cluster; both run through
   our distributors in ``img2dataset_guards``, which end a pass only when no task can still be
   writing) writes ``00000.tar`` + ``00000.parquet`` + ``00000_stats.json`` per unit into
   ``{output}``;
4. shards without ``_stats.json`` (a worker died, or a shard failed as a whole) get their partial
   files removed and are run again, up to ``shard_retry_rounds`` times; the rest are reported.
   With ``distributor: ray``, shards whose task reported success but whose ``_stats.json`` this
   driver does not see mean the workers write to their own node's disk: when none of a run's
   is seen, the run stops there (``OutputNotVisibleError``) instead of retrying in vain;
5. per-shard stats are summed into ``{output}/_meta/download_stats.json`` with counts per reason,
   next to the resolved ``download_config.yaml``.

Nothing but img2dataset's own files goes at the top of ``{output}``: its incremental mode parses
every ``*.json`` there as a shard number.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import scratch, storage
from pipeline.cluster_paths import (
    NOT_VISIBLE_HINT,
    RAY_JOB_ENV,
    OutputNotVisibleError,
    appears,
    as_seen_here,
    check_paths_for_ray_job,
    ray_job_submission,
)
from pipeline.config import doc, save_config, to_dict
from pipeline.data.metadata import (
    SHARD_DIGITS,
    MetadataConfig,
    prepare_units,
    units_fingerprint,
)
from pipeline.data.netguard import AddressGuard
from pipeline.data.shards import RAW_STATS_SUFFIX, read_raw_stats
from pipeline.errortext import InUseError
from pipeline.log import get_logger, progress

log = get_logger(__name__)

REFUSED_PREFIX = "t2i-refused-"
# img2dataset's defaults, and "none" (X-Robots-Tag's "noindex, nofollow" in one word)
DEFAULT_OPT_OUT = ["noai", "noimageai", "noindex", "noimageindex", "none"]
# settings that change what a finished shard holds: a resumed run must use the same ones
SHARD_SHAPING = (
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "min_image_size",
    "max_aspect_ratio",
    "max_image_pixels",
    "encode_format",
    "encode_quality",
    "compute_hash",
    "extract_exif",
    # the opt-out check: shards made with and without it must not mix
    "user_agent_token",
    "disallowed_header_directives",
)


@dataclass(frozen=True)
class DownloadConfig:
    """Everything the download stage needs; saved beside its output."""

    input: str = doc("metadata parquet: a file, a folder or a glob; local or s3://")
    output: str = doc("raw shard folder, local or s3://")
    metadata: MetadataConfig = doc("columns, de-duplication and unit size", MetadataConfig())
    distributor: Literal["multiprocessing", "ray"] = doc(
        "multiprocessing for one box, ray for a cluster", "multiprocessing"
    )
    ray_address: str | None = doc(
        "Ray cluster to join ('auto' on a cluster node); unset: $RAY_ADDRESS, else a local Ray",
        None,
    )
    processes: int = doc("worker processes (multiprocessing; CPUs of a local Ray)", 2)
    threads: int = doc("download threads per process", 64)
    image_size: int = doc("target size in pixels (see resize_mode)", 256)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = doc(
        "img2dataset resize mode", "center_crop"
    )
    resize_only_if_bigger: bool = doc("never upscale", False)
    min_image_size: int = doc("drop images whose shorter side is smaller (pixels)", 64)
    max_aspect_ratio: float = doc("drop images more elongated than this", 3.0)
    max_image_pixels: int = doc(
        "decompression-bomb guard: refuse images whose header claims more pixels", 100_000_000
    )
    encode_format: Literal["jpg", "png", "webp"] = doc("image format in the shards", "jpg")
    encode_quality: int = doc("JPEG/WebP quality (PNG: compression 0-9)", 95)
    timeout_s: int = doc("per-request timeout in seconds", 10)
    image_deadline_s: float | None = doc(
        "most seconds one image's download may take in all, redirects and body included "
        "(timeout_s bounds each read only: a server sending a byte now and then is cut here, "
        "counted too_slow); unset: 3 x timeout_s",
        None,
    )
    max_image_bytes: int = doc(
        "largest image body fetched, in bytes; a larger one is cut off, counted too_large",
        32 << 20,
    )
    retries: int = doc("extra attempts per URL", 0)
    shard_retry_rounds: int = doc("reruns of shards that failed as a whole", 3)
    user_agent_token: str | None = doc(
        "token added to the User-Agent; X-Robots-Tag directives aimed at it are honoured",
        "img2dataset",
    )
    disallowed_header_directives: list[str] = doc(
        "X-Robots-Tag directives that forbid use of an image (opt-out); [] disables the check",
        DEFAULT_OPT_OUT,
    )
    allow_private_addresses: bool = doc(
        "fetch from private/loopback/link-local/reserved addresses (never in production)", False
    )
    allow_loopback: bool = doc("fetch from 127.0.0.0/8 and ::1 only (tests, the local demo)", False)
    dns_threads: int = doc("concurrent DNS lookups of the address guard", 32)
    compute_hash: Literal["md5", "sha256", "sha512"] | None = doc(
        "hash of the original bytes stored per sample", "sha256"
    )
    extract_exif: bool = doc("store EXIF in each sample's json (slower)", False)
    overwrite: bool = doc(
        "delete an output made from other metadata or with other shard settings (instead of "
        "refusing it); one made with these is continued",
        False,
    )
    tmp_dir: str | None = doc(
        "scratch folder for img2dataset (TMPDIR); default: a new temp dir", None
    )

    def __post_init__(self) -> None:
        positive = ("processes", "threads", "image_size", "timeout_s", "max_image_pixels")
        for name in (*positive, "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_deadline_s is not None and not self.image_deadline_s > 0:
            raise ValueError(f"image_deadline_s must be > 0, got {self.image_deadline_s}")
        if self.shard_retry_rounds < 0 or self.retries < 0:
            raise ValueError("shard_retry_rounds and retries must be >= 0")


@dataclass
class DownloadResult:
    """What a run achieved; ``failed_shards`` empty means every unit has a finished shard."""

    output: str
    shards_total: int
    shards_done: int
    failed_shards: list[int]
    stats: dict[str, Any] = field(repr=False)


# --- paths ---------------------------------------------------------------------------------------


def shard_name(i: int) -> str:
    return f"{i:0{SHARD_DIGITS}d}"


def meta_dir(output: str) -> str:
    return storage.join(output, "_meta")


def done_shards(output: str) -> set[int]:
    """Shard ids whose ``_stats.json`` exists (img2dataset's done marker)."""
    out = set()
    for name in storage.list_dir(output, "_stats.json"):
        head = name.split("_", 1)[0]
        if head.isdigit():
            out.add(int(head))
    return out


# what img2dataset writes per shard (webdataset output): the tar and the parquet, then the stats
SHARD_FILES = (".tar", ".parquet")


def incomplete_shards(output: str) -> dict[int, list[str]]:
    """Shards with a ``_stats.json`` (img2dataset's done marker, written last) but without
    their tar or parquet, with the names of the files they lack. img2dataset never leaves one
    (a kill before the stats file leaves no marker); a second run into the same output, or a
    hand, can: such a shard is not done (score would skip it, select_hq would lose its rows)."""
    names = set(storage.list_dir(output))
    out = {}
    for n in names:
        stem = n[: -len(RAW_STATS_SUFFIX)]
        if n.endswith(RAW_STATS_SUFFIX) and stem.isdigit():
            lacking = [stem + s for s in SHARD_FILES if stem + s not in names]
            if lacking:
                out[int(stem)] = lacking
    return dict(sorted(out.items()))


def _redo_incomplete(output: str, read: dict[int, dict[str, Any]], redone: set[int]) -> None:
    """Remove the done marker (and what is left of the shard) of each of
    :func:`incomplete_shards`, so that it counts as missing and is downloaded again in this run;
    ``redone`` gathers them, ``read`` forgets their stats."""
    bad = incomplete_shards(output)
    if not bad:
        return
    log.warning(
        "download: %d shards have a stats file but lack their data (%s): not done; their stats "
        "files are removed and they are downloaded again in this run. Another download run into "
        "%s at the same time (or a hand) removes files so",
        len(bad),
        "; ".join(f"{shard_name(i)}{RAW_STATS_SUFFIX} without {', '.join(v)}" for i, v in
                  list(bad.items())[:20]),
        output,
    )  # fmt: skip
    for i in bad:
        storage.remove(storage.join(output, f"{shard_name(i)}{RAW_STATS_SUFFIX}"))
        _remove_partial(output, i)
        read.pop(i, None)
        redone.add(i)


# --- one run at a time ----------------------------------------------------------------------------

LEASE_NAME = "run_lease.json"  # in {output}/_meta/
LEASE_HEARTBEAT_S = 30.0  # how often a run refreshes its lease
# a lease not refreshed for this long is a dead run's (three missed refreshes and a margin for a
# slow store), and is taken over
LEASE_STALE_S = 3 * LEASE_HEARTBEAT_S + 60.0
_held_leases: set[str] = set()  # the run ids of the leases this process holds now


class OutputInUseError(InUseError):
    """Another download run is writing into the same output."""


def lease_uri(output: str) -> str:
    return storage.join(meta_dir(output), LEASE_NAME)


def _holder_is_dead(lease: dict[str, Any]) -> bool:
    """Whether ``lease`` is that of a process of this host and PID namespace that is gone (its
    PIDs mean nothing elsewhere), or of this process but no run of it holds it any more."""
    pid = lease.get("pid")
    if lease.get("owner") != scratch._owner() or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return lease.get("run_id") not in _held_leases
    return not scratch._alive(pid)


def _ago(t: Any, now: float) -> str:
    try:
        s = max(0, int(now - float(t)))
    except (TypeError, ValueError):
        return "an unknown time"
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h{s % 3600 // 60}m"


def _describe(lease: dict[str, Any], now: float) -> str:
    job = lease.get("ray_job")
    return (
        f"run {lease.get('run_id')} (host {lease.get('host')}, pid {lease.get('pid')}"
        + (f", Ray job {job}" if job else "")
        + f", started {_ago(lease.get('started'), now)} ago, lease refreshed "
        f"{_ago(lease.get('heartbeat'), now)} ago)"
    )


class RunLease:
    """The output's ``_meta/run_lease.json``: which run is writing into it. Two download runs
    into one output (a ``ray job submit`` sent again after Ctrl-C, which leaves the job running)
    delete each other's shards: a retry round removes what it takes for a failed shard's
    partial files, which is the other run's shard being written. ``acquire`` refuses a second
    run while a lease is refreshed (a daemon thread rewrites it every ``LEASE_HEARTBEAT_S``),
    and takes over one not refreshed for ``LEASE_STALE_S`` (a dead run's) or one of a dead
    process of this host; ``release`` removes it. Works on a local path and on ``s3://``.

    Two runs starting in the same second both write their lease; each reads it back a moment
    later and the one that does not find its own stops. A run whose lease another took over
    (it looked dead) finds out at its next refresh and stops at its next :meth:`check`."""

    def __init__(self, output: str) -> None:
        self.uri = lease_uri(output)
        self.output = output
        self.run_id = f"{scratch._host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.record: dict[str, Any] = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "owner": scratch._owner(),  # host and PID namespace: where the PID means something
            "ray_job": ray_job_submission(),
            "command": " ".join(sys.argv)[:1000],
        }
        self.lost: str | None = None  # why this run's lease is no longer its own
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        """The lease there now; None when there is none. One that does not read (written by
        something else) counts as a dead run's."""
        try:
            data = storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(data)
        except ValueError:
            lease = None
        if not isinstance(lease, dict):
            log.warning("download: %s does not read as a run lease: a dead run's", self.uri)
            return {"heartbeat": 0}
        return lease

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        storage.write_json(self.uri, self.record)

    def acquire(self) -> None:
        now = time.time()
        held = self._read()
        if held is not None and held.get("run_id") != self.run_id:
            age = now - float(held.get("heartbeat") or 0)
            if _holder_is_dead(held):
                log.warning(
                    "download: taking over the lease of %s: its process is gone",
                    _describe(held, now),
                )
            elif age < LEASE_STALE_S:
                job = held.get("ray_job")
                stop = f"`ray job stop {job}`" if job and job != "unknown" else None
                stop = stop or f"end process {held.get('pid')} on {held.get('host')}"
                raise OutputInUseError(
                    f"download: {self.output} is being written by another download "
                    f"{_describe(held, now)}; two runs into one output delete each other's "
                    f"shards. Wait for it to end, or stop it ({stop}). If that run is dead, "
                    f"remove {self.uri} (or rerun once the lease has not been refreshed for "
                    f"{int(LEASE_STALE_S)}s: it is then taken over)"
                )
            else:
                log.warning(
                    "download: taking over the lease of %s: not refreshed for %ds, that run is "
                    "taken for dead",
                    _describe(held, now),
                    int(age),
                )
        self.record["started"] = now
        self._write()
        _held_leases.add(self.run_id)
        time.sleep(2.0 if storage.is_remote(self.uri) else 0.2)  # a run started with this one
        held = self._read()
        if held is None or held.get("run_id") != self.run_id:
            _held_leases.discard(self.run_id)
            raise OutputInUseError(
                f"download: another download run into {self.output} started at the same time "
                f"and holds its lease now: {_describe(held or {}, time.time())}"
            )
        self._thread = threading.Thread(target=self._beat, name="download-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                held = self._read()
                if held is not None and held.get("run_id") != self.run_id:
                    self.lost = (
                        f"download: the lease of {self.output} was taken over by "
                        f"{_describe(held, time.time())} (this run looked dead to it: no refresh "
                        f"for {int(LEASE_STALE_S)}s); this run stops so as not to delete its shards"
                    )
                    log.error("%s", self.lost)
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next refresh may pass
                log.warning("download: could not refresh the run lease %s: %s", self.uri, e)

    def check(self) -> None:
        """Raise if another run took this run's lease over."""
        if self.lost:
            raise OutputInUseError(self.lost)

    def release(self) -> None:
        """Stop refreshing and remove the lease, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        _held_leases.discard(self.run_id)
        try:
            held = self._read()
            if held is not None and held.get("run_id") == self.run_id:
                storage.remove(self.uri)
        except Exception as e:  # noqa: BLE001 - never hides the run's own outcome
            log.warning("download: could not remove the run lease %s: %s", self.uri, e)


# --- the address guard ---------------------------------------------------------------------------


def refused_url(reason: str, url: str) -> str:
    """A URL urllib rejects at once ("unknown url type") that still names the original."""
    return f"{REFUSED_PREFIX}{reason.replace('_', '-')}:{url}"


# what the address guard decides by: a change re-checks the units not yet downloaded
GUARD_SETTINGS = ("allow_loopback", "allow_private_addresses")


def guard_units(
    units_dir: str, input_dir: str, unit_names: list[str], guard: AddressGuard
) -> Counter:
    """Write img2dataset's input for each unit not yet guarded; returns refusal counts."""
    counts: Counter = Counter()
    have = set(storage.list_dir(input_dir, ".parquet"))
    todo = [n for n in unit_names if n not in have]  # earlier decisions are kept as they are
    for name in progress(todo, desc="address guard", unit="unit"):
        with storage.open_read(storage.join(units_dir, name)) as f:
            table = pq.read_table(f)
        urls = table.column("url").to_pylist()
        reasons = guard.check_many(urls)
        new_urls = [u if r is None else refused_url(r, u) for u, r in zip(urls, reasons)]
        for r in reasons:
            counts[r or "allowed"] += 1
        table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(new_urls))
        with storage.open_write(storage.join(input_dir, name)) as f:
            pq.write_table(table, f)
    return counts


# --- img2dataset -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _img2dataset_env(cfg: DownloadConfig) -> Iterator[str]:
    """Environment img2dataset needs (also inherited by its workers); restored afterwards."""
    tmp = cfg.tmp_dir or scratch.mkdtemp("dl")  # short: a local Ray's socket paths go under it
    os.makedirs(tmp, exist_ok=True)
    env = {
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "TMPDIR": tmp,
        # second line of the bomb guard, for images Pillow cannot parse but OpenCV can
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(cfg.max_image_pixels),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tempfile.tempdir = None
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield tmp
    finally:
        with contextlib.suppress(ValueError):  # img2dataset replaces the SIGINT handler
            signal.signal(signal.SIGINT, sigint)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = None
        if cfg.tmp_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


# what the Ray workers need of _img2dataset_env's variables (a local Ray's inherit them all)
_WORKER_ENV = ("NO_ALBUMENTATIONS_UPDATE", "WANDB_MODE", "OPENCV_IO_MAX_IMAGE_PIXELS")
# those whose value shapes shards (max_image_pixels): ours, not the job's, reach the workers
_SHAPING_ENV = ("OPENCV_IO_MAX_IMAGE_PIXELS",)
_OVERRIDE_ENV = "RAY_OVERRIDE_JOB_RUNTIME_ENV"


def _job_env_vars() -> dict[str, str] | None:
    """The ``env_vars`` of the runtime env of the ``ray job submit`` this driver runs under
    (Ray 2.60 hands the job's config to the driver as JSON in ``RAY_JOB_CONFIG_JSON_ENV_VAR``,
    and ``ray.init`` merges its ``runtime_env`` into it); None outside a submitted job."""
    raw = os.environ.get(RAY_JOB_ENV)
    if raw is None:
        return None
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def _driver_env_vars(
    wanted: dict[str, str], job: dict[str, str] | None
) -> tuple[dict[str, str], bool]:
    """The ``env_vars`` for ``ray.init``'s runtime env, and whether Ray must let them override
    the job's. Ray refuses to merge a submitted job's runtime env with ``ray.init``'s when both
    set one variable ("Failed to merge the Job's runtime env") unless
    ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1``. A variable the job sets is left to the job, except one
    that shapes shards set to another value than this run's (``OPENCV_IO_MAX_IMAGE_PIXELS``:
    ``max_image_pixels``, recorded with the shards): ours wins, with a warning."""
    if not job:
        return dict(wanted), False
    out, override = {}, False
    for k, v in wanted.items():
        if k not in job:
            out[k] = v
        elif job[k] != v and k in _SHAPING_ENV:
            log.warning(
                "download: the Ray job's runtime env sets %s=%s, but this run's max_image_pixels "
                "makes it %s (the limit shapes the shards and is recorded with them): %s is used "
                "(set max_image_pixels to change it)",
                k, job[k], v, v,
            )  # fmt: skip
            out[k], override = v, True
        elif job[k] != v:
            log.info("download: the Ray job's runtime env sets %s=%s: kept", k, job[k])
    return out, override


@contextlib.contextmanager
def _ray_session(cfg: DownloadConfig) -> Iterator[None]:
    """Join a Ray cluster or start a local Ray (only what this function started is shut down)."""
    if cfg.distributor != "ray":
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    wanted = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    if address:
        env_vars, override = _driver_env_vars(wanted, _job_env_vars())
        saved = os.environ.get(_OVERRIDE_ENV)
        if override:  # read by ray.init only
            os.environ[_OVERRIDE_ENV] = "1"
        try:
            ray.init(
                address=address,
                runtime_env={"env_vars": env_vars} if env_vars else None,
                log_to_driver=False,
            )
        finally:
            if saved is None:
                os.environ.pop(_OVERRIDE_ENV, None)
            else:
                os.environ[_OVERRIDE_ENV] = saved
    else:
        ray.init(num_cpus=cfg.processes, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class _PassOutcome:
    """The shards the distributor ran in an img2dataset pass, and those it reported done."""

    ran: set[int] = field(default_factory=set)
    ok: set[int] = field(default_factory=set)


def _recording(distributor: Any, outcome: _PassOutcome) -> Any:
    """``distributor`` (our img2dataset distributor) noting in ``outcome`` what it ran and
    what it reported done (the tasks it does not return as failed)."""

    def run(processes_count, downloader, reader, subjob_size, max_shard_retry) -> list:
        ran: list[int] = []

        def rows() -> Iterator:  # (shard id, its input file), each staged as the distributor
            for row in reader:  # takes it: not every unit before the first task starts
                ran.append(row[0])
                yield row

        failed = distributor(processes_count, downloader, rows(), subjob_size, max_shard_retry)
        outcome.ran.update(ran)
        outcome.ok.update(set(ran) - {row[0] for row in failed})
        return failed

    return run


def _run_img2dataset(
    cfg: DownloadConfig,
    input_dir: str,
    outcome: _PassOutcome | None = None,
    staging: str | None = None,
) -> None:
    """One img2dataset pass in incremental mode (done shards are skipped); ``outcome``: what
    the Ray distributor ran and reported done; ``staging``: where its reader writes each shard's
    input (img2dataset's own is ``{output}/_tmp``, shared by every run into the output)."""
    import functools
    import importlib

    from pipeline.data.img2dataset_guards import (
        GuardedDownloader,
        GuardedResizer,
        pool_distributor,
        ray_distributor,
    )

    # the package re-exports a function named ``main``: fetch the module itself
    i2d = importlib.import_module("img2dataset.main")

    extras = list(cfg.metadata.extra_columns) or None
    original = i2d.Resizer, i2d.Downloader, i2d.multiprocessing_distributor, i2d.ray_distributor
    # its distributors can hang on a dead worker or return with tasks still writing: ours wait
    i2d.multiprocessing_distributor, i2d.ray_distributor = pool_distributor, ray_distributor
    if outcome is not None:
        i2d.ray_distributor = _recording(ray_distributor, outcome)
    # img2dataset builds these itself: hand it ours (pickled by reference to the workers)
    i2d.Resizer = functools.partial(GuardedResizer, max_pixels=cfg.max_image_pixels)
    i2d.Downloader = functools.partial(
        GuardedDownloader,
        allow_loopback=cfg.allow_loopback,
        allow_private=cfg.allow_private_addresses,
        image_deadline_s=cfg.image_deadline_s,
        max_image_bytes=cfg.max_image_bytes,
    )
    reader_class = i2d.Reader
    if staging is not None:
        storage.makedirs(staging)

        def staged_reader(*args, **kwargs):  # Reader(..., done_shards, tmp_path, start_shard_id)
            bound = inspect.signature(reader_class).bind(*args, **kwargs)
            bound.arguments["tmp_path"] = staging
            return reader_class(*bound.args, **bound.kwargs)

        i2d.Reader = staged_reader
    try:
        i2d.download(
            url_list=input_dir,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=extras,
            output_folder=cfg.output,
            output_format="webdataset",
            number_sample_per_shard=cfg.metadata.rows_per_unit,
            oom_shard_count=SHARD_DIGITS,
            distributor=cfg.distributor,
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=cfg.resize_only_if_bigger,
            min_image_size=cfg.min_image_size,
            max_aspect_ratio=cfg.max_aspect_ratio,
            max_image_area=float(cfg.max_image_pixels),
            encode_format=cfg.encode_format,
            encode_quality=cfg.encode_quality,
            timeout=cfg.timeout_s,
            retries=cfg.retries,
            user_agent_token=cfg.user_agent_token,
            # never None here: img2dataset reads None as "the defaults" and [] as "no check"
            disallowed_header_directives=list(cfg.disallowed_header_directives),
            compute_hash=cfg.compute_hash,
            extract_exif=cfg.extract_exif,
            incremental_mode="incremental",  # "overwrite" is broken in 1.47
            max_shard_retry=1,
            enable_wandb=False,
        )
    finally:
        i2d.Resizer, i2d.Downloader, i2d.multiprocessing_distributor, i2d.ray_distributor = original
        i2d.Reader = reader_class


def _remove_partial(output: str, shard: int) -> None:
    for suffix in (".tar", ".parquet"):
        storage.remove(storage.join(output, shard_name(shard) + suffix), recursive=True)


# --- stats ---------------------------------------------------------------------------------------

# img2dataset's status strings -> short reasons; first match wins.
_REASONS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^success$"), "success"),
    (re.compile(r"unknown url type: '?" + REFUSED_PREFIX + r"([a-z-]+)"), "refused_{0}"),
    (re.compile(r"refused connection to an? ([a-z_]+) address"), "refused_{0}"),
    (re.compile(r"refused redirect to an? [a-z+.-]+:// URL"), "refused_redirect_scheme"),
    (re.compile(r"HTTP Error (\d{3})"), "http_{0}"),
    (re.compile(r"download too slow"), "too_slow"),  # img2dataset_guards.ERR_TOO_SLOW
    (re.compile(r"download too large"), "too_large"),  # img2dataset_guards.ERR_TOO_LARGE
    (
        re.compile(r"decompression bomb|CV_IO_MAX_IMAGE_PIXELS|image area too large"),
        "decompression_bomb",
    ),
    (re.compile(r"not an image"), "not_an_image"),
    (re.compile(r"Image decoding error|image conversion error"), "decode_error"),
    (re.compile(r"image too small"), "too_small"),
    (re.compile(r"aspect ratio too large"), "aspect_ratio"),
    (re.compile(r"X-Robots-Tag"), "opted_out"),
    (re.compile(r"timed out|[Tt]imeout"), "timeout"),
    (re.compile(r"Connection refused"), "connection_refused"),
    (
        re.compile(
            r"Connection reset|Remote end closed|RemoteDisconnected|IncompleteRead|"
            r"BadStatusLine"
        ),
        "connection_error",
    ),
    (
        re.compile(
            r"Name or service not known|nodename nor servname|getaddrinfo|"
            r"Temporary failure in name resolution|No address associated"
        ),
        "dns_error",
    ),
    (re.compile(r"SSL|CERTIFICATE"), "ssl_error"),
    (re.compile(r"unknown url type|no host given"), "bad_url"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
]


def reason_of(status: str) -> str:
    """A short, stable reason for one of img2dataset's status / error strings."""
    for pattern, template in _REASONS:
        m = pattern.search(status)
        if m:
            return template.format(*(g.replace("-", "_") for g in m.groups()))
    return "other"


def _read_stats(output: str, shard: int) -> dict[str, Any] | None:
    """Shard ``shard``'s ``_stats.json``; None (and the file removed, so that the shard is
    redone) when its content is not a stats object: img2dataset writes it with a plain
    ``open``, and a kill can cut it short. A store error (a refused read, throttling past the
    retries) is raised, not taken for a bad file: deleting a good one would redo a shard whose
    URLs may since have died."""
    uri = storage.join(output, f"{shard_name(shard)}{RAW_STATS_SUFFIX}")
    try:
        return read_raw_stats(uri)
    except ValueError as e:
        log.warning("unreadable stats for shard %d (%s): removed, the shard is redone", shard, e)
        storage.remove(uri)
        return None


def readable_done_shards(output: str, read: dict[int, dict[str, Any]]) -> set[int]:
    """:func:`done_shards` whose stats file reads (:func:`_read_stats` removes one that does
    not, so the shard counts as missing and is downloaded again in this run's retry rounds).
    ``read`` keeps the stats read so far by shard: each file is read once a run, 32 at a time
    (a LAION-COCO download has tens of thousands of shards)."""
    done = done_shards(output)
    todo = sorted(done - set(read))
    if todo:
        with ThreadPoolExecutor(32) as pool:
            for i, stats in zip(todo, pool.map(lambda i: _read_stats(output, i), todo)):
                if stats is not None:
                    read[i] = stats
    return {i for i in done if i in read}


def aggregate_stats(
    output: str, shards_total: int, read: dict[int, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Sum every ``{shard}_stats.json`` under ``output`` into counts per reason.

    A stats file that cannot be read (img2dataset writes it with a plain ``open``: a kill can
    cut it short) does not make its shard done: it is removed and the shard counted as failed,
    so that the next run downloads it again instead of keeping it without its counts."""
    samples: Counter = Counter()
    statuses: Counter = Counter()
    done = []
    read = {} if read is None else read
    for i in sorted(i for i in readable_done_shards(output, read) if i < shards_total):
        s = read[i]
        done.append(i)
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            samples[k] += int(s.get(k, 0))
        statuses.update({str(k): int(v) for k, v in s.get("status_dict", {}).items()})
    by_reason: Counter = Counter()
    for status, n in statuses.items():
        by_reason[reason_of(status)] += n
    return {
        "shards": {
            "total": shards_total,
            "done": len(done),
            "failed": sorted(set(range(shards_total)) - set(done)),
        },
        "samples": dict(samples),
        "by_reason": dict(by_reason.most_common()),
        # the raw strings, for reasons the table above does not know yet
        "statuses": dict(statuses.most_common(100)),
    }


# --- the stage -------------------------------------------------------------------------------------


def _check_reported_shards(
    cfg: DownloadConfig,
    outcome: _PassOutcome,
    done: set[int],
    seen: set[int],
    staging: str | None = None,
) -> None:
    """After a Ray pass: shards whose task reported success must have a ``_stats.json`` that
    this driver sees (``done``, or at least in a listing); ``seen`` gathers those that do. None
    of them seen: the workers write to their own node's disk, so every shard would be lost the
    same way: stop. Some: those are redone in the retry rounds. Every task failed with a local
    output: say that workers on other nodes may not see their inputs (``staging``)."""
    seen.update(outcome.ok & done)
    unseen = sorted(outcome.ok - done)

    def all_listed() -> bool:  # a stats file there but unreadable is seen (and redone)
        nonlocal unseen
        listed = done_shards(cfg.output)
        seen.update(i for i in unseen if i in listed)
        unseen = [i for i in unseen if i not in listed]
        return not unseen

    if unseen and not appears(all_listed):
        why = (
            f"{len(unseen)} download tasks reported success, but this driver sees no stats file "
            f"of theirs (e.g. {shard_name(unseen[0])}{RAW_STATS_SUFFIX}; shards {unseen[:10]}) "
            f"under {as_seen_here(cfg.output)}: {NOT_VISIBLE_HINT}"
        )
        if not seen:
            raise OutputNotVisibleError(f"download: {why}; stopped after the first pass")
        log.error("download: %s; they are redone in the retry rounds", why)
    if outcome.ran and not outcome.ok and not storage.is_remote(cfg.output):
        log.error(
            "download: all %d tasks of this pass failed. With distributor ray and a local output "
            "folder, workers on other nodes read their input from %s and write their shards "
            "there: if their logs say 'No such file', that folder is not on their node; use "
            "s3://... or a file system every node mounts",
            len(outcome.ran),
            staging or storage.join(cfg.output, "_tmp"),
        )


def _made_with(state: dict[str, Any], meta: str) -> dict[str, Any]:
    """The shard-shaping settings the shards there were made with: ``state.json``'s, and for
    those an earlier version did not record there, the saved ``download_config.yaml``'s."""
    made = dict(state.get("shard_settings", {}))
    saved_uri = storage.join(meta, "download_config.yaml")
    if set(SHARD_SHAPING) - set(made) and storage.exists(saved_uri):
        saved = yaml.safe_load(storage.read_text(saved_uri)) or {}
        made.update({k: saved[k] for k in SHARD_SHAPING if k not in made and k in saved})
    return made


def run_download(cfg: DownloadConfig) -> DownloadResult:
    """Download every unit of ``cfg.input`` into raw shards under ``cfg.output`` (resumable).
    One run at a time per output (:class:`RunLease`): a second is refused with
    :class:`OutputInUseError` before it touches anything."""
    check_paths_for_ray_job({"input": cfg.input, "output": cfg.output})
    storage.makedirs(cfg.output)
    lease = RunLease(cfg.output)
    meta = meta_dir(cfg.output)
    # this run's staging of img2dataset's per-shard inputs: a folder no other run deletes
    staging_root = storage.join(meta, "staging")
    staging = storage.join(staging_root, lease.run_id)
    if not storage.is_remote(staging):
        staging = os.path.abspath(storage.normalize(staging))  # workers may start elsewhere
    try:
        lease.acquire()  # refused: release() leaves the other run's lease alone
        for name in storage.list_dir(staging_root):  # left by killed runs: none runs now
            storage.remove(storage.join(staging_root, name), recursive=True)
        return _download(cfg, lease, staging)
    finally:
        with contextlib.suppress(Exception):
            storage.remove(staging, recursive=True)
        lease.release()


def _download(cfg: DownloadConfig, lease: RunLease, staging: str) -> DownloadResult:
    start = time.time()
    meta = meta_dir(cfg.output)
    units_dir, input_dir = storage.join(meta, "units"), storage.join(meta, "input")

    read: dict[int, dict[str, Any]] = {}  # the done shards' stats, each read once
    redone: set[int] = set()  # shards with a stats file but without their tar or parquet
    _redo_incomplete(cfg.output, read, redone)
    existing = done_shards(cfg.output)
    # refused before the units are rewritten (a LAION-COCO-size input takes hours to cut)
    listing = units_fingerprint(cfg.input, cfg.metadata)
    state_uri = storage.join(meta, "state.json")
    state = storage.read_json(state_uri) if storage.exists(state_uri) else None
    shape = {k: v for k, v in to_dict(cfg).items() if k in SHARD_SHAPING}
    other = []  # why the shards there cannot be finished with these settings
    if state and existing:
        if state.get("units_fingerprint") != listing[2]:
            other.append("metadata or unit settings")
        made = _made_with(state, meta)
        # a setting neither state.json nor the saved config of an earlier version holds is not
        # compared
        other += sorted(k for k in shape if k in made and made[k] != shape[k])
    replace = bool(cfg.overwrite and existing and (other or not state))
    if replace:
        log.info(
            "overwrite: %s holds %d shards made with other %s: deleted once the metadata is cut "
            "into units (an error there deletes nothing)",
            cfg.output, len(existing), ", ".join(other) or "settings (no state.json)",
        )  # fmt: skip
    elif cfg.overwrite and existing:
        # a rerun of the command that deleted an earlier output, after a kill: the shards
        # there are this one's, nothing is deleted again
        log.warning(
            "overwrite: %s holds %d shards made from this metadata with these settings: "
            "continuing them (delete the folder yourself to download everything again)",
            cfg.output, len(existing),
        )  # fmt: skip
    elif other:
        raise RuntimeError(
            f"{cfg.output} holds shards made with other {', '.join(other)}; finishing them "
            "with these settings would mix two kinds of shard. Use a new output folder, or "
            "overwrite=true to delete them"
        )
    if replace or (state and state.get("units_fingerprint") != listing[2]):
        storage.remove(input_dir, recursive=True)  # no shard made from them: cut again
    units_stats = prepare_units(cfg.input, units_dir, cfg.metadata, listing)
    unit_names = [u["name"] for u in units_stats["units"]]
    total = len(unit_names)
    if not total:
        raise ValueError(
            f"the metadata {cfg.input} gave no row to download: {units_stats['counts']} (check "
            "metadata.url_column / caption_column and the URLs' scheme)"
        )
    if replace:  # the new units are there: the old shards go
        log.info("overwrite: deleting the %d shards of %s", len(existing), cfg.output)
        old = [n for n in storage.list_dir(cfg.output) if n != os.path.basename(meta)]
        with ThreadPoolExecutor(32) as pool:  # tens of thousands of files on S3
            list(pool.map(lambda n: storage.remove(storage.join(cfg.output, n), True), old))
        for name in ("state.json", "download_stats.json"):
            storage.remove(storage.join(meta, name))
        existing, state = set(), None
    guard_settings = {k: getattr(cfg, k) for k in GUARD_SETTINGS}
    if state and state.get("guard_settings", guard_settings) != guard_settings:
        # the shards not yet done are guarded again under the new settings (done ones keep
        # what they were downloaded with: their refusals are in their stats)
        redo = [n for i, n in enumerate(unit_names) if i not in existing]
        log.warning(
            "address guard settings changed (%s -> %s): %d units not yet downloaded are "
            "checked again",
            state["guard_settings"], guard_settings, len(redo),
        )  # fmt: skip
        for name in redo:
            storage.remove(storage.join(input_dir, name))
    storage.write_json(
        state_uri,
        {
            "units_fingerprint": units_stats["fingerprint"],
            "shard_settings": shape,
            "guard_settings": guard_settings,
        },
    )
    save_config(cfg, storage.join(meta, "download_config.yaml"))

    guard = AddressGuard(
        allow_loopback=cfg.allow_loopback,
        allow_private=cfg.allow_private_addresses,
        threads=cfg.dns_threads,
    )
    guard_counts = guard_units(units_dir, input_dir, unit_names, guard)
    if guard_counts:
        log.info("address guard: %s (%d DNS lookups)", dict(guard_counts), guard.lookups)
    if guard.transient_failures:
        log.warning(
            "address guard: %d hosts kept failing DNS with 'try again' (a throttled resolver?); "
            "their URLs were kept, each download worker checks their addresses when it connects",
            guard.transient_failures,
        )

    reported_seen: set[int] = set()  # shards a Ray task reported done that this driver sees
    missing = sorted(set(range(total)) - readable_done_shards(cfg.output, read))
    if total and not missing:
        log.info("all %d shards already done in %s", total, cfg.output)
    with _img2dataset_env(cfg), _ray_session(cfg):
        for attempt in range(cfg.shard_retry_rounds + 1):
            if not missing:
                break
            if attempt:
                log.warning(
                    "retry %d/%d of %d failed shards: %s",
                    attempt,
                    cfg.shard_retry_rounds,
                    len(missing),
                    missing[:20],
                )
                lease.check()
                for i in missing:  # whatever a failed shard left behind goes before its rerun
                    _remove_partial(cfg.output, i)
            outcome = _PassOutcome() if cfg.distributor == "ray" else None
            try:
                _run_img2dataset(cfg, input_dir, outcome, staging)
            except SystemExit as e:
                # img2dataset's SIGINT handler exits with status 0: a stop must not look done
                raise KeyboardInterrupt("download interrupted; rerun to resume") from e
            except Exception:  # noqa: BLE001 - finished shards are safe; check what is missing
                log.exception("img2dataset pass %d stopped with an error", attempt + 1)
            lease.check()
            done = readable_done_shards(cfg.output, read)
            if outcome is not None:  # a stats file seen is seen, with its tar or without
                _check_reported_shards(cfg, outcome, done, reported_seen, staging)
            _redo_incomplete(cfg.output, read, redone)
            missing = sorted(set(range(total)) - {i for i in done if i in read})
    lease.check()
    # img2dataset's own staging (emptied by it on a local disk; runs before this version's)
    storage.remove(storage.join(cfg.output, "_tmp"), recursive=True)

    stats = aggregate_stats(cfg.output, total, read)
    # counted in "done" or "failed" as this run left them
    stats["shards"]["redone_missing_files"] = sorted(redone)
    stats["metadata"] = units_stats["counts"]
    stats["guard_this_run"] = dict(guard_counts)
    stats["duration_s"] = round(time.time() - start, 3)
    storage.write_json(storage.join(meta, "download_stats.json"), stats)
    failed = stats["shards"]["failed"]
    if failed:
        log.error(
            "%d of %d shards still failed after %d retry rounds: %s; rerun to retry them",
            len(failed),
            total,
            cfg.shard_retry_rounds,
            failed[:50],
        )
    log.info(
        "download: %d/%d shards done, samples %s, reasons %s",
        stats["shards"]["done"],
        total,
        stats["samples"],
        stats["by_reason"],
    )
    return DownloadResult(cfg.output, total, stats["shards"]["done"], failed, stats)
