"""URL dedup of the metadata stage: memory and time per key, ``SeenKeys`` against a Python set.

``pipeline.data.metadata`` drops repeated URLs while it streams the input, keeping one 8-byte
digest per URL seen. A Python set of those digests (as ``bytes``) costs about 70 bytes a key:
50 GB for the 600M rows of LAION-COCO. ``SeenKeys`` keeps them in sorted ``uint64`` runs merged
as they pile up. Both get the same keys in the same batches (10% of them repeats of earlier
ones), in one process; memory is what ``tracemalloc`` sees held at the end (and at the peak)
over the number of distinct keys. The extrapolation to 600M keys is linear.

    python benchmarks/bench_dedup.py [--keys 4000000] [--batch 8192]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.metadata import SeenKeys  # noqa: E402

LAION_COCO_ROWS = 600_000_000


def _keys(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, n).astype(np.uint64)
    keys[::10] = keys[1::10]  # every tenth key repeats its neighbour
    return keys


def _measure(fn) -> tuple[float, int, int, int]:
    """(seconds, bytes held at the end, peak bytes, distinct keys) of ``fn``, which returns
    (distinct keys, the structure): the structure stays alive until its memory is read."""
    tracemalloc.start()
    t0 = time.perf_counter()
    kept, structure = fn()
    seconds = time.perf_counter() - t0
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del structure
    return seconds, held, peak, kept


def run(n: int = 4_000_000, batch: int = 8192) -> list[dict]:
    keys = _keys(n)

    def seen_keys():
        s = SeenKeys()
        kept = 0
        for i in range(0, n, batch):
            kept += int(s.first_seen(keys[i : i + batch]).sum())
        return kept, s

    def python_set():
        s: set[bytes] = set()
        kept = 0
        for k in keys.tolist():
            b = k.to_bytes(8, "little")
            if b not in s:
                s.add(b)
                kept += 1
        return kept, s

    rows = []
    for name, fn in (
        ("SeenKeys (sorted uint64 runs)", seen_keys),
        ("set of 8-byte digests", python_set),
    ):
        seconds, held, peak, kept = _measure(fn)
        rows.append(
            {
                "structure": name,
                "keys": n,
                "distinct": kept,
                "seconds": seconds,
                "us_per_key": seconds / n * 1e6,
                "bytes_per_key": held / kept,
                "peak_bytes_per_key": peak / kept,
                "GB_at_600M_rows": held / kept * LAION_COCO_ROWS / 1e9,
            }
        )
    assert rows[0]["distinct"] == rows[1]["distinct"]  # the same answer
    rows[0]["speedup"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[0]["memory_ratio"] = rows[1]["bytes_per_key"] / rows[0]["bytes_per_key"]
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=4_000_000)
    ap.add_argument("--batch", type=int, default=8192)
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import markdown_table

    rows = run(a.keys, a.batch)
    cols = ["structure", "keys", "distinct", "seconds", "us_per_key", "bytes_per_key",
            "peak_bytes_per_key", "GB_at_600M_rows", "speedup", "memory_ratio"]  # fmt: skip
    print(markdown_table(rows, cols))
