"""A loopback HTTP server with good images and every kind of bad response a crawler meets.

``BadServer(n_good=...)`` serves generated shape images (``pipeline.data.synthetic``) at
``/good/{i}.jpg`` and the cases in ``BAD_CASES`` at ``/bad/{name}``; every request is counted
per path (``server.hits``) so tests can tell whether a rerun downloaded again. The hanging
handler waits at most ``hang_s`` seconds and is released as soon as the server stops.
"""

from __future__ import annotations

import http.server
import io
import random
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

from pipeline.data import synthetic

# name -> what a downloader should make of it ("kept": arrives as an RGB jpg; else a reason)
BAD_CASES: dict[str, str] = {
    "missing.jpg": "http_404",
    "hang.jpg": "timeout",
    "page.html": "not_an_image",
    "truncated.jpg": "decode_error",
    "tiny.png": "too_small",
    "bomb.png": "decompression_bomb",
    "noai.jpg": "opted_out",
    "cmyk.jpg": "kept",
    "rgb16.png": "kept",
    "gray16.png": "kept",
    "rgba.png": "kept",
    "palette.png": "kept",
    "gray.jpg": "kept",
    "redirect.jpg": "kept",  # 302 to cmyk.jpg
    "redirect-private.jpg": "refused_private",  # 302 to 10.255.255.1: refused before connecting
}
# what the kept cases show (the colour is lost in the gray ones)
KEPT_SHOWS: dict[str, tuple[str | None, str]] = {
    "cmyk.jpg": ("red", "circle"),
    "rgb16.png": ("blue", "square"),
    "gray16.png": (None, "triangle"),
    "rgba.png": ("green", "circle"),
    "palette.png": ("yellow", "square"),
    "gray.jpg": (None, "circle"),
    "redirect.jpg": ("red", "circle"),
}
REDIRECTS = {"redirect.jpg": "/bad/cmyk.jpg", "redirect-private.jpg": "http://10.255.255.1/x.jpg"}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + _png_chunk(b"IEND", b"")
    )


def _png16(rgb: Image.Image, gray: bool) -> bytes:
    """A 16-bit PNG (gray or RGB) of ``rgb``, written chunk by chunk (Pillow writes neither)."""
    a = np.asarray(rgb.convert("L") if gray else rgb).astype(np.uint16) * 257
    h, w = a.shape[:2]
    rows = a.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    colour_type = 0 if gray else 2
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def make_bad_bodies(size: int = 96) -> dict[str, bytes]:
    """The response body of every bad case (the hang and the 404 have none)."""

    def shape(c, s, b="white", seed=0):
        return synthetic.draw_shape(c, s, b, size, random.Random(seed))

    good = _encode(shape("red", "circle"), "JPEG", quality=90)
    rgba = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # transparent: composited over white
    rgba.paste(
        shape("green", "circle"),
        mask=shape("green", "circle").convert("L").point(lambda v: 255 if v < 200 else 0),
    )
    return {
        "page.html": b"<!doctype html><html><body>not an image</body></html>",
        "truncated.jpg": good[: len(good) // 2],
        "tiny.png": _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "bomb.png": bomb_png(),
        "noai.jpg": good,
        "cmyk.jpg": _encode(shape("red", "circle").convert("CMYK"), "JPEG", quality=95),
        "rgb16.png": _png16(shape("blue", "square"), gray=False),
        "gray16.png": _png16(shape("red", "triangle", "black"), gray=True),
        "rgba.png": _encode(rgba, "PNG"),
        "palette.png": _encode(shape("yellow", "square", "black").convert("P"), "PNG"),
        "gray.jpg": _encode(shape("blue", "circle").convert("L"), "JPEG", quality=95),
    }


class BadServer:
    """Good and bad images over loopback HTTP; counts requests per path."""

    def __init__(self, n_good: int = 0, size: int = 96, hang_s: float = 8.0, seed: int = 0):
        self.samples = synthetic.make_samples(n_good, seed=seed)
        self.good = [
            _encode(
                synthetic.draw_shape(
                    s.colour, s.shape, s.background, size, random.Random(seed * 7919 + i)
                ),
                "JPEG",
                quality=90,
            )
            for i, s in enumerate(self.samples)
        ]
        self.bad = make_bad_bodies(size)
        self.hang_s = hang_s
        self.hits: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.base = ""

    def good_urls(self) -> list[str]:
        return [f"{self.base}/good/{i}.jpg" for i in range(len(self.good))]

    def bad_url(self, name: str) -> str:
        return f"{self.base}/bad/{name}"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, body: bytes, ctype: str, extra: dict[str, str] | None = None):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] += 1
                if path.startswith("/good/"):
                    try:
                        i = int(path[len("/good/") :].split(".")[0])
                        body = server.good[i]
                    except (ValueError, IndexError):
                        self.send_error(404)
                        return
                    self._send(body, "image/jpeg")
                    return
                name = path[len("/bad/") :] if path.startswith("/bad/") else ""
                if name == "hang.jpg":
                    # a server that never answers (within the client's timeout)
                    server._stop.wait(server.hang_s)
                    return
                if name in REDIRECTS:
                    self.send_response(302)
                    self.send_header("Location", REDIRECTS[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name not in server.bad:
                    self.send_error(404, "Not Found")
                    return
                extra = {"X-Robots-Tag": "noai, noimageai"} if name == "noai.jpg" else None
                ctype = "text/html" if name.endswith(".html") else "image/" + name.split(".")[-1]
                self._send(server.bad[name], ctype, extra)

        return Handler

    @contextmanager
    def running(self) -> Iterator[BadServer]:
        """Serve on 127.0.0.1 (a free port) while the block runs."""
        httpd = _Server(("127.0.0.1", 0), self._handler())
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        self.base = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            yield self
        finally:
            self._stop.set()  # release hanging handlers before the server shuts down
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # the default listen backlog of 5 drops connections when 16+ download threads arrive at
    # once; the client then waits out a SYN retry (1 s) and reports a timeout
    request_queue_size = 256
