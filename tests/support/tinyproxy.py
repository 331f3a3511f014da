"""A real tinyproxy (forward HTTP proxy, with CONNECT for HTTPS) on loopback, for tests.

tinyproxy runs in the foreground (``tinyproxy -d -c CONF``) with a configuration file, log file
and pid file in a private work directory. ``LogLevel Info`` is used: readiness is detected from
an Info message, and at ``Connect`` or more verbose tinyproxy logs one line per request it
accepts, e.g. (the timestamp and pid prefix shortened here)::

    CONNECT   Nov 26 13:21:07.470 [3357]: Connect (file descriptor 5): 127.0.0.1
    CONNECT   ...: Request (file descriptor 5): GET http://127.0.0.1:8080/x HTTP/1.1
    CONNECT   ...: Request (file descriptor 5): CONNECT 127.0.0.1:8443 HTTP/1.1

:meth:`Tinyproxy.requests_seen` returns those request lines (``"GET http://... HTTP/1.1"``).
No ``ConnectPort`` line is written, which lets CONNECT reach any port (tinyproxy's example
configuration restricts CONNECT to 443 and 563, which would refuse a test server's random port).
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path
from typing import ClassVar

from .process import ServerProcess, read_text_or_empty
from .tools import port_is_open, wait_until

_REQUEST_RE = re.compile(r"\]: Request \(file descriptor \d+\): (?P<request>.+)$")
_READY_MARKER = "Accepting connections."


class Tinyproxy(ServerProcess):
    """A real tinyproxy listening on ``127.0.0.1:<free port>``; only 127.0.0.1 may use it.

    Use as a context manager; ``url`` is what to hand to a client as its proxy
    (``httpx.Client(proxy=proxy.url)``).
    """

    name: ClassVar[str] = "tinyproxy"

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        extra_config: str = "",
        startup_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        super().__init__(workdir, startup_timeout=startup_timeout, binary=binary)
        self.extra_config = extra_config
        self.conf_file = self.workdir / "tinyproxy.conf"
        self.log_file = self.workdir / "tinyproxy.log"
        self.pid_file = self.workdir / "tinyproxy.pid"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; valid once started."""
        if self.port == 0:
            raise RuntimeError("tinyproxy is not started")
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        """Return tinyproxy's whole log."""
        return read_text_or_empty(self.log_file)

    def requests_seen(self) -> list[str]:
        """Return the request lines tinyproxy accepted, oldest first.

        For plain HTTP these are absolute-form (``"GET http://127.0.0.1:PORT/f HTTP/1.1"``),
        for HTTPS the tunnel request (``"CONNECT 127.0.0.1:PORT HTTP/1.1"``). tinyproxy logs the
        line as soon as it has read it, before contacting the origin, so it is there by the time
        the client has a response.
        """
        seen: list[str] = []
        for line in self.log_text().splitlines():
            match = _REQUEST_RE.search(line)
            if match is not None:
                seen.append(match.group("request"))
        return seen

    def _config(self) -> str:
        return textwrap.dedent(
            f"""\
            Port {self.port}
            Listen {self.host}
            Timeout 60
            LogFile "{self.log_file}"
            LogLevel Info
            PidFile "{self.pid_file}"
            MaxClients 100
            Allow 127.0.0.1
            ViaProxyName "tinyproxy"
            """
        ) + (self.extra_config + "\n" if self.extra_config else "")

    def _prepare(self) -> None:
        self.conf_file.write_text(self._config(), encoding="utf-8")
        self.log_file.unlink(missing_ok=True)

    def _command(self) -> list[str]:
        return [self.binary, "-d", "-c", str(self.conf_file)]

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # tinyproxy logs the marker after listen() succeeded on every address. Probing the port
        # instead would both add noise to its log and be fooled by another process that won a
        # race for the port.
        wait_until(
            lambda: _READY_MARKER in self.log_text(),
            self.startup_timeout,
            what="tinyproxy to start accepting connections",
            process=process,
        )

    def _diagnostics(self) -> str:
        return f"{self.output_text()}\n{self.log_text()}"

    def _lost_port_race(self, error: str) -> bool:
        return "Could not create listening sockets" in error or port_is_open(self.host, self.port)

    def __repr__(self) -> str:
        where = self.url if self.port else "not started"
        return f"<Tinyproxy {where}>"
