"""The fault injector in front of a real registry: a reverse proxy whose answers misbehave.

:class:`FaultProxy` is a :class:`~tests.support.range_server.FaultServer` whose origin is one
plain HTTP upstream (a :class:`~tests.support.registry.Registry`): it forwards every request,
keeping the client's ``Host`` header (so the URLs the registry builds point at the proxy),
streams the answer back and records each exchange. The faults are the injector's own
(:class:`~tests.support.range_server.Fault`); those a registry test wants are about blobs and
manifests, selected with :data:`BLOB_GETS`, :data:`BLOB_REQUESTS` and :data:`MANIFEST_GETS`:

* ``Fault.reset(after, on=BLOB_GETS)`` — a load balancer or a flaky link cutting a download;
* ``Fault.tamper(on=MANIFEST_GETS)`` — the registry's bytes plus a newline (still valid JSON,
  same ``Docker-Content-Digest``): a corrupting or lying intermediary;
* ``Fault.strip_accept_ranges(on=BLOB_REQUESTS)`` — as behind some CDNs (the registry still
  honours ``Range``);
* ``Fault.cut_before_end(on=BLOB_GETS)`` — every byte, chunked, but not the final chunk.

An upstream body that ends before its ``Content-Length`` (the registry's 416 does that: it
announces the blob's size over a 33-byte error text) is passed on as it is, and the connection
to the client is then closed, as the registry closes its own. Plain HTTP only: a proxy in front
of TLS would have to terminate it with its own certificate.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterable, Iterator
from typing import Protocol
from urllib.parse import urlsplit

from .range_server import (
    HOP_BY_HOP,
    Answer,
    Fault,
    FaultKind,
    FaultPlan,
    FaultServer,
    RequestRecord,
    Requests,
)
from .registry import Registry

_BLOB_RE = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_MANIFEST_RE = re.compile(r"^/v2/.+/manifests/[^/]+$")
_CHUNK = 64 * 1024

#: Blob downloads.
BLOB_GETS = Requests(frozenset({"GET"}), _BLOB_RE)
#: Blob downloads and their HEAD checks.
BLOB_REQUESTS = Requests(frozenset({"GET", "HEAD"}), _BLOB_RE)
#: Manifest downloads.
MANIFEST_GETS = Requests(frozenset({"GET"}), _MANIFEST_RE)


class FaultProxy(FaultServer):
    """A reverse proxy to ``upstream`` (``http://HOST:PORT``) with a plan of faults.

    Use as a context manager; :attr:`address` (``127.0.0.1:PORT``) is what a client uses in
    place of the registry's. :meth:`add` plans more faults while it runs.
    """

    def __init__(self, upstream: str, faults: Iterable[Fault] = ()) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port
        super().__init__(FaultPlan(), name="fault-proxy")
        self.add(*faults)

    def add(self, *faults: Fault) -> None:
        """Plan ``faults`` after those already pending."""
        if any(fault.kind is FaultKind.CHANGE for fault in faults):
            raise ValueError("a proxy does not own its upstream's objects: it cannot change one")
        self.faults.add(*faults)

    @property
    def pending(self) -> list[Fault]:
        """The faults not yet (fully) used."""
        return self.faults.pending

    def blob_gets(self) -> list[RequestRecord]:
        """The blob GETs among :attr:`requests`."""
        return [r for r in self.requests if BLOB_GETS(r.method, urlsplit(r.path).path)]

    def answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        """The upstream's answer, its body streamed as it arrives."""
        upstream = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        try:
            upstream.request(method, target, body=body, headers=headers)
            response = upstream.getresponse()
        except BaseException:
            upstream.close()
            raise
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        content = iter(()) if method == "HEAD" else _read(response)
        return Answer(response.status, response.reason, kept, content, upstream.close)


def _read(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while chunk := response.read(_CHUNK):
        yield chunk


class FaultProxyFactory(Protocol):
    """Type of the ``fault_proxy_factory`` fixture."""

    def __call__(self, registry: Registry, *faults: Fault) -> FaultProxy:
        """Start a proxy in front of ``registry`` (plain HTTP) with ``faults`` planned."""
        ...
