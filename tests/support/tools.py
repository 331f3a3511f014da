"""Finding real tools, picking free ports and waiting for servers to come up.

The rule for missing real parts: under ``CI=true`` a test that needs one must *fail* (CI is
supposed to have everything installed, so a missing binary is a broken CI image, not a reason to
quietly test less); on a developer machine it is skipped with a clear reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

#: Directories searched in addition to ``PATH``: sbin directories are often missing from the
#: ``PATH`` of non-login shells, yet that is where nginx, losetup and mkfs.ext4 live.
EXTRA_TOOL_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def in_ci() -> bool:
    """Return True when running under CI (``CI=true``, as GitHub Actions and GitLab set it)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def fail_or_skip(reason: str) -> NoReturn:
    """Fail the current test under CI, skip it otherwise.

    Use this whenever a real part a test depends on (a binary, root, a kernel feature) is not
    available: in CI that is an error in the CI image; locally it is merely a skipped test.
    """
    if in_ci():
        pytest.fail(f"{reason} (CI=true: missing real parts are a failure, not a skip)")
    pytest.skip(reason)


def find_tool(name: str) -> str | None:
    """Return the path of executable ``name`` (PATH, then the sbin directories), or None."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in EXTRA_TOOL_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tool(name: str) -> str:
    """Return the path of executable ``name``; fail (CI) or skip (otherwise) when it is missing."""
    found = find_tool(name)
    if found is None:
        fail_or_skip(f"required tool {name!r} not found in PATH or {', '.join(EXTRA_TOOL_DIRS)}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0, then release).

    There is an unavoidable window between releasing the port and the server binding it; the
    server wrappers detect a lost race (the server fails to start) and retry with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    *,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    interval: float = 0.01,
) -> None:
    """Poll ``condition`` until it returns True; raise TimeoutError after ``timeout`` seconds.

    When ``process`` is given and exits while waiting, raise RuntimeError at once instead of
    waiting for the timeout (a server that died will never become ready).
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with status {process.returncode} before {what}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def port_is_open(host: str, port: int) -> bool:
    """Return True if a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Raises TimeoutError after ``timeout`` seconds, or RuntimeError as soon as ``process`` (the
    server expected to listen there, if given) exits.
    """
    wait_until(
        lambda: port_is_open(host, port),
        timeout,
        what=f"{host}:{port} to accept connections",
        process=process,
    )


def die_with_parent(command: list[str]) -> list[str]:
    """Prefix ``command`` so the server gets SIGTERM if the test process dies (when possible).

    A safety net only (teardown normally stops servers): if pytest is killed outright, for
    instance by pytest-timeout's thread method, the servers it started do not linger. Uses
    util-linux ``setpriv --pdeathsig`` (``exec``s the command, so the server stays our direct
    child) rather than a thread-unsafe ``preexec_fn``; returns ``command`` unchanged without it.
    """
    setpriv = find_tool("setpriv")
    if setpriv is None:
        return command
    return [setpriv, "--pdeathsig", "TERM", "--", *command]


def stop_process(
    process: subprocess.Popen[bytes],
    *,
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
) -> None:
    """Stop a server started with ``start_new_session=True``: ``sig``, wait, then SIGKILL.

    The SIGKILL goes to the whole process group (the server's own session), so worker
    processes of a master/worker server cannot outlive a master that had to be killed.
    """
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    # Still running (so not reaped: its pid, which is also its process group id, cannot have
    # been reused). Kill the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=timeout)
