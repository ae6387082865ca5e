"""pipeline/executor.py without Ray: the inline backend's retries and failure bookkeeping, and
``prefetch``'s producer thread (errors reach the consumer; an early exit ends the thread)."""

import os
import threading

import pytest

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
