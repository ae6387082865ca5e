"""Download throughput: ~500 generated 256 px JPEGs from a loopback server through the whole stage.

Each row is one full ``run_download`` (metadata units, address guard, img2dataset, stats) into a
fresh local folder. ``images_per_s`` counts the whole run including process / Ray start-up;
``shard_images_per_s`` is img2dataset's own rate (samples over first shard start to last shard
end, from its ``_stats.json`` files). The server runs in this process and shares the CPUs, so
these figures are the pipeline's overhead per image, not a network measurement.

    python benchmarks/bench_download.py [--n 500] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _one(server, n: int, distributor: str, workdir: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.data import synthetic
    from pipeline.data.download import DownloadConfig, run_download, shard_name
    from pipeline.data.metadata import MetadataConfig

    meta = os.path.join(workdir, f"meta-{distributor}.parquet")
    urls = server.good_urls()[:n]
    table = synthetic.laion_coco_table(server.samples[:n], urls)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), meta)
    cfg = DownloadConfig(
        input=meta,
        output=os.path.join(workdir, f"raw-{distributor}"),
        metadata=MetadataConfig(rows_per_unit=100),
        distributor=distributor,
        processes=os.cpu_count() or 2,
        threads=32,
        image_size=256,
        resize_mode="center_crop",
        min_image_size=64,
        timeout_s=10,
        allow_loopback=True,
    )
    t0 = time.perf_counter()
    result = run_download(cfg)
    wall = time.perf_counter() - t0
    starts, ends, size = [], [], 0
    for i in range(result.shards_total):
        s = storage.read_json(os.path.join(cfg.output, f"{shard_name(i)}_stats.json"))
        starts.append(s["start_time"])
        ends.append(s["end_time"])
        size += os.path.getsize(os.path.join(cfg.output, f"{shard_name(i)}.tar"))
    ok = result.stats["by_reason"].get("success", 0)
    return {
        "distributor": distributor,
        "images": n,
        "ok": ok,
        "shards": result.shards_total,
        "processes": cfg.processes,
        "threads": cfg.threads,
        "wall_s": round(wall, 2),
        "images_per_s": round(ok / wall, 1),
        "shard_images_per_s": round(ok / (max(ends) - min(starts)), 1),
        "MB_written": round(size / 1e6, 1),
    }


def run(n: int = 500, ray: bool = True) -> list[dict]:
    """One row per distributor: images per second through the whole download stage."""
    from tests.badserver import BadServer

    rows = []
    server = BadServer(n_good=n, size=256)
    with server.running(), tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        rows.append(_one(server, n, "multiprocessing", tmp))
        if ray:
            rows.append(_one(server, n, "ray", tmp))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    rows = run(args.n, ray=not args.no_ray)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
