"""The tests' fault injector: one plan of faults, applied to the answers of a file or a proxy.

A :class:`FaultServer` answers HTTP/1.1 on ``127.0.0.1:<free port>`` from background threads and
makes chosen answers misbehave in the ways real networks and servers do: connection resets
(after N bytes, or at an offset of the object), short bodies, stalls, error statuses, ignored
ranges, a changing object, wrong ``Content-Range`` starts, empty bodies, a tampered body, a
missing ``Accept-Ranges``, a chunked body cut before its last chunk. Where the answers come from
is its origin:

* :class:`RangeServer` (here) serves ONE file from disk with what a careful client relies on:
  strong ETag and Last-Modified, ``Accept-Ranges: bytes``, single byte ranges (206 / 416) and
  ``If-Range``;
* :class:`~tests.support.fault_proxy.FaultProxy` forwards to a real server (a registry).

::

    plan = FaultPlan([Fault.reset_at(64 << 20), Fault.status(503, retry_after="1")])
    with RangeServer(image_path, faults=plan) as server:
        fetch(server.url)
        print(server.requests)

It is a test tool, not a web server: no multipart ranges, no TLS.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Self, cast
from urllib.parse import quote, urlsplit

from .threaded_server import OwnedHttpServer, ThreadedHttpServer

try:  # Linux: bytes not yet acknowledged by the peer (see `reset_connection`)
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _TIOCOUTQ = None

AUTO_ETAG = '"auto"'
"""The `etag` default: derive a strong ETag from the file's size and mtime."""

_CHANGED_PREFIX = 1 << 20  # how much of the content a `change` fault alters
_ACK_WAIT = 5.0  # seconds a reset waits for the peer to acknowledge the bytes sent
_HANDLER_TIMEOUT = 60.0  # socket timeout of a connection, so a vanished peer frees its thread
_RANGE_RE = re.compile(r"bytes[ \t]*=[ \t]*(\d*)[ \t]*-[ \t]*(\d*)[ \t]*", re.IGNORECASE)
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
#: Answers taken from the object, the only ones a fault applies to (not a 401, not a 404).
_FAULTABLE = frozenset({200, 206, 416})
#: Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded.
HOP_BY_HOP = frozenset(
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


# -- the plan ---------------------------------------------------------------------------------


class FaultKind(enum.StrEnum):
    """What an injected fault does to one answer."""

    RESET = "reset"
    RESET_AT = "reset_at"
    SHORT = "short"
    IGNORE_RANGE = "ignore_range"
    STALL = "stall"
    STATUS = "status"
    CHANGE = "change"
    WRONG_RANGE_START = "wrong_range_start"
    EMPTY = "empty"
    TAMPER = "tamper"
    STRIP_ACCEPT_RANGES = "strip_accept_ranges"
    CUT_BEFORE_END = "cut_before_end"


#: Kinds that only change headers: they combine with one other fault on the same answer.
_MODIFIERS = frozenset({FaultKind.STRIP_ACCEPT_RANGES})


@dataclass(frozen=True)
class Requests:
    """Which requests a fault is for: these methods, on paths matching `path` (any if None)."""

    methods: frozenset[str]
    path: re.Pattern[str] | None = None

    def __call__(self, method: str, path: str) -> bool:
        return method in self.methods and (self.path is None or bool(self.path.match(path)))


#: Every GET (a HEAD never consumes a fault unless it is asked for).
GETS = Requests(frozenset({"GET"}))


@dataclass(frozen=True)
class Fault:
    """One injected fault; build it with the class methods, which say what each field means.

    Every fault applies to the next `times` answers to requests that `on` selects.
    """

    kind: FaultKind
    after: int = 0  # RESET, SHORT, STALL: body bytes sent before the fault
    offset: int = 0  # RESET_AT: absolute object offset where the connection is reset
    seconds: float = 0.0  # STALL
    pause: float = 0.0  # RESET: seconds between the acknowledgement and the reset
    code: int = 0  # STATUS
    retry_after: str | None = None  # STATUS
    delta: int = 0  # WRONG_RANGE_START
    content: bool = True  # CHANGE: alter the bytes too, not only the validators
    times: int = 1
    on: Requests = GETS

    @classmethod
    def reset(cls, after: int, *, pause: float = 0.0, times: int = 1, on: Requests = GETS) -> Fault:
        """Send the headers and `after` body bytes, then abort the connection with a TCP RST.

        The reset waits until the client has acknowledged those bytes, so it sees exactly
        `after` of them, then `pause` seconds more. A shorter body is sent whole, then reset.
        """
        after = _non_negative("after", after)
        return cls(FaultKind.RESET, after=after, pause=pause, times=times, on=on)

    @classmethod
    def reset_at(cls, offset: int) -> Fault:
        """Reset the connection when the body reaches absolute object offset `offset`.

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
        """Answer 200 with the whole object, even though a Range was asked."""
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
        client that mixes versions ends with the wrong hash. The size stays the same. Only an
        origin that owns the object can do this (a `RangeServer`).
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

    @classmethod
    def tamper(cls, *, times: int = 1, on: Requests = GETS) -> Fault:
        """Append a newline to the body (JSON stays valid, a digest over it does not)."""
        return cls(FaultKind.TAMPER, times=times, on=on)

    @classmethod
    def strip_accept_ranges(cls, *, times: int = 1_000_000, on: Requests = GETS) -> Fault:
        """Drop `Accept-Ranges` from the answers (by default from all of them), as some CDNs do.

        Combines with another fault on the same answer.
        """
        return cls(FaultKind.STRIP_ACCEPT_RANGES, times=times, on=on)

    @classmethod
    def cut_before_end(cls, *, times: int = 1, on: Requests = GETS) -> Fault:
        """Send the body whole but chunked, and close before the final chunk that ends it.

        A proxy whose own upstream broke just after the last byte: the client has every byte
        yet an incomplete response, so it resumes at the object's size.
        """
        return cls(FaultKind.CUT_BEFORE_END, times=times, on=on)


def _non_negative(name: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


@dataclass
class _Planned:
    fault: Fault
    remaining: int


class FaultPlan:
    """A thread-safe list of faults, used up in order by the answers they apply to.

    Each answer takes the first pending fault that applies to its request (a `reset_at` that
    its body does not reach holds it and the faults behind it back), plus any header
    modifiers that apply. Once the plan is empty requests are answered normally.
    """

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._pending: list[_Planned] = []
        self.add(*faults)

    def add(self, *faults: Fault) -> None:
        """Append faults to the end of the plan."""
        with self._lock:
            self._pending.extend(_Planned(fault, fault.times) for fault in faults)

    @property
    def pending(self) -> list[Fault]:
        """The faults not (fully) used yet, next first."""
        with self._lock:
            return [planned.fault for planned in self._pending]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def take(self, method: str, path: str, body_start: int, body_end: int) -> list[Fault]:
        """The faults for an answer whose body spans object bytes [body_start, body_end)."""
        taken: list[Fault] = []
        decided = False
        with self._lock:
            for planned in self._pending:
                fault = planned.fault
                if not fault.on(method, path):
                    continue
                if fault.kind in _MODIFIERS:
                    if all(t.kind is not fault.kind for t in taken):
                        taken.append(fault)
                        planned.remaining -= 1
                    continue
                if decided:
                    continue
                decided = True
                if fault.kind is FaultKind.RESET_AT and not body_start <= fault.offset < body_end:
                    continue
                taken.insert(0, fault)
                planned.remaining -= 1
            self._pending = [planned for planned in self._pending if planned.remaining]
        return taken


@dataclass
class RequestRecord:
    """What one request asked and what it was answered (updated while the body is sent)."""

    method: str
    path: str  # as requested, with the query
    range: str | None
    if_range: str | None
    authorization: str | None  # the client's Authorization header (test credentials only)
    status: int = 0
    content_range: str | None = None
    content_length: int | None = None  # as sent to the client (None: chunked or none)
    faults: list[FaultKind] = field(default_factory=list)  # the answer-changing one first
    body_bytes: int = 0  # body bytes actually handed to the socket

    @property
    def fault(self) -> FaultKind | None:
        """The fault that changed this answer, if any."""
        return self.faults[0] if self.faults else None


# -- the server and its answers ---------------------------------------------------------------


@dataclass
class Answer:
    """What an origin answers a request with, before any fault: the body is still to be read."""

    status: int
    reason: str | None
    headers: list[tuple[str, str]]  # end-to-end headers, Content-Length among them if known
    body: Iterator[bytes]
    close: Callable[[], None] = lambda: None

    def header(self, name: str) -> str | None:
        """The first value of header `name`."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def start(self) -> int:
        """The object offset of the body's first byte (from Content-Range; else 0)."""
        match = _CONTENT_RANGE_RE.fullmatch(self.header("Content-Range") or "")
        return int(match.group(1)) if match else 0

    @property
    def length(self) -> int | None:
        """The announced body length."""
        value = self.header("Content-Length")
        return int(value) if value is not None else None


class FaultServer(ThreadedHttpServer):
    """Answers from an origin (`answer`), with the faults of `faults` applied; a context manager.

    Stopping is prompt: open connections are shut down, stalled handlers are woken.
    """

    def __init__(self, faults: FaultPlan | None, *, name: str) -> None:
        self.faults = faults if faults is not None else FaultPlan()
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        super().__init__(
            _FaultHandler, name=name, server_class=_FaultHttpServer, poll_interval=0.05
        )

    def answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        """The origin's answer to a request for `target` (path and query)."""
        raise NotImplementedError

    def change(self, content: bool) -> None:
        """Make the object a new version (see `Fault.change`)."""
        raise NotImplementedError(f"{self.name} does not own its object: it cannot change it")

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the records of the requests answered so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and start serving in a daemon thread."""
        self._stopping.clear()
        return super().start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, abort open connections and wait (bounded) for handlers to end."""
        with self._lock:
            connections = dict(self._connections)
        super().stop()
        deadline = time.monotonic() + timeout
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _before_shutdown(self) -> None:
        self._stopping.set()  # wakes stalls and reset waits
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # Unblocks handlers stuck in send (peer not reading) or waiting for a request.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _track(self, conn: socket.socket, thread: threading.Thread | None) -> None:
        with self._lock:
            if thread is None:
                self._connections.pop(conn, None)
            else:
                self._connections[conn] = thread


class _FaultHttpServer(OwnedHttpServer):
    request_queue_size = 64
    owner: FaultServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can take seconds
        # on machines without a resolver; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client going away mid-answer (or being reset by us) is what tests provoke.
        return


class _StopServing(Exception):
    """The server is stopping, or the connection was reset: abandon this answer."""


class _FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _HANDLER_TIMEOUT
    # Headers and body go out in separate writes; with Nagle a small body then waits for the
    # client's delayed ACK (40 ms per request).
    disable_nagle_algorithm = True
    server_version = "imagestream-fault-server"

    @property
    def owner(self) -> FaultServer:
        return cast(_FaultHttpServer, self.server).owner

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
        return  # tests read `requests` instead of a log

    def do_GET(self) -> None:
        owner = self.owner
        path = urlsplit(self.path).path
        record = RequestRecord(
            method=self.command,
            path=self.path,
            range=self.headers.get("Range"),
            if_range=self.headers.get("If-Range"),
            authorization=self.headers.get("Authorization"),
        )
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            answer = owner.answer(self.command, self.path, headers, body)
            faults: list[Fault] = []
            if answer.status in _FAULTABLE:
                end = answer.start + (answer.length or 0)
                faults = owner.faults.take(self.command, path, answer.start, end)
            record.faults = [fault.kind for fault in faults]
            self._send_faulty(record, answer, faults, headers, body)
        except (OSError, _StopServing):
            # The peer went away, the server is stopping, or we reset: this connection is done.
            self.close_connection = True
        finally:
            if record.status == 0:  # nothing was sent: still a request the tests may look at
                owner._record(record)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _send_faulty(
        self,
        record: RequestRecord,
        answer: Answer,
        faults: list[Fault],
        headers: dict[str, str],
        body: bytes | None,
    ) -> None:
        owner = self.owner
        kinds = {fault.kind: fault for fault in faults}
        main = next((fault for fault in faults if fault.kind not in _MODIFIERS), None)
        if main is not None and main.kind is FaultKind.STATUS:
            answer.close()
            self._send_status(record, main)
            return
        asked = None if main is None else self._asked_instead(answer, main, headers)
        if asked is not None:
            answer.close()
            answer = owner.answer(self.command, self.path, asked, body)
        try:
            self._send_answer(record, answer, kinds, main)
        finally:
            answer.close()

    def _asked_instead(
        self, answer: Answer, main: Fault, headers: dict[str, str]
    ) -> dict[str, str] | None:
        """The request headers to ask the origin with again, for a fault that changes the
        request (a `change` makes the new version first); None to keep `answer`."""
        if main.kind is FaultKind.CHANGE:
            self.owner.change(main.content)
            return headers
        unranged = {k: v for k, v in headers.items() if k.lower() not in {"range", "if-range"}}
        if main.kind is FaultKind.IGNORE_RANGE:
            return unranged
        if main.kind is FaultKind.WRONG_RANGE_START:
            shifted = _shifted_range(answer, main.delta)
            return None if shifted is None else {**unranged, "Range": shifted}
        return None

    def _send_answer(
        self,
        record: RequestRecord,
        answer: Answer,
        kinds: dict[FaultKind, Fault],
        main: Fault | None,
    ) -> None:
        head = self.command == "HEAD"
        drop = {"content-length"}
        if FaultKind.STRIP_ACCEPT_RANGES in kinds:
            drop.add("accept-ranges")
        chunked = FaultKind.CUT_BEFORE_END in kinds
        length = answer.length
        body: Iterator[bytes] = answer.body
        if not head and (FaultKind.TAMPER in kinds or length is None):
            # Bodies to change, and bodies of unknown length, are read whole (small JSON).
            whole = b"".join(body) + (b"\n" if FaultKind.TAMPER in kinds else b"")
            body, length = iter([whole]), len(whole)
        if FaultKind.EMPTY in kinds and answer.status == 206 and length:
            body, length = iter(()), 0
        record.status = answer.status
        record.content_range = answer.header("Content-Range")
        record.content_length = None if chunked else length
        self.owner._record(record)
        self.send_response(answer.status, answer.reason)
        for name, value in answer.headers:
            if name.lower() not in drop:
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif length is not None:
            self.send_header("Content-Length", str(length))
        if answer.status == 408:  # RFC 9110 §15.5.9: the server closes after a 408
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        limit = None if main is None else _body_limit(main, answer.start)
        self._send_body(record, body, limit=limit, chunked=chunked)
        if main is not None:
            self._end_truncated(main)
        # A cut chunked body, a short one, or a body shorter than its Content-Length leaves
        # the client unable to find where a next response would start: close (FIN).
        if limit is not None or chunked or (length or 0) > record.body_bytes:
            self.close_connection = True

    def _end_truncated(self, main: Fault) -> None:
        """What a truncating fault does once its part of the body went out: reset, or stall."""
        if main.kind in (FaultKind.RESET, FaultKind.RESET_AT):
            self.rfile.close()  # it would keep the descriptor, and the connection, open
            reset_connection(self.connection, stopping=self.owner._stopping, pause=main.pause)
            raise _StopServing
        if main.kind is FaultKind.STALL and self.owner._stopping.wait(main.seconds):
            raise _StopServing  # stopped mid-stall: the connection is torn down anyway

    def _send_body(
        self, record: RequestRecord, body: Iterator[bytes], *, limit: int | None, chunked: bool
    ) -> None:
        """Pass the body on until it ends or `limit` bytes were sent (`chunked`: framed so,
        without the final chunk)."""
        for piece in body:
            if self.owner._stopping.is_set():
                raise _StopServing
            sent = piece if limit is None else piece[: max(0, limit - record.body_bytes)]
            if sent:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(sent), sent) if chunked else sent)
                record.body_bytes += len(sent)
            if limit is not None and record.body_bytes >= limit:
                return

    def _send_status(self, record: RequestRecord, fault: Fault) -> None:
        extra = [("Retry-After", fault.retry_after)] if fault.retry_after is not None else []
        text = f"{fault.code} (injected)\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), *extra]
        headers.append(("Content-Length", str(len(text))))
        answer = Answer(fault.code, None, headers, iter([text]))
        self._send_answer(record, answer, {}, None)


def _body_limit(fault: Fault, body_start: int) -> int | None:
    """How many body bytes a truncating fault lets through (None: it truncates nothing)."""
    if fault.kind is FaultKind.RESET_AT:
        return fault.offset - body_start
    if fault.kind in (FaultKind.RESET, FaultKind.SHORT, FaultKind.STALL):
        return fault.after
    return None


def _shifted_range(answer: Answer, delta: int) -> str | None:
    """The Range that makes the origin answer from `delta` bytes off the asked start."""
    match = _CONTENT_RANGE_RE.fullmatch(answer.header("Content-Range") or "")
    if answer.status != 206 or match is None:
        return None
    start, last, total = (int(group) for group in match.groups())
    moved = min(max(0, start + delta), total - 1)
    length = min(last - start + 1, total - moved)
    return f"bytes={moved}-{moved + length - 1}"


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


# -- the file origin --------------------------------------------------------------------------


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


class RangeServer(FaultServer):
    """Serve one file over HTTP/1.1 with ranges, on 127.0.0.1, from background threads.

    Use it as a context manager; `url` is valid inside the block.

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
        self.advertise_ranges = advertise_ranges
        self.send_last_modified = last_modified
        self.chunk_size = chunk_size
        self._base_etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"' if etag == AUTO_ETAG else etag
        self._version = _Version(0, self._base_etag, int(st.st_mtime), 0)
        super().__init__(faults, name=f"range-server-{path.name}")

    @property
    def url(self) -> str:
        """The URL of the served file, e.g. http://127.0.0.1:40123/image.raw.zst."""
        return f"http://{self.address}/{quote(self.path.name)}"

    @property
    def etag(self) -> str | None:
        """The ETag of the current version of the object."""
        return self._current().etag

    @property
    def last_modified(self) -> str:
        """The Last-Modified value of the current version of the object."""
        return self._current().last_modified

    def answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        """The file's answer, as a well-behaved server gives it."""
        if urlsplit(target).path != f"/{quote(self.path.name)}" or method not in {"GET", "HEAD"}:
            text = b"not found\n"
            plain = [("Content-Type", "text/plain; charset=utf-8")]
            return Answer(404, None, [*plain, ("Content-Length", str(len(text)))], iter([text]))
        version = self._current()
        status, start, length = self._range(
            method == "HEAD", _header(headers, "Range"), _header(headers, "If-Range"), version
        )
        sent = [("Content-Type", "application/octet-stream")]
        sent.append(("Content-Length", str(0 if status == 416 else length)))
        if status == 206:
            sent.append(("Content-Range", f"bytes {start}-{start + length - 1}/{self.size}"))
        elif status == 416:
            sent.append(("Content-Range", f"bytes */{self.size}"))
        if self.advertise_ranges:
            sent.append(("Accept-Ranges", "bytes"))
        if version.etag is not None:
            sent.append(("ETag", version.etag))
        if self.send_last_modified:
            sent.append(("Last-Modified", version.last_modified))
        content = iter(()) if status == 416 else self._read(start, length, version)
        return Answer(status, None, sent, content)

    def change(self, content: bool) -> None:
        """Switch to a new version of the object."""
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

    def _current(self) -> _Version:
        with self._lock:
            return self._version

    def _range(
        self, head: bool, range_value: str | None, if_range: str | None, version: _Version
    ) -> tuple[int, int, int]:
        """(status, start, length) for this request, as a well-behaved server decides them."""
        full = (200, 0, self.size)
        # Range is only defined for GET (RFC 9110 §14.2); a server without ranges ignores it.
        if head or not self.advertise_ranges or range_value is None:
            return full
        if if_range is not None and not self._if_range_matches(if_range, version):
            return full
        match = _RANGE_RE.fullmatch(range_value.strip())
        if match is None:  # not a single byte range (e.g. multipart): ignoring it is allowed
            return full
        first, last = match.group(1), match.group(2)
        total = self.size
        if not first:  # suffix range: the last N bytes
            if not last:
                return full
            suffix = int(last)
            if suffix == 0 or total == 0:
                return (416, 0, 0)
            return (206, max(0, total - suffix), min(suffix, total))
        start = int(first)
        if last and int(last) < start:  # syntactically invalid: ignore the header
            return full
        if start >= total:
            return (416, 0, 0)
        end = min(int(last), total - 1) if last else total - 1
        return (206, start, end - start + 1)

    def _if_range_matches(self, value: str, version: _Version) -> bool:
        """RFC 9110 §13.1.5: a strong ETag compared strongly, or the exact Last-Modified."""
        value = value.strip()
        if value.startswith("W/"):
            return False
        if value.startswith('"'):
            etag = version.etag
            return etag is not None and not etag.startswith("W/") and value == etag
        if not self.send_last_modified:
            return False
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return False
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return int(when.timestamp()) == version.mtime

    def _read(self, start: int, length: int, version: _Version) -> Iterator[bytes]:
        """File bytes [start, start+length) of `version`, a chunk at a time."""
        with self.path.open("rb") as fh:
            for offset, size in _chunks(start, length, self.chunk_size, version.xor):
                data = os.pread(fh.fileno(), size, offset)
                if version.xor and offset < _CHANGED_PREFIX:
                    data = data.translate(_xor_table(version.xor))
                if not data:  # the file shrank under us; nothing more to send
                    return
                yield data


def _header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


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
