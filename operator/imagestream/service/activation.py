"""systemd socket activation (`LISTEN_FDS`/`LISTEN_PID`) for a server that cannot adopt a
descriptor: grpcio binds addresses only, never a socket it is handed.

So the gRPC server listens on a private Unix socket in a fresh 0700 directory, and a relay
accepts on the socket systemd passed and pipes each connection's bytes to it both ways. TLS,
when the passed socket is TCP, stays end to end between the client and the gRPC server; the
relay only moves bytes. Connections systemd queued before the server started are served.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import MutableMapping
from pathlib import Path

from imagestream.errors import UsageError

#: The first descriptor systemd passes (sd_listen_fds(3)).
LISTEN_FDS_START = 3
_RELAY_CHUNK = 256 << 10


def activated_socket(environ: MutableMapping[str, str], pid: int) -> socket.socket | None:
    """The listening socket systemd passed this process, or None when there is none.

    The variables are removed from `environ` (as sd_listen_fds(1) does), so a child process,
    the reboot command among them, never takes the socket for its own.
    """
    fds, listen_pid = environ.pop("LISTEN_FDS", None), environ.pop("LISTEN_PID", None)
    environ.pop("LISTEN_FDNAMES", None)
    if fds is None or listen_pid is None or listen_pid != str(pid):
        return None
    if fds != "1":
        raise UsageError(f"systemd passed {fds} sockets (LISTEN_FDS); the server takes exactly 1")
    sock = socket.socket(fileno=LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM:
        raise UsageError("the socket systemd passed is not a stream socket (ListenStream=)")
    os.set_inheritable(sock.fileno(), False)
    return sock


def describe(sock: socket.socket) -> str:
    """The activated socket as a --listen address."""
    if sock.family == socket.AF_UNIX:
        return f"unix://{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"tcp://{host}:{port}"


class Relay:
    """Accepts on `listener` and pipes every connection to the Unix socket at `backend`."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._directory = Path(tempfile.mkdtemp(prefix="imagestream-serve-"))
        self.backend = self._directory / "grpc.sock"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="imagestream-relay", daemon=True)

    def start(self) -> None:
        """Start accepting (the backend must listen by then)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; the socket itself stays systemd's."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._listener.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # shut down by stop()
            try:
                backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                backend.connect(os.fspath(self.backend))
            except OSError:
                client.close()
                continue
            threading.Thread(target=_connection, args=(client, backend), daemon=True).start()


def _connection(client: socket.socket, backend: socket.socket) -> None:
    """Both directions of one connection; both sockets closed once both ended."""
    back = threading.Thread(target=_pipe, args=(backend, client), daemon=True)
    back.start()
    _pipe(client, backend)
    back.join()
    client.close()
    backend.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until EOF, then pass the EOF on."""
    try:
        while data := source.recv(_RELAY_CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        source.shutdown(socket.SHUT_RD)
