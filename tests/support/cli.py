r"""The real ``imagestream`` CLI in a subprocess, as a user runs it, and what it said.

:func:`run_imagestream` runs it with a clean environment (no proxy or CA variables inherited
from the developer's shell, a wide console so rich does not wrap messages) and returns a
:class:`CliRun`. :func:`imagestream_process` starts it for a test that acts while it runs
(reads its progress, :func:`interrupt`\ s it). :func:`imagestream_command` and
:func:`imagestream_env` are the same command line and environment for a test that has to
drive the process some other way (a launcher).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagestream.demo.image import SampleImage

from .rss import run_measured
from .targets import sha384_of, staging_path

#: The console script installed beside the interpreter running the tests.
IMAGESTREAM = Path(sys.executable).with_name("imagestream")

#: Variables that would change where the CLI connects or whom it trusts: never inherited.
DROPPED_ENV = frozenset(
    {
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "ssl_cert_file",
        "ssl_cert_dir",
        "requests_ca_bundle",
        "curl_ca_bundle",
    }
)


def imagestream_env(**overrides: str) -> dict[str, str]:
    """Our environment minus :data:`DROPPED_ENV` (any case), a wide console, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in DROPPED_ENV}
    env["COLUMNS"] = "1000"  # rich would otherwise wrap messages (and paths in them) at 80
    env["NO_COLOR"] = "1"
    env.update(overrides)
    return env


def imagestream_command(*args: str | os.PathLike[str]) -> list[str]:
    """The command line ``imagestream ARGS...``."""
    return [str(IMAGESTREAM), *(os.fspath(arg) for arg in args)]


def one_line(text: str) -> str:
    """``text`` with every whitespace run folded to one space (rich wraps long lines)."""
    return " ".join(text.split())


def json_records(stdout: str) -> list[dict[str, Any]]:
    """Every JSON line of ``--progress json`` output, in order."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def result_record(stdout: str, stderr: str = "") -> dict[str, Any]:
    """The ``{"event": "result", ...}`` record, which must be the last JSON line of stdout."""
    records = json_records(stdout)
    assert records, f"no JSON lines in stdout:\n{stdout}\n{stderr}"
    final = records[-1]
    assert final.get("event") == "result", f"the last JSON line is not the result: {final}"
    return final


@dataclass(frozen=True)
class CliRun:
    """One finished ``imagestream`` process."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def text(self) -> str:
        """stdout and stderr with all whitespace runs folded to one space."""
        return one_line(f"{self.stdout}\n{self.stderr}")

    def records(self) -> list[dict[str, Any]]:
        """Every JSON line of stdout (``--progress json``), in order."""
        return json_records(self.stdout)

    def result(self) -> dict[str, Any]:
        """The final ``{"event": "result", ...}`` line of ``--progress json``."""
        return result_record(self.stdout, self.stderr)


def run_imagestream(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> CliRun:
    """Run ``imagestream ARGS...`` (stdin from /dev/null) and wait for it.

    ``env`` is the process's whole environment; by default :func:`imagestream_env`'s. A run
    that outlives ``timeout`` seconds is killed and raises ``subprocess.TimeoutExpired``.
    """
    started = time.monotonic()
    proc = subprocess.run(
        imagestream_command(*args),
        capture_output=True,
        text=True,
        env=env if env is not None else imagestream_env(),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    return CliRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@contextlib.contextmanager
def imagestream_process(
    *args: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Start ``imagestream ARGS...`` with stdout and stderr piped (text), for a test to drive.

    ``env`` as for :func:`run_imagestream`. A process still running when the block ends (the
    test failed before it finished) is killed, so no CLI outlives its test.
    """
    with subprocess.Popen(
        imagestream_command(*args),
        env=env if env is not None else imagestream_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def interrupt(process: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    """SIGTERM ``process`` (what Kubernetes sends a deleted Pod), wait; its (stdout, stderr)."""
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=timeout)


# -- peak memory of one run --------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One ``imagestream`` run with the peak RSS the kernel recorded for it."""

    exit_code: int
    peak_rss_mib: float
    seconds: float
    result: dict[str, Any]
    stderr: str


def imagestream_measured(
    *args: str | os.PathLike[str], workdir: Path, timeout: float = 300
) -> Measured:
    """Run ``imagestream ARGS...`` as a grandchild; its exit code, peak RSS and JSON result.

    stdout, stderr and the launcher's report go to files in ``workdir``.
    """
    stdout_path = workdir / "stdout.json"
    stderr_path = workdir / "stderr.txt"
    started = time.monotonic()
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        peak = run_measured(
            imagestream_command(*args),
            env=imagestream_env(),
            stdout=stdout,
            stderr=stderr,
            report=workdir / "rusage.json",
            timeout=timeout,
        )
    records = json_records(stdout_path.read_text())
    return Measured(
        exit_code=peak.exit_code,
        peak_rss_mib=peak.peak_rss_mib,
        seconds=time.monotonic() - started,
        result=records[-1] if records else {},
        stderr=stderr_path.read_text(),
    )


def stream_image(
    source: str,
    target: Path,
    image: SampleImage,
    *extra: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> CliRun:
    """``imagestream stream SOURCE TARGET --sha384 <image's> --progress json EXTRA...``."""
    return run_imagestream(
        "stream",
        source,
        target,
        "--sha384",
        image.sha384,
        "--progress",
        "json",
        *extra,
        env=env,
        timeout=timeout,
    )


def stream_fast_retries(
    source: str,
    target: Path,
    image: SampleImage,
    *extra: str,
    stall_timeout: float,
    max_retries: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> CliRun:
    """:func:`stream_image` with a 0.05 s retry backoff and the given stall timeout (and retries).

    A test's faults (a cut, a reset, a refusal) would otherwise cost the default backoff's
    seconds for every retry; ``max_retries`` None keeps the CLI's default.
    """
    retries = () if max_retries is None else ("--max-retries", str(max_retries))
    return stream_image(
        source,
        target,
        image,
        "--retry-backoff",
        "0.05",
        *retries,
        "--stall-timeout",
        str(stall_timeout),
        *extra,
        env=env,
        timeout=timeout,
    )


# -- what a `stream --progress json` into a file target must have done -------------------------


def assert_succeeded(run: CliRun, target: Path, image: SampleImage) -> dict[str, Any]:
    """Exit 0, a verified JSON result, and the file holds exactly the raw image; the result."""
    assert run.code == 0, run.text
    result = run.result()
    assert result["ok"] is True
    assert result["verified"] is True
    assert result["sha384"] == image.sha384
    assert result["bytesFetched"] == image.compressed_size
    assert result["bytesWritten"] == image.raw_size
    assert target.stat().st_size == image.raw_size
    assert sha384_of(target) == image.raw_sha384
    assert not staging_path(target).exists()
    return result


def assert_failed(run: CliRun, code: int, *causes: str) -> dict[str, Any]:
    """The failure family's exit code, a message naming each cause (any case); the result."""
    assert run.code == code, run.text
    for cause in causes:
        assert cause.lower() in run.text.lower(), run.text
    assert "Traceback" not in run.stderr, run.stderr
    result = run.result()
    assert result["ok"] is False
    return result


def assert_exited(run: CliRun, code: int, *phrases: str) -> None:
    """Exit status ``code``, and stderr (folded to one line) contains each of ``phrases``."""
    assert run.code == code, run.text
    message = one_line(run.stderr)
    for phrase in phrases:
        assert phrase in message, message
