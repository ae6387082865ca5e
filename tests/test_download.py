"""The download stage against a loopback server of good images and bad cases (real img2dataset)."""

import contextlib
import copy
import dataclasses
import http.server
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.config import load_config
from pipeline.data import synthetic
from pipeline.data.download import (
    DEFAULT_OPT_OUT,
    DownloadConfig,
    aggregate_stats,
    reason_of,
    refused_url,
    run_download,
)
from pipeline.data.img2dataset_guards import ERR_TOO_LARGE, ERR_TOO_SLOW
from pipeline.data.metadata import MetadataConfig
from pipeline.data.netguard import (
    AddressGuard,
    RefusedAddress,
    classify_address,
    guarded_create_connection,
    guarded_opener,
)
from tests.badserver import BAD_CASES, KEPT_SHOWS, BadServer
from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = "word " * 2000  # 10,000 characters


def _config(inp: str, out: str, **kw) -> DownloadConfig:
    base = dict(
        input=inp,
        output=out,
        metadata=MetadataConfig(rows_per_unit=10),
        processes=1,
        threads=8,
        image_size=64,
        min_image_size=32,
        timeout_s=3,
        allow_loopback=True,
    )
    base.update(kw)
    return DownloadConfig(**base)


def _write_metadata(
    path: str, urls: list, captions: list | None = None, nan_similarity: tuple[int, ...] = ()
) -> None:
    samples = synthetic.make_samples(len(urls))
    table = pa.Table.from_pandas(
        synthetic.laion_coco_table(samples, [u if isinstance(u, str) else "x" for u in urls]),
        preserve_index=False,
    )
    table = table.set_column(0, "URL", pa.array(urls, pa.string(), from_pandas=True))
    if captions is not None:
        # bytes, viewed as a string column: real dumps do hold invalid UTF-8
        raw = [c.encode() if isinstance(c, str) else c for c in captions]
        table = table.set_column(1, "TEXT", pa.array(raw, pa.binary()).view(pa.string()))
    sim = [float("nan") if i in nan_similarity else 0.35 for i in range(len(urls))]
    table = table.set_column(
        table.schema.get_field_index("similarity"), "similarity", pa.array(sim, pa.float64())
    )
    pq.write_table(table, path)


def read_samples(output: str) -> dict[str, dict]:
    """Every sample in every tar under ``output``, by source URL."""
    parts: dict[str, dict] = defaultdict(dict)
    for name in storage.list_dir(output, ".tar"):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(output, name)))) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                parts[key][ext] = tf.extractfile(m).read()
    out = {}
    for p in parts.values():
        meta = json.loads(p["json"])
        out[meta["url"]] = {"jpg": p["jpg"], "txt": p["txt"].decode("utf-8"), "json": meta}
    return out


# --- one run over every bad case, shared by the tests below ---------------------------------------


@pytest.fixture(scope="module")
def server():
    srv = BadServer(n_good=20, size=96, hang_s=10.0)
    with srv.running():
        yield srv


@pytest.fixture(scope="module")
def bad_run(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    good = server.good_urls()
    closed = f"http://127.0.0.1:{free_port()}/closed.jpg"
    urls = (
        good
        + [server.bad_url(n) for n in BAD_CASES]
        + [good[0], float("nan"), None]  # duplicate, NaN and missing URL
        + [
            "http://10.0.0.7/x.jpg",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:192.168.0.1]/a.jpg",
            closed,
        ]
    )
    captions = [s.caption for s in synthetic.make_samples(len(urls))]
    captions[1], captions[2], captions[3], captions[4] = None, "  ", b"caf\xe9 \xff", LONG
    _write_metadata(str(tmp / "meta.parquet"), urls, captions, nan_similarity=(5,))
    cfg = _config(str(tmp / "meta.parquet"), str(tmp / "raw"))
    result = run_download(cfg)
    return cfg, result, urls, captions


def test_every_bad_case_is_counted_by_reason(bad_run):
    cfg, result, urls, _ = bad_run
    assert result.failed_shards == [] and result.shards_total == result.shards_done == 4
    expected = Counter(v for v in BAD_CASES.values() if v != "kept")
    expected["success"] = 20 + len(KEPT_SHOWS)
    expected["refused_private"] += 2  # 10.0.0.7 and an IPv4-mapped 192.168.0.1
    expected["refused_link_local"] += 1
    expected["connection_refused"] += 1
    assert result.stats["by_reason"] == dict(expected)
    assert result.stats["samples"]["count"] == len(urls) - 3 == 39
    assert result.stats["metadata"]["duplicate_url"] == 1
    assert result.stats["metadata"]["missing_url"] == 2
    assert result.stats["metadata"]["null_similarity"] == 1
    on_disk = storage.read_json(storage.join(cfg.output, "_meta", "download_stats.json"))
    assert on_disk["by_reason"] == dict(expected)
    saved = load_config(DownloadConfig, storage.join(cfg.output, "_meta", "download_config.yaml"))
    assert saved == cfg


def test_good_and_odd_images_arrive_as_rgb_jpg(bad_run, server):
    cfg, *_ = bad_run
    samples = read_samples(cfg.output)
    assert len(samples) == 20 + len(KEPT_SHOWS)
    for url, s in zip(server.good_urls(), server.samples):
        img = Image.open(io.BytesIO(samples[url]["jpg"]))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64))
        assert synthetic.check_image(img) == (s.colour, s.shape)
    for name, (colour, shape) in KEPT_SHOWS.items():
        img = Image.open(io.BytesIO(samples[server.bad_url(name)]["jpg"]))
        assert (img.format, img.mode) == ("JPEG", "RGB"), name
        seen_colour, seen_shape = synthetic.check_image(img)
        assert seen_shape == shape, name  # a saturated 16-bit image would show nothing
        if colour is not None:
            assert seen_colour == colour, name


def test_captions_arrive_normalised(bad_run, server):
    cfg, _, urls, captions = bad_run
    samples = read_samples(cfg.output)
    good = server.good_urls()
    assert samples[good[0]]["txt"] == captions[0]
    assert samples[good[1]]["txt"] == ""  # missing caption
    assert samples[good[2]]["txt"] == ""  # blank caption
    assert samples[good[3]]["txt"] == "caf\ufffd \ufffd"  # bad bytes replaced
    assert samples[good[4]]["txt"] == LONG[:1000].rstrip()  # cut to max_caption_chars
    meta = samples[good[6]]["json"]
    assert meta["similarity"] == pytest.approx(0.35) and meta["WIDTH"] == 256
    assert meta["caption"] == captions[6] and meta["status"] == "success"
    raw_json = samples[good[5]]["json"]
    assert raw_json["similarity"] is None  # NaN arrives as null, not as invalid JSON NaN


def test_refused_rows_stay_in_the_shard_parquet(bad_run):
    cfg, *_ = bad_run
    rows = pa.concat_tables(
        pq.read_table(io.BytesIO(storage.read_bytes(storage.join(cfg.output, n))))
        for n in storage.list_dir(cfg.output, ".parquet")
    ).to_pylist()
    by_url = {r["url"]: r for r in rows}
    r = by_url[refused_url("private", "http://10.0.0.7/x.jpg")]
    assert r["status"] == "failed_to_download" and "t2i-refused-private" in r["error_message"]
    assert "http://169.254.169.254/latest/meta-data/" not in by_url
    assert len(rows) == 39


def test_rerun_skips_done_shards_and_redoes_a_lost_one(bad_run, server):
    cfg, first, *_ = bad_run
    before = copy.copy(server.hits)
    again = run_download(cfg)
    assert server.hits == before  # nothing downloaded twice
    assert again.stats["by_reason"] == first.stats["by_reason"]

    # finishing the output with settings that shape shards differently is refused
    with pytest.raises(RuntimeError, match="image_size"):
        run_download(dataclasses.replace(cfg, image_size=128))

    # a shard whose done marker is missing (a crash mid-shard) is downloaded again, alone
    os.remove(os.path.join(cfg.output, "00001_stats.json"))
    unit = pq.read_table(os.path.join(cfg.output, "_meta", "input", "00001.parquet"))
    redo = {
        u.split(server.base, 1)[1]
        for u in unit.column("url").to_pylist()
        if u.startswith(server.base)
    }
    third = run_download(cfg)
    assert third.failed_shards == []
    assert third.stats["by_reason"] == first.stats["by_reason"]
    changed = {p for p in server.hits if server.hits[p] != before.get(p, 0)}
    assert changed == redo and all(server.hits[p] == before[p] + 1 for p in redo)

    # a done marker cut short (a kill mid-write) is not done either: redone in this same run
    # (it was only removed at the end, and the shard left failed until the next run)
    marker = os.path.join(cfg.output, "00001_stats.json")
    with open(marker, "r+b") as f:
        f.truncate(os.path.getsize(marker) // 2)
    fourth = run_download(cfg)
    assert fourth.failed_shards == [] and fourth.stats["by_reason"] == first.stats["by_reason"]
    assert all(server.hits[p] == before[p] + 2 for p in redo)

    # other metadata settings with shards done: refused before a unit is rewritten
    units = os.path.join(cfg.output, "_meta", "units")
    unit_times = {n: os.stat(os.path.join(units, n)).st_mtime_ns for n in os.listdir(units)}
    other = dataclasses.replace(cfg.metadata, rows_per_unit=cfg.metadata.rows_per_unit + 1)
    with pytest.raises(RuntimeError, match="other metadata or unit settings"):
        run_download(dataclasses.replace(cfg, metadata=other))
    assert {n: os.stat(os.path.join(units, n)).st_mtime_ns for n in os.listdir(units)} == (
        unit_times
    )

    # the address guard's settings changed: the units not yet downloaded are checked again
    # (loopback now refused: shard 1's server URLs), the done ones keep what they had
    os.remove(marker)
    inputs = os.path.join(cfg.output, "_meta", "input")
    kept = pq.read_table(os.path.join(inputs, "00000.parquet"))
    strict = run_download(dataclasses.replace(cfg, allow_loopback=False))
    assert strict.failed_shards == []
    unit1 = pq.read_table(os.path.join(inputs, "00001.parquet")).column("url").to_pylist()
    assert not any(u.startswith(server.base) for u in unit1 if isinstance(u, str))
    assert pq.read_table(os.path.join(inputs, "00000.parquet")).equals(kept)
    assert all(server.hits[p] == before[p] + 2 for p in redo)  # refused: not fetched
    # and back: shard 1 redone with loopback allowed, as the first run had it
    os.remove(marker)
    assert run_download(cfg).stats["by_reason"] == first.stats["by_reason"]

    # the opt-out check shapes shards too: turning it off half-way would mix them
    with pytest.raises(RuntimeError, match="disallowed_header_directives"):
        run_download(dataclasses.replace(cfg, disallowed_header_directives=[]))
    # overwrite=true, run again after a kill: the shards made with these settings are kept
    hits = dict(server.hits)
    again = run_download(dataclasses.replace(cfg, overwrite=True))
    assert server.hits == hits and again.stats["by_reason"] == first.stats["by_reason"]
    # with other metadata settings that cut no unit (a column name mistyped): an error before
    # anything is deleted
    shards_there = sorted(os.listdir(cfg.output))
    typo = dataclasses.replace(cfg.metadata, url_column="no_such_column")
    with pytest.raises(KeyError, match="'no_such_column' not found"):
        run_download(dataclasses.replace(cfg, overwrite=True, metadata=typo))
    assert sorted(os.listdir(cfg.output)) == shards_there
    # a state.json of an earlier version, without the opt-out settings: the saved config's
    # are compared instead
    state_uri = os.path.join(cfg.output, "_meta", "state.json")
    state = storage.read_json(state_uri)
    for k in ("user_agent_token", "disallowed_header_directives"):
        del state["shard_settings"][k]
    storage.write_json(state_uri, state)
    with pytest.raises(RuntimeError, match="disallowed_header_directives"):
        run_download(dataclasses.replace(cfg, disallowed_header_directives=[]))
    # and with other settings it deletes them, and downloads again
    small = run_download(dataclasses.replace(cfg, overwrite=True, image_size=128))
    assert small.failed_shards == [] and server.hits != hits
    assert (
        storage.read_json(os.path.join(cfg.output, "_meta", "state.json"))["shard_settings"][
            "image_size"
        ]
        == 128
    )


# --- Ray, retries, S3 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_distributor_retries_a_failed_shard(local_ray, server, tmp_path):
    """img2dataset's Ray distributor drops a shard that fails as a whole; we rerun it.

    A directory squatting on ``00001.tar`` makes that shard fail before it fetches anything.
    """
    urls = server.good_urls()[:15]
    _write_metadata(str(tmp_path / "m.parquet"), urls)
    out = tmp_path / "raw"
    (out / "00001.tar").mkdir(parents=True)
    before = copy.copy(server.hits)

    cfg = _config(str(tmp_path / "m.parquet"), str(out), distributor="ray", shard_retry_rounds=0)
    first = run_download(cfg)
    assert first.failed_shards == [1] and first.shards_done == 1
    assert storage.read_json(str(out / "_meta" / "download_stats.json"))["shards"]["failed"] == [1]

    second = run_download(
        _config(str(tmp_path / "m.parquet"), str(out), distributor="ray", shard_retry_rounds=1)
    )
    assert second.failed_shards == [] and second.shards_done == 2
    assert (out / "00001.tar").is_file()
    assert second.stats["by_reason"] == {"success": 15}
    assert len(read_samples(str(out))) == 15
    for u in urls:  # shard 0 was not fetched again, shard 1 failed before fetching
        path = u.split(server.base, 1)[1]
        assert server.hits[path] == before.get(path, 0) + 1


def test_job_writes_shards_to_s3(s3_bucket, server, tmp_path):
    urls = server.good_urls()[:8] + [server.bad_url("missing.jpg")]
    _write_metadata(str(tmp_path / "m.parquet"), urls)
    spec = importlib.util.spec_from_file_location(
        "download_job", os.path.join(ROOT, "jobs", "download.py")
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = f"{s3_bucket}/raw"
    rc = job.main(
        [
            "--config",
            os.path.join(ROOT, "configs", "data", "download_local.yaml"),
            f"input={tmp_path / 'm.parquet'}",
            f"output={out}",
            "metadata.rows_per_unit=5",
            "processes=1",
            "threads=8",
            "image_size=64",
        ]
    )
    assert rc == 0
    names = storage.list_dir(out)
    for i in (0, 1):
        assert {f"0000{i}.tar", f"0000{i}.parquet", f"0000{i}_stats.json"} <= set(names)
    assert "_tmp" not in names
    stats = storage.read_json(f"{out}/_meta/download_stats.json")
    assert stats["by_reason"] == {"success": 8, "http_404": 1}
    assert aggregate_stats(out, 2)["by_reason"] == stats["by_reason"]
    assert len(read_samples(out)) == 8


# --- pieces without img2dataset ------------------------------------------------------------------


def test_private_address_guard_without_network():
    def no_dns(host, port):
        raise AssertionError(f"looked up {host}: literals must not be resolved")

    strict = AddressGuard(resolver=no_dns)
    assert strict.check("http://127.0.0.1:8000/a.jpg") == "loopback"
    assert strict.check("http://[::1]/a.jpg") == "loopback"
    assert strict.check("http://10.1.2.3/a.jpg") == "private"
    assert strict.check("http://192.168.0.10/a.jpg") == "private"
    assert strict.check("http://169.254.169.254/latest/meta-data/") == "link_local"
    assert strict.check("http://224.0.0.1/") == "multicast"
    assert strict.check("http://0.0.0.0/") == "unspecified"
    assert strict.check("http://[::ffff:10.0.0.1]/") == "private"
    assert strict.check("http://93.184.216.34/a.jpg") is None  # public literal: allowed
    assert strict.check("file:///etc/passwd") == "bad_url_scheme"
    assert strict.lookups == 0

    tests = AddressGuard(allow_loopback=True, resolver=no_dns)
    assert tests.check("http://127.0.0.1:8000/a.jpg") is None
    assert tests.check("http://10.1.2.3/a.jpg") == "private"
    assert tests.check("http://169.254.1.1/a.jpg") == "link_local"
    assert AddressGuard(allow_private=True, resolver=no_dns).check("http://10.1.2.3/") is None
    assert classify_address("100.64.0.1") == "private"  # carrier-grade NAT space


def test_guard_resolves_each_host_once():
    calls = []

    def fake_dns(host, port):
        calls.append(host)
        if host == "missing.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return {"evil.example": ["203.0.113.9", "10.0.0.5"], "ok.example": ["93.184.216.34"]}[host]

    guard = AddressGuard(resolver=fake_dns)
    urls = [
        "http://evil.example/a.jpg",
        "http://ok.example/b.jpg",
        "http://evil.example/c.jpg",
        "http://OK.example./d.jpg",
        "http://missing.example/e.jpg",
    ]
    assert guard.check_many(urls) == ["private", None, "private", None, "unresolvable_host"]
    assert sorted(calls) == ["evil.example", "missing.example", "ok.example"]
    guard.check("http://ok.example/again.jpg")
    assert len(calls) == 3


def test_guard_retries_a_throttled_lookup_and_never_drops_a_host_for_it():
    """EAI_AGAIN is "try again", not an answer: a transient lookup failure must not remove every
    URL of a host for the rest of the run (the verdict is cached and written to the unit)."""
    calls = []

    def flaky_dns(host, port):
        calls.append(host)
        if host == "cdn.example" and calls.count(host) < 3:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "down.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "inner.example":
            return ["10.0.0.7"]
        return ["93.184.216.34"]

    guard = AddressGuard(resolver=flaky_dns)
    guard.dns_backoff = 0.001
    urls = ["http://cdn.example/a.jpg", "http://down.example/b.jpg", "http://inner.example/c"]
    assert guard.check_many(urls) == [None, None, "private"]
    assert calls.count("cdn.example") == 3  # answered on the third try
    assert calls.count("down.example") == guard.dns_attempts  # never answered: kept, unjudged
    assert guard.transient_failures == 1


def test_connect_time_guard_follows_redirects(server, monkeypatch):
    opener = guarded_opener(allow_loopback=True)
    assert opener.open(server.good_urls()[0], timeout=5).read() == server.good[0]
    assert opener.open(server.bad_url("redirect.jpg"), timeout=5).read() == server.bad["cmyk.jpg"]
    with pytest.raises(urllib.error.URLError, match="refused connection to a private address"):
        opener.open(server.bad_url("redirect-private.jpg"), timeout=5)
    with pytest.raises(urllib.error.URLError, match="refused connection to a loopback address"):
        guarded_opener().open(server.good_urls()[0], timeout=5)

    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was opened for a refused address")

    monkeypatch.setattr(socket, "socket", no_socket)
    create = guarded_create_connection(allow_loopback=True)
    for address in (("10.0.0.1", 80), ("169.254.169.254", 80), ("::ffff:192.168.1.1", 443)):
        with pytest.raises(RefusedAddress):
            create(address, 1)


class _Recorder:
    """A loopback HTTP server answering each path from ``routes`` (status, headers, body) and
    recording what it was asked: a stand-in for an image host or a forward proxy."""

    def __init__(self, routes):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.path)  # a proxy is asked for the whole URL
                status, headers, body = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_a_redirect_to_another_scheme_is_refused_unconnected(monkeypatch):
    """urllib's default opener would follow a 302 to ftp:// with ftplib, whose sockets the
    guard never sees (a private FTP host, or any host and port through FTP's commands)."""
    host = _Recorder({"/a.jpg": (302, {"Location": "ftp://10.255.255.1/x.jpg"}, b"")})
    connects = []
    real = socket.create_connection
    monkeypatch.setattr(
        socket, "create_connection", lambda a, *r, **k: connects.append(a) or real(a, *r, **k)
    )
    try:
        with pytest.raises(urllib.error.HTTPError, match="refused redirect to a ftp:// URL"):
            guarded_opener(allow_loopback=True).open(f"http://127.0.0.1:{host.port}/a.jpg")
        with pytest.raises(urllib.error.URLError, match="unknown url type: ftp"):
            guarded_opener(allow_loopback=True).open("ftp://10.255.255.1/x.jpg")
    finally:
        host.close()
    assert not [a for a in connects if a[1] == 21]
    assert (
        reason_of("HTTP Error 302: refused redirect to a ftp:// URL") == "refused_redirect_scheme"
    )


def test_behind_a_proxy_every_host_it_fetches_for_us_is_judged(monkeypatch):
    """With a proxy the connection goes to the proxy, which fetches the URL: the guard judges
    the URL's host itself (the first and every redirect), connects to the proxy at its own
    port only, and takes a proxy setting written without a scheme as urllib does."""
    public = "http://93.184.216.34/img.jpg"  # a literal public address: no DNS needed
    proxy = _Recorder(
        {
            public: (302, {"Location": "http://10.0.0.5/admin"}, b""),
            "http://93.184.216.34/ok.jpg": (200, {}, b"IMAGE"),
        }
    )
    inner = _Recorder({"/": (200, {}, b"INTERNAL SECRET")})  # loopback, not the proxy's port
    for k in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("http_proxy", f"127.0.0.1:{proxy.port}")  # no scheme
    try:
        opener = guarded_opener()
        assert opener.open("http://93.184.216.34/ok.jpg", timeout=5).read() == b"IMAGE"
        with pytest.raises(urllib.error.URLError, match="refused connection to a private"):
            opener.open(public, timeout=5)
        with pytest.raises(urllib.error.URLError, match="refused connection to a link_local"):
            opener.open("http://169.254.169.254/latest/meta-data/", timeout=5)
        assert proxy.seen == ["http://93.184.216.34/ok.jpg", public]  # not 10.0.0.5, not .254
        # only the proxy's own (host, port) is exempt: the host at another port is loopback
        monkeypatch.delenv("http_proxy")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
        with pytest.raises(urllib.error.URLError, match="refused connection to a loopback"):
            guarded_opener().open(f"http://127.0.0.1:{inner.port}/", timeout=5)
        assert inner.seen == []
    finally:
        proxy.close()
        inner.close()


def test_proxy_settings_and_allow_private_behind_a_proxy(monkeypatch):
    from pipeline.data.netguard import proxy_addresses

    assert proxy_addresses("http://Proxy.corp:3128") == {("proxy.corp", 3128)}
    assert proxy_addresses("10.1.2.3:3128") == {("10.1.2.3", 3128)}  # no scheme: HTTP
    assert proxy_addresses("http://10.1.2.3") == {("10.1.2.3", 80), ("10.1.2.3", 443)}
    assert proxy_addresses("not a url::") == set()
    # allow_private: nothing to refuse, and no local DNS (where only the proxy resolves names)
    proxy = _Recorder({"http://only-the-proxy-resolves.invalid/x.jpg": (200, {}, b"OK")})
    for k in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    try:
        opener = guarded_opener(allow_private=True)
        got = opener.open("http://only-the-proxy-resolves.invalid/x.jpg", timeout=5).read()
        assert got == b"OK"
        with pytest.raises(urllib.error.URLError, match="cannot resolve"):  # judged: no DNS
            guarded_opener().open("http://only-the-proxy-resolves.invalid/x.jpg", timeout=5)
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "address,reason",
    [
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8: what DNS64 gives on IPv6-only clusters
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b:1::1", "private"),  # NAT64's local-use prefix
        ("fec0::1", "private"),  # deprecated site-local, still in use
        ("2606:4700:4700::1111", None),
    ],
)
def test_ipv6_translations_and_site_local(address, reason):
    assert classify_address(address) == reason


def test_image_guard_takes_its_own_pixel_limit_and_scales_float_images(monkeypatch):
    """Pillow refuses images above twice its own limit (179M pixels) as bombs whatever
    max_pixels says; a float image holding 0..1 (float TIFFs mostly do) was stored black."""
    import struct
    import zlib

    import cv2
    import numpy as np

    from pipeline.data.img2dataset_guards import ERR_BOMB, GuardedResizer

    def png_header(w, h):  # a PNG that declares w x h pixels (its data is cut short)
        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")

    def resizer(max_pixels):
        return GuardedResizer(
            image_size=64, resize_mode="center_crop", resize_only_if_bigger=False,
            max_pixels=max_pixels,
        )  # fmt: skip

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # put back after
    big = png_header(15000, 15000)  # 225M pixels
    assert resizer(100_000_000)(io.BytesIO(big))[-1] == ERR_BOMB
    assert resizer(300_000_000)(io.BytesIO(big))[-1] != ERR_BOMB  # allowed; its data is bad
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(ramp, "F").save(buf, "TIFF")
    out = resizer(100_000_000)(io.BytesIO(buf.getvalue()))
    assert out[-1] is None
    assert cv2.imdecode(np.frombuffer(out[0], np.uint8), 1).max() >= 250


def test_refused_url_fails_without_network():
    url = refused_url("link_local", "http://169.254.169.254/")
    with pytest.raises(urllib.error.URLError, match="unknown url type") as e:
        urllib.request.urlopen(url, timeout=1)
    assert reason_of(str(e.value)) == "refused_link_local"


@pytest.mark.parametrize(
    "status, reason",
    [
        ("success", "success"),
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("timed out", "timeout"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("Remote end closed connection without response", "connection_error"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>", "ssl_error"),
        ("Image decoding error", "decode_error"),
        ("not an image (unrecognised format)", "not_an_image"),
        ("decompression bomb (image larger than max_image_pixels)", "decompression_bomb"),
        ("image too small", "too_small"),
        ("aspect ratio too large", "aspect_ratio"),
        ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
        ("<urlopen error unknown url type: t2i-refused-private>", "refused_private"),
        ("something new", "other"),
    ],
)
def test_reason_of(status, reason):
    assert reason_of(status) == reason


@pytest.mark.parametrize("name", ["download.yaml", "download_hq.yaml", "download_local.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(
        DownloadConfig,
        os.path.join(ROOT, "configs", "data", name),
        ["input=s3://b/meta/", "output=s3://b/raw/"],
    )
    assert cfg.disallowed_header_directives == DEFAULT_OPT_OUT  # "none" included
    assert cfg.allow_private_addresses is False
    assert cfg.allow_loopback is (name == "download_local.yaml")


def test_metadata_without_a_usable_row_is_an_error_not_an_empty_success(tmp_path):
    meta = tmp_path / "meta.parquet"
    pq.write_table(
        pa.table({"url": [f"ftp://h/{i}.jpg" for i in range(5)], "caption": ["a"] * 5}), meta
    )
    cfg = DownloadConfig(
        input=str(meta),
        output=str(tmp_path / "raw"),
        metadata=MetadataConfig(url_column="url", caption_column="caption"),
    )
    with pytest.raises(ValueError, match="gave no row to download.*'bad_url_scheme': 5"):
        run_download(cfg)
    assert not storage.list_dir(cfg.output, "_stats.json")


def test_a_stats_file_cut_short_makes_its_shard_failed_not_done(tmp_path):
    """img2dataset writes a shard's _stats.json (its done marker) with a plain open(): cut
    short by a kill, it would keep the shard done without its counts. It is removed instead, and
    the shard counted failed, so the next run downloads it again."""
    out = str(tmp_path / "raw")
    full = {"count": 5, "successes": 4, "failed_to_download": 1, "failed_to_resize": 0,
            "status_dict": {"success": 4, "HTTP Error 404: Not Found": 1}}  # fmt: skip
    storage.write_json(f"{out}/00000_stats.json", full)
    storage.write_bytes(f"{out}/00001_stats.json", b'{"count": 5, "succ')
    stats = aggregate_stats(out, 2)
    assert stats["shards"]["done"] == 1 and stats["shards"]["failed"] == [1]
    assert stats["samples"]["successes"] == 4 and stats["by_reason"]["http_404"] == 1
    assert not storage.exists(f"{out}/00001_stats.json")
    assert storage.exists(f"{out}/00000_stats.json")


def test_a_store_error_reading_a_stats_file_is_raised_not_taken_for_a_cut_file(
    tmp_path, monkeypatch
):
    """A refused read (a missing KMS permission, throttling past the retries) says nothing
    about the file: deleting a good _stats.json would redo its shard, whose URLs may since have
    died. Only a file whose content does not parse is removed."""
    from pipeline.data import download

    out = str(tmp_path / "raw")
    storage.write_json(f"{out}/00000_stats.json", {"count": 5, "successes": 5})
    real = download.storage.read_bytes  # what shards.read_raw_stats reads the file with

    def refused(uri):
        if str(uri).endswith("00000_stats.json"):
            raise PermissionError(f"Access Denied: {uri}")
        return real(uri)

    monkeypatch.setattr(download.storage, "read_bytes", refused)
    with pytest.raises(PermissionError, match="Access Denied"):
        aggregate_stats(out, 1)
    assert storage.exists(f"{out}/00000_stats.json")
    monkeypatch.setattr(download.storage, "read_bytes", real)
    assert aggregate_stats(out, 1)["shards"]["done"] == 1


# --- distributors ---------------------------------------------------------------------------------


def _done(d) -> set[int]:
    return {int(n.split(".")[0]) for n in os.listdir(d)}


@pytest.mark.timeout(180)
def test_pool_distributor_ends_a_pass_when_a_worker_dies(tmp_path):
    """img2dataset's Pool waits forever for a dead worker's shard; ours reports it and returns."""
    import multiprocessing

    from pipeline.data.img2dataset_guards import pool_distributor
    from tests.fakeworkers import FakeDownloader

    rows = [(i, f"unit{i}") for i in range(6)]
    down = FakeDownloader(str(tmp_path), die=1, fail=4, slow=0.2)
    left = pool_distributor(2, down, iter(rows), None, 1)
    done = _done(tmp_path)
    assert 1 in {r[0] for r in left} and 1 not in done
    # every shard is either finished or reported: nothing lost silently
    assert done | {r[0] for r in left} == set(range(6))
    assert not done & {r[0] for r in left}
    assert multiprocessing.active_children() == []  # no worker goes on writing

    # without a dying worker: the failing shard is retried once in the pass, then reported
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    down = FakeDownloader(str(healthy), fail=4)
    assert pool_distributor(2, down, iter(rows), None, 1) == [(4, "unit4")]
    assert _done(healthy) == {0, 1, 2, 3, 5}


def test_pool_workers_end_with_a_killed_driver(tmp_path):
    """``kill -9`` of the download driver (or the OOM killer) left its pool workers finishing
    shards into the output while a rerun filled it too: they now end with it."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from pipeline.data.img2dataset_guards import die_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=die_with_parent, initargs=(os.getpid(),))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        worker = int(proc.stdout.readline())
        os.kill(worker, 0)  # alive
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{worker}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break  # dead, not yet reaped by whoever adopted it
            except FileNotFoundError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its killed driver")
    finally:
        proc.kill()


def test_ray_distributor_waits_for_every_task(local_ray, tmp_path):
    """img2dataset's ``ray.get`` returns at the first failed task while others still write."""
    from pipeline.data.img2dataset_guards import ray_distributor
    from tests.fakeworkers import FakeDownloader

    rows = [(i, f"unit{i}") for i in range(3)]
    down = FakeDownloader(str(tmp_path), raise_on=0, slow=3.0)
    left = ray_distributor(2, down, iter(rows), None, 0)
    assert left == [(0, "unit0")]
    assert _done(tmp_path) == {1, 2}  # the slow tasks had finished when it returned


def test_ray_distributor_stages_a_unit_only_when_a_slot_frees(local_ray, tmp_path):
    """The reader is asked for (and stages) its next unit only when fewer than the window's
    tasks (twice the Ray's 2 CPUs) are submitted and unfinished; every unit still runs once."""
    from pipeline.data.img2dataset_guards import ray_distributor
    from tests.fakeworkers import FakeDownloader

    taken, in_flight = [], []

    def reader():
        for i in range(12):
            in_flight.append(len(taken) - len(_done(tmp_path)))
            taken.append(i)
            yield i, f"unit{i}"

    down = FakeDownloader(str(tmp_path), fail=11, slow=0.3)
    left = ray_distributor(1, down, reader(), None, 0)
    assert left == [(11, "unit11")]
    assert _done(tmp_path) == set(range(11))
    assert in_flight[:4] == [0, 1, 2, 3]  # the window filled...
    assert max(in_flight) == 3  # ...and a unit was staged only with a slot free for it


def test_x_robots_tag_none_opts_out():
    """X-Robots-Tag "none" is "noindex, nofollow" in one word: an opt-out like noindex."""
    from email.message import Message

    from img2dataset.downloader import is_disallowed

    from pipeline.data.download import DEFAULT_OPT_OUT

    for value in ("none", "img2dataset: none", "noai", "noindex, nofollow"):
        headers = Message()
        headers["X-Robots-Tag"] = value
        assert is_disallowed(headers, "img2dataset", DEFAULT_OPT_OUT), value
    headers = Message()
    headers["X-Robots-Tag"] = "nofollow"
    assert not is_disallowed(headers, "img2dataset", DEFAULT_OPT_OUT)


# --- EXIF orientation -----------------------------------------------------------------------------

# four quadrants of distinct colours (none near white: "border" pads with white) tell which of
# the eight EXIF orientations an image is shown in
_QUADRANTS = {"tl": (0, 160, 0), "tr": (0, 0, 255), "bl": (255, 0, 0), "br": (255, 200, 0)}


def _upright(w: int, h: int) -> Image.Image:
    """The scene as a browser shows it: green top left, blue top right, red and yellow below."""
    img = Image.new("RGB", (w, h))
    for name, colour in _QUADRANTS.items():
        x = 0 if name[1] == "l" else w // 2
        y = 0 if name[0] == "t" else h // 2
        img.paste(colour, (x, y, x + w // 2, y + h // 2))
    return img


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _tagged(upright: Image.Image, orientation: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """``upright`` as a camera stores it: the pixels turned, an EXIF tag saying how to undo it."""
    undo = {  # the inverse of what the tag asks the viewer to do
        1: None,
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,  # 6: the viewer turns it 90 degrees clockwise
        8: Image.Transpose.ROTATE_270,  # 8: the viewer turns it 90 degrees counter-clockwise
    }[orientation]
    stored = (upright.transpose(undo) if undo else upright).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(stored, fmt, exif=exif)


def _quadrants(img: Image.Image) -> dict[str, tuple[int, ...]]:
    """The colour at the centre of each quadrant of ``img``'s content (white padding cut off)."""
    img = img.convert("RGB")
    img = img.crop(Image.eval(img, lambda v: 255 - v).getbbox())
    w, h = img.size
    return {
        k: img.getpixel(
            (w // 4 if k[1] == "l" else 3 * w // 4, h // 4 if k[0] == "t" else 3 * h // 4)
        )
        for k in _QUADRANTS
    }


def _shows_upright(img: Image.Image, gray: bool = False) -> bool:
    got = _quadrants(img)
    for k, colour in _QUADRANTS.items():
        if gray:  # what a gray source keeps of the colour
            colour = (Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0)),) * 3
        if max(abs(a - b) for a, b in zip(got[k], colour)) > 40:
            return False
    return True


def test_exif_orientation_is_applied_to_downloaded_photos(tmp_path):
    """Phone photos are stored landscape with an EXIF orientation; OpenCV's IMREAD_UNCHANGED
    ignored it and the re-encode dropped the tag, so they landed sideways in the shards. They
    are stored upright as browsers show them (RGB, gray and PNG sources alike), with the
    upright size in the metadata; an ordinary JPEG is stored as it was."""
    cases = {  # name: (body, upright size)
        "rot6.jpg": (_tagged(_upright(100, 200), 6), (100, 200)),
        "rot8.jpg": (_tagged(_upright(100, 200), 8), (100, 200)),
        "rot3.jpg": (_tagged(_upright(200, 100), 3), (200, 100)),
        "gray6.jpg": (_tagged(_upright(100, 200), 6, mode="L"), (100, 200)),
        "rot6.png": (_tagged(_upright(100, 200), 6, fmt="PNG"), (100, 200)),
        "plain.jpg": (_encoded(_upright(200, 100), quality=95), (200, 100)),  # no EXIF
    }
    assert Image.open(io.BytesIO(cases["rot6.jpg"][0])).size == (200, 100)  # stored sideways
    srv = BadServer(n_good=0)
    srv.bad.update({name: body for name, (body, _) in cases.items()})
    with srv.running():
        _write_metadata(str(tmp_path / "m.parquet"), [srv.bad_url(name) for name in cases])
        cfg = _config(str(tmp_path / "m.parquet"), str(tmp_path / "raw"), resize_mode="keep_ratio")
        result = run_download(cfg)
    assert result.stats["by_reason"] == {"success": len(cases)}
    samples = read_samples(cfg.output)
    for name, (_, (w, h)) in cases.items():
        s = samples[srv.bad_url(name)]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert (img.mode, img.size) == ("RGB", (64 * w // min(w, h), 64 * h // min(w, h))), name
        assert (s["json"]["original_width"], s["json"]["original_height"]) == (w, h), name
        assert _shows_upright(img, gray=name.startswith("gray")), (name, _quadrants(img))


@pytest.mark.parametrize("mode", ["no", "keep_ratio", "center_crop", "border"])
def test_exif_orientation_in_every_resize_mode(mode):
    """Upright in every resize mode; reading the orientation decodes no pixels, so ordinary
    images (no EXIF, or orientation 1) keep the fast path at its old cost."""
    from pipeline.data.img2dataset_guards import GuardedResizer, needs_conversion

    resizer = GuardedResizer(
        image_size=64, resize_mode=mode, resize_only_if_bigger=False, max_pixels=10**8
    )
    size = {"no": (100, 200), "keep_ratio": (64, 128)}.get(mode, (64, 64))
    for orientation in (6, 8):
        out, w, h, ow, oh, err = resizer(io.BytesIO(_tagged(_upright(100, 200), orientation)))
        assert err is None and (ow, oh) == (100, 200) and (w, h) == size, orientation
        img = Image.open(io.BytesIO(out))
        assert _shows_upright(img), (orientation, _quadrants(img))
    plain = _upright(200, 100)
    for body in (_tagged(plain, 1), _encoded(plain), _encoded(plain, "PNG")):
        im = Image.open(io.BytesIO(body))
        assert not needs_conversion(im)
        assert im.tile  # still undecoded: only the header was read
    assert needs_conversion(Image.open(io.BytesIO(_tagged(plain, 6, fmt="PNG"))))


# --- a deadline per image and a byte cap ------------------------------------------------------------


class _SlowOrHuge(http.server.BaseHTTPRequestHandler):
    """``/drip.jpg``: headers, then a byte every 0.5 s (each read well within timeout_s);
    ``/head-drip.jpg``: the headers themselves a line every 0.5 s; ``/huge.jpg``: a
    Content-Length over the cap; ``/stream.jpg``: a body over the cap without one. They stop
    when ``stop`` is set; ``sent`` counts the body bytes written."""

    stop = threading.Event()
    sent: Counter = Counter()

    def log_message(self, *args) -> None:
        pass

    def _drip(self, line: bytes) -> None:
        for _ in range(240):
            if self.stop.wait(0.5):
                return
            try:
                self.wfile.write(line)
                self.wfile.flush()
            except OSError:
                return
            self.sent[self.path] += len(line)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/head-drip.jpg":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._drip(b"X-Pad: x\r\n")
            return
        huge = 256 << 20
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if self.path != "/stream.jpg":
            self.send_header("Content-Length", str(huge if self.path == "/huge.jpg" else 10**6))
        self.end_headers()
        if self.path == "/drip.jpg":
            self._drip(b"\xff")
            return
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(huge >> 20):
                if self.stop.is_set():
                    return
                self.wfile.write(chunk)
                self.sent[self.path] += len(chunk)
        except OSError:
            pass


@contextlib.contextmanager
def _slow_or_huge_server():
    _SlowOrHuge.stop.clear()
    _SlowOrHuge.sent.clear()
    with synthetic.serve_folder("", handler=_SlowOrHuge) as base:
        try:
            yield base
        finally:
            _SlowOrHuge.stop.set()  # the dripping handlers end, then the server shuts down


@pytest.mark.timeout(240)
def test_a_dripping_or_huge_image_is_cut_and_counted_and_the_rest_arrives(server, tmp_path):
    """img2dataset's timeout bounds each read, not the download: a server dripping a byte a
    second held its image, shard and pass for as long as it dripped; and a body of any size was
    read whole into memory. Now each image has a deadline and a byte cap, counted as reasons."""
    with _slow_or_huge_server() as slow:
        bad = ["drip.jpg", "head-drip.jpg", "huge.jpg", "stream.jpg"]
        urls = server.good_urls()[:12] + [f"{slow}/{n}" for n in bad]
        _write_metadata(str(tmp_path / "m.parquet"), urls)
        cfg = _config(
            str(tmp_path / "m.parquet"),
            str(tmp_path / "raw"),
            image_deadline_s=2,
            max_image_bytes=4 << 20,
            shard_retry_rounds=0,
        )
        start = time.monotonic()
        result = run_download(cfg)
        took = time.monotonic() - start
        sent = dict(_SlowOrHuge.sent)
    # the drips would go on for 120 s; the rest of the run (process start-up) takes ~15 s
    assert took < 90, took
    assert result.failed_shards == []
    assert result.stats["by_reason"] == {"success": 12, "too_slow": 2, "too_large": 2}
    statuses = result.stats["statuses"]
    assert statuses[ERR_TOO_SLOW] == 2 and statuses[ERR_TOO_LARGE] == 2
    assert len(read_samples(cfg.output)) == 12
    # the huge body was refused from its Content-Length, the streamed one at the cap: neither
    # was read whole (what the server manages to write is bounded by the socket buffers)
    assert sent.get("/huge.jpg", 0) < 64 << 20 and sent.get("/stream.jpg", 0) < 64 << 20
    assert sent.get("/drip.jpg", 0) < 20


def test_fetch_image_keeps_img2dataset_behaviour_and_cuts_every_phase():
    """The request img2dataset sends (User-Agent with its token), its opt-out check and its
    error strings; the deadline also cuts a TLS handshake that never ends (the per-read
    timeout here is 30 s)."""
    from pipeline.data.img2dataset_guards import fetch_image

    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            seen["ua"] = self.headers["User-Agent"]
            body = b"0123456789"
            self.send_response(200)
            if self.path == "/short":
                self.send_header("Content-Length", "20")
            else:
                self.send_header("Content-Length", str(len(body)))
            if self.path == "/noai":
                self.send_header("X-Robots-Tag", "img2dataset: noai")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (in the kernel), never answers
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        opt_out = {"noai"}

        def fetch(url, **kw):
            kw = {"allow_loopback": True, "user_agent_token": "img2dataset", **kw}
            return fetch_image(url, kw.pop("timeout", 3), kw.pop("deadline", 5), 100, **kw)

        assert fetch(f"{base}/ok", disallowed_header_directives=opt_out) == (b"0123456789", None)
        assert "(compatible; img2dataset; +https://github.com/rom1504/img2dataset)" in seen["ua"]
        assert seen["ua"].startswith("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0)")
        body, err = fetch(f"{base}/noai", disallowed_header_directives=opt_out)
        assert body is None and reason_of(err) == "opted_out"
        assert fetch(f"{base}/noai", disallowed_header_directives=set())[0] == b"0123456789"
        body, err = fetch(f"{base}/short")
        assert err == "IncompleteRead(10 bytes read, 10 more expected)"  # as r.read() says it
        assert fetch(f"{base}/ok", user_agent_token=None)[1] is None
        assert "compatible" not in seen["ua"]
        err = fetch("http://10.255.255.1/x.jpg")[1]  # the connection guard still applies
        assert reason_of(err) == "refused_private"
        port = silent.getsockname()[1]
        for scheme in ("http", "https"):
            start = time.monotonic()
            body, err = fetch(f"{scheme}://127.0.0.1:{port}/x.jpg", timeout=30, deadline=1)
            assert err == ERR_TOO_SLOW and time.monotonic() - start < 5, scheme
    finally:
        httpd.shutdown()
        httpd.server_close()
        silent.close()


def test_new_reasons_and_settings():
    assert reason_of(ERR_TOO_SLOW) == "too_slow"
    assert reason_of(ERR_TOO_LARGE) == "too_large"
    with pytest.raises(ValueError, match="image_deadline_s"):
        DownloadConfig(input="x", output="y", image_deadline_s=0)
    with pytest.raises(ValueError, match="max_image_bytes"):
        DownloadConfig(input="x", output="y", max_image_bytes=0)
    from pipeline.data.img2dataset_guards import GuardedDownloader

    def downloader(**kw):
        args = dict.fromkeys(
            ["sample_writer_class", "resizer", "thread_count", "save_caption", "extract_exif",
             "output_folder", "column_list", "number_sample_per_shard", "oom_shard_count",
             "compute_hash", "verify_hash_type", "encode_format", "retries",
             "user_agent_token", "disallowed_header_directives"]
        )  # fmt: skip
        return GuardedDownloader(**args, timeout=10, **kw)

    d = downloader()  # unset: 3 x timeout_s, and 32 MiB
    assert (float(d.timeout), d.timeout.deadline_s, d.timeout.max_bytes) == (10, 30, 32 << 20)
    d = downloader(image_deadline_s=4.5, max_image_bytes=1000)
    assert (d.timeout.deadline_s, d.timeout.max_bytes) == (4.5, 1000)


# --- the distributors take units as the reader stages them ----------------------------------------


def _staging_reader(rows, out_dir, seen, wait_for=None, fail_at=None):
    """img2dataset's reader stages a unit (reads its parquet, writes a feather) as it is asked
    for one; this one notes which shards were done when each row was asked for, can wait for
    ``wait_for``'s shard to be done before going on (a distributor that takes every unit first
    never gets there), and can fail at ``fail_at``."""
    for row in rows:
        if row[0] == fail_at:
            raise RuntimeError("staging failed: throttled")
        if wait_for is not None and row[0] == wait_for[1]:
            deadline = time.monotonic() + 60
            while f"{wait_for[0]}.done" not in os.listdir(out_dir):
                if time.monotonic() > deadline:
                    raise AssertionError("no task ran before every unit was staged")
                time.sleep(0.05)
        seen.append((row[0], _done(out_dir)))
        yield row


@pytest.mark.timeout(180)
def test_pool_distributor_runs_units_as_they_are_staged(tmp_path):
    """Every unit used to be staged (serially, ~70 ms each on S3: an hour for 60,000) before
    the first image was fetched; now the first shard runs while the rest are staged, with at
    most two shards per worker submitted ahead of the results."""
    import multiprocessing

    from pipeline.data.img2dataset_guards import pool_distributor
    from tests.fakeworkers import FakeDownloader

    rows = [(i, f"unit{i}") for i in range(6)]
    seen: list = []
    reader = _staging_reader(rows, str(tmp_path), seen, wait_for=(0, 4))
    down = FakeDownloader(str(tmp_path), fail=5, slow=0.3)
    assert pool_distributor(1, down, reader, None, 0) == [(5, "unit5")]
    assert _done(tmp_path) == {0, 1, 2, 3, 4}
    asked = dict(seen)
    assert asked[3] != set()  # one worker: units 0 and 1 ahead, unit 3 waited for a result

    # a reader that fails part-way: the shards it handed out end, then its error is raised
    failing = tmp_path / "failing"
    failing.mkdir()
    reader = _staging_reader(rows, str(failing), [], fail_at=2)
    with pytest.raises(RuntimeError, match="staging failed"):
        pool_distributor(2, FakeDownloader(str(failing), slow=0.5), reader, None, 1)
    assert _done(failing) == {0, 1}
    assert multiprocessing.active_children() == []


def test_ray_distributor_runs_units_as_they_are_staged_and_records_them(local_ray, tmp_path):
    from pipeline.data.download import _PassOutcome, _recording
    from pipeline.data.img2dataset_guards import ray_distributor
    from tests.fakeworkers import FakeDownloader

    rows = [(i, f"unit{i}") for i in range(5)]
    outcome = _PassOutcome()
    distributor = _recording(ray_distributor, outcome)
    reader = _staging_reader(rows, str(tmp_path), [], wait_for=(0, 3))
    left = distributor(2, FakeDownloader(str(tmp_path), raise_on=4), reader, None, 0)
    assert left == [(4, "unit4")]
    assert _done(tmp_path) == {0, 1, 2, 3}
    assert outcome.ran == {0, 1, 2, 3, 4} and outcome.ok == {0, 1, 2, 3}

    failing = tmp_path / "failing"
    failing.mkdir()
    outcome = _PassOutcome()
    distributor = _recording(ray_distributor, outcome)
    reader = _staging_reader(rows, str(failing), [], fail_at=2)
    with pytest.raises(RuntimeError, match="staging failed"):
        distributor(2, FakeDownloader(str(failing), slow=2.0), reader, None, 0)
    assert _done(failing) == {0, 1}  # the tasks it had started ended before the error
