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
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path
from types import TracebackType
from typing import Self

from .tools import die_with_parent, free_port, port_is_open, require_tool, stop_process, wait_until

_HOST = "127.0.0.1"
_PORT_RETRIES = 5
_REQUEST_RE = re.compile(r"\]: Request \(file descriptor \d+\): (?P<request>.+)$")
_READY_MARKER = "Accepting connections."


class Tinyproxy:
    """A real tinyproxy listening on ``127.0.0.1:<free port>``; only 127.0.0.1 may use it.

    Use as a context manager; ``url`` is what to hand to a client as its proxy
    (``httpx.Client(proxy=proxy.url)``).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        extra_config: str = "",
        startup_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="tinyproxy-"))
            if workdir is None
            else Path(workdir).resolve()
        )
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout
        self.binary = binary if binary is not None else require_tool("tinyproxy")
        self.host = _HOST
        self.port = 0
        self.conf_file = self.workdir / "tinyproxy.conf"
        self.log_file = self.workdir / "tinyproxy.log"
        self.pid_file = self.workdir / "tinyproxy.pid"
        self.output_file = self.workdir / "output.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; valid once started."""
        if self.port == 0:
            raise RuntimeError("tinyproxy is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """PID of the tinyproxy process."""
        if self._process is None:
            raise RuntimeError("tinyproxy is not started")
        return self._process.pid

    def log_text(self) -> str:
        """Return tinyproxy's whole log."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _output_text(self) -> str:
        try:
            return self.output_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

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

    def start(self) -> Self:
        """Start tinyproxy and wait until it accepts connections."""
        if self._process is not None:
            raise RuntimeError("tinyproxy is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(_PORT_RETRIES):
            self.port = free_port(self.host)
            self.conf_file.write_text(self._config(), encoding="utf-8")
            self.log_file.unlink(missing_ok=True)
            with self.output_file.open("wb") as output:
                process = subprocess.Popen(
                    die_with_parent([self.binary, "-d", "-c", str(self.conf_file)]),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    start_new_session=True,
                )
            try:
                # tinyproxy logs the marker after listen() succeeded on every address. Probing
                # the port instead would both add noise to its log and be fooled by another
                # process that won a race for the port.
                wait_until(
                    lambda: _READY_MARKER in self.log_text(),
                    self.startup_timeout,
                    what="tinyproxy to start accepting connections",
                    process=process,
                )
            except (RuntimeError, TimeoutError) as exc:
                stop_process(process)
                last_error = f"{exc}\n{self._output_text()}\n{self.log_text()}"
                lost_race = "Could not create listening sockets" in last_error
                if lost_race or port_is_open(self.host, self.port):
                    continue  # somebody else took the port between free_port() and bind()
                raise RuntimeError(f"tinyproxy failed to start: {last_error}") from exc
            self._process = process
            return self
        raise RuntimeError(
            f"tinyproxy failed to start after {_PORT_RETRIES} attempts: {last_error}"
        )

    def stop(self) -> None:
        """Stop tinyproxy (SIGTERM, wait; SIGKILL if it hangs)."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def is_running(self) -> bool:
        """Return True while the tinyproxy process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.port else "not started"
        return f"<Tinyproxy {where}>"
