"""Thin kopf handlers: observe from memory, decide (pure), act through `kube`, patch status.

- Three in-memory indexes, filled by kopf's watches: agent Jobs and Pods by their ImageStream's
  uid, and ImageStreams by (node, target). A reconcile reads them instead of listing; kopf fills
  them completely before any handler runs, so a restarted controller sees every Job it made.
- One reconcile, run by a timer about once a second while the stream is not finished for its
  current generation. kopf starts an object's timer on the first event it sees (a creation, or
  every existing object when the controller starts) and again whenever the `when` filter turns
  true (a spec change of a finished stream), which covers creation, resumption and updates
  without change handlers racing the timer.
- A fourth index holds the Job controller's `FailedCreate` Events about agent Jobs: a Pod the
  API server refuses (Pod Security) exists only there, and ends the stream `AgentPodRejected`.
- A deletion handler (behind kopf's finalizer) cancels the stream and waits until its Jobs and
  Pods are gone, so a deleted ImageStream leaves no agent running on the node. Waiting is
  normal: it polls inside the handler and logs at info; only a cleanup that outlasts
  `CLEANUP_WAIT` is handed back to kopf as a (logged) temporary error.
- An event handler keeps the phase gauge and the bytes-written counter current.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from imagestream.controller import decisions
from imagestream.controller.bodies import (
    EventBody,
    metadata_of,
    progress_of,
    spec_generation,
    stream_status_of,
)
from imagestream.controller.builders import LABEL_MANAGED_BY, LABEL_UID, MANAGED_BY, JobSettings
from imagestream.controller.decisions import (
    CreateJob,
    Decision,
    DeleteJob,
    Event,
    JobEvent,
    JobView,
    Observation,
    PodView,
)
from imagestream.controller.kube import JobConflict, JobRejected, KubeClient
from imagestream.controller.metrics import Metrics
from imagestream.controller.spec import blocking_keys_of, held_keys_of
from imagestream.kube_config import GROUP, PLURAL, VERSION
from imagestream.reasons import Reason

#: How often an unfinished stream is reconciled: the status lags the agent by about this much.
RECONCILE_INTERVAL = 1.0
#: A reconcile that raised (an API error) is tried again after this long.
RETRY_BACKOFF = 2.0
#: How often the deletion handler checks that the Jobs and Pods are gone.
CLEANUP_POLL = 1.0
#: How long the deletion handler waits in one run: longer than an agent's grace period (30 s)
#: takes to stop, so only a cleanup that is really stuck becomes kopf's temporary error.
CLEANUP_WAIT = 60.0


def _managed() -> dict[str, Any]:
    """The label filter of agent Jobs and Pods (kopf's filter types are not exported)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_UID: kopf.PRESENT}


log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What every handler shares, carried in kopf's memo under `runtime`."""

    settings: JobSettings
    kube: KubeClient
    metrics: Metrics
    _locks: defaultdict[str, threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock)
    )
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, uid: str) -> threading.Lock:
        """Per ImageStream: a reconcile's Job creation and the deletion cleanup's listing never
        interleave (sync handlers run in kopf's thread pool), so no Job outlives its stream."""
        with self._guard:
            return self._locks[uid]

    def forget(self, uid: str) -> None:
        """The ImageStream is gone."""
        with self._guard:
            self._locks.pop(uid, None)

    def delete_all(self, namespace: str, uid: str) -> int:
        """Delete the stream's Jobs and Pods under its lock; how many were still there."""
        with self.lock(uid):
            return self.kube.delete_all(namespace, uid)


def runtime_of(memo: Mapping[str, Any]) -> Runtime:
    """The shared runtime main.py put into kopf's memo."""
    runtime = memo["runtime"]
    if not isinstance(runtime, Runtime):
        raise TypeError("kopf memo has no controller runtime")
    return runtime


@kopf.index("batch", "v1", "jobs", labels=_managed())
def agent_jobs(body: kopf.Body, **_: Any) -> dict[str, JobView] | None:
    """Agent Jobs by the uid of their ImageStream."""
    view = JobView.from_body(body)
    return None if view is None else {str(body.metadata.labels[LABEL_UID]): view}


@kopf.index("v1", "pods", labels=_managed())
def agent_pods(body: kopf.Body, **_: Any) -> dict[str, PodView] | None:
    """Agent Pods by the uid of their ImageStream."""
    view = PodView.from_body(body)
    return None if view is None else {str(body.metadata.labels[LABEL_UID]): view}


def _job_failed_create(body: kopf.Body, **_: Any) -> bool:
    return JobEvent.from_body(cast(EventBody, body)) is not None


@kopf.index("v1", "events", when=_job_failed_create)
def agent_job_events(body: kopf.Body, **_: Any) -> dict[tuple[str, str], JobEvent] | None:
    """The Job controller's `FailedCreate` Events by (namespace, Job name)."""
    view = JobEvent.from_body(cast(EventBody, body))
    return None if view is None else {(view.namespace, view.job): view}


@kopf.index(GROUP, VERSION, PLURAL)
def streams_by_target(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]] | None:
    """ImageStreams by each key they hold (`StreamSpec.held_keys`: every (node, host path)
    they may write, and a whole disk its whole node): the TargetBusy check reads this."""
    keys = held_keys_of(body)
    if not keys:
        return None
    metadata = metadata_of(body)
    status = stream_status_of(body)
    # deletionTimestamp too: while a stream is deleted, its generation is one ahead of its spec.
    fields = ("name", "namespace", "uid", "generation", "creationTimestamp", "deletionTimestamp")
    summary = {
        "metadata": {name: metadata.get(name) for name in fields},
        "status": {name: status.get(name) for name in ("phase", "observedGeneration")},
    }
    return dict.fromkeys(keys, summary)


def _unfinished(body: kopf.Body, **_: Any) -> bool:
    return not decisions.is_finished(body)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    id="reconcile",
    interval=RECONCILE_INTERVAL,
    backoff=RETRY_BACKOFF,
    when=_unfinished,
)
def reconcile(
    *,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **indexes: Any,
) -> None:
    """Observe one ImageStream, decide, act, and leave the status patch to kopf.

    kopf passes each index as a keyword named after its function (`agent_jobs`, ...).
    """
    agent_jobs: kopf.Index[str, JobView] = indexes["agent_jobs"]
    agent_pods: kopf.Index[str, PodView] = indexes["agent_pods"]
    job_events: kopf.Index[tuple[str, str], JobEvent] = indexes["agent_job_events"]
    streams: kopf.Index[tuple[str, str], dict[str, Any]] = indexes["streams_by_target"]
    runtime = runtime_of(memo)
    # A timer's body is kopf's live view, updated in place as events arrive: one decision
    # must see one version of the object.
    snapshot = copy.deepcopy(dict(body))
    uid = str(body.metadata.uid)
    namespace = str(body.metadata.namespace)
    generation = spec_generation(snapshot)
    with runtime.lock(uid):
        jobs = tuple(agent_jobs.get(uid, ()))
        observation = Observation(
            body=snapshot,
            settings=runtime.settings,
            now=datetime.now(UTC),
            jobs=jobs,
            pods=tuple(agent_pods.get(uid, ())),
            peers=_peers(snapshot, agent_jobs, agent_pods, streams),
            job_events=tuple(
                event for job in jobs for event in job_events.get((namespace, job.name), ())
            ),
        )
        decision = decisions.decide(observation)
        try:
            _act(body, runtime, _once(runtime, uid, generation, decision))
        except (JobRejected, JobConflict) as exc:
            decision = decisions.job_rejected(observation, str(exc))
            _act(body, runtime, _once(runtime, uid, generation, decision))
    if decision.status:
        patch.setdefault("status", {}).update(decision.status)
    outcome = decision.outcome
    if outcome is not None:
        runtime.metrics.record_outcome(uid, generation, outcome)
        if outcome.bytes_written is not None:
            # The agent's exact total: its last progress report may be up to a second old.
            runtime.metrics.observe_written(uid, generation, outcome.bytes_written)


def _once(runtime: Runtime, uid: str, generation: int, decision: Decision) -> Decision:
    """The decision without its outcome Event when that outcome was recorded already: kopf
    repeats a reconcile whose status patch failed, and it decides the same outcome again."""
    outcome = decision.outcome
    if outcome is not None and runtime.metrics.has_outcome(uid, generation, outcome):
        return decisions.without_outcome(decision)
    return decision


def _peers(
    body: Mapping[str, Any],
    jobs: kopf.Index[str, JobView],
    pods: kopf.Index[str, PodView],
    streams: kopf.Index[tuple[str, str], dict[str, Any]],
) -> tuple[decisions.Peer, ...]:
    uid = str(body["metadata"]["uid"])
    # A stream met under several keys (two A/B streams on one pair, a disk and its device) is
    # one peer.
    others: dict[str, dict[str, Any]] = {
        other_uid: other
        for key in blocking_keys_of(body)
        for other in streams.get(key, ())
        if (other_uid := str(other["metadata"]["uid"])) != uid
    }
    return tuple(
        decisions.peer(other, tuple(jobs.get(other_uid, ())), tuple(pods.get(other_uid, ())))
        for other_uid, other in others.items()
    )


def _act(body: kopf.Body, runtime: Runtime, decision: Decision) -> None:
    """Carry out the actions in order; an API error propagates and kopf retries."""
    namespace = str(body.metadata.namespace)
    uid = str(body.metadata.uid)
    for action in decision.actions:
        if isinstance(action, CreateJob):
            runtime.kube.create_job(action.body)
        elif isinstance(action, DeleteJob):
            runtime.kube.delete_job(namespace, action.name, uid, action.generation)
        elif isinstance(action, Event):
            kopf.event(body, type=action.type, reason=action.reason, message=action.message)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup")
async def cleanup(
    body: kopf.Body, memo: kopf.Memo, retry: int, logger: kopf.Logger, **_: Any
) -> None:
    """Cancel the stream and wait until its Jobs and Pods are gone; then kopf lets it go.

    Waiting for an agent to stop (its grace period) is the normal course of a deletion, so it
    is an info line, not kopf's "failed temporarily" error, and the cancellation is an Event.
    """
    runtime = runtime_of(memo)
    namespace = str(body.metadata.namespace)
    uid = str(body.metadata.uid)
    deadline = time.monotonic() + CLEANUP_WAIT
    found = await asyncio.to_thread(runtime.delete_all, namespace, uid)
    if found and retry == 0 and not decisions.is_finished(body):
        message = f"the ImageStream was deleted: stopping its agent ({found} Job(s)/Pod(s))"
        kopf.event(body, type="Normal", reason=Reason.CANCELLED, message=message)
    while found:
        if time.monotonic() >= deadline:
            raise kopf.TemporaryError(
                f"{found} agent Job(s)/Pod(s) still there after {CLEANUP_WAIT:.0f} s",
                delay=CLEANUP_POLL,
            )
        logger.info("waiting for %d agent Job(s)/Pod(s) to be gone", found)
        await asyncio.sleep(CLEANUP_POLL)
        found = await asyncio.to_thread(runtime.delete_all, namespace, uid)
    runtime.forget(uid)
    runtime.metrics.forget_stream(uid)


@kopf.on.event(GROUP, VERSION, PLURAL, id="metrics")
def observe(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the phase gauge and the bytes-written counter current."""
    metrics = runtime_of(memo).metrics
    uid = str(body.metadata.uid)
    if event.get("type") == "DELETED":
        metrics.forget_stream(uid)
        return
    status = stream_status_of(body)
    metrics.observe_stream(uid, status.get("phase"))
    written = progress_of(status).get("bytesWritten")
    if isinstance(written, int):
        metrics.observe_written(uid, spec_generation(body), written)
