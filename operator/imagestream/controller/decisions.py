"""Pure reconcile decisions: one observation in, a status patch and actions out.

The observation is everything the controller knows about one ImageStream: its body, the Jobs
and Pods labelled with its uid, and the other streams aimed at the same node and target. The
decision is level-based (it looks at what is, not at what happened) and idempotent: applying its
status patch and deciding again on the same children gives no patch and no action. That is what
makes a restarted controller safe: it decides from what exists, and a Job it created before is
found by its deterministic name, never created twice.

The final outcome comes from the Job and the agent's termination message, so an agent that
crashed, was OOM-killed or lost with its node still ends `Failed` with a reason; nothing ends
`Succeeded` unless the agent reported the SHA-384 the spec asks for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from imagestream import defaults
from imagestream.agent.contract import AgentResult
from imagestream.controller.bodies import (
    ContainerStateTerminated,
    ContainerStatus,
    EventBody,
    ObjectMeta,
    PodStatus,
    StreamStatus,
    job_status_of,
    metadata_of,
    pod_status_of,
    progress_of,
    spec_generation,
    stream_status_of,
)
from imagestream.controller.builders import (
    CONTAINER_NAME,
    FINAL_PHASES,
    LABEL_GENERATION,
    LABEL_UID,
    JobSettings,
    build_job,
    condition_reason,
    conditions,
    job_name,
)
from imagestream.controller.spec import StreamSpec, generation_of, parse_stream
from imagestream.errors import UsageError
from imagestream.reasons import Reason
from imagestream.timefmt import rfc3339

#: A Job the status says was created but the watch has not shown yet is given this long
#: before it counts as lost (the watch lags the create by milliseconds, not seconds).
JOB_VISIBILITY_GRACE = timedelta(seconds=30)
#: A Job that has had no Pod for this long gets a hint where its cause is (its Events): the Job
#: controller creates the Pod within a second unless something refuses it.
POD_CREATION_GRACE = timedelta(seconds=30)
#: How much of a crashed agent's log tail (the kubelet's fallback message) goes into status.
LOG_TAIL_CHARS = 512


#: The status fields the controller owns. `progress` is the agent's and is only ever cleared.
MANAGED_FIELDS = (
    "phase",
    "reason",
    "message",
    "observedGeneration",
    "jobName",
    "target",
    "sha384",
    "digest",
    "startTime",
    "completionTime",
    "conditions",
)


@dataclass(frozen=True)
class Termination:
    """How the agent container ended, as the kubelet recorded it."""

    exit_code: int
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class PodView:
    """What the decisions need from an agent Pod."""

    name: str
    generation: int
    created: str = ""
    phase: str = "Pending"
    reason: str = ""
    message: str = ""
    deleting: bool = False
    terminated: Termination | None = None
    waiting: str = ""
    unschedulable: str = ""
    disrupted: str = ""

    @property
    def finished(self) -> bool:
        """The agent no longer runs (and no longer holds its target)."""
        return self.phase in FINAL_PHASES

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PodView | None:
        """A Pod body as a view; None when it lacks the ImageStream labels."""
        metadata = metadata_of(body)
        generation = _generation_label(metadata)
        if generation is None:
            return None
        status = pod_status_of(body)
        container = _agent_container_status(status)
        state = container.get("state") or {}
        terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
        waiting = state.get("waiting") or {}
        return cls(
            name=str(metadata.get("name", "")),
            generation=generation,
            created=str(metadata.get("creationTimestamp") or ""),
            phase=str(status.get("phase") or "Pending"),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            deleting=bool(metadata.get("deletionTimestamp")),
            terminated=_termination(terminated) if terminated else None,
            waiting=_joined(waiting.get("reason"), waiting.get("message")),
            unschedulable=_condition_text(status, "PodScheduled", "False"),
            disrupted=_condition_text(status, "DisruptionTarget", "True"),
        )


@dataclass(frozen=True)
class JobView:
    """What the decisions need from an agent Job."""

    name: str
    generation: int
    deleting: bool = False
    complete: bool = False
    failed: bool = False
    failure_reason: str = ""
    failure_message: str = ""
    start_time: str | None = None
    completion_time: str | None = None

    @property
    def finished(self) -> bool:
        """The Job controller has decided the Job's outcome."""
        return self.complete or self.failed

    @property
    def live(self) -> bool:
        """Neither finished nor being deleted: its agent may yet run."""
        return not self.finished and not self.deleting

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobView | None:
        """A Job body as a view; None when it lacks the ImageStream labels."""
        metadata = metadata_of(body)
        generation = _generation_label(metadata)
        if generation is None:
            return None
        status = job_status_of(body)
        true = {
            str(item.get("type")): item
            for item in status.get("conditions") or []
            if item.get("status") == "True"
        }
        # FailureTarget/SuccessCriteriaMet (Kubernetes 1.31+) come first; the outcome is final.
        failure = true.get("Failed") or true.get("FailureTarget") or {}
        return cls(
            name=str(metadata.get("name", "")),
            generation=generation,
            deleting=bool(metadata.get("deletionTimestamp")),
            complete="Complete" in true or "SuccessCriteriaMet" in true,
            failed=bool(failure),
            failure_reason=str(failure.get("reason") or ""),
            failure_message=str(failure.get("message") or ""),
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
        )


@dataclass(frozen=True)
class JobEvent:
    """An Event about an agent Job: the Job controller's `FailedCreate` says why its Pod
    could not be created (Pod Security, a quota, an admission webhook)."""

    namespace: str
    job: str
    reason: str
    message: str

    @property
    def refused(self) -> bool:
        """The API server refused the Pod (403): retrying the same Pod will not help."""
        return self.reason == "FailedCreate" and "is forbidden" in self.message

    @classmethod
    def from_body(cls, body: EventBody) -> JobEvent | None:
        """A core Event as a view; None unless it is a Job's `FailedCreate`."""
        involved = body.get("involvedObject") or {}
        if involved.get("kind") != "Job" or body.get("reason") != "FailedCreate":
            return None
        return cls(
            namespace=str(involved.get("namespace") or metadata_of(body).get("namespace", "")),
            job=str(involved.get("name", "")),
            reason=str(body.get("reason", "")),
            message=str(body.get("message", "")),
        )


@dataclass(frozen=True)
class Peer:
    """Another ImageStream aimed at the same node and target."""

    namespace: str
    name: str
    uid: str
    created: str
    #: Not yet Succeeded/Failed for its current generation.
    active: bool
    #: Has a Job or a Pod that may be writing the target right now.
    holds_target: bool

    @property
    def order(self) -> tuple[str, str, str]:
        """First come, first served: creation time, then namespace/name as a tie-break."""
        return (self.created, self.namespace, self.name)


@dataclass(frozen=True)
class Observation:
    """Everything one decision looks at."""

    body: Mapping[str, Any]
    settings: JobSettings
    now: datetime
    jobs: tuple[JobView, ...] = ()
    pods: tuple[PodView, ...] = ()
    peers: tuple[Peer, ...] = ()
    #: Events about this stream's Jobs (the Job controller's `FailedCreate`).
    job_events: tuple[JobEvent, ...] = ()

    @property
    def stamp(self) -> str:
        """`now` as status timestamps are written."""
        return rfc3339(self.now.timestamp())


@dataclass(frozen=True)
class CreateJob:
    """Create this agent Job (an existing one of the same name is adopted)."""

    body: dict[str, Any]

    @property
    def name(self) -> str:
        """The Job's name."""
        return str(self.body["metadata"]["name"])


@dataclass(frozen=True)
class DeleteJob:
    """Delete a Job and its Pods (by the uid and generation labels): cancels that stream."""

    name: str
    generation: int


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the ImageStream."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = CreateJob | DeleteJob | Event


@dataclass(frozen=True)
class Outcome:
    """A final result this decision records (for the metrics), and the Event announcing it.

    The caller records each (uid, generation, phase, reason) once: a reconcile repeated
    because kopf's status patch failed decides the same outcome again.
    """

    phase: str
    reason: str
    seconds: float | None = None
    bytes_written: int | None = None
    event: Event | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Decision:
    """A merge patch for `.status` (changed fields only) and the actions to take first."""

    status: dict[str, Any] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()
    outcome: Outcome | None = None


@dataclass(frozen=True)
class _State:
    phase: str
    reason: str
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    result: AgentResult | None = None


def is_finished(body: Mapping[str, Any]) -> bool:
    """The status records an outcome for the current spec: nothing is left to do.

    A finished stream stays finished while it is being deleted (see `spec_generation`).
    """
    status = stream_status_of(body)
    generation = spec_generation(body)
    return status.get("phase") in FINAL_PHASES and status.get("observedGeneration") == generation


def without_outcome(decision: Decision) -> Decision:
    """The decision with its outcome (and the Event announcing it) left out: for an outcome
    already recorded, when kopf repeats a reconcile whose status patch failed."""
    outcome = decision.outcome
    if outcome is None:
        return decision
    actions = tuple(action for action in decision.actions if action is not outcome.event)
    return Decision(status=decision.status, actions=actions)


def peer(body: Mapping[str, Any], jobs: Sequence[JobView], pods: Sequence[PodView]) -> Peer:
    """Another stream (its body, Jobs and Pods) as the TargetBusy check sees it."""
    metadata = metadata_of(body)
    holds = any(job.live for job in jobs) or any(not pod.finished for pod in pods)
    return Peer(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        uid=str(metadata.get("uid", "")),
        created=_created(body),
        active=not is_finished(body),
        holds_target=holds,
    )


def decide(observation: Observation) -> Decision:
    """The status patch and actions that move this ImageStream towards its spec."""
    body = observation.body
    if metadata_of(body).get("deletionTimestamp"):
        return Decision()  # the finalizer handler cancels and cleans up
    cancels = _cancel_superseded(observation)
    if is_finished(body):
        return Decision(actions=tuple(cancels))
    try:
        stream = parse_stream(body)
    except UsageError as exc:
        return _conclude(observation, _State("Failed", exc.reason, exc.message), cancels)
    job = _current_job(observation, stream)
    if job is None:
        return _without_job(observation, stream, cancels)
    state = _with_job(observation, stream, job)
    if state.reason == Reason.AGENT_POD_REJECTED:
        # A Job whose Pod is refused keeps trying: delete it, or it would start the agent of
        # a Failed stream once the namespace's policy changes.
        cancels = [*cancels, DeleteJob(name=job.name, generation=stream.generation)]
    return _conclude(observation, state, cancels)


def job_rejected(observation: Observation, message: str) -> Decision:
    """The API server refused the Job (a 4xx other than a conflict): fail with its reason."""
    state = _State("Failed", Reason.JOB_REJECTED, f"the agent Job was rejected: {message}")
    return _conclude(observation, state, [])


def _cancel_superseded(observation: Observation) -> list[Action]:
    """Delete Jobs and Pods of older generations that may still be running."""
    generation = generation_of(observation.body)
    live = {
        job.generation for job in observation.jobs if job.generation != generation and job.live
    } | {
        pod.generation
        for pod in observation.pods
        if pod.generation != generation and not pod.finished and not pod.deleting
    }
    metadata = metadata_of(observation.body)
    status = stream_status_of(observation.body)
    # Deletes repeat until the watch shows them (level-based); the Event is said once.
    first_sight = status.get("observedGeneration") != generation
    actions: list[Action] = []
    for old in sorted(live):
        name = job_name(str(metadata.get("name")), str(metadata.get("uid")), old)
        actions.append(DeleteJob(name=name, generation=old))
        if first_sight:
            message = (
                f"generation {old} is superseded by generation {generation}: deleting Job {name}"
            )
            actions.append(Event("Normal", Reason.CANCELLING, message))
    return actions


def _current_job(observation: Observation, stream: StreamSpec) -> JobView | None:
    expected = job_name(stream.name, stream.uid, stream.generation)
    current = [job for job in observation.jobs if job.generation == stream.generation]
    return min(current, key=lambda job: job.name != expected, default=None)


def _without_job(observation: Observation, stream: StreamSpec, cancels: list[Action]) -> Decision:
    expected = job_name(stream.name, stream.uid, stream.generation)
    status = stream_status_of(observation.body)
    if _created_before(status, stream, expected):
        started = _parse_time(status.get("startTime"))
        if started is not None and observation.now - started < JOB_VISIBILITY_GRACE:
            return Decision(actions=tuple(cancels))  # created a moment ago; the watch lags
        message = (
            f"Job {expected} disappeared before the agent's outcome was recorded (deleted, "
            "or removed after it finished while the controller was away)"
        )
        return _conclude(observation, _State("Failed", Reason.AGENT_LOST, message), cancels)
    if _previous_still_running(observation, stream.generation):
        message = "waiting for the agent of an earlier generation to stop"
        return _conclude(
            observation, _State("Pending", Reason.CANCELLING_PREVIOUS, message), cancels
        )
    blocker = blocking_peer(stream, _created(observation.body), observation.peers)
    if blocker is not None:
        message = (
            f"{stream.target.description} on node {stream.node_name} is being written by "
            f"ImageStream {blocker.namespace}/{blocker.name}; this stream starts when it ends"
        )
        return _conclude(observation, _State("Pending", Reason.TARGET_BUSY, message), cancels)
    job = build_job(stream, observation.settings)
    fields = {"jobName": expected, "startTime": observation.stamp}
    message = f"created Job {expected} on node {stream.node_name}"
    state = _State("Pending", Reason.JOB_CREATED, message, fields)
    return _conclude(observation, state, [*cancels, CreateJob(job)], clear_progress=True)


def blocking_peer(stream: StreamSpec, created: str, peers: Sequence[Peer]) -> Peer | None:
    """The stream that has the node's target first, if it is not this one.

    A stream whose agent may be writing holds the target whatever its age; otherwise the
    earliest active stream goes first, so two waiting streams never both start.
    """
    others = [item for item in peers if item.uid != stream.uid]
    holder = next((item for item in others if item.holds_target), None)
    if holder is not None:
        return holder
    mine = (created, stream.namespace, stream.name)
    earlier = [item for item in others if item.active and item.order < mine]
    return min(earlier, key=lambda item: item.order) if earlier else None


def _with_job(observation: Observation, stream: StreamSpec, job: JobView) -> _State:
    status = stream_status_of(observation.body)
    started = status.get("startTime") if _created_before(status, stream, job.name) else None
    now = observation.stamp
    fields = {"jobName": job.name, "startTime": started or job.start_time or now}
    pod = _latest_pod(observation.pods, stream.generation)
    if job.complete:
        ended = job.completion_time or now
        return _succeeded_or_unverified(stream, pod, {**fields, "completionTime": ended})
    if job.failed:
        return _failed(stream, job, pod, {**fields, "completionTime": now})
    if job.deleting:
        message = f"Job {job.name} was deleted before the agent reported an outcome"
        return _State("Failed", Reason.AGENT_LOST, message, {**fields, "completionTime": now})
    if pod is None:
        return _without_pod(observation, stream, job, fields)
    if pod.phase == "Pending":
        detail = pod.unschedulable or pod.waiting
        message = f"agent of Job {job.name} starting on node {stream.node_name}"
        return _State("Pending", Reason.AGENT_STARTING, _joined(message, detail), fields)
    if progress_of(status).get("phase") == "Verifying":
        message = f"verifying {stream.target.description}"
        return _State("Verifying", Reason.VERIFYING, message, fields)
    message = f"streaming to {stream.target.description} on node {stream.node_name}"
    return _State("Running", Reason.STREAMING, message, fields)


def _without_pod(
    observation: Observation, stream: StreamSpec, job: JobView, fields: Mapping[str, Any]
) -> _State:
    """A Job with no Pod: refused by the API server (its FailedCreate Event), or not yet."""
    events = [event for event in observation.job_events if event.job == job.name]
    refusal = next((event for event in events if event.refused), None)
    if refusal is not None:
        message = f"the agent Pod of Job {job.name} was refused: {refusal.message}"
        ended = {**fields, "completionTime": observation.stamp}
        return _State("Failed", Reason.AGENT_POD_REJECTED, message, ended)
    message = f"agent of Job {job.name} starting on node {stream.node_name}"
    detail = events[-1].message if events else ""
    started = _parse_time(fields.get("startTime"))
    if not detail and started is not None and observation.now - started >= POD_CREATION_GRACE:
        # No Event to read (expired, or not allowed to list Events): say where to look.
        seconds = int(POD_CREATION_GRACE.total_seconds())
        detail = f"no Pod after {seconds} s; kubectl describe job {job.name} shows why"
    return _State("Pending", Reason.AGENT_STARTING, _joined(message, detail), fields)


def _succeeded_or_unverified(
    stream: StreamSpec, pod: PodView | None, fields: Mapping[str, Any]
) -> _State:
    result = _agent_result(pod)
    expected = stream.source.sha384
    if result is None or result.outcome != "Succeeded":
        message = "the agent Job completed without reporting a verified result"
        return _State("Failed", Reason.RESULT_UNVERIFIED, message, fields, result)
    reported = (result.sha384 or "").lower()
    if reported != expected:
        message = f"the agent reported SHA-384 {reported or 'none'}, the spec expects {expected}"
        return _State("Failed", Reason.RESULT_UNVERIFIED, message, fields, result)
    message = result.message or f"wrote and verified {result.target}"
    return _State("Succeeded", Reason.SUCCEEDED, message, fields, result)


def _failed(
    stream: StreamSpec, job: JobView, pod: PodView | None, fields: Mapping[str, Any]
) -> _State:
    result = _agent_result(pod)
    if job.failure_reason == Reason.DEADLINE_EXCEEDED:
        limit = stream.options.active_deadline_seconds
        message = f"the stream ran longer than activeDeadlineSeconds ({limit} s)"
        return _State("Failed", Reason.DEADLINE_EXCEEDED, message, fields, result)
    if result is not None and result.outcome == "Failed":
        return _State("Failed", result.reason, result.message, fields, result)
    if pod is None:
        message = f"the agent Pod of Job {job.name} is gone (node lost, or Pod deleted)"
        return _State("Failed", Reason.AGENT_LOST, _joined(message, job.failure_message), fields)
    end = pod.terminated
    if end is not None and end.reason == "OOMKilled":
        message = f"the agent was killed for exceeding its memory limit (exit code {end.exit_code})"
        return _State("Failed", Reason.AGENT_OOM_KILLED, message, fields)
    if pod.disrupted or (pod.reason and end is None):
        message = f"the agent Pod {pod.name} was stopped by Kubernetes"
        detail = pod.disrupted or _joined(pod.reason, pod.message)
        return _State("Failed", Reason.AGENT_LOST, _joined(message, detail), fields)
    if end is not None and end.exit_code != 0:
        message = f"the agent exited with code {end.exit_code}"
        tail = end.message[-LOG_TAIL_CHARS:].strip()
        return _State("Failed", Reason.AGENT_CRASHED, _joined(message, tail), fields)
    message = f"Job {job.name} failed"
    detail = _joined(job.failure_reason, job.failure_message)
    return _State("Failed", Reason.AGENT_FAILED, _joined(message, detail), fields)


def _conclude(
    observation: Observation,
    state: _State,
    actions: list[Action],
    *,
    clear_progress: bool = False,
) -> Decision:
    """Turn the wanted state into a diff of `.status`, a transition Event, and an Outcome."""
    body = observation.body
    status = stream_status_of(body)
    generation = generation_of(body)
    reason = condition_reason(state.reason)
    wanted = _wanted_status(observation, state, reason, generation)
    patch = {key: value for key, value in wanted.items() if status.get(key) != value}
    new_generation = status.get("observedGeneration") != generation
    if (clear_progress or new_generation) and status.get("progress") is not None:
        patch["progress"] = None  # the agent's report of an earlier generation
    transition = (status.get("phase"), status.get("reason"), status.get("observedGeneration"))
    events = list(actions)
    outcome = None
    if transition != (state.phase, reason, generation):
        kind: Literal["Normal", "Warning"] = "Warning" if state.phase == "Failed" else "Normal"
        event = Event(kind, reason, state.message)
        events.append(event)
        if state.phase in FINAL_PHASES:
            outcome = _outcome(state, reason, wanted, event)
    return Decision(status=patch, actions=tuple(events), outcome=outcome)


def _wanted_status(
    observation: Observation, state: _State, reason: str, generation: int
) -> dict[str, Any]:
    body = observation.body
    status = stream_status_of(body)
    result = state.result
    fields = dict(state.fields)
    if result is not None:
        fields["target"] = result.target or None
        fields["sha384"] = _matching(defaults.SHA384, (result.sha384 or "").lower())
        fields["digest"] = _matching(defaults.DIGEST, result.digest or "")
    if "target" not in fields:
        fields["target"] = _host_target(body)
    wanted: dict[str, Any] = {key: None for key in MANAGED_FIELDS}
    wanted.update(fields)
    wanted.update(
        phase=state.phase,
        reason=reason,
        message=state.message,
        observedGeneration=generation,
        conditions=conditions(
            state.phase,
            reason,
            state.message,
            generation=generation,
            previous=status.get("conditions") or [],
            now=observation.stamp,
        ),
    )
    return wanted


def _outcome(state: _State, reason: str, wanted: Mapping[str, Any], event: Event) -> Outcome:
    started = _parse_time(wanted.get("startTime"))
    ended = _parse_time(wanted.get("completionTime"))
    seconds = (ended - started).total_seconds() if started and ended else None
    written = state.result.bytes_written if state.result is not None else None
    return Outcome(
        phase=state.phase, reason=reason, seconds=seconds, bytes_written=written, event=event
    )


def _previous_still_running(observation: Observation, generation: int) -> bool:
    return any(
        pod.generation != generation and not pod.finished for pod in observation.pods
    ) or any(job.generation != generation and job.live for job in observation.jobs)


def _created_before(status: StreamStatus, stream: StreamSpec, name: str) -> bool:
    """The status records that this generation's Job was created."""
    return status.get("jobName") == name and status.get("observedGeneration") == stream.generation


def _latest_pod(pods: Sequence[PodView], generation: int) -> PodView | None:
    mine = [pod for pod in pods if pod.generation == generation]
    return max(mine, key=lambda pod: (pod.created, pod.name)) if mine else None


def _agent_result(pod: PodView | None) -> AgentResult | None:
    if pod is None or pod.terminated is None or not pod.terminated.message:
        return None
    try:
        return AgentResult.from_json(pod.terminated.message)
    except (ValueError, TypeError):
        return None  # not JSON: the kubelet's fallback (the log tail) of an agent that crashed


def _host_target(body: Mapping[str, Any]) -> str | None:
    try:
        return parse_stream(body).target.known_path
    except UsageError:
        return None


def _matching(pattern: re.Pattern[str], value: str) -> str | None:
    return value if pattern.fullmatch(value) else None


def _created(body: Mapping[str, Any]) -> str:
    return str(metadata_of(body).get("creationTimestamp") or "")


def _generation_label(metadata: ObjectMeta) -> int | None:
    found = metadata.get("labels") or {}
    if not found.get(LABEL_UID):
        return None
    try:
        return int(str(found.get(LABEL_GENERATION)))
    except (TypeError, ValueError):
        return None


def _agent_container_status(status: PodStatus) -> ContainerStatus:
    containers = status.get("containerStatuses") or []
    named = [item for item in containers if item.get("name") == CONTAINER_NAME]
    found = named or containers
    return found[0] if found else {}


def _termination(terminated: ContainerStateTerminated) -> Termination:
    return Termination(
        exit_code=int(terminated.get("exitCode") or 0),
        reason=str(terminated.get("reason") or ""),
        message=str(terminated.get("message") or ""),
    )


def _condition_text(status: PodStatus, kind: str, value: str) -> str:
    for item in status.get("conditions") or []:
        if item.get("type") == kind and item.get("status") == value:
            return _joined(item.get("reason"), item.get("message"))
    return ""


def _joined(*parts: object) -> str:
    return ": ".join(str(part) for part in parts if part)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
