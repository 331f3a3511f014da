"""ImageStream, Job and Pod bodies shaped as the API server returns them, for controller tests.

Jobs come from the controller's own builder and Pods carry the Job template's labels, as the
Job controller copies them; statuses are what the Job controller and the kubelet write.
"""

from __future__ import annotations

import copy
from typing import Any

from imagestream.agent.contract import AgentResult
from imagestream.controller.builders import JobSettings, build_job
from imagestream.controller.spec import parse_stream

SHA384 = "ab" * 48
OTHER_SHA384 = "cd" * 48
SETTINGS = JobSettings(agent_image="registry.example/imagestream:test")


def stream_body(
    *,
    name: str = "root-b",
    namespace: str = "imagestream-system",
    uid: str = "11111111-2222-3333-4444-555555555555",
    generation: int = 1,
    created: str = "2026-01-01T00:00:00Z",
    node: str = "node-7",
    target: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    **knobs: Any,
) -> dict[str, Any]:
    """An ImageStream body; the defaults write /dev/disk/by-partlabel/root-b on node-7."""
    body: dict[str, Any] = {
        "apiVersion": "imagestream.dev/v1alpha1",
        "kind": "ImageStream",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "generation": generation,
            "creationTimestamp": created,
        },
        "spec": {
            "nodeName": node,
            "source": source or {"url": "https://images.example/root.raw.zst", "sha384": SHA384},
            "target": target or {"device": "/dev/disk/by-partlabel/root-b"},
            **knobs,
        },
    }
    if status is not None:
        body["status"] = status
    return body


def job_body(
    stream: dict[str, Any],
    *,
    conditions: list[dict[str, Any]] | None = None,
    deleting: bool = False,
    start_time: str | None = "2026-01-01T00:00:05Z",
    completion_time: str | None = None,
) -> dict[str, Any]:
    """The agent Job the controller builds for `stream`, with a Job controller's status."""
    job = build_job(parse_stream(stream), SETTINGS)
    if deleting:
        job["metadata"]["deletionTimestamp"] = "2026-01-01T00:10:00Z"
    status: dict[str, Any] = {"conditions": conditions or []}
    if start_time:
        status["startTime"] = start_time
    if completion_time:
        status["completionTime"] = completion_time
    job["status"] = status
    return job


def pod_body(
    job: dict[str, Any],
    *,
    phase: str = "Running",
    terminated: dict[str, Any] | None = None,
    waiting: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    reason: str | None = None,
    deleting: bool = False,
    created: str = "2026-01-01T00:00:06Z",
) -> dict[str, Any]:
    """A Pod of `job` (template labels copied), with a kubelet's status."""
    state: dict[str, Any] = {"running": {"startedAt": created}}
    if terminated is not None:
        state = {"terminated": terminated}
    elif waiting is not None:
        state = {"waiting": waiting}
    metadata = copy.deepcopy(job["spec"]["template"]["metadata"])
    metadata.update(name=job["metadata"]["name"] + "-x7k2p", creationTimestamp=created)
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:10:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions or [],
        "containerStatuses": [{"name": "agent", "state": state}],
    }
    if reason:
        status["reason"] = reason
    return {
        "metadata": metadata,
        "spec": copy.deepcopy(job["spec"]["template"]["spec"]),
        "status": status,
    }


def job_condition(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    """A true Job condition (Complete, Failed, FailureTarget, ...)."""
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def agent_result(**overrides: Any) -> str:
    """An agent's termination message: by default a verified success of SHA384."""
    fields: dict[str, Any] = {
        "outcome": "Succeeded",
        "reason": "Verified",
        "message": "wrote and verified /dev/disk/by-partlabel/root-b",
        "target": "/dev/disk/by-partlabel/root-b",
        "sha384": SHA384,
        "bytes_fetched": 1000,
        "bytes_written": 4000,
        "seconds": 12.5,
    }
    fields.update(overrides)
    return AgentResult(**fields).to_json()


def terminated(exit_code: int = 0, message: str = "", reason: str = "") -> dict[str, Any]:
    """A container's terminated state as the kubelet records it."""
    state: dict[str, Any] = {"exitCode": exit_code, "message": message}
    if reason:
        state["reason"] = reason
    return state
