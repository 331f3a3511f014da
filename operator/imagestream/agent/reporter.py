"""Progress into the ImageStream's status: throttled, coalesced, and never in the stream's way.

The pipeline calls `ProgressReporter.update` ten times a second from its supervising thread;
that call only stores the snapshot. A background thread sends the newest one at most once per
`interval` seconds. A failing or hanging API server costs status freshness, never the stream:
errors are logged (rate-limited) and the next tick simply tries again. Only `ObjectReplaced`
(the ImageStream was deleted and re-created: it is not ours anymore) ends the sending for good;
the stream goes on, and its verdict reaches the controller through the termination message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from imagestream.pipeline.progress import Progress
from imagestream.status_fields import progress_fields
from imagestream.timefmt import rfc3339

log = logging.getLogger(__name__)

#: Sends one `status.progress` report (see `progress_report`); raises on failure.
PatchFunction = Callable[[dict[str, Any]], None]

#: How often a persisting failure is logged again after the first time.
ERROR_LOG_INTERVAL = 30.0
#: The phases `status.progress.phase` may show. The verdict (Succeeded/Failed) is the
#: controller's, read from the termination message, so the pipeline's own final "Succeeded"
#: is shown as the verification step it ends.
_SHOWN_PHASES = frozenset({"Running", "Verifying"})


class StatusWriteError(Exception):
    """A status patch failed; the message is safe to log (no credentials, no secret URLs)."""


class ObjectReplaced(StatusWriteError):
    """The ImageStream under our name has another uid: further patches would be rejected too."""


def progress_report(progress: Progress, at: float) -> dict[str, Any]:
    """The `status.progress` object for one snapshot taken at wall-clock time `at` (epoch s)."""
    fields = {key: value for key, value in progress_fields(progress).items() if value is not None}
    if fields["phase"] not in _SHOWN_PHASES:
        fields["phase"] = "Verifying"
    fraction = progress.fraction
    if fraction is not None:
        fields["percent"] = min(100, max(0, int(fraction * 100)))
    fields["updatedAt"] = rfc3339(at)
    return fields


class ProgressReporter:
    """Feeds pipeline snapshots to `patch`, at most once per `interval` seconds.

    Use as a context manager around the stream; leaving it sends the last snapshot (if it was
    not sent yet) and waits at most `close_timeout` seconds for the sending thread.
    """

    def __init__(
        self,
        patch: PatchFunction,
        interval: float = 1.0,
        *,
        close_timeout: float = 5.0,
        error_log_interval: float = ERROR_LOG_INTERVAL,
    ) -> None:
        self._patch = patch
        self._interval = interval
        self._close_timeout = close_timeout
        self._error_log_interval = error_log_interval
        # (snapshot, wall time) replaced by one assignment: atomic under the GIL, no lock.
        self._latest: tuple[Progress, float] | None = None
        self._sent: tuple[Progress, float] | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._failures = 0
        self._last_error_log = float("-inf")
        # Set once, by the sending thread only, when the object turned out to be replaced.
        self._replaced = False
        self._thread = threading.Thread(target=self._run, name="imagestream-status", daemon=True)
        self._thread.start()

    def update(self, progress: Progress) -> None:
        """The pipeline's progress callback: remember the snapshot and return at once."""
        self._latest = (progress, time.time())
        self._wake.set()

    def close(self) -> None:
        """Send the last snapshot and stop; give up on a hanging API after `close_timeout`."""
        self._closing.set()
        self._wake.set()
        self._thread.join(self._close_timeout)
        if self._thread.is_alive():
            log.warning(
                "the last progress update did not reach the API server within %g s; "
                "the result is in the termination message",
                self._close_timeout,
            )

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        next_allowed = float("-inf")
        while True:
            self._wake.wait()
            self._wake.clear()
            # Sleeping (rather than waiting on an event) keeps the limit even for the final
            # patch; it lasts at most one interval.
            pause = next_allowed - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            latest = self._latest
            if self._replaced:
                # Snapshots still arrive (update() stays as cheap as ever) but go nowhere.
                self._sent = latest
            elif latest is not None and latest is not self._sent:
                self._send(latest)
                next_allowed = time.monotonic() + self._interval
            if self._closing.is_set() and self._latest is self._sent:
                return

    def _send(self, latest: tuple[Progress, float]) -> None:
        # Marked sent even when the patch fails: a newer snapshot replaces it on the next tick,
        # and retrying a stale one would only delay that.
        self._sent = latest
        try:
            self._patch(progress_report(*latest))
        except ObjectReplaced as exc:
            self._replaced = True
            log.warning("%s", exc)
        except Exception as exc:  # never into the pipeline: the stream matters more
            self._failed(exc)
        else:
            self._recovered()

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._last_error_log < self._error_log_interval:
            return
        self._last_error_log = now
        log.warning(
            "status progress update failed (%d so far), retrying on the next tick: %s",
            self._failures,
            describe(exc),
        )

    def _recovered(self) -> None:
        if self._failures:
            log.info("status progress updates work again after %d failures", self._failures)
            self._failures = 0
            self._last_error_log = float("-inf")


def describe(exc: Exception) -> str:
    """A log-safe description: our own errors' messages, otherwise only the exception type.

    Third-party messages may carry URLs with tokens or request headers; they are left out.
    """
    if isinstance(exc, StatusWriteError):
        return str(exc)
    return type(exc).__name__
