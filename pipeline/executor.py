"""Run a data stage's work units on Ray: skip done ones, retry failures, collect per-unit stats.

The one place the data stages touch Ray. A stage hands over its units (shard indices), a test of
whether a unit is already done (its done marker exists), and a picklable ``make_worker`` that
builds a callable ``worker(unit) -> stats``. Each Ray actor calls ``make_worker()`` once, so the
models it holds load once per actor, then runs unit after unit.

A unit whose worker raises is retried on the same actor; a unit whose actor process died (killed,
out of memory, segfault, lost node), or that ran past ``unit_timeout_s`` (a hang), is retried on
a fresh actor. After ``max_retries`` retries it
counts as failed and the run goes on: finished units are never lost because one failed.

An actor that fails to start (a transient error loading its models, at the first start or in a
fresh one replacing a dead one) is started again after a short backoff, up to ``START_TRIES``
failures in a row per actor slot; a slot past that is given up. When no actor starts at all
(every slot gave up, or none started within ``start_timeout_s``), the run stops with that error,
a configuration problem: the error the actors' ``make_worker`` raised (a ``FileNotFoundError``
stays one), or a ``TimeoutError`` that also names any start failures. Once one has started, when
no actor is left, or none could start again within ``start_timeout_s``, the units not yet done
count as failed ("no actor could be started ...") and the report is returned as usual: a rerun
does the rest. A local Ray too small for one actor is refused up front (``ConfigError``).

A failed attempt logs its whole traceback (cause included) at WARNING; the failure kept in the
report names every exception of the chain, its frames left out first when it is too long.

``backend="inline"`` runs the same workers in this process, one after another (for debugging
with a debugger attached; no Ray at all).

Where a unit's output can be seen: a stage that names each unit's done marker (``done_marker``)
has it checked from the driver when the unit reports success, one ``exists`` per unit. Workers on
other nodes that write to their own disks (a relative path, a local path on nodes sharing no file
system) report success while the driver, which merges the results, sees nothing: when the first
unit to finish is not visible, the run stops with :class:`OutputNotVisibleError`; a later one
counts as a failed attempt. Under ``ray job submit`` a relative local path is refused up front
(:func:`check_paths_for_ray_job`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

from pipeline.cluster_paths import OutputCheck
from pipeline.config import ConfigError, doc
from pipeline.errortext import carried_error, chain, message, poisons_process, short, summary
from pipeline.log import get_logger, progress, setup_logging

log = get_logger(__name__)

Worker = Callable[[int], dict[str, Any]]
T = TypeVar("T")

# An actor slot whose fresh actors fail to start this many times in a row is given up; before
# each new try the actor waits START_BACKOFF_S, doubled per failure (2 s, 4 s, ...).
START_TRIES = 3
START_BACKOFF_S = 2.0


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """Where and how the units of a data stage run."""

    backend: Literal["ray", "inline"] = doc(
        "ray: actors on a Ray cluster (or a local Ray); inline: this process, sequentially", "ray"
    )
    address: str | None = doc(
        "Ray address ('auto', 'host:6379', 'ray://host:10001'); null: $RAY_ADDRESS (set inside "
        "`ray job submit`) or else a new local Ray",
        None,
    )
    num_actors: int = doc("Model-holding actors; each loads the models once", 1)
    cpus_per_actor: float = doc("CPUs reserved per actor (also its torch thread count)", 1.0)
    gpus_per_actor: float = doc("GPUs per actor (0 on CPU machines; 1 or a fraction on GPUs)", 0.0)
    max_retries: int = doc("Retries of a failed unit (error or dead worker) before giving up", 2)
    local_num_cpus: int | None = doc("CPUs of a local Ray (null: all of this machine's)", None)
    local_object_store_mb: int = doc("Object store of a local Ray, in MiB", 256)
    start_timeout_s: float = doc(
        "Fail when not one actor has started (models loaded) after this long: the cluster may "
        "lack the CPUs/GPUs asked per actor (an autoscaler may need minutes to add nodes). Later "
        "in the run, units left with no actor started again within this long count as failed",
        900.0,
    )
    unit_timeout_s: float | None = doc(
        "A unit running longer than this is taken as hung (a GPU or driver hang, a stuck "
        "read): its actor is killed and replaced and the unit retried. null: no limit. Set it "
        "well above a unit's longest normal time (a CPU pretokenize shard takes hours)",
        None,
    )

    def __post_init__(self) -> None:
        if self.unit_timeout_s is not None and self.unit_timeout_s <= 0:
            raise ValueError(
                f"executor.unit_timeout_s must be > 0 or null, got {self.unit_timeout_s}"
            )
        if self.max_retries < 0:
            raise ValueError(f"executor.max_retries must be >= 0, got {self.max_retries}")
        if self.num_actors < 1:
            raise ValueError(f"executor.num_actors must be >= 1, got {self.num_actors}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError(
                f"executor.cpus_per_actor must be > 0 and gpus_per_actor >= 0, got "
                f"{self.cpus_per_actor} and {self.gpus_per_actor}"
            )


def check_gpu_devices(executor: ExecutorConfig, devices: dict[str, str]) -> None:
    """Refuse CUDA devices (``devices``: field name -> device) on Ray actors that reserve no
    GPU: Ray leaves such an actor's ``CUDA_VISIBLE_DEVICES`` alone, so every actor of the job
    would load its models onto the node's GPU 0, unannounced."""
    cuda = sorted(k for k, d in devices.items() if str(d).startswith("cuda"))
    if cuda and executor.backend == "ray" and executor.gpus_per_actor <= 0:
        raise ValueError(
            f"{', '.join(cuda)} on CUDA with executor.gpus_per_actor 0: each Ray actor needs a "
            "GPU reserved (1, or a fraction to share one), else every actor lands on GPU 0"
        )
    if not cuda and executor.backend == "ray" and executor.gpus_per_actor > 0:
        # not an error (a GPU cluster may have nothing else to do), but an autoscaler would
        # start GPU nodes for this CPU work, and actors wait for GPUs they never use
        log.warning(
            "executor.gpus_per_actor is %g but no model of this job runs on CUDA (%s): each "
            "actor reserves GPUs it never uses; set executor.gpus_per_actor=0 for CPU work",
            executor.gpus_per_actor,
            ", ".join(f"{k}={d}" for k, d in sorted(devices.items())) or "no model at all",
        )


@dataclasses.dataclass
class RunReport:
    """What a run did: per-unit stats of the units it ran, the ones skipped, the ones that failed."""

    results: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    skipped: list[int] = dataclasses.field(default_factory=list)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    attempts: dict[int, int] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def run_units(
    units: Sequence[int],
    make_worker: Callable[[], Worker],
    cfg: ExecutorConfig,
    is_done: Callable[[int], bool] | None = None,
    desc: str = "units",
    done_marker: Callable[[int], str] | None = None,
) -> RunReport:
    """Run ``make_worker()(unit)`` for every unit not yet done; see the module docstring.
    ``done_marker(unit)``: the URI a unit's success leaves, checked from here as each finishes."""
    t0 = time.perf_counter()
    report = RunReport()
    todo = []
    for u in units:
        if is_done is not None and is_done(u):
            report.skipped.append(u)
        else:
            todo.append(u)
    log.info(
        "%s: %d to run, %d already done (skipped), backend %s",
        desc,
        len(todo),
        len(report.skipped),
        cfg.backend,
    )
    if todo:
        check = OutputCheck(done_marker, desc)
        if cfg.backend == "inline":
            _run_inline(todo, make_worker, cfg, report, desc, check)
        else:
            _run_ray(todo, make_worker, cfg, report, desc, check)
    report.wall_s = time.perf_counter() - t0
    log.info(
        "%s: %d ran, %d skipped, %d failed in %.1fs",
        desc,
        len(report.results),
        len(report.skipped),
        len(report.failed),
        report.wall_s,
    )
    for u, err in sorted(report.failed.items()):
        log.error("%s: unit %d failed after %d attempts: %s", desc, u, report.attempts[u], err)
    return report


def _run_inline(
    todo: list[int],
    make_worker: Callable[[], Worker],
    cfg: ExecutorConfig,
    report: RunReport,
    desc: str,
    check: OutputCheck,
) -> None:
    worker = make_worker()
    for u in progress(todo, desc=desc, unit="unit"):
        for attempt in range(1, cfg.max_retries + 2):
            report.attempts[u] = attempt
            try:
                result = worker(u)
            except Exception as exc:  # noqa: BLE001 - recorded, retried, reported
                report.failed[u] = chain(exc)
                log.warning(
                    "%s: unit %d attempt %d failed: %s",
                    desc,
                    u,
                    attempt,
                    report.failed[u],
                    exc_info=exc,
                )
                continue
            unseen = check(u)
            if unseen is not None:
                report.failed[u] = unseen
                log.warning("%s: unit %d attempt %d failed: %s", desc, u, attempt, unseen)
                continue
            report.results[u] = result
            report.failed.pop(u, None)
            _log_unit(desc, u, report, len(todo))
            break


def _log_unit(desc: str, u: int, report: RunReport, total: int) -> None:
    """One progress line per finished unit: count, elapsed time and its scalar stats."""
    stats = report.results[u]
    brief = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) and k != "unit"}
    log.info("%s: unit %d done (%d/%d) %s", desc, u, len(report.results), total, brief)


class _UnitActor:
    """Holds one worker (and so its models) for the actor's lifetime."""

    def __init__(self, make_worker: Callable[[], Worker], delay_s: float = 0.0) -> None:
        setup_logging()
        time.sleep(delay_s)  # a backoff before trying again to load what just failed to load
        # Raised out of __init__, an error kills the actor: Ray prints its traceback twice and
        # the driver gets an ActorDiedError that has lost the error's type. Kept for ready() to
        # raise instead, it reaches the driver as a task error that is an instance of its type.
        self.worker: Worker | None = None
        self.start_error: Exception | None = None
        try:
            self.worker = make_worker()
        except Exception as exc:  # noqa: BLE001 - raised by ready()
            self.start_error = exc

    def ready(self) -> int:
        if self.start_error is not None:
            raise self.start_error
        return os.getpid()

    def run(self, unit: int) -> dict[str, Any]:
        assert self.worker is not None, "run() on an actor that failed to start"
        return self.worker(unit)


def _ray_init(cfg: ExecutorConfig) -> Literal["local", "cluster"] | None:
    """Connect to (or start) Ray unless already connected: "local" when this call started a
    local Ray, "cluster" when it connected to one, None when Ray was connected already."""
    import ray

    if ray.is_initialized():
        return None
    # Loopback clusters (tests, one box) need this, or Ray swaps 127.0.0.1 for the host's address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, configure_logging=False, log_to_driver=True)
    else:
        log.info("starting a local Ray (%s CPUs)", cfg.local_num_cpus or "all")
        ray.init(
            num_cpus=cfg.local_num_cpus,
            include_dashboard=False,
            object_store_memory=cfg.local_object_store_mb << 20,
            configure_logging=False,
            log_to_driver=True,
        )
        return "local"
    return "cluster"


def _check_fits(cfg: ExecutorConfig, resources: dict[str, float]) -> None:
    """Refuse actors larger than a whole local Ray (``resources``: ``ray.cluster_resources()``),
    which no node will ever join: else the run waits ``start_timeout_s`` for nothing."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cfg.cpus_per_actor > cpus or cfg.gpus_per_actor > gpus:
        raise ConfigError(
            f"executor.cpus_per_actor {cfg.cpus_per_actor:g} and gpus_per_actor "
            f"{cfg.gpus_per_actor:g}: more than this machine's local Ray has ({cpus:g} CPUs, "
            f"{gpus:g} GPUs), so no actor could ever start; ask for less (or more "
            "executor.local_num_cpus), or set executor.address to run on a cluster"
        )


def _run_ray(
    todo: list[int],
    make_worker: Callable[[], Worker],
    cfg: ExecutorConfig,
    report: RunReport,
    desc: str,
    check: OutputCheck,
) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    connected = _ray_init(cfg)
    # Ray sets OMP_NUM_THREADS (and so torch's thread count) from num_cpus in each actor.
    actor_cls = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor)(_UnitActor)

    def new_actor(slot: int, delay_s: float = 0.0):
        # Retries are ours (a fresh actor per death), so Ray restarts nothing by itself.
        actor = actor_cls.options(max_restarts=0, max_task_retries=0).remote(make_worker, delay_s)
        actors.append(actor)
        slot_of[actor] = slot
        starting[actor.ready.remote()] = actor
        return actor

    def replace(actor) -> None:
        """Kill ``actor`` and start a fresh one in its slot (it takes work once ready)."""
        ray.kill(actor)
        actors.remove(actor)
        new_actor(slot_of.pop(actor))

    def start_failed(actor, exc: BaseException) -> None:
        """``actor`` could not load its models: try its slot again after a backoff, or give the
        slot up after START_TRIES failures in a row."""
        nonlocal last_start_error, start_failures_total
        ray.kill(actor)
        actors.remove(actor)
        slot = slot_of.pop(actor)
        start_failures[slot] += 1
        start_failures_total += 1
        last_start_error = exc
        # the traceback at DEBUG, a line at WARNING: a missing model file would otherwise print
        # START_TRIES tracebacks per actor before the run stops with it
        log.debug("%s: an actor failed to start: %s", desc, message(exc))
        if start_failures[slot] < START_TRIES:
            delay_s = START_BACKOFF_S * 2 ** (start_failures[slot] - 1)
            log.warning(
                "%s: an actor failed to start (%d in a row), trying again in %.0fs: %s",
                desc,
                start_failures[slot],
                delay_s,
                summary(exc),
            )
            new_actor(slot, delay_s)
        else:
            log.warning(
                "%s: an actor failed to start %d times in a row, %d actors left: %s",
                desc,
                start_failures[slot],
                len(actors),
                summary(exc),
            )

    def give_up(reason: str) -> None:
        """No actor can take the units still pending: record them as failed and end the run
        (the finished ones are kept; a rerun does the rest)."""
        log.error("%s: %s; %d units not run", desc, reason, len(pending))
        for u in pending:
            report.attempts.setdefault(u, 0)
            last = report.failed.get(u)
            report.failed[u] = reason if last is None else f"{reason}; its last attempt: {last}"
        pending.clear()

    def none_started() -> BaseException:
        """Why not one actor started within start_timeout_s: not placed (the cluster lacks the
        resources asked) or still loading, and the start failures meanwhile, if any."""
        msg = (
            f"no actor started within {cfg.start_timeout_s:.0f}s (start_timeout_s): {len(starting)}"
            f" still waiting to be placed or loading; does the cluster have {cfg.cpus_per_actor} "
            f"CPUs and {cfg.gpus_per_actor} GPUs free for one? (cluster resources: "
            f"{ray.cluster_resources()})"
        )
        if last_start_error is None:
            return TimeoutError(msg)
        failed = f"{start_failures_total} failed start" + "s" * (start_failures_total > 1)
        msg += f"; {failed} meanwhile, the last with: "
        error = TimeoutError(msg + summary(last_start_error))
        error.__cause__ = last_start_error  # its text: the remote traceback
        return error

    actors: list[Any] = []
    slot_of: dict[Any, int] = {}  # actor -> its slot, which a fresh actor takes over
    # ready() ref -> actor, for actors not yet started: a unit goes only to a started actor, so
    # one the cluster never places (a pod left Pending, a node that never comes) holds no work
    starting: dict[Any, Any] = {}
    n_actors = max(1, min(cfg.num_actors, len(todo)))
    start_failures = [0] * n_actors  # per slot, in a row
    start_failures_total = 0
    last_start_error: BaseException | None = None
    # Until one actor has started, a failure ends the run with an exception: not one unit could
    # run, so it is a configuration problem (a missing model file, a cluster too small), not
    # something a rerun of the remaining units would get past.
    any_started = False
    first_deadline = time.monotonic() + cfg.start_timeout_s
    idle: list[Any] = []
    pending = collections.deque(todo)
    inflight: dict[Any, tuple[Any, int]] = {}
    since: dict[Any, float] = {}  # ref -> when its unit was handed out
    try:
        if connected == "local":
            _check_fits(cfg, ray.cluster_resources())
        for slot in range(n_actors):
            new_actor(slot)
        while pending or inflight:
            while idle and pending:
                actor, u = idle.pop(), pending.popleft()
                report.attempts[u] = report.attempts.get(u, 0) + 1
                ref = actor.run.remote(u)
                inflight[ref], since[ref] = (actor, u), time.monotonic()
            waiting = list(inflight) + (list(starting) if pending else [])
            if not waiting:  # every slot given up after failed starts
                assert last_start_error is not None
                if not any_started:  # what make_worker raised: report_failure (cli) knows it
                    cause = carried_error(last_start_error)
                    if cause is last_start_error:
                        raise cause
                    raise cause from last_start_error
                give_up(f"no actor could be started: {short(last_start_error)}")
                break
            # with nothing running, only actors still starting can take the rest: bounded wait;
            # with a unit limit, wake up when the oldest unit in flight reaches it
            timeout = None if inflight else cfg.start_timeout_s
            if not any_started:
                timeout = max(0.0, first_deadline - time.monotonic())
            if inflight and cfg.unit_timeout_s is not None:
                oldest = min(since[r] for r in inflight)
                timeout = max(0.0, oldest + cfg.unit_timeout_s - time.monotonic())
            ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
            if not ready and not inflight:
                if not any_started:
                    raise none_started()
                give_up(
                    f"no actor could be started within {cfg.start_timeout_s:.0f}s "
                    f"(start_timeout_s; cluster resources: {ray.cluster_resources()})"
                )
                break
            if not ready:  # a unit ran past unit_timeout_s: take it as hung
                now = time.monotonic()
                for ref in [r for r in inflight if now - since[r] >= cfg.unit_timeout_s]:
                    actor, u = inflight.pop(ref)
                    since.pop(ref)
                    err = (
                        f"no result after {cfg.unit_timeout_s:.0f}s (unit_timeout_s): taken as "
                        "hung, its actor is replaced"
                    )
                    replace(actor)
                    log.warning(
                        "%s: unit %d attempt %d failed: %s", desc, u, report.attempts[u], err
                    )
                    report.failed[u] = err
                    if report.attempts[u] <= cfg.max_retries:
                        pending.append(u)
                continue
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                        start_failures[slot_of[actor]] = 0
                        any_started = True
                    except ray.exceptions.RayError as exc:  # it could not load its models
                        start_failed(actor, exc)
                    continue
                actor, u = inflight.pop(ref)
                since.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:  # the worker raised
                    err, full = short(exc), message(exc)
                    # on the whole message: a long one (a C++ backtrace) has its middle cut
                    if not poisons_process(full):  # the actor is fine
                        idle.append(actor)
                    else:  # a CUDA context left broken fails every later unit: a fresh actor
                        err = f"{err} (its actor is replaced: the error is sticky)"
                        full = f"{full} (its actor is replaced: the error is sticky)"
                        replace(actor)
                except (RayActorError, ray.exceptions.RayError) as exc:  # the process died
                    err = f"worker process died: {short(exc)}"
                    full = f"worker process died: {message(exc)}"
                    replace(actor)
                else:
                    idle.append(actor)
                    err = full = check(u)  # raises while no unit's output has been seen
                    if err is None:
                        report.results[u] = result
                        report.failed.pop(u, None)
                        _log_unit(desc, u, report, len(todo))
                        continue
                # the whole traceback here, once per attempt; the report keeps it shortened
                log.warning("%s: unit %d attempt %d failed: %s", desc, u, report.attempts[u], full)
                report.failed[u] = err
                if report.attempts[u] <= cfg.max_retries:
                    pending.append(u)
    finally:
        for a in actors:
            ray.kill(a)
        if connected is not None:
            ray.shutdown()


_END = object()


@dataclasses.dataclass(frozen=True)
class _Raised:
    exc: BaseException


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, up to ``depth`` ahead of the consumer.

    Inside a worker this overlaps reading and decoding the next batch with the model's work on
    this one (PIL and torch release the GIL). An exception in the producer is raised here.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(_Raised(exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):  # (an item that is an exception object is an item)
                raise item.exc
            yield item
    finally:
        stop.set()
        # unblock a producer waiting on a full queue so the thread can end
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
