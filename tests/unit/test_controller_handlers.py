"""The reconcile handler as kopf calls it: a repeated reconcile records an outcome once.

kopf runs the timer again when the status patch of a reconcile did not land (an API error, or
a watch that has not shown the patched status yet): the repeated reconcile decides the same
outcome from the same body. The outcome metric and the outcome Event must count it once per
(uid, generation, outcome). The handler runs here with kopf's own Event queue (the context
variables its poster reads) and the controller's real Metrics; no API call is made (the Job
is complete, nothing is created or deleted).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, cast

import kopf
from kopf._core.engines.posting import event_queue_loop_var, event_queue_var, settings_var
from kubernetes import client
from prometheus_client import CollectorRegistry
from tests.support.streams import (
    SETTINGS,
    agent_result,
    job_body,
    job_condition,
    pod_body,
    stream_body,
    terminated,
)

from imagestream.controller import handlers
from imagestream.controller.builders import job_name
from imagestream.controller.decisions import JobView, PodView
from imagestream.controller.kube import KubeClient
from imagestream.controller.metrics import Metrics

UID = "11111111-2222-3333-4444-555555555555"


def finished_job_observation() -> tuple[dict[str, Any], JobView, PodView]:
    """A stream whose Job completed with a verified result, its status still Running."""
    name = job_name("root-b", UID, 1)
    body = stream_body(
        status={
            "phase": "Running",
            "reason": "Streaming",
            "observedGeneration": 1,
            "jobName": name,
            "startTime": "2026-01-01T00:00:02Z",
        }
    )
    job = job_body(
        body, conditions=[job_condition("Complete")], completion_time="2026-01-01T00:00:45Z"
    )
    pod = pod_body(job, phase="Succeeded", terminated=terminated(0, agent_result(), "Completed"))
    job_view, pod_view = JobView.from_body(job), PodView.from_body(pod)
    assert job_view is not None
    assert pod_view is not None
    return body, job_view, pod_view


async def reconcile_twice(metrics: Metrics) -> list[tuple[str, str]]:
    """Run the reconcile twice on the same body; the (type, reason) of the Events posted."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    settings_var.set(kopf.OperatorSettings())
    event_queue_var.set(queue)
    event_queue_loop_var.set(asyncio.get_running_loop())
    runtime = handlers.Runtime(
        settings=SETTINGS, kube=KubeClient(client.ApiClient()), metrics=metrics
    )
    body, job, pod = finished_job_observation()
    # As kopf calls it (its decorator's type names every keyword kopf could pass).
    reconcile: Any = handlers.reconcile
    patches = []
    for _ in range(2):
        patch = kopf.Patch()
        reconcile(
            body=kopf.Body(cast(Any, copy.deepcopy(body))),
            patch=patch,
            memo=kopf.Memo(runtime=runtime),
            agent_jobs={UID: [job]},
            agent_pods={UID: [pod]},
            agent_job_events={},
            streams_by_target={},
        )
        patches.append(patch)
    assert patches[0]["status"]["phase"] == patches[1]["status"]["phase"] == "Succeeded"
    events = []
    while not queue.empty():
        event = queue.get_nowait()
        events.append((event.type, event.reason))
    return events


def test_a_repeated_reconcile_counts_its_outcome_and_posts_its_event_once() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    events = asyncio.run(reconcile_twice(metrics))
    assert events.count(("Normal", "Succeeded")) == 1, events
    labels = {"phase": "Succeeded", "reason": "Succeeded"}
    assert registry.get_sample_value("imagestream_stream_outcomes_total", labels) == 1.0
    assert registry.get_sample_value("imagestream_bytes_written_total") == 4000.0


def test_a_whole_disk_stream_and_any_device_stream_of_its_node_are_peers() -> None:
    disk = stream_body(name="disk", uid="d" * 8, target={"disk": "/dev/disk/by-id/nvme-1"})
    device = stream_body(name="root", uid="r" * 8, target={"device": "/dev/nvme0n1p5"})
    other_node = stream_body(name="far", uid="f" * 8, node="node-8", target={"device": "/dev/a"})
    index: dict[Any, list[dict[str, Any]]] = {}
    for body in (disk, device, other_node):
        # As kopf calls it (its decorator's type names every keyword kopf could pass).
        index_of: Any = handlers.streams_by_target
        entries = index_of(body=kopf.Body(cast(Any, body)))
        assert entries is not None
        for key, summary in entries.items():
            index.setdefault(key, []).append(summary)

    def peers(body: dict[str, Any]) -> list[str]:
        found = handlers._peers(body, cast(Any, {}), cast(Any, {}), cast(Any, index))
        return sorted(peer.name for peer in found)

    assert peers(disk) == ["root"]
    assert peers(device) == ["disk"]
    assert peers(other_node) == []
