"""What we hand img2dataset in place of its own Resizer and Downloader.

``GuardedDownloader`` installs the connect-time address guard (``netguard``) in each worker
process before it downloads a shard, so redirects and DNS answers that lead to private addresses
are refused there too.

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

import ctypes
import io
import os
import signal
import sys
import warnings

import numpy as np
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from PIL import Image, ImageOps

from pipeline.data.netguard import install_connection_guard
from pipeline.log import get_logger

log = get_logger(__name__)

# Error strings written into img2dataset's per-shard status_dict (keep them constant).
ERR_BOMB = "decompression bomb (image larger than max_image_pixels)"
ERR_NOT_IMAGE = "not an image (unrecognised format)"
ERR_CONVERT = "image conversion error"

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


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that first guards this process's connections."""

    def __init__(
        self, *args, allow_loopback: bool = False, allow_private: bool = False, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private

    def __call__(self, row):
        # runs in the worker (a pool process or a Ray task): guard before the first request
        install_connection_guard(self.allow_loopback, self.allow_private)
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


def _retry(run, tasks: list, max_shard_retry: int) -> list:
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
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    lost: list = []

    def run(tasks: list) -> list:
        if lost:  # the pool broke earlier in this pass: the rest waits for the next round
            return list(tasks)
        failed = []
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            processes_count,
            mp_context=ctx,
            max_tasks_per_child=5,
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        )
        try:
            futures = {pool.submit(downloader, row): row for row in tasks}
            for fut in as_completed(futures):
                try:
                    ok, row = fut.result()
                except BrokenProcessPool:
                    lost.append(futures[fut])
                    continue
                if not ok:
                    failed.append(row)
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
        return failed

    return _retry(run, list(reader), max_shard_retry) + lost


def _ray_call(downloader, row):
    return downloader(row)


def ray_distributor(processes_count, downloader, reader, _subjob_size, max_shard_retry) -> list:
    """img2dataset's Ray distributor, waiting for every task before it returns.

    A task that fails as a whole (its worker died after Ray's own retries) is logged and its
    shard reported; the others run to their end. An interrupt cancels every task still running,
    so none writes after the driver has gone. Returns the failed or lost shards.
    """
    import ray

    remote = ray.remote(_ray_call)

    def run(tasks: list) -> list:
        refs = {remote.remote(downloader, row): row for row in tasks}
        pending, failed = list(refs), []
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        ok, row = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        row = refs[ref]
                        log.error("download task of shard %s failed: %s", row[0], exc)
                        failed.append(row)
                        continue
                    if not ok:
                        failed.append(row)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return failed

    return _retry(run, list(reader), max_shard_retry)
