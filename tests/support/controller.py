"""The real ``imagestream controller`` as a subprocess, for the operator's integration tests.

It runs exactly as in a Deployment, except that it finds the API through ``KUBECONFIG`` (the
API stand-in's, or a real cluster's) instead of a service-account token, and serves its
Prometheus metrics on a free port of 127.0.0.1. Its log (``-v``: kopf's debug lines too) goes
to a file in its work directory; a restart keeps the earlier runs' logs, so a test failing
after a restart shows the whole story.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .process import ServerProcess, read_text_or_empty
from .tools import fail_or_skip, stop_process, wait_for_port

#: Long enough for a cold start of Python, kopf and the kubernetes client on a busy CI box.
STARTUP_TIMEOUT = 30.0
#: Variables that would make the client prefer an in-cluster configuration over KUBECONFIG.
IN_CLUSTER_VARIABLES = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")

#: What the ``controller_factory`` fixture is: ``factory(**ControllerProcess options)``.
ControllerFactory = Callable[..., "ControllerProcess"]


def project_executable() -> str:
    """The ``imagestream`` entry point of this virtualenv (fail under CI, skip otherwise)."""
    found = shutil.which("imagestream", path=str(Path(sys.executable).parent))
    if found is None:
        fail_or_skip(f"the imagestream entry point is not installed next to {sys.executable}")
    return found


class ControllerProcess(ServerProcess):
    """``imagestream controller --standalone -n NS... --metrics-port P``; a context manager.

    :meth:`stop` takes the signal to send (SIGTERM: the clean shutdown a rollout does; SIGKILL:
    a crash), :meth:`restart` stops and starts again, :meth:`metrics` reads the metrics page.
    """

    name = "imagestream-controller"

    def __init__(
        self,
        kubeconfig: Path,
        namespaces: Sequence[str],
        workdir: Path,
        *,
        verbose: bool = True,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        super().__init__(
            workdir, startup_timeout=startup_timeout, binary=binary or project_executable()
        )
        self.kubeconfig = Path(kubeconfig)
        self.namespaces = list(namespaces)
        self.verbose = verbose
        self.extra_args = list(extra_args)
        #: The exit status of every run stopped so far (negative: killed by that signal).
        self.exit_codes: list[int] = []
        self._runs = 0

    def _prepare(self) -> None:
        self.output_file.unlink(missing_ok=True)

    def _command(self) -> list[str]:
        # `env` rather than a Popen env: the base class owns Popen, and `env` execs in place,
        # so the pid (and the signals sent to it) stay the controller's.
        unset = [arg for name in IN_CLUSTER_VARIABLES for arg in ("-u", name)]
        scope = [arg for namespace in self.namespaces for arg in ("-n", namespace)]
        return [
            "env",
            *unset,
            f"KUBECONFIG={self.kubeconfig}",
            self.binary,
            *(["-v"] if self.verbose else []),
            "controller",
            "--standalone",
            *scope,
            "--metrics-port",
            str(self.port),
            "--metrics-address",
            self.host,
            *self.extra_args,
        ]

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # The metrics port opens just before kopf starts watching (see controller.main).
        wait_for_port(self.host, self.port, self.startup_timeout, process=process)

    def _diagnostics(self) -> str:
        return self.output_text()[-4000:]

    def _lost_port_race(self, error: str) -> bool:
        return "cannot serve metrics" in error and "in use" in error

    def start(self) -> ControllerProcess:
        """Start the controller and wait until its metrics port answers."""
        self._runs += 1
        super().start()
        return self

    def stop(self, *, sig: int = signal.SIGTERM) -> None:
        """Stop the controller with ``sig`` (SIGKILL after 10 s if it does not exit)."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_process(process, sig=sig)
        self.exit_codes.append(process.returncode)
        self._keep_log()

    def restart(self, *, sig: int = signal.SIGTERM) -> ControllerProcess:
        """Stop with ``sig`` and start a new controller process (on a new metrics port)."""
        self.stop(sig=sig)
        return self.start()

    def metrics(self) -> str:
        """The Prometheus text page of the running controller."""
        response = httpx.get(f"http://{self.host}:{self.port}/metrics", timeout=5)
        response.raise_for_status()
        return response.text

    def log_text(self) -> str:
        """Everything every run of the controller logged, oldest run first."""
        stopped = [read_text_or_empty(self._log_of_run(run)) for run in range(1, self._runs + 1)]
        return "".join(stopped) + self.output_text()

    def _log_of_run(self, run: int) -> Path:
        return self.workdir / f"output.{run}.log"

    def _keep_log(self) -> None:
        if self.output_file.exists():
            self.output_file.rename(self._log_of_run(self._runs))

    def __repr__(self) -> str:
        return f"ControllerProcess(port={self.port}, workdir={self.workdir})"


def metric_value(page: str, sample: str, **labels: str) -> float:
    """The value of sample ``sample`` with exactly ``labels`` on a metrics page; NaN if absent.

    ``sample`` is the sample's own name (``imagestream_bytes_written_total``, ``..._count``).
    """
    for family in text_string_to_metric_families(page):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return math.nan
