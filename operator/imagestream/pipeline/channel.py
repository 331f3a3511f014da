"""A bounded hand-off between pipeline stages that any stage can abort.

`queue.Queue` alone blocks forever when the other side has died; every wait here also watches a
shared abort event, so one failing stage stops the others within a fraction of a second.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.1


class Aborted(Exception):
    """Raised in a stage when another stage failed or the stream was cancelled."""


class Channel(Generic[T]):
    """A bounded FIFO of items; `None` marks the end of the stream."""

    def __init__(self, capacity: int, abort: threading.Event) -> None:
        self._queue: queue.Queue[T | None] = queue.Queue(maxsize=capacity)
        self._abort = abort

    def put(self, item: T | None) -> None:
        """Hand an item (or the end marker) downstream, waiting for room."""
        while True:
            if self._abort.is_set():
                raise Aborted
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Mark the end of the stream."""
        self.put(None)

    def get(self) -> T | None:
        """Take the next item, or `None` at the end of the stream."""
        while True:
            if self._abort.is_set():
                raise Aborted
            try:
                return self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
