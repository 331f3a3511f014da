"""A TCP server that accepts connections and never answers: a hung registry or token service.

Every connection is held open, unread and unanswered, until :meth:`SilentServer.stop`; a client
waits in its TLS handshake or for its response headers until its own timeout (or a cancel).
"""

from __future__ import annotations

import socket
import threading
from typing import Self

from .process import LOOPBACK, StartStop


class SilentServer(StartStop):
    """Listens on ``127.0.0.1:<free port>``; :attr:`accepted` counts the connections held."""

    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        assert self._listener is not None, "not started"
        return int(self._listener.getsockname()[1])

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def accepted(self) -> int:
        """How many connections were accepted so far."""
        with self._lock:
            return len(self._held)

    def start(self) -> Self:
        """Listen and accept in a thread."""
        self._listener = socket.create_server((LOOPBACK, 0))
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stop
            with self._lock:
                self._held.append(conn)

    def stop(self) -> None:
        """Close the listener and every held connection."""
        if self._listener is None:
            return
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held.clear()
        self._listener = None
