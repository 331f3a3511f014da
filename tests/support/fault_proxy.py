"""A small reverse HTTP proxy that misbehaves on purpose, in front of a real registry, for tests.

:class:`FaultProxy` listens on ``127.0.0.1:<free port>`` and forwards every request to one plain
HTTP upstream (a :class:`~tests.support.registry.Registry`), streaming the answer back, keeping
the client's ``Host`` header (so the URLs the registry builds point at the proxy) and recording
each exchange (:class:`ProxiedRequest`). Planned :class:`ProxyFault`\\ s change chosen answers:

* ``reset`` — a blob GET (``/v2/<name>/blobs/sha256:...``) sends ``after`` bytes of its body,
  waits until the client acknowledged them, holds the connection ``pause`` seconds, then aborts
  it with a TCP RST: a load balancer or a flaky link cutting a download;
* ``tamper_manifest`` — a manifest GET is answered with the registry's bytes plus a trailing
  newline (still valid JSON, same ``Docker-Content-Digest`` header), so its sha256 no longer
  matches the digest the client asked for: a corrupting or lying intermediary;
* ``strip_accept_ranges`` — blob HEAD and GET answers lose their ``Accept-Ranges`` header, as
  behind some CDNs (the registry still honours ``Range``);
* ``cut_before_end`` — a blob GET is forwarded chunked (``Transfer-Encoding: chunked`` instead of
  the registry's ``Content-Length``) with every byte of its body, but the connection is closed
  before the last chunk that ends the message: a proxy whose own upstream connection broke
  just after the last byte. The client has the whole blob yet an incomplete response, so it
  resumes at the blob's size.

An upstream body that ends before its ``Content-Length`` (the registry's 416 does that: it
announces the blob's size over a 33-byte error text) is passed on as it is, and the connection
to the client is then closed, as the registry closes its own.

Each fault applies to the next ``times`` matching requests, in plan order. Plain HTTP only: a
proxy in front of TLS would have to terminate it with its own certificate.
"""

from __future__ import annotations

import enum
import http.client
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Protocol, cast
from urllib.parse import urlsplit

from .range_server import reset_connection
from .registry import Registry
from .threaded_server import OwnedHttpServer, ThreadedHttpServer

_BLOB_RE = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_MANIFEST_RE = re.compile(r"^/v2/.+/manifests/[^/]+$")
_CHUNK = 64 * 1024
#: Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class FaultKind(enum.StrEnum):
    """What a :class:`ProxyFault` does (see the module docstring)."""

    RESET = "reset"
    TAMPER_MANIFEST = "tamper_manifest"
    STRIP_ACCEPT_RANGES = "strip_accept_ranges"
    CUT_BEFORE_END = "cut_before_end"


@dataclass(frozen=True)
class ProxyFault:
    """One planned fault; build it with the class methods."""

    kind: FaultKind
    times: int = 1
    after: int = 0
    pause: float = 0.0

    @classmethod
    def reset(cls, after: int, *, times: int = 1, pause: float = 0.0) -> ProxyFault:
        """Cut the next ``times`` blob GETs after ``after`` body bytes (``pause`` s before)."""
        return cls(FaultKind.RESET, times=times, after=after, pause=pause)

    @classmethod
    def tamper_manifest(cls, *, times: int = 1) -> ProxyFault:
        """Append a newline to the next ``times`` manifest GET bodies."""
        return cls(FaultKind.TAMPER_MANIFEST, times=times)

    @classmethod
    def strip_accept_ranges(cls, *, times: int = 1_000_000) -> ProxyFault:
        """Drop ``Accept-Ranges`` from blob HEAD/GET answers (by default from all of them)."""
        return cls(FaultKind.STRIP_ACCEPT_RANGES, times=times)

    @classmethod
    def cut_before_end(cls, *, times: int = 1) -> ProxyFault:
        """Send the next ``times`` blob GET bodies whole, chunked, but not the final chunk."""
        return cls(FaultKind.CUT_BEFORE_END, times=times)

    def applies_to(self, method: str, path: str) -> bool:
        """Whether this fault is about a request of ``method`` on ``path``."""
        if self.kind in (FaultKind.RESET, FaultKind.CUT_BEFORE_END):
            return method == "GET" and _BLOB_RE.match(path) is not None
        if self.kind is FaultKind.TAMPER_MANIFEST:
            return method == "GET" and _MANIFEST_RE.match(path) is not None
        return method in {"GET", "HEAD"} and _BLOB_RE.match(path) is not None


@dataclass
class _Planned:
    fault: ProxyFault
    remaining: int


@dataclass
class ProxiedRequest:
    """One request the proxy forwarded, and what it did with the answer."""

    method: str
    path: str
    range: str | None
    authorization: str | None  # the client's Authorization header (test credentials only)
    status: int = 0
    content_length: int | None = None  # as the upstream announced it
    body_bytes: int = 0  # body bytes sent to the client
    faults: list[FaultKind] = field(default_factory=list)


class FaultProxy(ThreadedHttpServer):
    """A reverse proxy to ``upstream`` (``http://HOST:PORT``) with a plan of faults.

    Use as a context manager; :attr:`address` (``127.0.0.1:PORT``) is what a client uses in
    place of the registry's. :meth:`add` plans more faults while it runs.
    """

    def __init__(self, upstream: str, faults: Iterable[ProxyFault] = ()) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port
        self._lock = threading.Lock()
        self._pending: list[_Planned] = []
        self._requests: list[ProxiedRequest] = []
        self._stopping = threading.Event()
        super().__init__(_ProxyHandler, name="fault-proxy", server_class=_ProxyServer)
        self.add(*faults)

    # -- plan and records -------------------------------------------------------------------

    def add(self, *faults: ProxyFault) -> None:
        """Plan ``faults`` after those already pending."""
        with self._lock:
            self._pending.extend(_Planned(fault, fault.times) for fault in faults)

    def take(self, method: str, path: str) -> list[ProxyFault]:
        """The faults (at most one of each kind) for this request, used up from the plan."""
        taken: list[ProxyFault] = []
        with self._lock:
            for planned in self._pending:
                fault = planned.fault
                if fault.applies_to(method, path) and all(t.kind is not fault.kind for t in taken):
                    planned.remaining -= 1
                    taken.append(fault)
            self._pending = [planned for planned in self._pending if planned.remaining]
        return taken

    @property
    def pending(self) -> list[ProxyFault]:
        """The faults not yet (fully) used."""
        with self._lock:
            return [planned.fault for planned in self._pending]

    @property
    def requests(self) -> list[ProxiedRequest]:
        """Every request forwarded so far, oldest first (records of finished exchanges)."""
        with self._lock:
            return list(self._requests)

    def blob_gets(self) -> list[ProxiedRequest]:
        """The blob GETs among :attr:`requests`."""
        return [r for r in self.requests if r.method == "GET" and _BLOB_RE.match(r.path)]

    def _record(self, record: ProxiedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    # -- lifecycle --------------------------------------------------------------------------

    def _before_shutdown(self) -> None:
        # Abandon responses in flight: handlers holding a connection before a reset end now.
        self._stopping.set()


class _ProxyServer(OwnedHttpServer):
    owner: FaultProxy

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients going away mid-answer (or being reset by us) is what the tests provoke.
        return


class _Reset(Exception):
    """The connection was aborted on purpose: end this handler without another response."""


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30

    @property
    def owner(self) -> FaultProxy:
        return cast(_ProxyServer, self.server).owner

    def log_message(self, format: str, *args: object) -> None:
        return  # tests read FaultProxy.requests

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _forward(self) -> None:
        owner = self.owner
        path = urlsplit(self.path).path
        record = ProxiedRequest(
            method=self.command,
            path=path,
            range=self.headers.get("Range"),
            authorization=self.headers.get("Authorization"),
        )
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            record.status = response.status
            faults = owner.take(self.command, path) if response.status in (200, 206) else []
            record.faults = [fault.kind for fault in faults]
            self._answer(response, faults, record)
        except _Reset:
            self.close_connection = True
        finally:
            upstream.close()
            owner._record(record)

    def _answer(
        self,
        response: http.client.HTTPResponse,
        faults: list[ProxyFault],
        record: ProxiedRequest,
    ) -> None:
        kinds = {fault.kind: fault for fault in faults}
        head = self.command == "HEAD"
        announced = response.getheader("Content-Length")
        record.content_length = int(announced) if announced is not None else None
        # Bodies to change, and bodies of unknown length, are read whole (they are small JSON);
        # blobs stream through.
        buffered = not head and (FaultKind.TAMPER_MANIFEST in kinds or announced is None)
        body = response.read() if buffered else None
        if body is not None and FaultKind.TAMPER_MANIFEST in kinds:
            body += b"\n"
        chunked = FaultKind.CUT_BEFORE_END in kinds
        self.send_response(response.status, response.reason)
        self._forward_headers(response, kinds, keep_length=body is None and not chunked)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if head:
            return
        if body is not None:
            self.wfile.write(body)
            record.body_bytes = len(body)
            return
        reset = kinds.get(FaultKind.RESET)
        self._copy_body(response, record, limit=reset.after if reset else None, chunked=chunked)
        if reset is not None:
            self.rfile.close()  # it would keep the descriptor, and the connection, open
            reset_connection(self.connection, stopping=self.owner._stopping, pause=reset.pause)
            raise _Reset
        # A chunked body without its last chunk, or a body shorter than its Content-Length,
        # leaves the client unable to find where a next response would start.
        if chunked or (record.content_length or 0) > record.body_bytes:
            self.close_connection = True

    def _forward_headers(
        self,
        response: http.client.HTTPResponse,
        kinds: dict[FaultKind, ProxyFault],
        *,
        keep_length: bool,
    ) -> None:
        """Pass the upstream's end-to-end headers on (Content-Length only if ``keep_length``)."""
        for name, value in response.getheaders():
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or (lowered == "content-length" and not keep_length):
                continue
            if lowered == "accept-ranges" and FaultKind.STRIP_ACCEPT_RANGES in kinds:
                continue
            self.send_header(name, value)

    def _copy_body(
        self,
        response: http.client.HTTPResponse,
        record: ProxiedRequest,
        *,
        limit: int | None,
        chunked: bool,
    ) -> None:
        """Pass the upstream body on until it ends or ``limit`` bytes were sent.

        ``chunked`` frames each piece as a chunk; the final, empty chunk is never sent.
        """
        while limit is None or record.body_bytes < limit:
            if self.owner._stopping.is_set():
                raise _Reset
            want = _CHUNK if limit is None else min(_CHUNK, limit - record.body_bytes)
            chunk = response.read(want)
            if not chunk:
                break
            self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            record.body_bytes += len(chunk)


class FaultProxyFactory(Protocol):
    """Type of the ``fault_proxy_factory`` fixture."""

    def __call__(self, registry: Registry, *faults: ProxyFault) -> FaultProxy:
        """Start a proxy in front of ``registry`` (plain HTTP) with ``faults`` planned."""
        ...
