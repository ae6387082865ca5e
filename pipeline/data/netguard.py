"""Refuse URLs that point inside the network: private, loopback, link-local, reserved, multicast.

A web-scale URL list is untrusted input. Without this check a row such as
``http://169.254.169.254/latest/meta-data/`` or ``http://10.0.0.5/admin`` would make every
download worker fetch from the cluster's own network (SSRF). ``AddressGuard`` resolves each host
once (cached per host, resolved on a thread pool) and classifies every address it resolves to with
the ``ipaddress`` module; a URL is refused if ANY of its addresses is not public. Literal IP hosts
are classified without any network traffic.

That check happens before img2dataset fetches, so on its own it misses a host whose DNS answer
changes between the check and the fetch (DNS rebinding) and a public URL that redirects to a
private one. ``install_connection_guard`` closes both inside each download worker: it replaces
urllib's HTTP(S) handlers with ones whose connections resolve the host, refuse it when any address
is not public, and then connect only to the addresses just checked (redirects open new
connections and go through the same check). Nothing is sent to a refused address, not even a SYN.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

# getaddrinfo-like: (host, port) -> list of address strings
Resolver = Callable[[str, int], list[str]]

ALLOWED_SCHEMES = ("http", "https")


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to, through the system resolver."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]).split("%", 1)[0] for info in infos})


def is_transient_dns_error(exc: BaseException) -> bool:
    """A lookup that may succeed when retried: ``EAI_AGAIN`` (a throttled or unreachable
    resolver), a timeout. ``EAI_NONAME`` and the like are answers, not failures."""
    if isinstance(exc, socket.gaierror):
        return exc.errno == getattr(socket, "EAI_AGAIN", -3)
    return isinstance(exc, TimeoutError)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: a network's own translators


def classify_address(
    address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    allow_loopback: bool = False,
    allow_private: bool = False,
) -> str | None:
    """Why ``address`` may not be fetched from (``"loopback"``, ``"private"``, ...), or None.

    ``allow_private`` allows every non-public class (a lab network); ``allow_loopback`` allows only
    127.0.0.0/8 and ::1 (tests that serve from 127.0.0.1).
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:10.0.0.1 (mapped), 2002:0a00:0001:: (6to4) and 64:ff9b::10.0.0.1 (NAT64, what
        # DNS64 gives an IPv4-only host on an IPv6-only cluster) reach IPv4 addresses: judge those
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is None and ip in _NAT64:
            mapped = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if mapped is not None:
            return classify_address(mapped, allow_loopback, allow_private)
    if allow_private:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and (ip.is_site_local or ip in _NAT64_LOCAL):
        return "private"  # fec0::/10 (deprecated, still in use) and NAT64's local-use prefix
    # order matters: 127.0.0.1 is also "private" in ipaddress's sense
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:  # shared address space 100.64/10 and the like
        return "private"
    return None


class AddressGuard:
    """Decides per URL whether it may be fetched; one DNS lookup per host, cached."""

    def __init__(
        self,
        allow_loopback: bool = False,
        allow_private: bool = False,
        resolver: Resolver = system_resolver,
        threads: int = 32,
    ) -> None:
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private
        self.resolver = resolver
        self.threads = threads
        self._cache: dict[tuple[str, int], str | None] = {}
        self._lock = threading.Lock()
        self.lookups = 0  # DNS lookups actually made (cache misses), for tests and logs
        self.transient_failures = 0  # hosts left unjudged after every attempt said "try again"
        self.dns_attempts = 4
        self.dns_backoff = 0.25  # seconds, doubled per attempt

    def _judge_host(self, host: str, port: int) -> str | None:
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:  # an IP literal: classify, no network
            return classify_address(literal, self.allow_loopback, self.allow_private)
        if self.allow_private:
            return None  # everything is allowed: no reason to resolve
        addresses = None
        for attempt in range(self.dns_attempts):
            with self._lock:
                self.lookups += 1
            try:
                addresses = self.resolver(host, port)
                break
            except (OSError, UnicodeError, ValueError) as exc:
                if not is_transient_dns_error(exc):
                    return "unresolvable_host"
                if attempt + 1 < self.dns_attempts:
                    time.sleep(self.dns_backoff * 2**attempt)
        if addresses is None:
            # the resolver kept saying "try again" (throttled, timed out): no verdict on the
            # host, so its URLs stay in; each download worker's connection guard still resolves
            # and refuses a non-public address before connecting (and a host that never
            # resolves fails its downloads, counted by img2dataset)
            with self._lock:
                self.transient_failures += 1
            return None
        if not addresses:
            return "unresolvable_host"
        for a in addresses:
            try:
                reason = classify_address(a, self.allow_loopback, self.allow_private)
            except ValueError:
                return "unresolvable_host"
            if reason is not None:
                return reason
        return None

    @staticmethod
    def _host_port(url: str) -> tuple[str, int] | str:
        """(host, port) of ``url``, or the reason it cannot be fetched at all."""
        try:
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            host = parts.hostname
            port = parts.port
        except ValueError:
            return "bad_url"
        if scheme not in ALLOWED_SCHEMES:
            return "bad_url_scheme"
        if not host:
            return "bad_url"
        return host.lower().rstrip("."), port or (443 if scheme == "https" else 80)

    def check(self, url: str) -> str | None:
        """The reason ``url`` is refused, or None when it may be fetched."""
        hp = self._host_port(url)
        if isinstance(hp, str):
            return hp
        with self._lock:
            if hp in self._cache:
                return self._cache[hp]
        reason = self._judge_host(*hp)
        with self._lock:
            self._cache[hp] = reason
        return reason

    def check_many(self, urls: Iterable[str]) -> list[str | None]:
        """``check`` for each URL, resolving distinct hosts concurrently."""
        urls = list(urls)
        hosts = {hp for hp in map(self._host_port, urls) if not isinstance(hp, str)}
        with self._lock:
            todo = [hp for hp in hosts if hp not in self._cache]
        if len(todo) > 1 and self.threads > 1:
            with ThreadPoolExecutor(min(self.threads, len(todo))) as pool:
                results = list(pool.map(lambda hp: self._judge_host(*hp), todo))
            with self._lock:
                self._cache.update(zip(todo, results))
        return [self.check(u) for u in urls]


# --- connect-time guard, installed in download worker processes ------------------------------------


class RefusedAddress(OSError):
    """A connection the guard would not open; urllib reports it as the URL's error."""


def refuse_non_public(infos: list, allow_loopback: bool, allow_private: bool) -> None:
    """Raise :class:`RefusedAddress` if any ``getaddrinfo`` result is not to be fetched from."""
    for info in infos:
        ip = str(info[4][0]).split("%", 1)[0]
        reason = classify_address(ip, allow_loopback, allow_private)
        if reason is not None:
            raise RefusedAddress(f"refused connection to a {reason} address")


def guarded_create_connection(
    allow_loopback: bool = False,
    allow_private: bool = False,
    exempt: frozenset[tuple[str, int]] = frozenset(),
):
    """A ``socket.create_connection`` that refuses non-public addresses before connecting;
    ``exempt``: (host, port) pairs it connects to as they are (the configured proxies)."""

    def create_connection(
        address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *args, **kwargs
    ):
        host, port = address[0], address[1]
        if (str(host).lower(), int(port)) in exempt:  # a configured proxy, at its own port
            return socket.create_connection(address, timeout, source_address, *args, **kwargs)
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        refuse_non_public(infos, allow_loopback, allow_private)
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:  # only the addresses just checked
            sock = None
            try:
                sock = socket.socket(family, kind, proto)
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                error = e
                if sock is not None:
                    sock.close()
        raise error or OSError(f"no address for {host}")

    return create_connection


class _GuardedOpen:
    """Mixin for urllib's HTTP(S) handlers: every connection uses the guarded connect."""

    create_connection = None

    def do_open(self, http_class, req, **kwargs):
        create = self.create_connection

        def connection(host, **kw):
            conn = http_class(host, **kw)
            conn._create_connection = create  # what HTTPConnection.connect() calls
            return conn

        return super().do_open(connection, req, **kwargs)


class GuardedHTTPHandler(_GuardedOpen, urllib.request.HTTPHandler):
    pass


class GuardedHTTPSHandler(_GuardedOpen, urllib.request.HTTPSHandler):
    pass


def proxy_addresses(value: str) -> set[tuple[str, int]]:
    """(host, port) pairs urllib may connect to for a ``*_proxy`` setting (``host:port``
    without a scheme is an HTTP proxy, as urllib takes it). Without a port: 80 and 443, as
    urllib opens an HTTPS request's proxy connection at the HTTPS port."""
    parsed = urlsplit(value if "://" in value else f"http://{value}")
    if not parsed.hostname:
        return set()
    try:
        port = parsed.port
    except ValueError:
        return set()
    host = parsed.hostname.lower()
    return {(host, port)} if port else {(host, 80), (host, 443)}


class _GuardedRequests(urllib.request.BaseHandler):
    """Judges each request's own host (the first URL and every redirect) where a proxy will
    fetch it: the connection then goes to the proxy, so the connect-time guard never sees the
    host. (Without a proxy the connect-time guard judges the addresses it connects to.)"""

    handler_order = 100  # a preprocessor, before anything opens the request

    def __init__(self, allow_loopback: bool, allow_private: bool, proxies: dict[str, str]):
        self.allow_loopback, self.allow_private = allow_loopback, allow_private
        self.proxies = proxies

    def _check(self, req: urllib.request.Request) -> urllib.request.Request:
        if self.allow_private or req.type not in self.proxies:
            return req  # (allow_private: nothing to refuse; the proxy may resolve names alone)
        parts = urlsplit(req.full_url)
        host = parts.hostname or ""
        if urllib.request.proxy_bypass(host):
            return req  # no_proxy: a direct connection, judged when it is made
        try:
            port = parts.port or (443 if req.type == "https" else 80)
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except (OSError, ValueError) as e:
            raise urllib.error.URLError(f"cannot resolve {host!r}: {e}") from e
        try:
            refuse_non_public(infos, self.allow_loopback, self.allow_private)
        except RefusedAddress as e:  # as urllib reports the connect-time guard's refusal
            raise urllib.error.URLError(e) from None
        return req

    http_request = https_request = _check


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https URLs only."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise urllib.error.HTTPError(
                newurl, code, f"refused redirect to a {scheme or 'relative'}:// URL", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(
    allow_loopback: bool = False, allow_private: bool = False
) -> urllib.request.OpenerDirector:
    """A urllib opener for http and https alone, whose connections refuse non-public addresses.

    No FTP, file or data handlers (``build_opener`` adds them; a redirect to ``ftp://`` would
    connect unguarded), and redirects to other schemes are refused. A configured proxy
    (``*_proxy`` variables) is connected to at its own (host, port) only, which may well be a
    private address; the hosts it fetches for us (the first URL and every redirect) are
    resolved and judged here instead, as the connection to them is the proxy's.
    """
    proxies = urllib.request.getproxies()
    exempt = {a for k, v in proxies.items() if k in ("http", "https") for a in proxy_addresses(v)}
    create = guarded_create_connection(allow_loopback, allow_private, frozenset(exempt))
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        _GuardedRequests(allow_loopback, allow_private, proxies),
        urllib.request.ProxyHandler(proxies),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HTTPOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ]
    for cls in (GuardedHTTPHandler, GuardedHTTPSHandler):
        h = cls()
        h.create_connection = create
        handlers.append(h)
    for h in handlers:
        opener.add_handler(h)
    return opener


_installed: tuple[bool, bool] | None = None


def install_connection_guard(allow_loopback: bool = False, allow_private: bool = False) -> None:
    """Make this process's ``urllib.request.urlopen`` use ``guarded_opener`` (idempotent)."""
    global _installed
    if _installed != (allow_loopback, allow_private):
        urllib.request.install_opener(guarded_opener(allow_loopback, allow_private))
        _installed = (allow_loopback, allow_private)
