"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 server (moto in the tests).

``FaultProxy(upstream, fault_rate=0.25, seed=0)`` forwards every request to ``upstream`` and
answers a seeded fraction of them with a fault instead:

- ``slowdown``: 503 with S3's ``SlowDown`` XML error body (the request never reaches S3),
- ``internal``: 500 with S3's ``InternalError`` XML error body (never reaches S3),
- ``reset``: the request IS forwarded and applied by S3, then the client gets the status line,
  the headers and half the body before the socket is closed with a TCP RST. This is the nasty
  case: the write happened but the client cannot know, so its retry must be idempotent.

Decisions come from ``random.Random(seed)`` drawn once per request in arrival order, so a run
with one client thread is exactly reproducible; ``faults`` counts what was injected and
``requests`` every request seen, per kind and per method. ``target(method, path)`` limits
faults to matching requests (e.g. only the POST that completes a multipart upload) and
``max_faults`` caps how many are injected in all; ``record=True`` keeps every request's
method, path, headers and body in ``recorded`` (what actually went over the wire). Point ``AWS_ENDPOINT_URL`` at
``proxy.endpoint`` to put it between a client and S3.
"""

from __future__ import annotations

import http.client
import http.server
import io
import random
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

FAULT_KINDS = ("slowdown", "internal", "reset")

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>{rid}</RequestId><HostId>fault-proxy</HostId></Error>"
)
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# hop-by-hop headers are the proxy's business, not the upstream's
_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "expect",
}


class FaultProxy:
    """Threaded HTTP/1.1 proxy injecting S3 faults; use as a context manager."""

    def __init__(
        self,
        upstream: str,
        fault_rate: float = 0.25,
        seed: int = 0,
        kinds: tuple[str, ...] = FAULT_KINDS,
        target: Callable[[str, str], bool] | None = None,
        max_faults: int | None = None,
        record: bool = False,
    ) -> None:
        unknown = [k for k in kinds if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind {unknown[0]!r}; known: {FAULT_KINDS}")
        up = urlsplit(upstream)
        self.upstream_host = up.hostname or "127.0.0.1"
        self.upstream_port = up.port or 80
        self.fault_rate = fault_rate
        self.kinds = kinds
        self.target = target
        self.max_faults = max_faults
        self.record = record
        # (method, path, headers, body) of every request, when ``record``
        self.recorded: list[tuple[str, str, dict[str, str], bytes]] = []
        self.enabled = True
        self.faults: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def total_faults(self) -> int:
        return sum(self.faults[k] for k in FAULT_KINDS)

    def decide(self, method: str, path: str) -> str | None:
        """The fault for the next request (None: forward it untouched)."""
        with self._lock:
            self.requests[method] += 1
            self.requests["total"] += 1
            if self.target is not None and not self.target(method, path):
                return None
            # always draw both numbers so the sequence does not depend on `enabled`
            hit = self._rng.random() < self.fault_rate
            kind = self._rng.choice(self.kinds)
            if self.max_faults is not None and self.total_faults >= self.max_faults:
                return None
            if not (self.enabled and hit):
                return None
            self.faults[kind] += 1
            self.faults[f"{kind}:{method}"] += 1
            return kind


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for botocore's PUTs
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet test output
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        proxy = self.server.proxy
        if proxy.record:
            with proxy._lock:
                proxy.recorded.append((self.command, self.path, dict(self.headers.items()), body))
        kind = proxy.decide(self.command, self.path)
        if kind in _ERRORS:
            self._send_error(kind)
            return
        status, reason, headers, payload = self._forward(body)
        if kind == "reset":
            self._send_and_reset(status, reason, headers, payload)
            return
        self.send_response(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            out = [
                (k, v)
                for k, v in resp.getheaders()
                if k.lower() not in _HOP and k.lower() != "content-length"
            ]
            if self.command == "HEAD":
                length = resp.getheader("Content-Length")
                if length is not None:
                    out.append(("Content-Length", length))
            return resp.status, resp.reason, out, payload
        finally:
            conn.close()

    def _send_error(self, kind: str) -> None:
        status, code, message = _ERRORS[kind]
        payload = (
            b""
            if self.command == "HEAD"
            else _ERROR_XML.format(code=code, message=message, rid=uuid.uuid4().hex[:16]).encode()
        )
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_and_reset(
        self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes
    ) -> None:
        """Start the real response, then drop the connection with a RST half-way through."""
        if self.command != "HEAD" and status not in (204, 304) and len(payload) >= 2:
            self.send_response(status, reason)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
        # No body to cut (HEAD, empty PUT reply): reset before the status line instead.
        # SO_LINGER 0 makes close() send RST rather than FIN ("Connection reset by peer"); the
        # buffered file objects hold references to the socket, so close them first.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.wfile.close()
        self.rfile.close()
        self.connection.close()
        # the base class flushes wfile after the handler returns: give it something harmless
        self.wfile = io.BytesIO()
        self.rfile = io.BytesIO()
