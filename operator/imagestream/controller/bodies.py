"""Typed views of the resource bodies the controller reads (as kopf's `structs/bodies.py`).

A body from the API is a JSON object in which any field may be absent (or `null`), so every
view is a `TypedDict` with `total=False`. The accessors below read one level each, turning an
absent or `null` section into an empty one once, so the decisions read fields by name, with
their types, instead of chains of `.get(...) or {}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, cast


class ObjectMeta(TypedDict, total=False):
    """`metadata` of any object, as far as the controller reads it."""

    name: str
    namespace: str
    uid: str
    generation: int
    creationTimestamp: str
    deletionTimestamp: str
    labels: dict[str, str]
    annotations: dict[str, str]
    finalizers: list[str]


class Condition(TypedDict, total=False):
    """One entry of `status.conditions` (a Job's, a Pod's or an ImageStream's)."""

    type: str
    status: str
    reason: str
    message: str
    observedGeneration: int
    lastTransitionTime: str


class Progress(TypedDict, total=False):
    """`status.progress` of an ImageStream: the agent's own report."""

    phase: str
    bytesFetched: int
    bytesWritten: int
    bytesTotal: int
    bytesPerSecond: int
    percent: int
    resumes: int
    #: A COSI disk target: the partition image being written, and how many.
    partition: int
    partitions: int
    updatedAt: str


class StreamStatus(TypedDict, total=False):
    """`status` of an ImageStream."""

    phase: str
    reason: str
    message: str
    observedGeneration: int
    jobName: str
    target: str
    sha384: str
    digest: str
    startTime: str
    completionTime: str
    progress: Progress
    conditions: list[Condition]


class ContainerStateWaiting(TypedDict, total=False):
    """`state.waiting` of a container."""

    reason: str
    message: str


class ContainerStateTerminated(TypedDict, total=False):
    """`state.terminated` (or `lastState.terminated`) of a container."""

    exitCode: int
    reason: str
    message: str


class ContainerState(TypedDict, total=False):
    """`state` of a container."""

    waiting: ContainerStateWaiting
    terminated: ContainerStateTerminated


class ContainerStatus(TypedDict, total=False):
    """One entry of a Pod's `status.containerStatuses`."""

    name: str
    state: ContainerState
    lastState: ContainerState


class PodStatus(TypedDict, total=False):
    """`status` of a Pod."""

    phase: str
    reason: str
    message: str
    conditions: list[Condition]
    containerStatuses: list[ContainerStatus]


class JobStatus(TypedDict, total=False):
    """`status` of a Job."""

    conditions: list[Condition]
    startTime: str
    completionTime: str


class InvolvedObject(TypedDict, total=False):
    """`involvedObject` of a core Event."""

    kind: str
    name: str
    namespace: str
    uid: str


class EventBody(TypedDict, total=False):
    """A core v1 Event, as far as the controller reads it."""

    metadata: ObjectMeta
    involvedObject: InvolvedObject
    type: str
    reason: str
    message: str


def metadata_of(body: Mapping[str, Any]) -> ObjectMeta:
    """The body's `metadata` (empty when absent)."""
    return cast(ObjectMeta, body.get("metadata") or {})


def stream_status_of(body: Mapping[str, Any]) -> StreamStatus:
    """An ImageStream body's `status` (empty before the controller wrote one)."""
    return cast(StreamStatus, body.get("status") or {})


def pod_status_of(body: Mapping[str, Any]) -> PodStatus:
    """A Pod body's `status` (empty before the kubelet reported)."""
    return cast(PodStatus, body.get("status") or {})


def job_status_of(body: Mapping[str, Any]) -> JobStatus:
    """A Job body's `status` (empty before the Job controller reported)."""
    return cast(JobStatus, body.get("status") or {})


def progress_of(status: StreamStatus) -> Progress:
    """The agent's progress report (empty when there is none)."""
    return status.get("progress") or {}


def spec_generation(body: Mapping[str, Any]) -> int:
    """The generation of the spec the status should be compared with.

    A real API server bumps `metadata.generation` once when it sets `deletionTimestamp` (the
    registry's BeforeDelete), although the spec did not change: while an object is being
    deleted, its spec's generation is one less. Without this, a stream finished for its spec
    would look unfinished (and active, holding its target) during its deletion.
    """
    metadata = metadata_of(body)
    generation = int(metadata.get("generation") or 1)
    if metadata.get("deletionTimestamp") and generation > 1:
        return generation - 1
    return generation
