"""The controller's Prometheus series, read back from a private registry and over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from tests.support.tools import free_port

from imagestream.controller.decisions import Outcome
from imagestream.controller.metrics import PHASES, Metrics, serve


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def streams(registry: CollectorRegistry) -> dict[str, float | None]:
    return {
        phase: registry.get_sample_value("imagestream_streams", {"phase": phase})
        for phase in PHASES
    }


def test_streams_by_phase_counts_each_stream_once(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    assert set(streams(registry).values()) == {0.0}  # every phase exported from the start
    metrics.observe_stream("a", "Running")
    metrics.observe_stream("b", "Running")
    metrics.observe_stream("c", "Pending")
    metrics.observe_stream("a", "Succeeded")
    metrics.observe_stream("d", None)  # not yet reconciled: not counted
    counts = streams(registry)
    assert (counts["Running"], counts["Pending"], counts["Succeeded"]) == (1.0, 1.0, 1.0)
    metrics.forget_stream("b")
    metrics.forget_stream("never-seen")
    assert streams(registry)["Running"] == 0.0


def test_bytes_written_counts_progress_deltas_across_generations(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    def total() -> float | None:
        return registry.get_sample_value("imagestream_bytes_written_total")

    metrics.observe_written("a", 1, 100)
    metrics.observe_written("a", 1, 250)
    metrics.observe_written("a", 1, 250)  # the same report twice counts once
    metrics.observe_written("b", 1, 50)
    assert total() == 300.0
    metrics.observe_written("a", 2, 30)  # a new generation's agent starts from zero
    assert total() == 330.0
    metrics.observe_written("a", 2, 10)  # never backwards
    assert total() == 330.0


def test_outcomes_and_durations(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.record_outcome("a", 1, Outcome("Succeeded", "Succeeded", 42.0, 4000))
    metrics.record_outcome("b", 1, Outcome("Failed", "AgentOOMKilled", None, None))
    metrics.record_outcome("c", 1, Outcome("Failed", "AgentOOMKilled", 3.0, None))
    outcome = {"phase": "Failed", "reason": "AgentOOMKilled"}
    assert registry.get_sample_value("imagestream_stream_outcomes_total", outcome) == 2.0
    succeeded = {"phase": "Succeeded"}
    assert registry.get_sample_value("imagestream_stream_duration_seconds_count", succeeded) == 1
    assert registry.get_sample_value("imagestream_stream_duration_seconds_sum", succeeded) == 42
    failed = {"phase": "Failed"}
    assert registry.get_sample_value("imagestream_stream_duration_seconds_count", failed) == 1


def test_an_outcome_decided_again_is_counted_once(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """kopf repeats a reconcile whose status patch failed: the same outcome of the same
    (uid, generation) is decided again, and must count once; another generation counts."""
    succeeded = Outcome("Succeeded", "Succeeded", 42.0, 4000)
    assert not metrics.has_outcome("a", 1, succeeded)
    metrics.record_outcome("a", 1, succeeded)
    assert metrics.has_outcome("a", 1, succeeded)
    metrics.record_outcome("a", 1, Outcome("Succeeded", "Succeeded", 43.0, 4000))
    labels = {"phase": "Succeeded", "reason": "Succeeded"}
    assert registry.get_sample_value("imagestream_stream_outcomes_total", labels) == 1.0
    count = registry.get_sample_value(
        "imagestream_stream_duration_seconds_count", {"phase": "Succeeded"}
    )
    assert count == 1
    metrics.record_outcome("a", 2, succeeded)
    assert registry.get_sample_value("imagestream_stream_outcomes_total", labels) == 2.0
    metrics.forget_stream("a")
    assert not metrics.has_outcome("a", 2, succeeded)


@pytest.fixture
def served(registry: CollectorRegistry) -> Iterator[str]:
    server = serve(0, "127.0.0.1", registry)
    assert server is None  # port 0 means disabled, as on the command line
    port = free_port()
    server = serve(port, "127.0.0.1", registry)
    assert server is not None
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    server.server_close()


def test_metrics_are_served_over_http(metrics: Metrics, served: str) -> None:
    metrics.observe_stream("a", "Verifying")
    text = httpx.get(served, timeout=5).text
    assert 'imagestream_streams{phase="Verifying"} 1.0' in text
    assert "imagestream_bytes_written_total 0.0" in text
