"""The demo's HTTP server: one file, byte ranges, and connection resets at chosen offsets.

`imagestream demo --faults` shows a stream that survives cut connections: the server resets
the connection when a response's body reaches each offset, once per offset, and the client
resumes with a ranged request from the byte it got to. `--rate` paces what it sends, so a person
can watch the bar and the resumes. That is all it does: one path, single byte ranges, no TLS.
(The tests' fault-injecting server is in `tests/support/range_server.py`.)
"""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import quote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)", re.ASCII)
# A paced body goes out in pieces about this often, so the rate is even at a human's scale.
_PACED_SENDS_PER_SECOND = 20
_MIN_PACED_PIECE = 16 << 10


class RangeServer:
    """Serve `path` on 127.0.0.1 (a free port) from background threads; use as a context manager.

    Each of `reset_offsets` resets one response whose body reaches it, in increasing order.
    `rate` (bytes a second) caps what all responses together send; None: no cap.
    """

    def __init__(
        self, path: Path, reset_offsets: Iterable[int] = (), rate: float | None = None
    ) -> None:
        stat = path.stat()
        self.path = path
        self.size = stat.st_size
        self.etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        self._resets = deque(sorted(reset_offsets))
        self._lock = threading.Lock()
        self._rate = rate
        self._next_send = 0.0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """The URL of the served file."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/{quote(self.path.name)}"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def reset_within(self, start: int, end: int) -> int | None:
        """The next reset offset if the body [start, end) reaches it (it is then used up)."""
        with self._lock:
            if self._resets and start <= self._resets[0] < end:
                return self._resets.popleft()
            return None

    def send(self, connection: socket.socket, image: BinaryIO, offset: int, count: int) -> None:
        """Send `count` bytes of `image` from `offset`, at no more than the server's rate."""
        if self._rate is None:
            connection.sendfile(image, offset, count)
            return
        piece = max(_MIN_PACED_PIECE, int(self._rate / _PACED_SENDS_PER_SECOND))
        # A small send buffer: the kernel would otherwise take megabytes ahead of the pace, and
        # the client would see bursts instead of the rate.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, piece)
        end = offset + count
        while offset < end:
            size = min(piece, end - offset)
            self._pace(size)
            connection.sendfile(image, offset, size)
            offset += size

    def _pace(self, size: int) -> None:
        """Wait for this piece's turn: pieces are spaced by their size over the rate."""
        assert self._rate is not None
        with self._lock:
            now = time.monotonic()
            turn = max(now, self._next_send)
            self._next_send = turn + size / self._rate
        time.sleep(turn - now)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: RangeServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can take seconds on a
        # machine without a resolver; the name is never used.
        socketserver.TCPServer.server_bind(self)

    def handle_error(self, request: object, client_address: object) -> None:
        return  # a client that went away (or that we reset) is expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60

    def log_message(self, format: str, *args: object) -> None:
        return  # the demo prints its own progress

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        owner = cast(_Server, self.server).owner
        if urlsplit(self.path).path != f"/{quote(owner.path.name)}":
            self.send_error(404)
            return
        start, end = 0, owner.size
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if head or self.headers.get("If-Range", owner.etag) != owner.etag:
            match = None  # ranges are for GETs of the version they name (RFC 9110 §13.1.5)
        ranged = match is not None
        if match is not None:
            start = int(match.group(1))
            if start >= owner.size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{owner.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if match.group(2):
                end = min(owner.size, int(match.group(2)) + 1)
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", owner.etag)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{owner.size}")
        self.end_headers()
        if head:
            return
        reset = owner.reset_within(start, end)
        with owner.path.open("rb") as image:
            owner.send(self.connection, image, start, (end if reset is None else reset) - start)
        if reset is not None:
            self._reset()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, as a failing link or load balancer would."""
        self.close_connection = True
        self.wfile.flush()
        self.rfile.close()  # it holds the descriptor, and with it the connection, open
        with contextlib.suppress(OSError):
            # A zero linger time makes close() send RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
