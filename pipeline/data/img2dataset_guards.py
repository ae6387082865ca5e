"""What we hand img2dataset in place of its own Resizer and Downloader.

``GuardedDownloader`` installs the connect-time address guard (``netguard``) in each worker
process before it downloads a shard, so redirects and DNS answers that lead to private addresses
are refused there too, and fetches each image itself (``fetch_image``): img2dataset's request,
with a deadline for the whole image and a cap on its bytes.

``GuardedResizer`` checks and normalises each downloaded image before img2dataset's resizer sees it.

img2dataset 1.47 decodes with ``cv2.imdecode(..., IMREAD_UNCHANGED)``, which (measured here):
- keeps 16-bit PNGs as uint16 and then saturates them to white when encoding JPEG;
- keeps grayscale images single-channel, so the shard holds a mix of 1- and 3-channel JPEGs;
- decodes whatever size a header claims (up to OpenCV's 2**30-pixel cap), a decompression bomb;
- ignores the EXIF orientation (and the re-encoded JPEG drops it), so a phone photo that browsers
  show upright is stored sideways or upside down.

``GuardedResizer`` wraps img2dataset's ``Resizer``: it reads the header with Pillow (no pixel
decoding), refuses images above ``max_pixels`` with a constant error string (so the stats count
it by reason), and converts anything that is not plain 8-bit RGB (16-bit, grayscale, CMYK,
palette, alpha, GIF) to 8-bit RGB (alpha over white, as img2dataset does), turned upright by
its EXIF orientation, before the normal resize path; the size filters then judge the upright
image. Plain 8-bit RGB images stored upright, the vast majority, take the unchanged fast path.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import io
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterable

import img2dataset.downloader
import numpy as np
from img2dataset.downloader import Downloader, is_disallowed
from img2dataset.resizer import Resizer
from PIL import Image, ImageOps

from pipeline.data.netguard import (
    GuardedHTTPHandler,
    GuardedHTTPSHandler,
    guarded_opener,
    install_connection_guard,
)
from pipeline.log import get_logger

log = get_logger(__name__)

# Error strings written into img2dataset's per-shard status_dict (keep them constant).
ERR_BOMB = "decompression bomb (image larger than max_image_pixels)"
ERR_NOT_IMAGE = "not an image (unrecognised format)"
ERR_CONVERT = "image conversion error"
ERR_TOO_SLOW = "download too slow (not done within image_deadline_s)"
ERR_TOO_LARGE = "download too large (more than max_image_bytes)"

# Formats OpenCV decodes itself; anything else (GIF, ...) goes through Pillow.
_CV2_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF"}


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation Pillow read with ``im``'s header: 2..8, or 1 (stored upright).

    Values outside 1..8 and unreadable EXIF count as 1, as browsers take them.
    """
    # PngImageFile.getexif decodes the whole image to look for an eXIf chunk after the pixel
    # data; browsers read only one that comes before it, which Pillow has seen with the header
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data"
            value = im.getexif().get(0x0112, 1)  # parsed from the header bytes, no decoding
    except Exception:  # noqa: BLE001 - malformed EXIF: shown as stored
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def needs_conversion(im: Image.Image) -> bool:
    """True unless ``im`` is upright 8-bit RGB in a format OpenCV decodes the same way."""
    if im.format not in _CV2_FORMATS or im.mode != "RGB":
        return True
    if exif_orientation(im) != 1:  # OpenCV's IMREAD_UNCHANGED ignores it: turned by to_rgb8
        return True
    rawmode = str(im.tile[0][3]) if im.tile else ""
    return ";16" in rawmode  # a 16-bit PNG that Pillow reports as RGB


def to_rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``im``, upright as a browser shows it (its EXIF orientation
    applied): 16-bit scaled down, alpha composited over white."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if exif_orientation(im) != 1:
        # the pixels are turned here and the tag dropped with the re-encode: stored upright
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float64)
        # 16-bit sources (I;16*, or I holding 0..65535) are scaled, 8-bit-range data kept;
        # float data in 0..1 (as float TIFFs mostly hold) is scaled up
        if mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0
        elif mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


class GuardedResizer(Resizer):
    """img2dataset's Resizer behind a size check and an 8-bit RGB conversion."""

    def __init__(self, *args, max_pixels: int = 100_000_000, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        fail = (None, None, None, None, None)
        if self.disable_all_reencoding:
            return super().__call__(img_stream, blurring_bbox_list)
        img_stream.seek(0)
        raw = img_stream.read()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # Pillow refuses above twice its own limit: let our max_pixels decide instead
                if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
                    Image.MAX_IMAGE_PIXELS = self.max_pixels
                im = Image.open(io.BytesIO(raw))  # reads the header only
        except Image.DecompressionBombError:
            return (*fail, ERR_BOMB)
        except Exception:  # noqa: BLE001 - Pillow raises many types for garbage
            # not something Pillow knows: let OpenCV have a go (it reports decoding errors)
            out = super().__call__(io.BytesIO(raw), blurring_bbox_list)
            return out if out[-1] != "Image decoding error" else (*fail, ERR_NOT_IMAGE)
        w, h = im.size
        if w * h > self.max_pixels:
            return (*fail, ERR_BOMB)
        if needs_conversion(im):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rgb = to_rgb8(im)
                buf = io.BytesIO()
                rgb.save(buf, "PNG", compress_level=1)  # lossless hand-over to the resizer
                raw = buf.getvalue()
            except Exception:  # noqa: BLE001 - truncated or corrupt pixel data
                return (*fail, "Image decoding error")
        return super().__call__(io.BytesIO(raw), blurring_bbox_list)


# --- fetching one image -----------------------------------------------------------------------------
# img2dataset 1.47 fetches with ``urlopen(request, timeout)`` then ``r.read()``: the timeout bounds
# each socket read, not the download, so a server that sends a byte now and then holds the image
# (its thread, its shard and the whole pass) for as long as it keeps sending; and ``r.read()``
# takes the whole body into memory, however large. ``GuardedDownloader`` fetches with
# ``fetch_image`` instead: the same request and opt-out check, the body read in chunks up to
# ``max_image_bytes``, and every connection of the image (redirects included) shut down by a
# watchdog thread once ``image_deadline_s`` has passed since the image's first request.

# the request img2dataset 1.47 sends (its User-Agent, token appended)
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_USER_AGENT_TOKEN = " (compatible; {}; +https://github.com/rom1504/img2dataset)"
ERR_OPTED_OUT = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's own string
_CHUNK = 1 << 16
DEADLINE_PER_TIMEOUT = 3  # image_deadline_s unset: this many times the per-read timeout


class _Watch:
    """One image's connections, shut down together when its deadline passes."""

    __slots__ = ("deadline", "expired", "_lock", "_socks", "_done")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._done = False

    def add(self, sock: socket.socket) -> None:
        # a duplicate of the descriptor: shutdown() acts on the connection itself, so it also
        # stops a TLS handshake (the SSL socket takes over the original descriptor) and every
        # read after it, and the duplicate is ours to close, never a number reused elsewhere
        try:
            dup = sock.dup()
        except OSError:
            return
        with self._lock:
            if self._done:
                dup.close()
                return
            self._socks.append(dup)
            if self.expired:
                _shut(dup)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for s in self._socks:
                _shut(s)

    def close(self) -> None:
        with self._lock:
            self._done = True
            socks, self._socks = self._socks, []
        for s in socks:
            s.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """A thread of this process that expires the watches whose deadline has passed (it ends
    when none is left, and starts again with the next)."""

    tick = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: set[_Watch] = set()
        self._thread: threading.Thread | None = None

    def watch(self, seconds: float) -> _Watch:
        w = _Watch(time.monotonic() + seconds)
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="image-deadline", daemon=True
                )
                self._thread.start()
        return w

    def forget(self, w: _Watch) -> None:
        with self._lock:
            self._watches.discard(w)
        w.close()

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                due = [w for w in self._watches if w.deadline <= now]
                self._watches.difference_update(due)
            for w in due:
                w.expire()


_watchdog = _Watchdog()
# a child forked while the thread ran would count on a thread it does not have
os.register_at_fork(after_in_child=lambda: _watchdog.__init__())
_current = threading.local()  # .watch: the image this thread is fetching


def _watched(create_connection):
    """``create_connection`` whose sockets join the calling thread's current watch."""

    def create(*args, **kwargs):
        sock = create_connection(*args, **kwargs)
        w = getattr(_current, "watch", None)
        if w is not None:
            w.add(sock)
        return sock

    return create


_openers: dict[tuple[bool, bool], urllib.request.OpenerDirector] = {}
_openers_lock = threading.Lock()


def _opener(allow_loopback: bool, allow_private: bool) -> urllib.request.OpenerDirector:
    """This process's guarded opener (``netguard.guarded_opener``) whose connections are
    watched."""
    key = (allow_loopback, allow_private)
    with _openers_lock:
        if key not in _openers:
            opener = guarded_opener(allow_loopback, allow_private)
            for h in opener.handlers:
                if isinstance(h, (GuardedHTTPHandler, GuardedHTTPSHandler)):
                    h.create_connection = _watched(h.create_connection)
            _openers[key] = opener
        return _openers[key]


def fetch_image(
    url: str,
    timeout: float,
    deadline_s: float,
    max_bytes: int,
    user_agent_token: str | None = None,
    disallowed_header_directives=None,
    allow_loopback: bool = False,
    allow_private: bool = False,
) -> tuple[bytes | None, str | None]:
    """``(body, None)`` or ``(None, error string)``, as img2dataset's ``download_image``, with
    the whole download (connections, redirects, headers, body) cut at ``deadline_s``
    (``ERR_TOO_SLOW``) and a body over ``max_bytes`` refused unread (``ERR_TOO_LARGE``)."""
    agent = _USER_AGENT + (_USER_AGENT_TOKEN.format(user_agent_token) if user_agent_token else "")
    w = _watchdog.watch(deadline_s)
    _current.watch = w
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        with _opener(allow_loopback, allow_private).open(request, timeout=timeout) as r:
            if disallowed_header_directives and is_disallowed(
                r.headers, user_agent_token, disallowed_header_directives
            ):
                return None, ERR_OPTED_OUT
            declared = r.headers.get("Content-Length", "").strip()
            if declared.isdigit() and int(declared) > max_bytes:
                return None, ERR_TOO_LARGE
            body = bytearray()
            while chunk := r.read(_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    return None, ERR_TOO_LARGE
            if w.expired:  # the end may be the watchdog's shutdown
                return None, ERR_TOO_SLOW
            if r.length:  # the connection ended before Content-Length: as r.read() says it
                raise http.client.IncompleteRead(bytes(body), r.length)
            return bytes(body), None
    except Exception as err:  # noqa: BLE001 - as img2dataset: the error string is the status
        return None, ERR_TOO_SLOW if w.expired else str(err)
    finally:
        _current.watch = None
        _watchdog.forget(w)


class _Timeout(float):
    """img2dataset's per-read timeout (``Downloader.timeout``), carrying our other fetch
    settings to ``_download_with_retry``: img2dataset hands it that value alone."""

    deadline_s: float
    max_bytes: int
    allow_loopback: bool
    allow_private: bool


_img2dataset_download = img2dataset.downloader.download_image_with_retry


def _download_with_retry(row, timeout, retries, user_agent_token, disallowed_header_directives):
    """img2dataset's ``download_image_with_retry`` through ``fetch_image`` (a body over the
    byte cap is not fetched again)."""
    if not isinstance(timeout, _Timeout):  # a plain img2dataset Downloader in this process
        return _img2dataset_download(
            row, timeout, retries, user_agent_token, disallowed_header_directives
        )
    key, url = row
    err = None
    for _ in range(retries + 1):
        body, err = fetch_image(
            url,
            float(timeout),
            timeout.deadline_s,
            timeout.max_bytes,
            user_agent_token,
            disallowed_header_directives,
            timeout.allow_loopback,
            timeout.allow_private,
        )
        if body is not None:
            return key, io.BytesIO(body), None
        if err == ERR_TOO_LARGE:
            break
    return key, None, err


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that first guards this process's connections, and fetches each
    image with ``fetch_image`` (a deadline per image, a byte cap)."""

    def __init__(
        self,
        *args,
        allow_loopback: bool = False,
        allow_private: bool = False,
        image_deadline_s: float | None = None,
        max_image_bytes: int = 32 << 20,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private
        limits = _Timeout(self.timeout)
        limits.deadline_s = float(image_deadline_s or DEADLINE_PER_TIMEOUT * self.timeout)
        limits.max_bytes = int(max_image_bytes)
        limits.allow_loopback, limits.allow_private = allow_loopback, allow_private
        self.timeout = limits  # what img2dataset hands the download function

    def __call__(self, row):
        # runs in the worker (a pool process or a Ray task): guard before the first request
        install_connection_guard(self.allow_loopback, self.allow_private)
        # img2dataset's shard loop calls its module's download_image_with_retry: ours
        img2dataset.downloader.download_image_with_retry = _download_with_retry
        return super().__call__(row)


# --- distributors ---------------------------------------------------------------------------------
# img2dataset 1.47's own distributors lose track of shards in two ways (read in its source):
# - multiprocessing: ``Pool.imap_unordered`` waits forever for a task whose worker process died
#   (the OOM killer, a segfault in a decoder): the download hangs;
# - ray: ``ray.get(all tasks)`` returns at the first task that fails as a whole, while the other
#   tasks go on writing their shards; our retry round then removes and rewrites a shard that a
#   task of the previous pass may still be writing (two writers on one tar).
# Ours end a pass only when no task of it can still be writing, and say what was lost; the shards
# left without ``_stats.json`` are removed and rerun by ``download``'s retry rounds.
# Both take the reader's rows as it stages them (a parquet read and a feather written into _tmp
# per unit, ~70 ms on S3): each task is submitted as its unit arrives, instead of every unit
# being staged before the first image is fetched. A reader that fails part-way lets the tasks
# it started end, then its error is raised.


def _retry(run, tasks: Iterable, max_shard_retry: int) -> list:
    failed = run(tasks)
    for i in range(max_shard_retry):
        if not failed:
            break
        log.warning("retrying %d failed shards in the same pass (try %d)", len(failed), i + 1)
        failed = run(failed)
    return failed


def die_with_parent(parent: int) -> None:
    """A pool worker's initializer: the worker ends when ``parent`` (the driver) does, even by
    ``kill -9`` or the OOM killer (Linux: the kernel sends it SIGKILL), instead of finishing its
    shards into an output that a rerun is filling at the same time."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError) as e:  # a static Python: no libc to ask
            log.warning("download worker: cannot ask to end with the driver (%s)", e)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def pool_distributor(processes_count, downloader, reader, _subjob_size, max_shard_retry) -> list:
    """img2dataset's multiprocessing distributor on a ``ProcessPoolExecutor``.

    A worker that dies breaks the pool (``BrokenProcessPool``): the executor stops the other
    workers and every pending shard is reported lost, so the pass ends instead of hanging.
    Returns the shards (``(id, file)`` rows) that failed or were lost.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
    from concurrent.futures.process import BrokenProcessPool

    lost: list = []
    # submitted and not done: a worker has its next shard queued while it runs one, and the
    # reader stages a unit only when a worker is about to need it
    limit = 2 * processes_count

    def run(tasks: Iterable) -> list:
        if lost:  # the pool broke earlier in this pass: the rest waits for the next round
            return list(tasks)
        failed: list = []
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            processes_count,
            mp_context=ctx,
            max_tasks_per_child=5,
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        )
        futures: dict = {}
        error = None

        def settle(done) -> None:
            for fut in done:
                row = futures.pop(fut)
                try:
                    ok, row = fut.result()
                except BrokenProcessPool:
                    lost.append(row)
                    continue
                if not ok:
                    failed.append(row)

        try:
            rows = iter(tasks)
            try:
                for row in rows:
                    while len(futures) >= limit:
                        settle(wait(futures, return_when=FIRST_COMPLETED)[0])
                    if lost:  # the pool broke: this unit and the rest go to the next round
                        lost.append(row)
                        lost.extend(rows)
                        break
                    try:
                        futures[pool.submit(downloader, row)] = row
                    except BrokenProcessPool:  # it broke since the last result
                        lost.append(row)
                        lost.extend(rows)
                        break
            except Exception as e:  # noqa: BLE001 - the reader: raised once the started end
                error = e
            settle(as_completed(list(futures)))
        except BaseException:  # an interrupt: no worker may go on writing after we return
            for proc in list((pool._processes or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if lost:
            log.error(
                "a download worker process died (out of memory? a crash in a decoder?); shards %s "
                "were not finished and go to the next retry round",
                sorted(r[0] for r in lost)[:50],
            )
        if error is not None:
            raise error
        return failed

    return _retry(run, reader, max_shard_retry) + lost


def _ray_call(downloader, row):
    return downloader(row)


def _ray_window(processes_count: int) -> int:
    """Tasks a Ray pass keeps submitted: twice the cluster's CPUs (each task takes one), read
    again as the pass goes, so nodes that join are used; at least ``2 * processes_count``."""
    import ray

    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
    except Exception:  # noqa: BLE001 - the GCS busy: the floor until the next read
        cpus = 0
    return max(2 * processes_count, 2 * cpus, 2)


def ray_distributor(processes_count, downloader, reader, _subjob_size, max_shard_retry) -> list:
    """img2dataset's Ray distributor, waiting for every task before it returns.

    A task that fails as a whole (its worker died after Ray's own retries) is logged and its
    shard reported; the others run to their end. An interrupt cancels every task still running,
    so none writes after the driver has gone. Returns the failed or lost shards.

    At most :func:`_ray_window` tasks are submitted and unfinished at a time: the reader stages
    a unit only when a CPU is about to take it (the staging folder holds a window's units, not
    the whole input's), and each wait looks at a window's tasks, not at every task of a
    60,000-unit pass (a wait per finished task over all of them would cost O(units^2)).
    """
    import ray

    remote = ray.remote(_ray_call)

    def run(tasks: Iterable) -> list:
        refs: dict = {}
        failed: list = []

        def settle(done) -> None:
            for ref in done:
                row = refs.pop(ref)
                try:
                    ok, row = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    log.error("download task of shard %s failed: %s", row[0], exc)
                    failed.append(row)
                    continue
                if not ok:
                    failed.append(row)

        def wait_some() -> None:
            done, _ = ray.wait(list(refs), num_returns=1)
            more, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)  # others done too
            settle(set(done) | set(more))

        try:
            error = None
            window, read_at = _ray_window(processes_count), time.monotonic()
            rows = iter(tasks)
            try:
                while True:
                    while len(refs) >= window:  # a slot first: the reader stages as it yields
                        wait_some()
                        if time.monotonic() - read_at > 30:
                            window, read_at = _ray_window(processes_count), time.monotonic()
                    row = next(rows, None)
                    if row is None:
                        break
                    refs[remote.remote(downloader, row)] = row
            except Exception as e:  # noqa: BLE001 - the reader: raised once the started end
                error = e
            while refs:
                wait_some()
            if error is not None:
                raise error
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        return failed

    return _retry(run, reader, max_shard_retry)
