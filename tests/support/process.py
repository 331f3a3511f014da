"""A real server process for tests: private work directory, free loopback port, clean stop.

:class:`ServerProcess` is what the nginx and tinyproxy wrappers share. It owns the work
directory (a temporary one, removed at stop, when none is given), starts the server in its own
session with its output captured in ``output.log``, waits until the server says it is ready,
retries with another free port when some other process won the race for the one picked, and
stops the server (SIGTERM, then SIGKILL to its process group). A subclass writes its
configuration, names its command line and says how to tell that it is ready.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from .tools import die_with_parent, free_port, require_tool, stop_process

LOOPBACK = "127.0.0.1"


class StartStop:
    """A server with :meth:`start` and :meth:`stop`, used as a context manager that calls them.

    The base of every test server here, so that ``with X(...) as x:`` means the same for all.
    """

    def start(self) -> Self:
        """Start serving; return ``self``."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving; a no-op when not started."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def read_text_or_empty(path: Path) -> str:
    """Return the text of a log the server writes, or "" while it does not exist yet."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


class ServerProcess(StartStop):
    """A server run in the foreground on ``127.0.0.1:<free port>``; use as a context manager.

    Subclasses set :attr:`name` (also the executable looked up when no ``binary`` is given) and
    implement :meth:`_prepare`, :meth:`_command`, :meth:`_wait_ready`, :meth:`_diagnostics` and
    :meth:`_lost_port_race`.
    """

    #: The server's name in messages, and the executable to find when ``binary`` is None.
    name: ClassVar[str]
    #: How many free ports :meth:`start` tries before it gives up.
    port_retries: ClassVar[int] = 5

    def __init__(self, workdir: Path | None, *, startup_timeout: float, binary: str | None) -> None:
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            if workdir is None
            else Path(workdir).resolve()
        )
        self.startup_timeout = startup_timeout
        self.binary = binary if binary is not None else require_tool(self.name)
        self.host = LOOPBACK
        self.port = 0
        self.output_file = self.workdir / "output.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- what a subclass provides -----------------------------------------------------------

    def _prepare(self) -> None:
        """Write the configuration for :attr:`port`; remove what a previous attempt left."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        """The command line that runs the server in the foreground."""
        raise NotImplementedError

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Return once ``process`` serves; raise RuntimeError or TimeoutError if it does not."""
        raise NotImplementedError

    def _diagnostics(self) -> str:
        """What the server said about a failed start (its logs)."""
        raise NotImplementedError

    def _lost_port_race(self, error: str) -> bool:
        """Whether a failed start (``error``, with diagnostics) means the port was taken."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """PID of the server (nginx: the master process)."""
        if self._process is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._process.pid

    def output_text(self) -> str:
        """Return what the server printed on stdout and stderr."""
        return read_text_or_empty(self.output_file)

    def start(self) -> Self:
        """Start the server and wait until it is ready; retries if the port was taken."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(self.port_retries):
            self.port = free_port(self.host)
            self._prepare()
            with self.output_file.open("wb") as output:
                process = subprocess.Popen(
                    die_with_parent(self._command()),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    start_new_session=True,
                )
            try:
                self._wait_ready(process)
            except (RuntimeError, TimeoutError) as exc:
                stop_process(process)
                last_error = f"{exc}\n{self._diagnostics()}"
                if self._lost_port_race(last_error):
                    continue  # somebody else took the port between free_port() and bind()
                raise RuntimeError(f"{self.name} failed to start: {last_error}") from exc
            self._process = process
            return self
        raise RuntimeError(
            f"{self.name} failed to start after {self.port_retries} attempts: {last_error}"
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, wait; SIGKILL the process group if it hangs)."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def is_running(self) -> bool:
        """Return True while the server process is alive."""
        return self._process is not None and self._process.poll() is None
