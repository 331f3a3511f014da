"""SIGTERM, SIGINT and SIGHUP as stop requests, shared by the CLI and the agent.

The first signal asks for a clean stop: it sets an event the stream watches, and the stream
ends within a fraction of a second with its target invalid. A second SIGINT (Ctrl-C pressed
again) does not wait for that: it raises `KeyboardInterrupt` where the main thread is, and the
stream turns it into the same cancel (the target's header stays zeros until the commit, so
stopping anywhere before it leaves the target invalid). SIGTERM never escalates: Kubernetes
sends it once and follows with SIGKILL after the grace period. SIGHUP (the terminal or the ssh
session went away) is a stop like SIGTERM: the stream must not go on writing a disk nobody
watches, and the default action would kill it without invalidating the target.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


def cancel_on_signals() -> threading.Event:
    """Install the handlers (main thread only); return the event the first signal sets."""
    cancel = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and cancel.is_set():
            log.warning("%s again: stopping at once", name)
            raise KeyboardInterrupt
        log.warning("%s: stopping the stream (Ctrl-C again to stop at once)", name)
        cancel.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
    return cancel
