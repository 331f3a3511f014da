"""Prometheus metrics of the controller, served on their own port.

- `imagestream_streams{phase}`: ImageStreams by phase (every phase exported, zeros included),
- `imagestream_bytes_written_total`: bytes the agents wrote (progress, then final results),
- `imagestream_stream_duration_seconds{phase}`: Job start to outcome, per finished stream,
- `imagestream_stream_outcomes_total{phase,reason}`: finished streams by outcome and reason.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from imagestream.controller.builders import ACTIVE_PHASES, FINAL_PHASES
from imagestream.controller.decisions import Outcome

PHASES = (*ACTIVE_PHASES, *FINAL_PHASES)
#: Streams take seconds (a sysext) to hours (a large disk over a slow link).
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))


class Metrics:
    """The controller's series; safe to call from kopf's handler threads."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.streams = Gauge(
            "imagestream_streams", "ImageStreams by phase.", ["phase"], registry=registry
        )
        self.bytes_written = Counter(
            "imagestream_bytes_written",
            "Bytes written to targets by agents (progress reports, then final results).",
            registry=registry,
        )
        self.duration = Histogram(
            "imagestream_stream_duration_seconds",
            "Seconds from the agent Job's start to the stream's outcome.",
            ["phase"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.outcomes = Counter(
            "imagestream_stream_outcomes",
            "Finished streams by outcome phase and reason.",
            ["phase", "reason"],
            registry=registry,
        )
        self._lock = threading.Lock()
        self._phases: dict[str, str] = {}
        self._written: dict[str, tuple[int, int]] = {}
        #: (uid, generation, phase, reason) of every outcome counted, per uid.
        self._outcomes: dict[str, set[tuple[int, str, str]]] = {}
        self._publish_phases()

    def observe_stream(self, uid: str, phase: str | None) -> None:
        """Record the phase of one ImageStream (None: not yet reconciled, not counted)."""
        with self._lock:
            if phase in PHASES:
                self._phases[uid] = phase
            else:
                self._phases.pop(uid, None)
            self._publish_phases()

    def observe_written(self, uid: str, generation: int, written: int) -> None:
        """Count what the agent of (uid, generation) wrote since its previous report."""
        with self._lock:
            seen_generation, seen = self._written.get(uid, (generation, 0))
            if seen_generation != generation:
                seen = 0  # a new generation's agent starts counting from zero
            if written > seen:
                self.bytes_written.inc(written - seen)
                seen = written
            self._written[uid] = (generation, seen)

    def forget_stream(self, uid: str) -> None:
        """The ImageStream is gone."""
        with self._lock:
            self._phases.pop(uid, None)
            self._written.pop(uid, None)
            self._outcomes.pop(uid, None)
            self._publish_phases()

    def has_outcome(self, uid: str, generation: int, outcome: Outcome) -> bool:
        """Whether this outcome of (uid, generation) was counted already."""
        with self._lock:
            return (generation, outcome.phase, outcome.reason) in self._outcomes.get(uid, set())

    def record_outcome(self, uid: str, generation: int, outcome: Outcome) -> None:
        """A stream finished: count its outcome and observe its duration, once per
        (uid, generation, outcome) however often the reconcile that decided it repeats."""
        key = (generation, outcome.phase, outcome.reason)
        with self._lock:
            seen = self._outcomes.setdefault(uid, set())
            if key in seen:
                return
            seen.add(key)
        self.outcomes.labels(phase=outcome.phase, reason=outcome.reason).inc()
        if outcome.seconds is not None:
            self.duration.labels(phase=outcome.phase).observe(max(0.0, outcome.seconds))

    def _publish_phases(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] += 1
        for phase, count in counts.items():
            self.streams.labels(phase=phase).set(count)


def serve(port: int, address: str, registry: CollectorRegistry = REGISTRY) -> WSGIServer | None:
    """Serve /metrics on address:port in a daemon thread; port 0 disables it (None)."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
