"""Raw shards in img2dataset's layout, built from the synthetic shapes, for the data-stage tests.

``00000.tar`` (``{key}.jpg/.txt/.json``), ``00000.parquet`` and ``00000_stats.json`` per shard,
written with ``webdataset.TarWriter`` so the tests do not depend on the download stage.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline import storage
from pipeline.data import synthetic


def raw_key(shard: int, i: int) -> str:
    """img2dataset's key: shard number then sample number, zero-padded."""
    return f"{shard:05d}{i:04d}"


def write_raw_shards(
    root: str,
    n_shards: int,
    per_shard: int,
    size: int = 64,
    seed: int = 0,
    meta_fn: Callable[[int, int], dict[str, Any]] | None = None,
    broken: set[tuple[int, int]] = frozenset(),
) -> dict[int, list[str]]:
    """Write ``n_shards`` raw shards under ``root`` (local or s3://); returns keys per shard.

    ``meta_fn(shard, i)`` overrides json fields of a sample (``caption`` there also sets the
    txt member); ``broken`` holds (shard, i) whose jpg is cut short (undecodable).
    """
    samples = synthetic.make_samples(n_shards * per_shard, seed=seed)
    keys: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shard in range(n_shards):
            rows = []
            keys[shard] = []
            with wds.TarWriter(os.path.join(tmp, f"{shard:05d}.tar")) as tw:
                for i in range(per_shard):
                    s = samples[shard * per_shard + i]
                    rng = random.Random(seed * 1_000_003 + shard * 10_000 + i)
                    img = synthetic.draw_shape(s.colour, s.shape, s.background, size, rng)
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=90)
                    jpg = buf.getvalue()
                    if (shard, i) in broken:
                        jpg = jpg[: len(jpg) // 3]
                    key = raw_key(shard, i)
                    meta = {
                        "url": f"http://127.0.0.1/{key}.jpg",
                        "key": key,
                        "status": "success",
                        "caption": s.caption,
                        "width": size,
                        "height": size,
                        "original_width": size,
                        "original_height": size,
                        "punsafe": 0.01,
                        "pwatermark": 0.05,
                        "similarity": 0.35,
                    }
                    meta.update(meta_fn(shard, i) if meta_fn else {})
                    caption = meta["caption"] if meta["caption"] is not None else ""
                    tw.write(
                        {
                            "__key__": key,
                            "jpg": jpg,
                            "txt": caption.encode("utf-8"),
                            "json": json.dumps(meta).encode("utf-8"),
                        }
                    )
                    keys[shard].append(key)
                    rows.append({"key": key, "url": meta["url"], "status": "success"})
            pq.write_table(pa.Table.from_pylist(rows), os.path.join(tmp, f"{shard:05d}.parquet"))
            with open(os.path.join(tmp, f"{shard:05d}_stats.json"), "w") as f:
                json.dump({"count": per_shard, "successes": per_shard, "failed_to_download": 0}, f)
        storage.makedirs(root)
        storage.put_dir(tmp, root)
    return keys


def build_tiny_models(root: str, aesthetic: bool = False) -> dict[str, Any]:
    """Tiny random-weight VQ (downsample 8) and T5 (and CLIP + aesthetic head) under ``root``."""
    import torch

    from pipeline.models.text_encoder import build_tiny_text_encoder
    from pipeline.models.vq import VQConfig, VQModel

    torch.manual_seed(0)
    vq_uri = storage.join(root, "vq")
    VQModel(VQConfig.from_name("tiny")).save_pretrained(vq_uri)
    out: dict[str, Any] = {"vq": vq_uri, "t5": build_tiny_text_encoder(storage.join(root, "t5"))}
    if aesthetic:
        from pipeline.models.aesthetic import build_tiny_aesthetic

        out["aesthetic"] = build_tiny_aesthetic(storage.join(root, "aesthetic"))
    return out


def download_again(raw, index, per_shard, tmp, when, meta_fn=None):
    """Raw shard ``index`` under ``raw`` replaced by another download of it (``per_shard``
    samples): its files written again, and its stats with that download's times (img2dataset
    writes them there), so the shard's identity changes."""
    import shutil

    again = os.path.join(tmp, f"again-{index}-{when}")
    write_raw_shards(again, index + 1, per_shard, meta_fn=meta_fn)
    stats = os.path.join(again, f"{index:05d}_stats.json")
    with open(stats) as f:
        s = json.load(f)
    with open(stats, "w") as f:
        json.dump({**s, "start_time": when - 5.0, "end_time": when}, f)
    for suffix in (".tar", ".parquet", "_stats.json"):
        shutil.copy(os.path.join(again, f"{index:05d}{suffix}"), raw)
