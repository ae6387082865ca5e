"""benchmarks/bench_dedup.py on a small key set: both structures give the same answer, and the
table's memory figures are what each structure is made of (8-byte keys against set entries)."""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

import bench_dedup  # noqa: E402


def test_bench_dedup_table():
    rows = bench_dedup.run(n=300_000, batch=4096)
    ours, ref = rows
    assert ours["distinct"] == ref["distinct"] == 270_000  # every tenth key a repeat
    assert 8 <= ours["bytes_per_key"] < 12  # the keys themselves, plus the array headers
    assert ref["bytes_per_key"] > 40  # a bytes object and a set slot per key
    assert ours["memory_ratio"] == ref["bytes_per_key"] / ours["bytes_per_key"]
    assert abs(ours["GB_at_600M_rows"] - ours["bytes_per_key"] * 0.6) < 1e-9
