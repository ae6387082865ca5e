"""Local paths and ``s3://`` URIs behind one small API.

Everything in the project that reads or writes a dataset, a checkpoint or a model goes through
this module; nothing else knows which kind of location it is talking to. S3 settings come from the
standard AWS chain (``AWS_ENDPOINT_URL``, profiles, env credentials, instance roles), so tests
point it at a loopback S3 server and production at AWS without code changes.

Writes are atomic: data goes to a temporary name first and is renamed (local) or uploaded in one
PUT / multipart-complete (S3, where an object only appears when complete) into place. A reader
therefore never sees half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec
import fsspec.asyn

from pipeline import scratch

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors worth retrying: throttling, server errors, dropped connections.
_RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}


def is_remote(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` (and other fsspec protocols), False for local paths (a URI this module
    would misread raises: :func:`check_uri`)."""
    uri = check_uri(uri)
    return "://" in uri and not uri.startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and ``os.path.join`` for local paths."""
    base = str(base)
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{str(p).strip('/')}"
        return out
    return os.path.join(base, *parts)


def _strip_file(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


# "s3:/bucket/key": what Path() and os.path.normpath make of "s3://bucket/key"
_ONE_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]*")


class BadURIError(ValueError):
    """A URI this module would misread (``s3:/b/x``, ``S3://b/x``): a mistake in a setting,
    reported by the jobs as one line, like a config error."""


def check_uri(uri: str | os.PathLike) -> str:
    """``uri`` as this module reads it, or a :class:`BadURIError` for one it would misread.

    ``s3:/bucket/run`` (a slash lost to ``Path`` or ``os.path.normpath``) would otherwise be a
    relative local folder named ``s3:``, and ``S3://`` an unknown protocol."""
    uri = str(uri)
    m = _ONE_SLASH.match(uri)
    if m:
        scheme = m.group(1).lower()
        rest = uri[m.end() :]
        # file:/tmp/x lost one of file:///tmp/x's three slashes: the path stays absolute
        fixed = f"file:///{rest}" if scheme == "file" else f"{scheme}://{rest}"
        raise BadURIError(
            f"{uri!r} has one slash after '{m.group(1)}:' (Path() and os.path.normpath drop one "
            f"from URIs): write {fixed}"
        )
    m = _SCHEME.match(uri)
    if m and m.group(1) != m.group(1).lower():
        raise BadURIError(f"{uri!r}: write the scheme in lower case ({m.group(1).lower()}://)")
    if uri.startswith("s3://"):
        bucket = uri[5:].split("/", 1)[0]
        if not _BUCKET.fullmatch(bucket):
            # e.g. the YOUR-BUCKET placeholder of a shipped config, left in
            raise BadURIError(
                f"{uri!r}: {bucket!r} is not an S3 bucket name (lower-case letters, digits, "
                "dots and hyphens); put your bucket's name there"
            )
    return uri


def normalize(uri: str | os.PathLike) -> str:
    """A checked URI with ``file://`` dropped: code that also uses ``os.path`` on a location
    (checkpoint folders, local caches) takes it in this form."""
    return _strip_file(check_uri(uri))


def filesystem(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less path for ``uri``."""
    uri = _strip_file(check_uri(uri))
    if is_remote(uri):
        protocol = uri.split("://", 1)[0]
        fs = fsspec.filesystem(protocol, **_storage_options(protocol))
        return fs, uri.split("://", 1)[1]
    return fsspec.filesystem("file"), os.path.abspath(uri)


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol != "s3":
        return {}
    # botocore retries throttling and dropped connections itself; a connect timeout keeps an
    # endpoint that drops packets from holding every call for minutes
    opts: dict[str, Any] = {
        "config_kwargs": {
            "retries": {"max_attempts": 5, "mode": "adaptive"},
            "connect_timeout": 10,
        }
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def is_retryable(exc: BaseException) -> bool:
    """True for transient storage errors: throttling, 5xx, resets and timeouts.

    Follows ``__cause__``: s3fs turns botocore's ``ClientError(SlowDown)`` into a bare
    ``OSError(EBUSY, "Please reduce your request rate.")`` whose cause holds the S3 error code.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if _is_retryable_one(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__
    return False


def _is_retryable_one(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = None
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = str(err.get("Code", "")) or str(
            response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
    if code and code in _RETRYABLE_CODES:
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(
        s in text
        for s in (
            "SlowDown",
            "ServiceUnavailable",
            "InternalError",
            "Connection reset",
            "ConnectionReset",
            "ReadTimeout",
            "EndpointConnectionError",
            "ServerDisconnected",
            "IncompleteRead",
            "ResponseStreamingError",
            "500 Internal",
        )
    ) or bool(_HTTP_503.search(text))


# An HTTP 503 as botocore and aiohttp word it: "(503)", "503 Service Unavailable", "status 503".
# Not any "503": a shard named 00503.tar or "ends after 503 of 1000 samples" is no server error.
_HTTP_503 = re.compile(r"\(503\)|\b503 Service|\b(?:HTTP|[Ss]tatus(?: code)?)[ :=]*503\b")


def _unreachable(exc: BaseException) -> bool:
    """The S3 endpoint cannot be reached at all (botocore has already retried the connection):
    a wrong AWS_ENDPOINT_URL or a network that is down, not a blip worth minutes more."""
    text = f"{type(exc).__name__}: {exc}"
    return "EndpointConnectionError" in text or "Could not connect to the endpoint URL" in text


def with_retries(fn: Callable[[], T], what: str, attempts: int = 6, base_delay: float = 0.2) -> T:
    """Run ``fn``; retry transient storage errors with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _unreachable(exc):
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                    "AWS_ENDPOINT_URL", "AWS's default for the region"
                )
                raise ConnectionError(
                    f"{what}: the S3 endpoint ({endpoint}) cannot be reached: {exc}"
                ) from exc
            if attempt == attempts or not is_retryable(exc):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fresh(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``uri``, with s3fs's cached listing of it dropped: after a
    ``list_dir`` in this process, a file another process wrote since would look absent, or keep
    its old size and ETag."""
    fs, path = filesystem(uri)
    if is_remote(str(uri)):
        fs.invalidate_cache(path)
    return fs, path


def exists(uri: str | os.PathLike) -> bool:
    fs, path = _fresh(uri)
    return with_retries(lambda: fs.exists(path), f"exists {uri}")


def size(uri: str | os.PathLike) -> int:
    fs, path = _fresh(uri)
    return int(with_retries(lambda: fs.size(path), f"size {uri}"))


def list_dir(uri: str | os.PathLike, suffix: str = "") -> list[str]:
    """Names (not full paths) directly under ``uri`` ending with ``suffix``, sorted; [] if absent."""
    fs, path = filesystem(uri)

    def _ls() -> list[str]:
        try:
            # refresh: a listing must see what another process just wrote
            if is_remote(str(uri)):
                fs.invalidate_cache(path)
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            _check_bucket(fs, uri, path)
            return []
        return sorted(
            os.path.basename(str(e).rstrip("/"))
            for e in entries
            if str(e).rstrip("/") != path.rstrip("/")
        )

    return [n for n in with_retries(_ls, f"list {uri}") if n.endswith(suffix)]


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A file as a listing shows it: its size and a ``version`` that changes whenever the file
    is written again (S3: its ETag, which follows its content; locally: its modification time
    in ns and its inode, both new for a file replaced by a rename). None where the store shows
    neither: such a file never counts as unchanged."""

    size: int
    version: str | None


def list_files(uri: str | os.PathLike, suffix: str = "") -> dict[str, FileEntry]:
    """The files directly under ``uri`` whose names end with ``suffix``, by name (sorted), with
    their sizes and versions, from one listing (on S3 one LIST request per 1,000 objects, where
    a HEAD per file would be one request each); {} if absent."""
    uri = _strip_file(check_uri(uri))
    if not is_remote(uri):
        return _local_files(uri, suffix)
    fs, path = filesystem(uri)
    out = {}
    for e in _remote_listing(fs, uri, path, lambda: fs.ls(path, detail=True)):
        name = str(e["name"]).rstrip("/")
        if e.get("type") == "file" and name != path.rstrip("/") and name.endswith(suffix):
            out[os.path.basename(name)] = FileEntry(int(e["size"]), _remote_version(e))
    return dict(sorted(out.items()))


def _remote_listing(fs: Any, uri: str, path: str, listing: Callable[[], list[Any]]) -> list[Any]:
    """``listing()`` of a remote ``path``, fresh (a listing must see what another process just
    wrote), retried; [] for a path that does not exist in a bucket that does."""

    def run() -> list[Any]:
        fs.invalidate_cache(path)
        try:
            return listing()
        except FileNotFoundError:
            _check_bucket(fs, uri, path)
            return []

    return with_retries(run, f"list {uri}")


def walk_files(uri: str | os.PathLike) -> list[str]:
    """Paths relative to ``uri`` (``/``-separated, sorted) of every file under it, sub-folders
    included; [] if absent. One recursive listing (on S3 one LIST request per 1,000 objects,
    not one per folder); local links to folders are not followed (a link loop, or a second name
    for a folder, would give files again), links to files are kept."""
    uri = _strip_file(check_uri(uri))
    if not is_remote(uri):
        out = []
        for root, _, files in os.walk(uri):  # followlinks=False
            rel = os.path.relpath(root, uri)
            out += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in files]
        return sorted(out)
    fs, path = filesystem(uri)
    base = path.rstrip("/") + "/"
    found = _remote_listing(fs, uri, path, lambda: fs.find(path, withdirs=False))
    return sorted(str(n)[len(base) :] for n in found if str(n).startswith(base))


def _local_files(path: str, suffix: str) -> dict[str, FileEntry]:
    out = {}
    try:
        with os.scandir(path) as entries:
            for e in entries:
                if not e.name.endswith(suffix):
                    continue
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile, or a dead link
                    if e.is_file():  # links followed, as open() follows them
                        out[e.name] = _local_entry(e.stat())
    except FileNotFoundError:
        return {}
    return dict(sorted(out.items()))


def _local_entry(st: os.stat_result) -> FileEntry:
    return FileEntry(st.st_size, f"{st.st_mtime_ns}-{st.st_ino}")


def _remote_version(info: Mapping[str, Any]) -> str | None:
    for field in ("ETag", "etag", "generation", "mtime", "LastModified"):
        if info.get(field):
            return str(info[field]).strip('"')
    return None


def read_tail(uri: str | os.PathLike, n: int) -> tuple[bytes, FileEntry]:
    """The last ``n`` bytes of ``uri`` (all of it when shorter) and the entry of the file they
    were read from (:class:`FileEntry`, as :func:`list_files` shows it). On S3 one suffix-range
    GET, without the HEAD that opening the object costs, whose ETag names the version read."""
    uri = _strip_file(check_uri(uri))
    if not is_remote(uri):
        with open(uri, "rb") as f:
            st = os.fstat(f.fileno())  # of the file open, even if another replaces it now
            f.seek(max(0, st.st_size - n))
            return f.read(), _local_entry(st)
    fs, path = filesystem(uri)
    if uri.startswith("s3://"):
        return with_retries(lambda: _s3_tail(fs, path, n), f"read the end of {uri}")

    def tail() -> tuple[bytes, FileEntry]:
        fs.invalidate_cache(path)
        info = fs.info(path)  # before the read: a version older than the bytes, never newer
        size = int(info["size"])
        data = fs.cat_file(path, start=max(0, size - n), end=size)
        return data, FileEntry(size, _remote_version(info))

    return with_retries(tail, f"read the end of {uri}")


def _s3_tail(fs: Any, path: str, n: int) -> tuple[bytes, FileEntry]:
    bucket, key, _ = fs.split_path(path)
    # s3fs's public call_s3 (the botocore call with its retries and credentials); the body is
    # an aiobotocore stream, read on s3fs's own event loop
    resp = fs.call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=-{n}")
    body = resp["Body"]
    try:
        data = fsspec.asyn.sync(fs.loop, body.read)
    finally:
        body.close()
    # "bytes 100-199/200"; absent when the whole object came (a 200, not a 206)
    total = str(resp.get("ContentRange") or "").rpartition("/")[2]
    size = int(total) if total.isdigit() else len(data)
    return data, FileEntry(size, _remote_version(resp))


def _check_bucket(fs: fsspec.AbstractFileSystem, uri: str | os.PathLike, path: str) -> None:
    """An absent S3 prefix lists as empty, but an absent bucket is a mistake (a typo in the
    URI, the wrong account): say so instead of reading it as "no data yet"."""
    if not is_remote(str(uri)) or not str(uri).startswith("s3://"):
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:  # s3fs's translation of 404 NoSuchBucket
        raise FileNotFoundError(f"{uri}: S3 bucket {bucket!r} does not exist") from None
    except Exception:  # noqa: BLE001 - forbidden to look at the bucket: the listing stands
        pass


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path), f"read {uri}")


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri))


def makedirs(uri: str | os.PathLike) -> None:
    """Create a local directory (a no-op for object stores, which have no directories)."""
    if not is_remote(str(uri)):
        os.makedirs(_strip_file(str(uri)), exist_ok=True)


def _durable_replace(tmp: str, uri: str) -> None:
    """``os.replace`` after the file's data is on disk, and the rename itself made durable: a
    marker written after this never survives a crash that loses the file."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, uri)
    fd = os.open(os.path.dirname(os.path.abspath(uri)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Atomically and durably write ``data`` to ``uri``."""
    uri = _strip_file(str(uri))
    if is_remote(uri):
        fs, path = filesystem(uri)
        with_retries(lambda: fs.pipe_file(path, data), f"write {uri}")
        return
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _durable_replace(tmp, uri)
    except BaseException:  # e.g. a full disk: the partial file would keep it full
        _unlink(tmp)
        raise


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def put_file(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Atomically copy a local file to ``uri`` (local or remote; on disk before it is renamed)."""
    uri = _strip_file(str(uri))
    if is_remote(uri):
        fs, path = filesystem(uri)
        with_retries(lambda: fs.put_file(str(local_path), path), f"upload {uri}")
        return
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copyfile(local_path, tmp)
        _durable_replace(tmp, uri)
    except BaseException:
        _unlink(tmp)
        raise


def get_file(uri: str | os.PathLike, local_path: str | os.PathLike) -> None:
    """Copy ``uri`` to a local file, atomically."""
    local_path = str(local_path)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = f"{local_path}.tmp-{uuid.uuid4().hex[:8]}"
    fs, path = filesystem(uri)
    try:
        with_retries(lambda: fs.get_file(path, tmp), f"download {uri}")
    except BaseException:  # a partial download is no file: none left behind
        _unlink(tmp)
        raise
    os.replace(tmp, local_path)


def put_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy every file under ``local_dir`` to ``uri``, keeping relative paths."""
    root = Path(local_dir)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            put_file(p, join(str(uri), *p.relative_to(root).parts))


def get_dir(
    uri: str | os.PathLike, local_dir: str | os.PathLike, missing_only: bool = False
) -> int:
    """Copy every object under ``uri`` into ``local_dir``, keeping relative paths; returns how
    many were copied. ``missing_only``: skip files ``local_dir`` already has (each copy is
    atomic, so a file that exists is whole)."""
    fs, path = filesystem(uri)
    found = with_retries(lambda: fs.find(path, detail=True), f"list {uri}")
    # files only: S3 "folder" markers (zero-byte keys ending in "/", which the AWS console's
    # "Create folder" and other tools make) are no files to copy
    remote = is_remote(str(uri))
    files = [
        f
        for f, e in found.items()
        if not f.endswith("/")
        and (e.get("type") == "file" or (not remote and os.path.isfile(f)))  # local symlinks
    ]
    if not files:
        raise FileNotFoundError(f"nothing found under {uri}")
    copied = 0
    for f in files:
        rel = os.path.relpath(f, path)
        dest = os.path.join(str(local_dir), rel)
        if missing_only and os.path.exists(dest):
            continue
        get_file(join(str(uri), *rel.split("/")), dest)
        copied += 1
    return copied


def remove(uri: str | os.PathLike, recursive: bool = False) -> None:
    """Delete a file or (with ``recursive``) a tree; missing is not an error."""
    fs, path = filesystem(uri)
    try:
        with_retries(lambda: fs.rm(path, recursive=recursive), f"remove {uri}")
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def open_write(uri: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write through a local temporary file, committed atomically only if the block succeeds."""
    uri = str(uri)
    fd, tmp = scratch.mkstemp("upload", suffix=os.path.basename(uri))
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
        put_file(tmp, uri)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def open_read(uri: str | os.PathLike) -> IO[bytes]:
    """A binary stream for ``uri`` (streams from S3, does not download whole)."""
    fs, path = _fresh(uri)  # not a listing cached before another process (re)wrote it
    if not is_remote(str(uri)):
        return open(path, "rb")
    return with_retries(lambda: fs.open(path, "rb", block_size=8 << 20), f"open {uri}")


def _source_fingerprint(fs: Any, path: str) -> tuple[bool, str]:
    """(is a directory, a digest of its objects' names, sizes and ETags) for a remote path."""
    is_dir = fs.isdir(path)
    entries = fs.find(path, detail=True).values() if is_dir else [fs.info(path)]
    # names relative to the folder without its trailing slash ("/config.json"), as before that
    # spelling was accepted: ".../model/" and ".../model" are one source with one digest
    base = path.rstrip("/")
    items = sorted(
        (
            str(e.get("name", "")).removeprefix(base),
            e.get("size"),
            str(e.get("ETag") or e.get("LastModified") or ""),
        )
        for e in entries
    )
    return is_dir, hashlib.sha256(repr(items).encode()).hexdigest()[:20]


_SAMPLE_BLOCKS, _SAMPLE_BYTES = 16, 1 << 16


def _sampled_digest(path: str) -> str:
    """The digest local fingerprints used before 2026-12-05 (outputs saved with it are still
    accepted: :func:`same_content`): all of a file up to 1 MiB, else 16 blocks of 64 KiB spread
    through it, which missed weights changed between the blocks."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - _SAMPLE_BYTES) // (_SAMPLE_BLOCKS - 1)
            for i in range(_SAMPLE_BLOCKS):
                f.seek(i * step)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _content_digest(path: str) -> str:
    """sha256 of a local file's whole content (a model saved again with the same weights
    digests the same; one with a few layers changed does not). Remembered in the cache folder
    by path, size, mtime and inode, so an unchanged 11 GB FLAN-T5-XL is read once (~10 s), not
    at every job start; a file changed in place has a new mtime and is read again."""
    st = os.stat(path)
    real = os.path.realpath(path)
    key = [real, st.st_size, st.st_mtime_ns, st.st_ino]
    cache_dir = os.path.expanduser(os.environ.get("T2I_CACHE", "~/.cache/t2i-pipeline"))
    memo = os.path.join(cache_dir, "digests", hashlib.sha256(real.encode()).hexdigest()[:32])
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(memo) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return str(saved["sha256"])
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs the next read
        write_json(memo, {"key": key, "sha256": digest})
    return digest


def fingerprint(uri: str | os.PathLike) -> str | None:
    """A digest of what ``uri`` holds (a file, or a directory's files); None when nothing is
    there. On S3 the objects' names, sizes and ETags; locally the files' names and content
    (:func:`_content_digest`), not their times: the same bytes written again are unchanged."""
    uri = _strip_file(str(uri))
    if is_remote(uri):
        fs, path = _fresh(uri)
        if not with_retries(lambda: fs.exists(path), f"stat {uri}"):
            return None
        return with_retries(lambda: _source_fingerprint(fs, path), f"stat {uri}")[1]
    return _local_fingerprint(uri, _content_digest)


def _local_fingerprint(uri: str, digest: Callable[[str], str]) -> str | None:
    if not os.path.exists(uri):
        return None
    paths = [uri]
    if os.path.isdir(uri):
        paths = [os.path.join(d, f) for d, _, files in os.walk(uri) for f in files]
    items = sorted((os.path.relpath(p, uri), digest(p)) for p in paths)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:20]


def same_content(saved: str | None, uri: str | os.PathLike, now: str | None) -> bool:
    """Whether ``saved`` (a fingerprint an earlier run stored for ``uri``) is what ``uri``
    holds now (``now``: its :func:`fingerprint`). A local one stored before whole-file
    digests (sampled blocks) is checked the way it was made."""
    if saved == now:
        return True
    uri = _strip_file(str(uri))
    if saved is None or now is None or is_remote(uri):
        return False
    return saved == _local_fingerprint(uri, _sampled_digest)


def _marker_matches(marker: str, fingerprint: str) -> bool:
    try:
        with open(marker) as f:
            return json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):  # absent, or an old empty marker
        return False


def local_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A local path holding ``uri``'s content (a file or a directory).

    Local paths are returned as they are; remote ones are copied into ``cache_dir`` (default
    ``$T2I_CACHE`` or ``~/.cache/t2i-pipeline``) and reused while the source is unchanged: the
    copy's ``.complete`` marker holds a digest of the source's object names, sizes and ETags,
    checked with one listing per call, so a model replaced at the same URI is copied again.
    Processes that share the cache (the actors of one node) copy it once: the first takes a
    file lock and copies, the others wait for it and then find the marker. The source is
    listed again after the copy: one replaced meanwhile is copied again (a copy of a large
    object is several range requests, and could otherwise hold parts of two versions).
    """
    uri = _strip_file(str(uri))
    if not is_remote(uri):
        if not os.path.exists(uri):
            raise FileNotFoundError(f"no such file or directory: {uri}")
        return uri
    cache_dir = str(cache_dir or os.environ.get("T2I_CACHE", "~/.cache/t2i-pipeline"))
    dest = os.path.join(os.path.expanduser(cache_dir), uri.replace("://", "/").rstrip("/"))
    marker = dest + ".complete"
    fs, path = _fresh(uri)
    is_dir, fingerprint = with_retries(lambda: _source_fingerprint(fs, path), f"stat {uri}")
    if _marker_matches(marker, fingerprint):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if _marker_matches(marker, fingerprint):  # another process copied it while we waited
            return dest
        if os.path.exists(marker):
            log.info("%s changed since it was cached: copying it again", uri)
            os.remove(marker)
        _remove_stale_staging(dest)
        for attempt in range(1, _COPY_TRIES + 1):
            _copy_into_cache(uri, dest, is_dir)
            # an object replaced at the same URI during the copy (an export saved again while a
            # sampler reads it) gives a copy of both versions, ranges of each: taken only when
            # the source is the same after the copy as before it
            is_dir, after = with_retries(lambda: _source_fingerprint(fs, path), f"stat {uri}")
            if after == fingerprint:
                break
            if attempt == _COPY_TRIES:
                _remove_path(dest)
                raise RuntimeError(
                    f"{uri} changed while it was being copied, {_COPY_TRIES} times: is it "
                    "being written now? Try again when its writer is done"
                )
            log.warning("%s changed while it was being copied: copying it again", uri)
            fingerprint = after
        tmp = f"{marker}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            json.dump({"uri": uri, "fingerprint": fingerprint}, f)
        os.replace(tmp, marker)
    log.info("copied %s to local cache %s", uri, dest)
    return dest


_COPY_TRIES = 3


def _copy_into_cache(uri: str, dest: str, is_dir: bool) -> None:
    if not is_dir:
        get_file(uri, dest)
        return
    staging = f"{dest}.partial-{uuid.uuid4().hex[:8]}"
    try:
        get_dir(uri, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)  # an earlier or outdated copy
    os.replace(staging, dest)


def _remove_stale_staging(dest: str) -> None:
    """Staging folders and temporary files of ``dest`` left by a copy that was killed (an
    actor stopped mid-way leaves up to a whole model: FLAN-T5-XL is ~11 GB). Called with
    ``dest``'s lock held, so no copy of it is running."""
    folder, base = os.path.split(dest)
    stale = (f"{base}.partial-", f"{base}.tmp-", f"{base}.complete.tmp-")
    for name in os.listdir(folder):
        if name.startswith(stale):
            _remove_path(os.path.join(folder, name))


def _remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink(path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def read_into(uri: str | os.PathLike) -> io.BytesIO:
    """The whole object as an in-memory stream (for small files such as model heads)."""
    return io.BytesIO(read_bytes(uri))
