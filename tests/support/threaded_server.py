"""An in-process HTTP server for tests: ``127.0.0.1:<free port>``, served by a daemon thread.

:class:`ThreadedHttpServer` is what the fault proxy, the token server and the status-API stand-in
share: bind port 0 on the loopback, ``serve_forever`` in a daemon thread (one daemon thread per
request), and stop with ``shutdown`` + ``server_close`` + a bounded join. A subclass passes its
request handler; the handler reaches the subclass instance through ``self.server.owner``.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from .process import LOOPBACK, StartStop


class OwnedHttpServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the :class:`ThreadedHttpServer` it serves for."""

    # Handlers still running when a test ends must not keep the interpreter alive.
    daemon_threads = True
    owner: object


class ThreadedHttpServer(StartStop):
    """Serve ``handler`` on a free loopback port from a daemon thread; a context manager.

    ``name`` names the thread and the messages; ``server_class`` lets a subclass change how the
    server handles errors; ``poll_interval`` bounds how long :meth:`stop` waits for
    ``serve_forever`` to notice the shutdown.
    """

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        *,
        name: str,
        server_class: type[OwnedHttpServer] = OwnedHttpServer,
        poll_interval: float = 0.5,
    ) -> None:
        self.name = name
        self._handler = handler
        self._server_class = server_class
        self._poll_interval = poll_interval
        self._server: OwnedHttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The listening port; valid once started."""
        if self._server is None:
            raise RuntimeError(f"{self.name} is not started")
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.address}"

    def start(self) -> Self:
        """Listen on a free loopback port and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError(f"{self.name} is already started")
        server = self._server_class((LOOPBACK, 0), self._handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": self._poll_interval},
            name=self.name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting (after :meth:`_before_shutdown`), close the socket, end the thread."""
        server, self._server = self._server, None
        if server is None:
            return
        self._before_shutdown()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _before_shutdown(self) -> None:
        """Wake handlers that wait for the server to stop; nothing to do by default."""
