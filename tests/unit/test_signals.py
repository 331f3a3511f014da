"""Signal handling: one neutral module for the CLI and the agent; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from imagestream.signals import cancel_on_signals


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("restore_handlers")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_first_signal_asks_for_a_clean_stop(sig: signal.Signals) -> None:
    cancel = cancel_on_signals()
    os.kill(os.getpid(), sig)  # the handler runs in this (the main) thread before kill returns
    assert cancel.is_set()


@pytest.mark.usefixtures("restore_handlers")
def test_a_second_sigint_raises_keyboard_interrupt() -> None:
    cancel = cancel_on_signals()
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert cancel.is_set()


@pytest.mark.usefixtures("restore_handlers")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_second_sigterm_or_sighup_does_not_escalate(sig: signal.Signals) -> None:
    # Kubernetes sends one SIGTERM; a duplicate must not turn a clean stop into an abrupt one.
    cancel = cancel_on_signals()
    os.kill(os.getpid(), sig)
    os.kill(os.getpid(), sig)
    assert cancel.is_set()


def test_the_agent_does_not_import_the_cli() -> None:
    # cli -> agent -> cli was a cycle; the agent takes its signal handling from a neutral module.
    probe = "import sys, imagestream.agent.main; print('imagestream.cli' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
