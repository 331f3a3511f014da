"""A small HTTP/1.1 range server for the demo and for fault-injection tests.

It serves ONE file from disk on 127.0.0.1 (a free port), in background threads, with what a
careful client relies on: strong ETag and Last-Modified, `Accept-Ranges: bytes`, single
byte ranges (206 / 416) and `If-Range`. A `FaultPlan` makes chosen GET requests misbehave in
the ways real networks and servers do: connection resets, short bodies, stalls, error
statuses, ignored ranges, a changing object, wrong `Content-Range` starts and empty bodies.

    plan = FaultPlan([Fault.reset_at(64 << 20), Fault.status(503, retry_after="1")])
    with RangeServer(image_path, faults=plan) as server:
        fetch(server.url)
        print(server.requests)

It is a test tool, not a web server: it serves one path, no multipart ranges, no TLS.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import re
import socket
import socketserver
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast
from urllib.parse import quote, urlsplit

try:  # Linux: bytes not yet acknowledged by the peer (see `reset_connection`)
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _TIOCOUTQ = None

__all__ = [
    "AUTO_ETAG",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "RangeServer",
    "RequestRecord",
    "reset_connection",
]

AUTO_ETAG = '"auto"'
"""The `etag` default: derive a strong ETag from the file's size and mtime."""

_CHANGED_PREFIX = 1 << 20  # how much of the content a `change` fault alters
_ACK_WAIT = 5.0  # seconds a reset waits for the peer to acknowledge the bytes sent
_HANDLER_TIMEOUT = 60.0  # socket timeout of a connection, so a vanished peer frees its thread
_RANGE_RE = re.compile(r"bytes[ \t]*=[ \t]*(\d*)[ \t]*-[ \t]*(\d*)[ \t]*", re.IGNORECASE)


class FaultKind(enum.StrEnum):
    """What an injected fault does to the response of one GET request."""

    RESET = "reset"
    RESET_AT = "reset_at"
    SHORT = "short"
    IGNORE_RANGE = "ignore_range"
    STALL = "stall"
    STATUS = "status"
    CHANGE = "change"
    WRONG_RANGE_START = "wrong_range_start"
    EMPTY = "empty"


@dataclass(frozen=True)
class Fault:
    """One injected fault; build it with the class methods, which say what each field means."""

    kind: FaultKind
    after: int = 0  # RESET, SHORT, STALL: body bytes sent before the fault
    offset: int = 0  # RESET_AT: absolute file offset where the connection is reset
    seconds: float = 0.0  # STALL
    code: int = 0  # STATUS
    retry_after: str | None = None  # STATUS
    delta: int = 0  # WRONG_RANGE_START
    content: bool = True  # CHANGE: alter the bytes too, not only the validators

    @classmethod
    def reset(cls, after: int) -> Fault:
        """Send the headers and `after` body bytes, then abort the connection with a TCP RST.

        The reset waits until the client has acknowledged those bytes, so it sees exactly
        `after` of them. A shorter body is sent whole, then reset.
        """
        return cls(FaultKind.RESET, after=_non_negative("after", after))

    @classmethod
    def reset_at(cls, offset: int) -> Fault:
        """Reset the connection when the body reaches absolute file offset `offset`.

        The fault waits in the plan (holding back the faults behind it) until a GET's body
        covers `offset`, i.e. starts at or before it and ends after it.
        """
        return cls(FaultKind.RESET_AT, offset=_non_negative("offset", offset))

    @classmethod
    def short(cls, after: int) -> Fault:
        """Promise the full Content-Length, send only `after` body bytes, then close (FIN)."""
        return cls(FaultKind.SHORT, after=_non_negative("after", after))

    @classmethod
    def ignore_range(cls) -> Fault:
        """Answer 200 with the whole file, even though a Range was asked."""
        return cls(FaultKind.IGNORE_RANGE)

    @classmethod
    def stall(cls, after: int, seconds: float) -> Fault:
        """Send `after` body bytes, then send nothing for `seconds`, then close."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        return cls(FaultKind.STALL, after=_non_negative("after", after), seconds=seconds)

    @classmethod
    def status(cls, code: int, retry_after: str | None = None) -> Fault:
        """Answer status `code` (e.g. 429, 503, 404) with a small body and maybe Retry-After."""
        if not 100 <= code <= 599:
            raise ValueError(f"not an HTTP status code: {code}")
        return cls(FaultKind.STATUS, code=code, retry_after=retry_after)

    @classmethod
    def change(cls, content: bool = True) -> Fault:
        """From this request on the object is a new version: new ETag and Last-Modified.

        With `content` (the default) its first MiB also differs (the bytes are XORed), so a
        client that mixes versions ends with the wrong hash. The size stays the same.
        """
        return cls(FaultKind.CHANGE, content=content)

    @classmethod
    def wrong_range_start(cls, delta: int) -> Fault:
        """Answer 206 with a Content-Range start off by `delta`, and the body from there."""
        return cls(FaultKind.WRONG_RANGE_START, delta=delta)

    @classmethod
    def empty(cls) -> Fault:
        """Answer 206 with the right Content-Range for the asked range, but no body at all."""
        return cls(FaultKind.EMPTY)


def _non_negative(name: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


class FaultPlan:
    """A thread-safe queue of faults, consumed one per GET request, in order.

    Once it is empty requests are served normally. HEAD requests never consume a fault.
    """

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque(faults)

    def add(self, *faults: Fault) -> None:
        """Append faults to the end of the plan."""
        with self._lock:
            self._queue.extend(faults)

    @property
    def pending(self) -> list[Fault]:
        """The faults not consumed yet, next first."""
        with self._lock:
            return list(self._queue)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def take(self, body_start: int, body_end: int) -> Fault | None:
        """Consume the next fault for a GET whose body spans file bytes [body_start, body_end).

        A `reset_at` fault stays queued (and the request is served normally) unless the body
        covers its offset.
        """
        with self._lock:
            if not self._queue:
                return None
            head = self._queue[0]
            if head.kind is FaultKind.RESET_AT and not body_start <= head.offset < body_end:
                return None
            return self._queue.popleft()


@dataclass
class RequestRecord:
    """What one request asked and what it was answered (updated while the body is sent)."""

    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int = 0
    content_range: str | None = None
    content_length: int | None = None
    fault: FaultKind | None = None
    body_bytes: int = 0  # body bytes actually handed to the socket


@dataclass(frozen=True)
class _Version:
    """The validators and content alteration of one version of the served object."""

    generation: int
    etag: str | None
    mtime: int  # whole seconds, as Last-Modified carries them
    xor: int  # 0: the file's bytes as they are; else XOR the first MiB with this value

    @property
    def last_modified(self) -> str:
        return formatdate(self.mtime, usegmt=True)


@dataclass(frozen=True)
class _Answer:
    """The shape of a normal response: status and the file bytes its body carries."""

    status: int  # 200, 206 or 416
    start: int
    length: int


class RangeServer:
    """Serve one file over HTTP/1.1 with ranges, on 127.0.0.1, from background threads.

    Use it as a context manager; `url` is valid inside the block. Stopping is prompt: open
    connections are shut down, stalled handlers are woken.

    `advertise_ranges=False` makes it a server without range support: no `Accept-Ranges`
    and every GET answered 200 with the whole file. `etag` is the strong ETag to send
    (`AUTO_ETAG` derives one from the file's size and mtime, None sends none);
    `last_modified=False` leaves Last-Modified out. `chunk_size` is the send granularity.
    """

    def __init__(
        self,
        path: Path,
        *,
        faults: FaultPlan | None = None,
        advertise_ranges: bool = True,
        etag: str | None = AUTO_ETAG,
        last_modified: bool = True,
        chunk_size: int = 256 * 1024,
    ) -> None:
        st = path.stat()
        self.path = path
        self.size = st.st_size
        self.faults = faults if faults is not None else FaultPlan()
        self.advertise_ranges = advertise_ranges
        self.send_last_modified = last_modified
        self.chunk_size = chunk_size
        self._base_etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"' if etag == AUTO_ETAG else etag
        self._version = _Version(0, self._base_etag, int(st.st_mtime), 0)
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> RangeServer:
        """Bind a free port on 127.0.0.1 and start serving in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("RangeServer already started")
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"range-server-{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, abort open connections and wait (bounded) for handlers to end."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes stalls and reset waits
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            # Unblocks handlers stuck in send (peer not reading) or waiting for a request.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what tests look at -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("RangeServer is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The URL of the served file, e.g. http://127.0.0.1:40123/image.raw.zst."""
        return f"http://127.0.0.1:{self.port}/{quote(self.path.name)}"

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the records of the requests answered so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def etag(self) -> str | None:
        """The ETag of the current version of the object."""
        return self._version.etag

    @property
    def last_modified(self) -> str:
        """The Last-Modified value of the current version of the object."""
        return self._version.last_modified

    # -- used by the handler ------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _track(self, conn: socket.socket, thread: threading.Thread | None) -> None:
        with self._lock:
            if thread is None:
                self._connections.pop(conn, None)
            else:
                self._connections[conn] = thread

    def _change(self, content: bool) -> _Version:
        """Switch to a new version of the object and return it."""
        with self._lock:
            old = self._version
            generation = old.generation + 1
            etag = self._base_etag
            if etag is not None:
                suffix = f"-changed{generation}"
                etag = f'{etag[:-1]}{suffix}"' if etag.endswith('"') else etag + suffix
            # A different byte per generation, never 0, so each version differs from the last.
            xor = (generation % 255) + 1 if content else old.xor
            self._version = _Version(generation, etag, old.mtime + 1, xor)
            return self._version

    def _current(self) -> _Version:
        with self._lock:
            return self._version


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    owner: RangeServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can take seconds
        # on machines without a resolver; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client going away mid-response is normal here (it is what tests provoke).
        return


class _StopServing(Exception):
    """The server is stopping: abandon this response."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _HANDLER_TIMEOUT
    # Headers and body go out in separate writes; with Nagle a small body then waits for the
    # client's delayed ACK (40 ms per request).
    disable_nagle_algorithm = True
    server_version = "imagestream-range-server"

    @property
    def owner(self) -> RangeServer:
        return cast(_Server, self.server).owner

    def setup(self) -> None:
        super().setup()
        self.owner._track(self.connection, threading.current_thread())
        if self.owner._stopping.is_set():
            # Accepted just as the server stopped, after `stop` looked for connections to
            # shut down: shut it here, or it would idle until the handler timeout.
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.owner._track(self.connection, None)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        # Quiet: tests read `RangeServer.requests` instead of a log.
        return

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- deciding -----------------------------------------------------------------------------

    def _serve(self, *, head: bool) -> None:
        owner = self.owner
        record = RequestRecord(
            method=self.command,
            path=self.path,
            range=self.headers.get("Range"),
            if_range=self.headers.get("If-Range"),
        )
        if urlsplit(self.path).path != f"/{quote(owner.path.name)}":
            self._send_small(record, 404, b"not found\n")
            return
        version = owner._current()
        answer = self._answer(head, version)
        fault = None if head else owner.faults.take(answer.start, answer.start + answer.length)
        record.fault = fault.kind if fault is not None else None
        try:
            if fault is None:
                self._send(record, answer, version, head=head)
            else:
                self._send_faulty(record, answer, version, fault)
        except (OSError, _StopServing):
            # The peer went away, or the server is stopping: this connection is done.
            self.close_connection = True

    def _answer(self, head: bool, version: _Version) -> _Answer:
        """Decide status and body range for this request as a well-behaved server would."""
        owner = self.owner
        full = _Answer(200, 0, owner.size)
        range_value = self.headers.get("Range")
        # Range is only defined for GET (RFC 9110 §14.2); a server without ranges ignores it.
        if head or not owner.advertise_ranges or range_value is None:
            return full
        if_range = self.headers.get("If-Range")
        if if_range is not None and not self._if_range_matches(if_range, version):
            return full
        match = _RANGE_RE.fullmatch(range_value.strip())
        if match is None:  # not a single byte range (e.g. multipart): ignoring it is allowed
            return full
        first, last = match.group(1), match.group(2)
        total = owner.size
        if not first:  # suffix range: the last N bytes
            if not last:
                return full
            suffix = int(last)
            if suffix == 0 or total == 0:
                return _Answer(416, 0, 0)
            return _Answer(206, max(0, total - suffix), min(suffix, total))
        start = int(first)
        if last and int(last) < start:  # syntactically invalid: ignore the header
            return full
        if start >= total:
            return _Answer(416, 0, 0)
        end = min(int(last), total - 1) if last else total - 1
        return _Answer(206, start, end - start + 1)

    def _if_range_matches(self, value: str, version: _Version) -> bool:
        """RFC 9110 §13.1.5: a strong ETag compared strongly, or the exact Last-Modified."""
        value = value.strip()
        if value.startswith("W/"):
            return False
        if value.startswith('"'):
            etag = version.etag
            return etag is not None and not etag.startswith("W/") and value == etag
        if not self.owner.send_last_modified:
            return False
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return False
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return int(when.timestamp()) == version.mtime

    # -- answering ----------------------------------------------------------------------------

    def _send_faulty(
        self, record: RequestRecord, answer: _Answer, version: _Version, fault: Fault
    ) -> None:
        owner = self.owner
        kind = fault.kind
        if kind is FaultKind.STATUS:
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._send_small(record, fault.code, f"{fault.code} (injected)\n".encode(), extra)
            return
        if kind is FaultKind.CHANGE:
            version = owner._change(fault.content)
            self._send(record, self._answer(False, version), version, head=False)
            return
        if kind is FaultKind.IGNORE_RANGE:
            self._send(record, _Answer(200, 0, owner.size), version, head=False)
            return
        if kind is FaultKind.EMPTY:
            if answer.status == 416 or answer.length == 0:
                self._send(record, answer, version, head=False)
                return
            self._send_headers(record, replace(answer, status=206), version, body_length=0)
            return
        if kind is FaultKind.WRONG_RANGE_START:
            if answer.status == 416 or owner.size == 0:
                self._send(record, answer, version, head=False)
                return
            start = min(max(0, answer.start + fault.delta), owner.size - 1)
            wrong = _Answer(206, start, min(answer.length, owner.size - start))
            self._send(record, wrong, version, head=False)
            return
        # The truncating faults: full headers, part of the body, then the fault.
        limit = fault.offset - answer.start if kind is FaultKind.RESET_AT else fault.after
        self._send_headers(record, answer, version, body_length=answer.length)
        self._send_body(record, answer.start, min(limit, answer.length), version)
        self.close_connection = True
        if kind in (FaultKind.RESET, FaultKind.RESET_AT):
            # rfile holds a reference that would keep the descriptor, and the connection, open.
            self.rfile.close()
            reset_connection(self.connection, stopping=owner._stopping)
        elif kind is FaultKind.STALL and owner._stopping.wait(fault.seconds):
            raise _StopServing  # stopped mid-stall: the connection is torn down anyway
        # SHORT (and STALL afterwards): the server closes the socket normally, sending FIN.

    def _send(
        self, record: RequestRecord, answer: _Answer, version: _Version, *, head: bool
    ) -> None:
        length = 0 if answer.status == 416 else answer.length
        self._send_headers(record, answer, version, body_length=length)
        if not head:
            self._send_body(record, answer.start, length, version)

    def _send_headers(
        self, record: RequestRecord, answer: _Answer, version: _Version, *, body_length: int
    ) -> None:
        owner = self.owner
        record.status = answer.status
        record.content_length = body_length
        if answer.status == 206:
            last = answer.start + answer.length - 1
            record.content_range = f"bytes {answer.start}-{last}/{owner.size}"
        elif answer.status == 416:
            record.content_range = f"bytes */{owner.size}"
        owner._record(record)
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(body_length))
        if record.content_range is not None:
            self.send_header("Content-Range", record.content_range)
        if owner.advertise_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if version.etag is not None:
            self.send_header("ETag", version.etag)
        if owner.send_last_modified:
            self.send_header("Last-Modified", version.last_modified)
        self.end_headers()

    def _send_small(
        self,
        record: RequestRecord,
        status: int,
        body: bytes,
        extra: dict[str, str] | None = None,
    ) -> None:
        record.status = status
        record.content_length = len(body)
        self.owner._record(record)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if status == 408:  # RFC 9110 §15.5.9: the server closes after a 408
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        record.body_bytes = len(body)

    def _send_body(self, record: RequestRecord, start: int, length: int, version: _Version) -> None:
        """Send file bytes [start, start+length) of `version`, a chunk at a time."""
        owner = self.owner
        sock = self.connection
        with owner.path.open("rb") as fh:
            for offset, size in _chunks(start, length, owner.chunk_size, version.xor):
                if owner._stopping.is_set():
                    raise _StopServing
                if version.xor and offset < _CHANGED_PREFIX:
                    data = os.pread(fh.fileno(), size, offset).translate(_xor_table(version.xor))
                    sock.sendall(data)
                    sent = len(data)
                else:
                    sent = sock.sendfile(fh, offset, size)
                record.body_bytes += sent
                if sent < size:  # the file shrank under us; nothing more to send
                    raise _StopServing


def reset_connection(sock: socket.socket, *, stopping: threading.Event, pause: float = 0.0) -> None:
    """Abort ``sock`` with a TCP RST once the peer has acknowledged every byte sent on it.

    A RST discards whatever is still in the send queue, so without the wait the peer would see
    the reset after an unpredictable number of bytes. The wait is bounded (a few seconds) and
    ends early when ``stopping`` is set; ``pause`` seconds (cut short by ``stopping`` too) pass
    between the acknowledgement and the reset. Close any file made with ``sock.makefile()``
    first: it keeps the descriptor open, and with it the connection.
    """
    _wait_until_acked(sock, stopping)
    stopping.wait(pause)
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _wait_until_acked(sock: socket.socket, stopping: threading.Event) -> None:
    if _TIOCOUTQ is None:  # pragma: no cover - not Linux
        return
    deadline = time.monotonic() + _ACK_WAIT
    while time.monotonic() < deadline and not stopping.is_set():
        raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
        if struct.unpack("i", raw)[0] == 0:
            return
        time.sleep(0.002)


def _chunks(start: int, length: int, chunk_size: int, xor: int) -> Iterator[tuple[int, int]]:
    """Split [start, start+length) into sends, cutting at the end of the altered prefix."""
    offset, end = start, start + length
    while offset < end:
        size = min(chunk_size, end - offset)
        if xor and offset < _CHANGED_PREFIX:
            size = min(size, _CHANGED_PREFIX - offset)
        yield offset, size
        offset += size


@functools.cache
def _xor_table(value: int) -> bytes:
    return bytes(b ^ value for b in range(256))
