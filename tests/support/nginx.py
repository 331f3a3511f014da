"""A real nginx serving a directory on loopback, for tests.

nginx runs in the foreground (``daemon off;``) with its own master process, a configuration file
written into a private work directory, and every path it writes (pid file, error and access logs,
lock file, all five ``*_temp_path`` directories) inside that directory: nothing under /etc/nginx,
/var/log/nginx, /var/lib/nginx or /run is read or written.

What it serves matters for imagestream's HTTP range client, so here it is spelled out:

* HTTP/1.1 (no HTTP/2), keep-alive on, ``sendfile on``.
* Range requests: nginx's defaults — single ranges give ``206`` with ``Content-Range``,
  multiple ranges a ``multipart/byteranges`` body, unsatisfiable ranges ``416``; ``If-Range``
  is honoured (against ETag or Last-Modified).
* ``etag on``: nginx's ETag is ``"<mtime in hex>-<size in hex>"``. It therefore does **not**
  change when a file is rewritten within the same second with the same size — a test that needs
  "the object changed" must also change the mtime (``os.utime``) or the size.
* ``open_file_cache`` stays off (the default), so files changed in the docroot are seen at once.
* The access log is one JSON object per request (see :class:`AccessLogEntry`), so tests can
  assert what a client really asked for (``Range``, ``If-Range``, ``Via`` from a proxy, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

from .process import ServerProcess, read_text_or_empty
from .tools import port_is_open, wait_until

_LOG_FORMAT = (
    '{"remote_addr":"$remote_addr","method":"$request_method","uri":"$request_uri",'
    '"protocol":"$server_protocol","status":$status,"body_bytes_sent":$body_bytes_sent,'
    '"range":"$http_range","if_range":"$http_if_range","via":"$http_via",'
    '"user_agent":"$http_user_agent","request_time":$request_time}'
)


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as nginx logged it (header fields are "" when the client did not send them)."""

    remote_addr: str
    method: str
    uri: str
    protocol: str
    status: int
    body_bytes_sent: int
    range: str
    if_range: str
    via: str
    user_agent: str
    request_time: float

    @classmethod
    def from_json(cls, line: str) -> AccessLogEntry:
        """Parse one line of the JSON access log."""
        data: dict[str, Any] = json.loads(line)
        return cls(
            remote_addr=str(data["remote_addr"]),
            method=str(data["method"]),
            uri=str(data["uri"]),
            protocol=str(data["protocol"]),
            status=int(data["status"]),
            body_bytes_sent=int(data["body_bytes_sent"]),
            range=str(data["range"]),
            if_range=str(data["if_range"]),
            via=str(data["via"]),
            user_agent=str(data["user_agent"]),
            request_time=float(data["request_time"]),
        )


class Nginx(ServerProcess):
    """A real nginx master process serving ``docroot`` on ``127.0.0.1:<free port>``.

    Use as a context manager (or call :meth:`start` / :meth:`stop`)::

        with Nginx(docroot, workdir) as server:
            httpx.get(server.url_for("image.zst"))

    Pass ``cert_file`` and ``key_file`` (PEM; the certificate file may hold the whole chain) to
    serve HTTPS instead of HTTP. ``extra_server_config`` / ``extra_http_config`` are spliced into
    the ``server {}`` / ``http {}`` blocks for tests that need more (``limit_rate``, extra
    ``location`` blocks, ...).
    """

    name: ClassVar[str] = "nginx"

    def __init__(
        self,
        docroot: Path,
        workdir: Path | None = None,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        extra_server_config: str = "",
        extra_http_config: str = "",
        worker_processes: int = 1,
        startup_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        self.docroot = Path(docroot).resolve()
        if not self.docroot.is_dir():
            raise ValueError(f"docroot {self.docroot} is not a directory")
        super().__init__(workdir, startup_timeout=startup_timeout, binary=binary)
        self.cert_file = None if cert_file is None else Path(cert_file).resolve()
        self.key_file = None if key_file is None else Path(key_file).resolve()
        self.extra_server_config = extra_server_config
        self.extra_http_config = extra_http_config
        self.worker_processes = worker_processes
        self.conf_file = self.workdir / "nginx.conf"
        self.pid_file = self.workdir / "nginx.pid"
        self.error_log = self.workdir / "error.log"
        self.access_log_file = self.workdir / "access.log"

    # -- URLs -------------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        """``https`` when serving TLS, else ``http``."""
        return "https" if self.cert_file is not None else "http"

    @property
    def base_url(self) -> str:
        """``scheme://127.0.0.1:PORT`` (no trailing slash); valid once started."""
        if self.port == 0:
            raise RuntimeError("nginx is not started")
        return f"{self.scheme}://{self.host}:{self.port}"

    def url_for(self, filename: str | os.PathLike[str]) -> str:
        """Return the URL of ``filename`` (a path relative to the docroot), percent-encoded."""
        relative = os.fspath(filename).lstrip("/")
        return f"{self.base_url}/{quote(relative)}"

    # -- logs -------------------------------------------------------------------------------

    def access_log(self, min_entries: int = 0, timeout: float = 5.0) -> list[AccessLogEntry]:
        """Return the requests nginx logged so far, oldest first.

        nginx writes an entry when it finalizes a request, which can be a moment *after* the
        client has read the last byte; pass ``min_entries`` to wait (up to ``timeout``) until at
        least that many entries are there.
        """
        entries: list[AccessLogEntry] = []

        def enough() -> bool:
            nonlocal entries
            entries = self._read_access_log()
            return len(entries) >= min_entries

        wait_until(enough, timeout, what=f"{min_entries} nginx access log entries")
        return entries

    def _read_access_log(self) -> list[AccessLogEntry]:
        try:
            text = self.access_log_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        # Only complete lines: nginx may be midway through writing the last one.
        lines = text.split("\n")[:-1]
        return [AccessLogEntry.from_json(line) for line in lines if line]

    def error_log_text(self) -> str:
        """Return the error log (startup problems, "client prematurely closed", ...)."""
        return read_text_or_empty(self.error_log)

    # -- lifecycle --------------------------------------------------------------------------

    def _config(self) -> str:
        w = self.workdir
        tls = ""
        ssl_flag = ""
        if self.cert_file is not None and self.key_file is not None:
            ssl_flag = " ssl"
            tls = textwrap.dedent(
                f"""\
                ssl_certificate     {self.cert_file};
                ssl_certificate_key {self.key_file};
                ssl_protocols       TLSv1.2 TLSv1.3;
                """
            )
        # `user` is only meaningful (and only accepted silently) when the master runs as root;
        # then it must be root so the workers can read a docroot under a 0700 pytest tmp dir.
        user = "user root root;" if os.geteuid() == 0 else ""
        return textwrap.dedent(
            f"""\
            daemon off;
            master_process on;
            worker_processes {self.worker_processes};
            {user}
            pid {w / "nginx.pid"};
            lock_file {w / "nginx.lock"};
            error_log {self.error_log} info;

            events {{
                worker_connections 1024;
            }}

            http {{
                types {{
                    application/octet-stream bin img raw zst;
                    text/plain txt;
                    application/json json;
                }}
                default_type application/octet-stream;

                log_format imagestream_json escape=json '{_LOG_FORMAT}';
                access_log {self.access_log_file} imagestream_json;

                client_body_temp_path {w / "client_body_temp"};
                proxy_temp_path       {w / "proxy_temp"};
                fastcgi_temp_path     {w / "fastcgi_temp"};
                uwsgi_temp_path       {w / "uwsgi_temp"};
                scgi_temp_path        {w / "scgi_temp"};

                sendfile on;
                tcp_nopush on;
                keepalive_timeout 65s;
                etag on;
                server_tokens off;

            {textwrap.indent(self.extra_http_config, "    ")}
                server {{
                    listen {self.host}:{self.port}{ssl_flag};
                    server_name localhost {self.host};
                    root {self.docroot};
            {textwrap.indent(tls, "        ")}
                    location / {{
                        autoindex off;
                    }}
            {textwrap.indent(self.extra_server_config, "        ")}
                }}
            }}
            """
        )

    def _prepare(self) -> None:
        self.conf_file.write_text(self._config(), encoding="utf-8")
        self.pid_file.unlink(missing_ok=True)
        self.error_log.unlink(missing_ok=True)  # so a failure shows this attempt's log only

    def _command(self) -> list[str]:
        return [
            self.binary,
            "-p",
            f"{self.workdir}/",
            "-e",
            str(self.error_log),
            "-c",
            str(self.conf_file),
        ]

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # The master writes its pid file only after it has bound the listening socket, so
        # "pid file names our process" means "nginx itself owns the port" (a bare port probe
        # could be answered by whoever won a race for the port).
        wait_until(
            self._pid_file_is_ours(process),
            self.startup_timeout,
            what="nginx to write its pid file",
            process=process,
        )
        wait_until(
            lambda: port_is_open(self.host, self.port),
            self.startup_timeout,
            what=f"nginx to accept connections on {self.host}:{self.port}",
            process=process,
        )

    def _diagnostics(self) -> str:
        return self.error_log_text()

    def _lost_port_race(self, error: str) -> bool:
        return "Address already in use" in error

    def _pid_file_is_ours(self, process: subprocess.Popen[bytes]) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return self.pid_file.read_text(encoding="ascii").strip() == str(process.pid)
            except FileNotFoundError:
                return False

        return check

    def __repr__(self) -> str:
        where = self.base_url if self.port else "not started"
        return f"<Nginx {where} docroot={self.docroot}>"


@dataclass(frozen=True)
class TLSNginx:
    """An HTTPS :class:`Nginx` together with the CA bundle that verifies its certificate."""

    server: Nginx
    ca_bundle: Path

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT``."""
        return self.server.base_url

    @property
    def docroot(self) -> Path:
        """The directory being served."""
        return self.server.docroot

    def url_for(self, filename: str | os.PathLike[str]) -> str:
        """Return the HTTPS URL of ``filename`` (relative to the docroot)."""
        return self.server.url_for(filename)


class NginxFactory(Protocol):
    """Type of the ``nginx_factory`` fixture: start another :class:`Nginx` for this test."""

    def __call__(
        self,
        docroot: Path,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        extra_server_config: str = "",
        extra_http_config: str = "",
        worker_processes: int = 1,
    ) -> Nginx:
        """Start nginx serving ``docroot`` (stopped at teardown) and return it."""
        ...
