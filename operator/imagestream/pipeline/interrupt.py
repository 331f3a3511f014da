"""Stopping a run's blocking waits from another thread: retry sleeps and socket I/O.

A thread blocked in `recv` or `connect` is not woken when another thread closes the socket
(Linux carries on until data, a reset or the timeout arrives); `shutdown` wakes it at once. So
the run's HTTP clients connect through `Interrupt.adopt`'s network backend, which keeps a handle
on every live socket, and setting the interrupt shuts them all down: the blocked call returns and
the stream wrapper raises `Cancelled` in its place, which no retry logic mistakes for a network
failure worth another attempt. Retry sleeps wait on the same event.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

# httpcore's own stream over a connected socket (its read, write and TLS code); not exported.
from httpcore._backends.sync import SyncStream

from imagestream.errors import Cancelled

_WATCH_INTERVAL = 0.05
_MESSAGE = "the stream was cancelled"


class Interrupt:
    """One run's stop request; once set, every wait of the run ends with `Cancelled`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        # Duplicates of the live sockets' descriptors: `shutdown` acts on the socket, and a
        # descriptor of our own cannot be closed and reused under us (TLS detaches the original).
        self._handles: set[socket.socket] = set()

    def set(self) -> None:
        """Wake every sleep, cut every connection, refuse new ones."""
        with self._lock:
            self._event.set()
            for handle in self._handles:
                with contextlib.suppress(OSError):
                    handle.shutdown(socket.SHUT_RDWR)

    def is_set(self) -> bool:
        """Whether the run was asked to stop."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise `Cancelled` once the interrupt is set."""
        if self._event.is_set():
            raise Cancelled(_MESSAGE)

    def sleep(self, seconds: float) -> None:
        """Sleep, or raise `Cancelled` as soon as the interrupt is set."""
        if self._event.wait(seconds):
            raise Cancelled(_MESSAGE)

    def adopt(self, client: httpx.Client) -> None:
        """Make every connection `client` opens from now on one this interrupt can cut.

        httpx has no public way to choose the network backend, so it is set on each transport's
        connection pool (the plain one and those for proxies); tests check it takes effect.
        """
        backend = _Backend(self)
        mounts: dict[Any, Any] = getattr(client, "_mounts", {})
        for transport in [getattr(client, "_transport", None), *mounts.values()]:
            pool = getattr(transport, "_pool", None)
            if pool is not None and hasattr(pool, "_network_backend"):
                pool._network_backend = backend

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self.check()
            handle = sock.dup()
            self._handles.add(handle)
            return handle

    def _release(self, handle: socket.socket) -> None:
        with self._lock:
            self._handles.discard(handle)
        handle.close()


@contextlib.contextmanager
def watching(cancel: threading.Event | None) -> Iterator[Interrupt]:
    """An `Interrupt` that `cancel` sets (from a watcher thread) while the block runs."""
    interrupt = Interrupt()
    if cancel is None:
        yield interrupt
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_WATCH_INTERVAL):
            if cancel.is_set():
                interrupt.set()
                return

    watcher = threading.Thread(target=watch, name="imagestream-cancel-watch", daemon=True)
    watcher.start()
    try:
        yield interrupt
    finally:
        done.set()
        join_all([watcher])


def join_all(threads: Iterable[threading.Thread]) -> None:
    """Join every thread, even through a KeyboardInterrupt (a second Ctrl-C) meanwhile.

    Closing files and clients under a thread still using them is what must never happen; the
    threads joined here end within a fraction of a second once stopped.
    """
    for thread in threads:
        while thread.is_alive():
            with contextlib.suppress(KeyboardInterrupt):
                thread.join()


class _Backend(httpcore.NetworkBackend):
    """`httpcore.SyncBackend`, with each socket tracked by the interrupt from before `connect`."""

    def __init__(self, interrupt: Interrupt) -> None:
        self._interrupt = interrupt
        self._sync = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        """Connect to the first address of `host` that accepts (as `socket.create_connection`)."""
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        error: OSError | None = None
        for family, kind, proto, _name, address in addresses:
            sock = socket.socket(family, kind, proto)
            handle = self._track(sock)
            try:
                sock.settimeout(timeout)
                if local_address is not None:
                    sock.bind((local_address, 0))
                sock.connect(address)
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                self._interrupt._release(handle)
                sock.close()
                self._interrupt.check()
                if isinstance(exc, TimeoutError):
                    raise httpcore.ConnectTimeout(str(exc)) from exc
                error = exc
                continue
            return _Stream(SyncStream(sock), handle, self._interrupt)
        raise httpcore.ConnectError(str(error or f"no address for {host}")) from error

    def _track(self, sock: socket.socket) -> socket.socket:
        try:
            return self._interrupt._track(sock)
        except BaseException:
            sock.close()
            raise

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        """Not used by the pipeline; kept as httpcore's, uncut."""
        return self._sync.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        """httpcore's pause between connection retries, cut short like any other wait."""
        self._interrupt.sleep(seconds)


class _Stream(httpcore.NetworkStream):
    """A connection whose failures after the interrupt are `Cancelled`, not network errors."""

    def __init__(
        self, inner: httpcore.NetworkStream, handle: socket.socket, interrupt: Interrupt
    ) -> None:
        self._inner = inner
        self._handle = handle
        self._interrupt = interrupt

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read; a read cut by the interrupt (an error or an early EOF) raises `Cancelled`."""
        try:
            data = self._inner.read(max_bytes, timeout)
        except Exception:
            self._interrupt.check()
            raise
        if not data:
            self._interrupt.check()
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write; a write cut by the interrupt raises `Cancelled`."""
        try:
            self._inner.write(buffer, timeout)
        except Exception:
            self._interrupt.check()
            raise

    def close(self) -> None:
        """Close the connection and forget its handle."""
        self._interrupt._release(self._handle)
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        """The TLS handshake, cut like a read; the TLS stream keeps the same handle."""
        try:
            inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        except Exception:
            # httpcore closed the socket itself; the handle must not keep it open.
            self._interrupt._release(self._handle)
            self._interrupt.check()
            raise
        return _Stream(inner, self._handle, self._interrupt)

    def get_extra_info(self, info: str) -> Any:
        """As httpcore's stream (the socket, the TLS object, addresses)."""
        return self._inner.get_extra_info(info)
