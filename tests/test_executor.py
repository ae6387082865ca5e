"""pipeline/executor.py: the inline backend's retries and failure bookkeeping, ``prefetch``'s
producer thread (errors reach the consumer; an early exit ends the thread), and the Ray backend on
a local Ray when actors die, fail to start or are left broken (tests/test_ray_job.py has more on
a Ray head)."""

import logging
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable

import pytest
import ray
import ray.cloudpickle

from pipeline import cluster_paths, errortext, executor
from pipeline.cli import report_failure
from pipeline.executor import ExecutorConfig, prefetch, run_units


class _ScriptedWorker:
    """Fails unit ``u`` on its first ``fails[u]`` attempts (-1: always); records every call."""

    def __init__(self, fails: dict[int, int]) -> None:
        self.fails = fails
        self.calls: list[int] = []

    def __call__(self, unit: int) -> dict:
        self.calls.append(unit)
        n = self.fails.get(unit, 0)
        if n < 0 or self.calls.count(unit) <= n:
            raise ValueError(f"unit {unit} attempt {self.calls.count(unit)} broke")
        return {"unit": unit, "attempt": self.calls.count(unit)}


def _inline(max_retries: int) -> ExecutorConfig:
    return ExecutorConfig(backend="inline", max_retries=max_retries)


def test_inline_backend_retries_then_records_success_or_failure():
    made = []

    def make_worker():
        made.append(_ScriptedWorker({1: 2, 2: -1, 3: 1}))
        return made[-1]

    report = run_units(range(6), make_worker, _inline(max_retries=2), is_done=lambda u: u == 0)
    assert len(made) == 1  # one worker (its models loaded once) for every unit and retry
    worker = made[0]
    # units in order, each one's retries right after it; unit 0 was done already
    assert worker.calls == [1, 1, 1, 2, 2, 2, 3, 3, 4, 5]
    assert report.skipped == [0]
    # unit 1 succeeded on its last allowed attempt: a result, and no failure left behind
    assert report.results[1] == {"unit": 1, "attempt": 3}
    assert report.results[3] == {"unit": 3, "attempt": 2}
    assert sorted(report.results) == [1, 3, 4, 5]
    # unit 2 failed max_retries + 1 times: the last attempt's error is kept
    assert report.failed == {2: "ValueError: unit 2 attempt 3 broke"}
    assert report.attempts == {1: 3, 2: 3, 3: 2, 4: 1, 5: 1}
    assert not report.ok


def test_inline_backend_without_retries_tries_once():
    worker = _ScriptedWorker({0: 1})
    report = run_units([0, 1], lambda: worker, _inline(max_retries=0))
    assert worker.calls == [0, 1]
    assert report.failed == {0: "ValueError: unit 0 attempt 1 broke"}
    assert report.results == {1: {"unit": 1, "attempt": 1}}
    assert report.attempts == {0: 1, 1: 1}


def _read_member(n: int) -> None:
    if n:
        return _read_tar(n - 1)  # alternating frames: Python folds none as a repeated line
    raise OSError("SlowDown: please reduce your request rate")


def _read_tar(n: int) -> None:
    return _read_member(n)


def _load_shard(n: int) -> None:
    if n:
        return _open_shard(n - 1)
    try:
        _read_member(8)
    except OSError as exc:
        raise RuntimeError("shard 7: cannot read its tar") from exc


def _open_shard(n: int) -> None:
    return _load_shard(n)


class _ChainedErrorWorker:
    """Unit 7 fails as a read from S3 deep in a data loader does: a RuntimeError raised from an
    OSError, each with a traceback over 1000 characters."""

    def __call__(self, unit: int) -> dict:
        if unit == 7:
            _load_shard(8)
        return {"unit": unit}


_CHAIN = (
    "RuntimeError: shard 7: cannot read its tar <- caused by "
    "OSError: SlowDown: please reduce your request rate"
)


def test_an_inline_failure_names_its_cause_and_logs_its_traceback(caplog):
    """Before: the report (and so failed_shards) kept "RuntimeError: shard 7: ..." alone, and
    the log line had no traceback: the cause was nowhere."""
    caplog.set_level(logging.WARNING, logger="pipeline.executor")
    report = run_units([6, 7], _ChainedErrorWorker, _inline(max_retries=1))
    assert report.failed == {7: _CHAIN}
    logged = [r for r in caplog.records if "unit 7 attempt" in r.getMessage()]
    assert len(logged) == 2 and all(r.levelno == logging.WARNING for r in logged)
    for record in logged:  # each attempt's whole traceback, cause included
        assert record.getMessage().endswith(_CHAIN)
        text = "".join(traceback.format_exception(*record.exc_info))
        assert text.count(", in _read_member") == 9 and "direct cause" in text


def test_a_long_chain_is_shortened_frames_first_keeping_every_exception():
    """Shortening drops frames first; a chain still too long (a C++ backtrace in a message) is
    cut within each of its exceptions, never across one."""
    try:
        try:
            _load_shard(8)
        except RuntimeError as exc:
            raise RuntimeError(_LONG_CUDA_ERROR) from exc
    except RuntimeError as exc:
        text = "".join(traceback.format_exception(exc))
    assert len(text) > 6000
    short = errortext.short(Exception(text))
    assert len(short) <= 2100, len(short)
    for line in (
        "OSError: SlowDown: please reduce your request rate",
        "RuntimeError: shard 7: cannot read its tar",
        "RuntimeError: CUDA error: an illegal memory access was encountered",
    ):
        assert line in short, short
    assert short.count("The above exception was the direct cause") == 2
    assert ", in _read_member" not in short  # frames went first


def test_nothing_to_do_builds_no_worker():
    def make_worker():
        raise AssertionError("a worker was built with every unit done")

    report = run_units(range(3), make_worker, _inline(max_retries=2), is_done=lambda u: True)
    assert report.skipped == [0, 1, 2] and report.results == {} and report.ok


def _prefetch_threads(before: set) -> list[threading.Thread]:
    """Prefetch threads alive now that were not alive at ``before``."""
    return [t for t in threading.enumerate() if t not in before and t.name == "prefetch"]


def test_prefetch_yields_every_item_in_order():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetch([], depth=1)) == []
    # an item that happens to be an exception object is passed on, not raised
    errors = [KeyError("a"), ValueError("b")]
    assert list(prefetch(iter(errors))) == errors


def test_an_error_in_the_producer_reaches_the_consumer():
    boom = ValueError("shard 7 is damaged")

    def items():
        yield 0
        yield 1
        raise boom

    before = set(threading.enumerate())
    got = []
    with pytest.raises(ValueError, match="shard 7 is damaged") as raised:
        for x in prefetch(items(), depth=2):
            got.append(x)
    assert got == [0, 1]  # what came before the error, then the error itself
    assert raised.value is boom
    assert _prefetch_threads(before) == []


def test_an_early_exit_ends_a_producer_blocked_on_a_full_queue():
    depth, consumed = 2, 1
    produced = []
    full = threading.Event()

    def items():
        for i in range(1000):
            produced.append(i)
            # the consumer holds `consumed` items, the queue `depth`, and this one waits to go in
            if len(produced) == consumed + depth + 1:
                full.set()
            yield i

    before = set(threading.enumerate())
    it = prefetch(items(), depth=depth)
    assert next(it) == 0
    [thread] = _prefetch_threads(before)
    assert full.wait(timeout=60), "the producer never filled the queue"
    it.close()  # the consumer stops early (a break, an error in the loop body)
    assert not thread.is_alive()
    # the producer stopped too instead of reading the rest: the one it held, at most one more
    assert len(produced) <= consumed + depth + 2


def test_a_loop_left_by_break_ends_the_producer():
    before = set(threading.enumerate())
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    def first_three() -> list[int]:
        out = []
        for x in prefetch(items(), depth=2):
            out.append(x)
            if len(out) == 3:
                break  # the generator is dropped on return and its cleanup runs
        return out

    assert first_three() == [0, 1, 2]
    assert _prefetch_threads(before) == []
    assert len(produced) <= 3 + 2 + 2  # consumed, queued, and the one the producer held


def test_cuda_models_on_ray_actors_without_a_gpu_are_refused():
    """Ray leaves CUDA_VISIBLE_DEVICES alone for an actor that reserves no GPU: every actor of a
    pretokenize or score job with gpus_per_actor 0 and a CUDA device would load onto GPU 0."""
    from pipeline.config import ConfigError, load_config
    from pipeline.data.filter import ScoreConfig
    from pipeline.data.pretokenize import PretokenizeConfig

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    over = ["input=/in", "output=/out", "executor.gpus_per_actor=0"]
    with pytest.raises(ConfigError, match=r"text.device, vq.device on CUDA"):
        load_config(PretokenizeConfig, None, [*over, "vq.device=cuda", "text.device=cuda:1"])
    with pytest.raises(ConfigError, match=r"aesthetic.device on CUDA"):
        load_config(ScoreConfig, os.path.join(configs, "data", "score.yaml"), over)
    # a GPU reserved (or a fraction of one), or the inline backend: accepted
    load_config(
        PretokenizeConfig, None, [*over[:2], "vq.device=cuda", "executor.gpus_per_actor=0.5"]
    )
    load_config(PretokenizeConfig, None, [*over, "vq.device=cuda", "executor.backend=inline"])
    load_config(ScoreConfig, os.path.join(configs, "data", "score_cpu.yaml"), over[:2])


def test_gpus_reserved_for_a_job_without_cuda_models_are_warned(caplog):
    """score.yaml with aesthetic=null (filters only), or pretokenize with both models on the
    CPU, reserved a GPU per actor without a word: an autoscaler starts GPU nodes for CPU work."""
    from pipeline.config import load_config
    from pipeline.data.filter import ScoreConfig
    from pipeline.data.pretokenize import PretokenizeConfig

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    over = ["input=/in", "output=/out", "executor.gpus_per_actor=1"]
    for cls, path, extra, named in (
        (ScoreConfig, os.path.join(configs, "data", "score.yaml"), ["aesthetic=null"], "no model"),
        (PretokenizeConfig, None, ["vq.device=cpu", "text.device=cpu"], "vq.device=cpu"),
    ):
        caplog.clear()
        load_config(cls, path, [*over, *extra])
        said = [r.getMessage() for r in caplog.records if "gpus_per_actor" in r.getMessage()]
        assert len(said) == 1 and "set executor.gpus_per_actor=0" in said[0] and named in said[0]
    caplog.clear()  # a CUDA model, or no GPU reserved: nothing to say
    load_config(PretokenizeConfig, None, [*over, "vq.device=cuda", "text.device=cuda"])
    load_config(PretokenizeConfig, None, [*over[:2], "executor.gpus_per_actor=0"])
    assert not [r for r in caplog.records if "gpus_per_actor" in r.getMessage()]


def test_a_local_ray_too_small_for_one_actor_is_refused_at_once():
    """Before: the run waited start_timeout_s (900 s by default) for an actor that no node of
    a local Ray could ever hold, then said so. (A process of its own: its own local Ray.)"""
    script = (
        "from pipeline.cli import run_main\n"
        "from pipeline.executor import ExecutorConfig, run_units\n"
        "cfg = ExecutorConfig(local_num_cpus=1, cpus_per_actor=2, start_timeout_s=30)\n"
        "run_main(lambda: run_units([0], int, cfg) and 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.endswith(
        "config error: executor.cpus_per_actor 2 and gpus_per_actor 0: more than this machine's "
        "local Ray has (1 CPUs, 0 GPUs), so no actor could ever start; ask for less (or more "
        "executor.local_num_cpus), or set executor.address to run on a cluster\n"
    ), out.stderr[-3000:]
    assert time.monotonic() - t0 < 30


# --- the Ray backend on a local Ray: actors that die, fail to start, or are left broken -------
# The workers below live in this test module, which Ray's workers cannot import: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20
    )
    yield
    ray.shutdown()


@pytest.fixture()
def quick_backoff(monkeypatch):
    monkeypatch.setattr(executor, "START_BACKOFF_S", 0.05)


def _ray(**kw) -> ExecutorConfig:
    return ExecutorConfig(**{"max_retries": 2, "start_timeout_s": 60, **kw})


def _create_once(path: str) -> bool:
    """Create ``path``; False when it was there already (atomic across processes)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _wait_for(ready: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``ready`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class _DyingWorker:
    """Unit 1 kills its process on the first try (the OOM killer). Every actor that starts
    after that death first fails ``bad_starts`` times loading its models (-1: always), as on
    a transient S3 error; ``hang_starts`` makes them never finish loading instead."""

    def __init__(self, root: str, bad_starts: int, hang_starts: bool = False) -> None:
        self.root, self.pid = root, os.getpid()
        if os.path.exists(os.path.join(root, "died")):
            if hang_starts:
                time.sleep(3600)
            n = len([f for f in os.listdir(root) if f.startswith("bad-")])
            if bad_starts < 0 or n < bad_starts:
                open(os.path.join(root, f"bad-{self.pid}"), "w").close()
                raise OSError("SlowDown: please reduce your request rate (loading weights)")
        open(os.path.join(root, f"up-{self.pid}"), "w").close()

    def __call__(self, unit: int) -> dict:
        if unit == 1 and _create_once(os.path.join(self.root, "died")):
            os._exit(9)
        return {"unit": unit, "pid": self.pid}


def _make_dying(root: str, bad_starts: int, hang_starts: bool = False):
    return lambda: _DyingWorker(root, bad_starts, hang_starts)


def _files(root, prefix: str) -> list[str]:
    return [f for f in os.listdir(root) if f.startswith(prefix)]


def test_a_replacement_that_fails_to_start_is_tried_again(local_ray, quick_backoff, tmp_path):
    """One actor; unit 1 kills it and its replacement fails twice loading its models. Before:
    the run raised 'every actor failed to start' and every finished result was lost."""
    report = run_units([0, 1, 2, 3], _make_dying(str(tmp_path), bad_starts=2), _ray(num_actors=1))
    assert sorted(report.results) == [0, 1, 2, 3] and report.ok
    assert report.attempts == {0: 1, 1: 2, 2: 1, 3: 1}
    assert len(_files(tmp_path, "bad-")) == 2 and len(_files(tmp_path, "up-")) == 2
    assert report.results[0]["pid"] != report.results[1]["pid"]  # unit 1 ran on the third try


def test_units_left_without_an_actor_are_reported_failed(local_ray, quick_backoff, tmp_path):
    """Every replacement fails to start: after START_TRIES of them the units not yet done count
    as failed and the report comes back (before: an exception, and no summary at all)."""
    report = run_units([0, 1, 2, 3], _make_dying(str(tmp_path), bad_starts=-1), _ray(num_actors=1))
    assert list(report.results) == [0]  # done before the death: kept
    assert sorted(report.failed) == [1, 2, 3]
    assert report.attempts == {0: 1, 1: 1, 2: 0, 3: 0}
    assert len(_files(tmp_path, "bad-")) == executor.START_TRIES
    for u in (1, 2, 3):
        assert report.failed[u].startswith("no actor could be started: "), report.failed[u]
        assert "SlowDown: please reduce your request rate" in report.failed[u]
    assert "its last attempt: worker process died" in report.failed[1]


def test_units_left_when_no_replacement_starts_in_time_are_reported_failed(local_ray, tmp_path):
    """The replacement never finishes starting (cannot be placed, or hangs loading): after
    start_timeout_s the units left are failed and the report returned, not a TimeoutError."""
    cfg = _ray(num_actors=1, start_timeout_s=15)
    report = run_units([0, 1, 2], _make_dying(str(tmp_path), 0, hang_starts=True), cfg)
    assert list(report.results) == [0]
    assert sorted(report.failed) == [1, 2]
    assert report.failed[2].startswith("no actor could be started within 15s (start_timeout_s")


class _RefillWorker:
    """Two actors. Unit 1 kills its actor once both have started; the next actor to start
    fails loading its models once, and the one after (its retry) leaves a ``refilled`` file.
    Unit 2, on the other actor meanwhile, waits for that file: it comes only when the dead
    actor's place is filled again while unit 2 runs."""

    def __init__(self, root: str) -> None:
        self.root, self.pid = root, os.getpid()
        if os.path.exists(os.path.join(root, "died")):
            if _create_once(os.path.join(root, "bad")):
                raise OSError("SlowDown: please reduce your request rate (loading weights)")
            open(os.path.join(root, "refilled"), "w").close()
        open(os.path.join(root, f"up-{self.pid}"), "w").close()

    def __call__(self, unit: int) -> dict:
        if unit == 1 and not os.path.exists(os.path.join(self.root, "died")):
            assert _wait_for(lambda: len(_files(self.root, "up-")) >= 2, 60)
            open(os.path.join(self.root, "died"), "w").close()
            os._exit(9)
        refilled = os.path.join(self.root, "refilled")
        if unit == 2:
            _wait_for(lambda: os.path.exists(refilled), 20)
        return {"unit": unit, "pid": self.pid, "refilled": os.path.exists(refilled)}


def _make_refill(root: str):
    return lambda: _RefillWorker(root)


def test_a_replacement_that_fails_to_start_does_not_shrink_the_pool(
    local_ray, quick_backoff, tmp_path
):
    """Before: the replacement that failed to start was dropped, and the rest of the run went on
    with one actor of two."""
    report = run_units([1, 2, 3, 4, 5], _make_refill(str(tmp_path)), _ray(num_actors=2))
    assert sorted(report.results) == [1, 2, 3, 4, 5] and report.ok
    assert report.results[2]["refilled"], "the dead actor's place was not filled again"
    assert len(_files(tmp_path, "up-")) == 3  # the two first actors, then the retried one


class _FirstStartFails:
    """The first actor to start fails loading its models (a transient S3 error); the others
    start. Unit 0 waits until two actors are up: it comes only when the failed one's slot is
    started again."""

    def __init__(self, root: str) -> None:
        self.root, self.pid = root, os.getpid()
        if _create_once(os.path.join(root, "bad")):
            raise OSError("SlowDown: please reduce your request rate (loading weights)")
        open(os.path.join(root, f"up-{self.pid}"), "w").close()

    def __call__(self, unit: int) -> dict:
        both = unit != 0 or _wait_for(lambda: len(_files(self.root, "up-")) >= 2, 20)
        return {"unit": unit, "pid": self.pid, "both_up": both}


def test_an_actor_that_fails_its_first_start_is_started_again(local_ray, quick_backoff, tmp_path):
    """Before: only a replacement was started again; an actor failing its very first start
    was dropped for the whole run, and the other actor did all the work alone."""
    report = run_units([0, 1, 2, 3], lambda: _FirstStartFails(str(tmp_path)), _ray(num_actors=2))
    assert sorted(report.results) == [0, 1, 2, 3] and report.ok
    assert report.results[0]["both_up"], "the failed actor's slot was not started again"
    assert len(_files(tmp_path, "up-")) == 2


def _missing_model(root: str):
    def make_worker():
        open(os.path.join(root, f"try-{uuid.uuid4().hex}"), "w").close()
        raise FileNotFoundError("models/vq.pt")

    return make_worker


def test_when_no_actor_can_start_the_run_raises_what_make_worker_raised(
    local_ray, quick_backoff, tmp_path, capsys
):
    """Before: an ActorDiedError, the error's type lost, so the CLI printed ~70 lines of
    tracebacks. Now every slot tries START_TRIES times, then the run raises what make_worker
    raised: one line from the CLI, as with the inline backend."""
    with pytest.raises(FileNotFoundError) as raised:
        run_units([0, 1, 2], _missing_model(str(tmp_path)), _ray(num_actors=2))
    assert str(raised.value) == "models/vq.pt"
    assert len(_files(tmp_path, "try-")) == 2 * executor.START_TRIES
    capsys.readouterr()
    assert report_failure(raised.value) == 1
    assert capsys.readouterr().err == "error: not found: models/vq.pt\n"
    with pytest.raises(FileNotFoundError, match="models/vq.pt"):  # inline: the same error
        run_units([0], _missing_model(str(tmp_path)), _inline(max_retries=0))


def _fails_then_hangs(root: str):
    def make_worker():
        if _create_once(os.path.join(root, "bad")):
            raise OSError("SlowDown: please reduce your request rate (loading weights)")
        time.sleep(3600)  # as an actor the cluster never places: it never starts

    return make_worker


def test_a_failed_start_is_reported_beside_actors_that_never_start(
    local_ray, quick_backoff, tmp_path
):
    """Before: after start_timeout_s the run raised the failed actor's error alone, which hid
    that the other actors never started (a cluster without the resources asked)."""
    cfg = _ray(num_actors=2, start_timeout_s=4)
    with pytest.raises(TimeoutError, match=r"^no actor started within 4s") as raised:
        run_units([0, 1], _fails_then_hangs(str(tmp_path)), cfg)
    message = str(raised.value)
    assert "2 still waiting to be placed or loading" in message and "GPUs free" in message
    assert "1 failed start meanwhile, the last with: OSError: SlowDown" in message, message


def test_a_failure_on_ray_keeps_every_exception_of_a_long_chain(local_ray, caplog):
    """Before: the report kept the first and last 1000 characters of the remote traceback,
    and the OSError that caused it all was in the part cut out; the log line was cut too."""
    caplog.set_level(logging.WARNING, logger="pipeline.executor")
    report = run_units([6, 7], _ChainedErrorWorker, _ray(num_actors=1, max_retries=0))
    error = report.failed[7]
    for line in (
        "OSError: SlowDown: please reduce your request rate",
        "The above exception was the direct cause of the following exception:",
        "RuntimeError: shard 7: cannot read its tar",
    ):
        assert line in error, error
    assert len(error) <= 2000
    [logged] = [r.getMessage() for r in caplog.records if "unit 7 attempt 1" in r.getMessage()]
    assert logged.count(", in _read_member") == 9  # the whole traceback, once


# A CUDA error as torch reports it with TORCH_SHOW_CPP_STACKTRACES=1: a C++ backtrace after it.
# (Raised from this name, so that no traceback line quotes the message itself.)
_LONG_CUDA_ERROR = (
    "CUDA error: an illegal memory access was encountered\n"
    "Exception raised from c10_cuda_check_implementation (most recent call first):\n"
    + "".join(
        f"frame #{i}: c10::detail::torchCheckFail(char const*, char const*, unsigned int, "
        "std::string const&) + 0x64 (0x7f00deadbeef in /venv/lib/torch/lib/libc10.so)\n"
        for i in range(30)
    )
)


class _PoisonedWorker:
    """Unit 3's first try leaves the worker broken (a CUDA context after an illegal memory
    access): every unit it gets afterwards fails with the same long CUDA error too. The error
    comes from deep in nested calls, as in a model's forward: the Python traceback before the
    message is longer than 1000 characters, the C++ one after it too."""

    def __init__(self, root: str) -> None:
        self.root, self.broken, self.pid = root, False, os.getpid()

    def __call__(self, unit: int, depth: int = 8) -> dict:
        return self.forward(unit, depth) if depth else self.kernel(unit)

    def forward(self, unit: int, depth: int) -> dict:
        return self(unit, depth - 1)  # alternating frames: Python repeats none as one line

    def kernel(self, unit: int) -> dict:
        if self.broken or (unit == 3 and _create_once(os.path.join(self.root, "poisoned"))):
            self.broken = True
            raise RuntimeError(_LONG_CUDA_ERROR)
        return {"unit": unit, "pid": self.pid}


def _make_poisoned(root: str):
    return lambda: _PoisonedWorker(root)


def test_a_sticky_cuda_error_with_a_long_message_replaces_its_actor(local_ray, tmp_path):
    """Before: the sticky-error check read the message cut to its first and last 1000
    characters, which left "CUDA error" out: the broken actor was kept and failed every unit."""
    report = run_units([3, 4, 5], _make_poisoned(str(tmp_path)), _ray(num_actors=1, max_retries=1))
    assert sorted(report.results) == [3, 4, 5] and report.ok
    assert report.attempts == {3: 2, 4: 1, 5: 1}
    assert len({r["pid"] for r in report.results.values()}) == 1  # all on the fresh actor


# --- units whose output the driver does not see (workers writing to their own node's disk) ------


class _NodeLocalWorker:
    """Writes unit ``u``'s done marker under ``shared`` (where the driver looks), or under
    ``private`` (another node's disk) for the units in ``hidden``."""

    def __init__(self, shared: str, private: str, hidden: set[int]) -> None:
        self.shared, self.private, self.hidden = shared, private, hidden
        self.calls: list[int] = []

    def __call__(self, unit: int) -> dict:
        self.calls.append(unit)
        root = self.private if unit in self.hidden else self.shared
        os.makedirs(root, exist_ok=True)
        open(os.path.join(root, f"{unit}.done"), "w").close()
        return {"unit": unit}


@pytest.fixture()
def no_visibility_wait(monkeypatch):
    monkeypatch.setattr(cluster_paths, "VISIBLE_WAIT_S", 0.0)


@pytest.fixture(params=["inline", "ray"])
def backend(request):
    """Both backends; the Ray one on the module's local Ray."""
    if request.param == "ray":
        request.getfixturevalue("local_ray")
        return _ray(num_actors=1, max_retries=1)
    return _inline(max_retries=1)


def test_a_run_whose_first_output_is_not_visible_stops(backend, no_visibility_wait, tmp_path):
    shared, private = str(tmp_path / "shared"), str(tmp_path / "node2")
    worker = _NodeLocalWorker(shared, private, hidden={0, 1, 2, 3})
    with pytest.raises(cluster_paths.OutputNotVisibleError) as err:
        run_units(
            range(4),
            lambda: worker,
            backend,
            desc="score",
            done_marker=lambda u: os.path.join(shared, f"{u}.done"),
        )
    msg = str(err.value)
    assert msg.startswith("score: unit 0 reported success")
    assert os.path.join(shared, "0.done") in msg and "own node's disk" in msg and "s3://" in msg
    assert os.listdir(private) == ["0.done"]  # stopped at the first unit, not after all four
    if backend.backend == "inline":
        assert worker.calls == [0]


def test_a_later_output_not_visible_fails_that_unit_only(backend, no_visibility_wait, tmp_path):
    shared, private = str(tmp_path / "shared"), str(tmp_path / "node2")
    worker = _NodeLocalWorker(shared, private, hidden={2})
    report = run_units(
        range(4),
        lambda: worker,
        backend,
        done_marker=lambda u: os.path.join(shared, f"{u}.done"),
    )
    assert sorted(report.results) == [0, 1, 3]
    assert list(report.failed) == [2] and "is not there as this driver sees it" in report.failed[2]
    assert report.attempts[2] == 2  # retried like any failure (max_retries=1)


def test_a_relative_done_marker_is_named_with_its_absolute_path(monkeypatch, tmp_path):
    """A relative path is named with the folder this driver resolves it to; a marker that
    shows up while the driver waits (an NFS listing cached for a while) counts as seen."""
    monkeypatch.chdir(tmp_path)
    assert cluster_paths.as_seen_here("out/0.done") == f"out/0.done ({tmp_path / 'out' / '0.done'})"
    assert cluster_paths.as_seen_here("s3://b/out") == "s3://b/out"
    monkeypatch.setattr(cluster_paths, "VISIBLE_WAIT_S", 5.0)
    looks = iter([False, True])
    assert cluster_paths.appears(lambda: next(looks))
