"""Progress snapshots and the counters the stages update while bytes flow."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    """What a progress consumer sees; immutable so it can cross threads freely."""

    phase: str
    bytes_fetched: int
    bytes_total: int | None
    bytes_written: int
    bytes_per_second: float
    resumes: int
    elapsed: float
    #: A COSI image: the partition image being written (1-based, in stream order) and how many.
    partition: int | None = None
    partitions: int | None = None
    #: The output size the data declares: the source size for uncompressed data, the first zstd
    #: frame's content size (the whole output of a single-frame image); None when unknown.
    output_total: int | None = None
    #: Bytes read back from the target so far (`--verify-after-write`); None before the read-back.
    bytes_read_back: int | None = None

    @property
    def fraction(self) -> float | None:
        """Share of the fetched bytes, or None while the total is unknown."""
        if not self.bytes_total:
            return None
        return min(1.0, self.bytes_fetched / self.bytes_total)


ProgressCallback = Callable[[Progress], None]


@dataclass
class Counters:
    """Plain integers each written by exactly one stage, read by the reporter.

    Single-writer ints need no lock under the GIL; the reporter only ever reads a consistent-enough
    snapshot, which is all a progress display needs.
    """

    bytes_fetched: int = 0
    bytes_total: int | None = None
    bytes_written: int = 0
    resumes: int = 0
    output_total: int | None = None
    bytes_read_back: int | None = None
    phase: str = "Running"
    started: float = field(default_factory=time.monotonic)
    partition: int | None = None
    partitions: int | None = None


class RateMeter:
    """Fetch rate over a sliding window of a few seconds, so a stall shows up as a falling rate."""

    def __init__(self, window: float = 3.0) -> None:
        self._window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def update(self, now: float, total_bytes: int) -> float:
        """Record the byte count at `now` and return bytes per second over the window."""
        self._samples.append((now, total_bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        first_time, first_bytes = self._samples[0]
        span = now - first_time
        return (total_bytes - first_bytes) / span if span > 0 else 0.0


def snapshot(counters: Counters, rate: RateMeter) -> Progress:
    """Freeze the counters into a `Progress`, updating the rate meter."""
    now = time.monotonic()
    return Progress(
        phase=counters.phase,
        bytes_fetched=counters.bytes_fetched,
        bytes_total=counters.bytes_total,
        bytes_written=counters.bytes_written,
        bytes_per_second=rate.update(now, counters.bytes_fetched),
        resumes=counters.resumes,
        elapsed=now - counters.started,
        partition=counters.partition,
        partitions=counters.partitions,
        output_total=counters.output_total,
        bytes_read_back=counters.bytes_read_back,
    )
