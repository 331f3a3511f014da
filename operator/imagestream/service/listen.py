"""Where `imagestream serve` listens: a 0600 Unix socket, or TCP with mutual TLS only.

There is no plaintext TCP: anyone who can reach the service can overwrite a disk, so the
network form requires a client certificate from the given CA, and the local form a socket only
root can open.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from imagestream.errors import UsageError

UNIX_PREFIX = "unix://"
TCP_PREFIX = "tcp://"


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key, and the CA that signs the clients' certificates."""

    cert: Path
    key: Path
    client_ca: Path


def parse_listen(address: str, tls: TlsFiles | None) -> tuple[str, str]:
    """`(kind, where)`: ("unix", path) or ("tcp", "host:port"); refuse what cannot be served."""
    if address.startswith(UNIX_PREFIX):
        path = address.removeprefix(UNIX_PREFIX)
        if not path.startswith("/"):
            raise UsageError(f"--listen {address}: the socket path must be absolute")
        if tls is not None:
            raise UsageError("--tls-cert/--tls-key/--client-ca apply to tcp:// only")
        return "unix", path
    if address.startswith(TCP_PREFIX):
        where = address.removeprefix(TCP_PREFIX)
        host, _, port = where.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise UsageError(f"--listen {address}: expected tcp://HOST:PORT")
        if tls is None:
            raise UsageError(
                "tcp:// needs mutual TLS: give --tls-cert, --tls-key and --client-ca "
                "(there is no plaintext TCP)"
            )
        return "tcp", where
    raise UsageError(f"--listen {address}: expected unix:///PATH or tcp://HOST:PORT")


def bind(server: grpc.Server, address: str, tls: TlsFiles | None) -> str:
    """Bind `server` to `address`; return the address as bound (the real port for :0)."""
    kind, where = parse_listen(address, tls)
    if kind == "unix":
        path = Path(where)
        try:
            _bind_unix(server, path)
        except (OSError, RuntimeError) as exc:
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot listen on {address}: {cause}") from exc
        return f"{UNIX_PREFIX}{path}"
    assert tls is not None
    try:
        port = server.add_secure_port(where, _credentials(tls))
    except RuntimeError as exc:
        raise UsageError(f"cannot listen on {TCP_PREFIX}{where}: {exc}") from exc
    host = where.rpartition(":")[0]
    return f"{TCP_PREFIX}{host}:{port}"


def _bind_unix(server: grpc.Server, path: Path) -> None:
    prepare_socket_path(path)
    # The socket is created under this umask, so it is never reachable by others, not even
    # between its creation and the chmod below.
    previous = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def bind_private(server: grpc.Server, path: Path, tls: TlsFiles | None) -> None:
    """Bind `server` to the Unix socket `path` in a private directory: the backend of a
    socket-activated server, with mutual TLS when the socket systemd passed is TCP."""
    if tls is None:
        server.add_insecure_port(f"unix:{path}")
    else:
        server.add_secure_port(f"unix:{path}", _credentials(tls))


def _credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(tls.key, "--tls-key"), _read(tls.cert, "--tls-cert"))],
        root_certificates=_read(tls.client_ca, "--client-ca"),
        require_client_auth=True,
    )


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory; replace a stale socket, refuse a live one or a file."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        status = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise UsageError(f"--listen {path} exists and is not a socket; remove it or choose another")
    if _is_live(path):
        raise UsageError(
            f"another server is listening on {path}; stop it first or choose another --listen"
        )
    path.unlink()


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror}") from exc


def remove_socket(bound: str) -> None:
    """Remove the Unix socket `bind` created (nothing for TCP)."""
    if bound.startswith(UNIX_PREFIX):
        with contextlib.suppress(FileNotFoundError):
            Path(bound.removeprefix(UNIX_PREFIX)).unlink()
