"""Where the image comes from: an HTTP(S) URL read with ranges, an OCI blob, or a local file."""

from __future__ import annotations

import logging
import os
import select
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpcore._sync.http11 as httpcore_http11
import httpx

from imagestream import __version__
from imagestream.errors import SourceError, UsageError
from imagestream.pipeline.credentials import Credentials
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.oci import Registry, registry_scheme, resolve_layer
from imagestream.pipeline.oci_refs import (
    OCI_SCHEME,
    host_platform,
    is_loopback,
    parse_platform,
    parse_reference,
    require_registry_host,
)
from imagestream.pipeline.range_reader import HttpRangeReader, RetryPolicy
from imagestream.pipeline.redact import redact_url
from imagestream.pipeline.registry_auth import RegistryAuth
from imagestream.reasons import Reason

log = logging.getLogger(__name__)

_FILE_CHUNK = 1 << 20
_PIPE_POLL = 0.1


class Source(Protocol):
    """A byte stream with a known or unknown length that counts its own resumes.

    `digest` is the `algorithm:hex` digest the bytes must have when the source publishes one
    (an OCI blob); the pipeline verifies it beside the SHA-384.
    """

    name: str
    digest: str | None

    @property
    def total(self) -> int | None:
        """The size in bytes, once known."""
        ...

    @property
    def resumes(self) -> int:
        """How many times the transfer was resumed."""
        ...

    def chunks(self) -> Iterator[bytes]:
        """Yield the bytes in order, once each."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


@dataclass(frozen=True)
class SourceOptions:
    """How to reach the source: TLS trust, credentials, retries, and which OCI blob to take.

    `platform` (`OS/ARCH[/VARIANT]`, default this machine's) picks an index entry, `layer` the
    layer by its title annotation; `plain_http` allows HTTP to a registry that is not on
    loopback. The three only matter to `oci://` sources.
    """

    ca_file: Path | None = None
    credentials: Credentials | None = None
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    platform: str | None = None
    layer: str | None = None
    plain_http: bool = False


class FileSource:
    """A local file, read in 1 MiB chunks; a pipe is waited on in slices the interrupt can end."""

    def __init__(self, path: Path, interrupt: Interrupt | None = None) -> None:
        self.name = str(path)
        self.digest: str | None = None
        self.resumes = 0
        self._interrupt = interrupt or Interrupt()
        try:
            self._file = path.open("rb", buffering=0)
        except OSError as exc:
            raise SourceError(f"cannot open source file {path}: {exc.strerror}") from exc
        status = os.fstat(self._file.fileno())
        # A pipe or a character device (`/dev/stdin`) has no size to promise.
        self.total: int | None = status.st_size if stat.S_ISREG(status.st_mode) else None
        self._waits = not stat.S_ISREG(status.st_mode)

    def chunks(self) -> Iterator[bytes]:
        """Yield the file's bytes; a read error is a `SourceError`."""
        while True:
            # A read from a pipe whose writer went quiet would block past any cancel.
            while self._waits and not select.select([self._file], [], [], _PIPE_POLL)[0]:
                self._interrupt.check()
            try:
                chunk = self._file.read(_FILE_CHUNK)
            except OSError as exc:
                raise SourceError(f"cannot read source file {self.name}: {exc.strerror}") from exc
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class _RangeReaderSource:
    """What HTTP objects and OCI blobs share: an `HttpRangeReader` over the source's own client.

    A subclass sets `name`, `digest`, `_client` and `_reader` in its constructor.
    """

    name: str
    digest: str | None
    _client: httpx.Client
    _reader: HttpRangeReader

    @property
    def total(self) -> int | None:
        """The size: from the blob's descriptor, or from the server's first answer if it tells."""
        return self._reader.total

    @property
    def resumes(self) -> int:
        """How many times the transfer was resumed."""
        return self._reader.resumes

    def chunks(self) -> Iterator[bytes]:
        """Yield the bytes."""
        return self._reader.chunks()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


class HttpSource(_RangeReaderSource):
    """An HTTP(S) object read with `HttpRangeReader` over one httpx client."""

    def __init__(self, url: str, options: SourceOptions, interrupt: Interrupt) -> None:
        self.name = redact_url(url)
        self.digest = None
        self._client = make_client(options, interrupt=interrupt)
        headers = {}
        if options.credentials is not None:
            authorization = options.credentials.authorization_for(httpx.URL(url).netloc.decode())
            if authorization:
                headers["Authorization"] = authorization
        self._reader = HttpRangeReader(
            url, self._client, options.policy, headers, interrupt=interrupt
        )


class OciSource(_RangeReaderSource):
    """One layer blob of an OCI artifact, resolved from `oci://` and read like an HTTP object.

    The manifest is resolved when the source opens, so an unknown tag, a refusal or a missing
    platform fails before any byte is written. The blob's size is known from its descriptor.
    """

    def __init__(self, location: str, options: SourceOptions, interrupt: Interrupt) -> None:
        reference = parse_reference(location)
        wanted = parse_platform(options.platform) if options.platform else host_platform()
        credentials = options.credentials or Credentials()
        self.name = str(reference)
        self._client = make_client(options, interrupt=interrupt)
        try:
            base = f"{registry_scheme(self._client, reference, options.plain_http)}://"
            base += reference.registry
            log.info("%s: the registry is reached at %s", self.name, base)
            login = credentials.login_for(reference.registry)
            self._client.auth = RegistryAuth(login, httpx.URL(base))
            registry = Registry(self._client, base, reference, options.policy, interrupt)
            try:
                layer = resolve_layer(registry, wanted, options.layer)
            except SourceError as exc:
                if exc.reason is Reason.UNAUTHORIZED and login is None:
                    exc.message += "; no credentials were sent (an anonymous pull)"
                if is_loopback(reference.host):
                    # Which of TLS and plain HTTP was tried is this machine's guess: say it.
                    exc.message += f" (the registry was reached at {base})"
                exc.args = (exc.message,)
                raise
            self.digest = layer.digest
            self._reader = HttpRangeReader(
                registry.blob_url(layer.digest),
                self._client,
                options.policy,
                size=layer.size,
                hooks=registry.hooks(f"blob {layer.digest}"),
                interrupt=interrupt,
            )
        except BaseException:
            self._client.close()
            raise


def check_location(location: str) -> None:
    """Refuse a SOURCE no source could open, before anything is opened or connected.

    Raises `UsageError` for a malformed http(s) URL (no host, a bad port, a broken IPv6
    literal), an `oci://` reference that does not parse or does not start with a registry
    host, and an unsupported scheme. Local paths are not looked at.
    """
    if location.startswith(OCI_SCHEME):
        require_registry_host(location)
    elif location.startswith(("http://", "https://")):
        try:
            # Both parsers, so a URL either would reject fails here as a usage error.
            urlsplit(location).port  # noqa: B018 - raises on a port out of range
            url = httpx.URL(location)
        except (httpx.InvalidURL, ValueError) as exc:
            # Not echoed: a URL that does not parse cannot be stripped of its credentials.
            raise UsageError(f"invalid source URL: {exc}") from exc
        if not url.host:
            raise UsageError(
                f"invalid source URL {redact_url(location)}: it names no host "
                "(expected http(s)://HOST[:PORT]/PATH)"
            )
    elif "://" in location and not location.startswith("file://"):
        scheme = location.split("://", 1)[0]
        raise UsageError(
            f"unsupported source scheme {scheme}://: use http://, https://, oci:// or a path"
        )


def open_source(
    location: str, options: SourceOptions, interrupt: Interrupt | None = None
) -> Source:
    """Open a URL (http://, https://, oci://) or a local path (plain or file://).

    Setting `interrupt` ends whatever the source waits for with `Cancelled`: the manifest
    resolution and token requests while it opens, then reads, stalls and retry sleeps.
    """
    check_location(location)
    interrupt = interrupt or Interrupt()
    if location.startswith(OCI_SCHEME):
        return OciSource(location, options, interrupt)
    if location.startswith(("http://", "https://")):
        return HttpSource(location, options, interrupt)
    if location.startswith("file://"):
        return FileSource(Path(location.removeprefix("file://")), interrupt)
    return FileSource(Path(location), interrupt)


# httpcore reads the socket 64 KiB at a time, and each read costs a pass through h11 with the
# GIL held: 256 KiB reads halve the fetch's CPU (0.41 s -> 0.18 s for 394 MiB from nginx, see
# benchmarks/README.md). A class attribute of httpcore's; if it goes away, reads stay at 64 KiB.
_HTTPCORE_READ_SIZE = 256 << 10
if hasattr(httpcore_http11.HTTP11Connection, "READ_NUM_BYTES"):
    httpcore_http11.HTTP11Connection.READ_NUM_BYTES = _HTTPCORE_READ_SIZE


def make_client(
    options: SourceOptions,
    transport: httpx.BaseTransport | None = None,
    interrupt: Interrupt | None = None,
) -> httpx.Client:
    """An httpx client: system trust plus the extra CA, proxies from the environment.

    `transport` replaces the network (tests hand in an `httpx.MockTransport`); `interrupt`, when
    set, cuts every connection of the client.
    """
    policy = options.policy
    timeout = httpx.Timeout(
        connect=policy.connect_timeout,
        read=policy.stall_timeout,
        write=policy.stall_timeout,
        pool=policy.connect_timeout,
    )
    # trust_env picks up HTTP(S)_PROXY, NO_PROXY and SSL_CERT_FILE like curl does.
    client = httpx.Client(
        verify=ssl_context(options.ca_file),
        timeout=timeout,
        follow_redirects=True,
        trust_env=True,
        transport=transport,
        headers={"User-Agent": f"imagestream/{__version__}"},
    )
    if interrupt is not None:
        interrupt.adopt(client)
    return client


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """System trust store, with `ca_file` added to it (never replacing it, never skipping)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load CA bundle {ca_file}: {exc}") from exc
    return context
