"""Interrupting a running ``imagestream`` as a user (Ctrl-C) or Kubernetes (SIGTERM) does.

:func:`interrupted` signals the process and waits for it; :func:`assert_cancelled` checks that
it stopped as a cancel must: exit 130 within :data:`PROMPT` seconds of the signal, the reason
``Cancelled`` in its JSON result, no traceback, and a message that says what the target holds.
"""

from __future__ import annotations

import signal
import subprocess
import time

from .cli import result_record

#: How soon after the signal the process must have exited (about 0.1 s when all is well).
PROMPT = 2.0


def interrupted(
    process: subprocess.Popen[str], *, times: int = 1, sig: int = signal.SIGINT
) -> tuple[float, str, str]:
    """Send ``sig`` ``times`` times, 0.5 s apart; (seconds to exit after the last, out, err)."""
    for n in range(times):
        if n:
            time.sleep(0.5)
        process.send_signal(sig)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=30)
    return time.monotonic() - sent, stdout, stderr


def assert_cancelled(
    process: subprocess.Popen[str], seconds: float, stdout: str, stderr: str, *phrases: str
) -> None:
    """Exit 130 within PROMPT seconds, reason Cancelled, no traceback, each of ``phrases``."""
    assert process.returncode == 130, stderr
    assert seconds < PROMPT, f"took {seconds:.1f}s to stop after the signal\n{stderr}"
    assert "Traceback" not in stderr, stderr
    final = result_record(stdout, stderr)
    assert (final["ok"], final["reason"]) == (False, "Cancelled")
    for phrase in phrases:
        assert phrase in str(final["message"]), final["message"]
