"""Picklable stand-ins for img2dataset's Downloader, for the distributor tests.

Each is called with a ``(shard_id, shard_file)`` row in a worker (a spawned process or a Ray task)
and writes ``{shard_id}.done`` into its directory when it finishes the shard.
"""

from __future__ import annotations

import os
import time


class FakeDownloader:
    def __init__(
        self, out_dir: str, die: int = -1, fail: int = -1, raise_on: int = -1, slow: float = 0.0
    ) -> None:
        self.out_dir, self.die, self.fail, self.raise_on, self.slow = (
            out_dir,
            die,
            fail,
            raise_on,
            slow,
        )

    def __call__(self, row):
        shard = row[0]
        if shard == self.die:
            os._exit(9)  # the process dies as under the OOM killer: no exception, no result
        if shard == self.raise_on:
            raise RuntimeError(f"shard {shard} failed as a whole")
        if shard == self.fail:
            return False, row
        time.sleep(self.slow)
        with open(os.path.join(self.out_dir, f"{shard}.done"), "w") as f:
            f.write(str(os.getpid()))
        return True, row
