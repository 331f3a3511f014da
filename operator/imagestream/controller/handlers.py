"""Thin kopf handlers: observe from memory, decide (pure), act through `kube`, patch status.

- Three in-memory indexes, filled by kopf's watches: agent Jobs and Pods by their ImageStream's
  uid, and ImageStreams by (node, target). A reconcile reads them instead of listing; kopf fills
  them completely before any handler runs, so a restarted controller sees every Job it made.
- One reconcile, run by a timer about once a second while the stream is not finished for its
  current generation. kopf starts an object's timer on the first event it sees (a creation, or
  every existing object when the controller starts) and again whenever the `when` filter turns
  true (a spec change of a finished stream), which covers creation, resumption and updates
  without change handlers racing the timer.
- A deletion handler (behind kopf's finalizer) cancels the stream and waits until its Jobs and
  Pods are gone, so a deleted ImageStream leaves no agent running on the node.
- An event handler keeps the phase gauge and the bytes-written counter current.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from imagestream.controller import decisions
from imagestream.controller.builders import LABEL_MANAGED_BY, LABEL_UID, MANAGED_BY, JobSettings
from imagestream.controller.decisions import (
    CreateJob,
    Decision,
    DeleteJob,
    Event,
    JobView,
    Observation,
    PodView,
)
from imagestream.controller.kube import JobConflict, JobRejected, KubeClient
from imagestream.controller.metrics import Metrics
from imagestream.controller.spec import generation_of, target_key_of
from imagestream.kube_config import GROUP, PLURAL, VERSION

#: How often an unfinished stream is reconciled: the status lags the agent by about this much.
RECONCILE_INTERVAL = 1.0
#: A reconcile that raised (an API error) is tried again after this long.
RETRY_BACKOFF = 2.0
#: How often the deletion handler checks that the Jobs and Pods are gone.
CLEANUP_POLL = 1.0


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


@kopf.index(GROUP, VERSION, PLURAL)
def streams_by_target(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]] | None:
    """ImageStreams by the (node, host path) they write: the TargetBusy check reads this."""
    key = target_key_of(body)
    if key is None:
        return None
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    summary = {
        "metadata": {
            name: metadata.get(name)
            for name in ("name", "namespace", "uid", "generation", "creationTimestamp")
        },
        "status": {name: status.get(name) for name in ("phase", "observedGeneration")},
    }
    return {key: summary}


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
    streams: kopf.Index[tuple[str, str], dict[str, Any]] = indexes["streams_by_target"]
    runtime = runtime_of(memo)
    # A timer's body is kopf's live view, updated in place as events arrive: one decision
    # must see one version of the object.
    snapshot = copy.deepcopy(dict(body))
    uid = str(body.metadata.uid)
    with runtime.lock(uid):
        observation = Observation(
            body=snapshot,
            settings=runtime.settings,
            now=datetime.now(UTC),
            jobs=tuple(agent_jobs.get(uid, ())),
            pods=tuple(agent_pods.get(uid, ())),
            peers=_peers(snapshot, agent_jobs, agent_pods, streams),
        )
        decision = decisions.decide(observation)
        try:
            _act(body, runtime, decision)
        except (JobRejected, JobConflict) as exc:
            decision = decisions.job_rejected(observation, str(exc))
            _act(body, runtime, decision)
    if decision.status:
        patch.setdefault("status", {}).update(decision.status)
    outcome = decision.outcome
    if outcome is not None:
        runtime.metrics.record_outcome(outcome)
        if outcome.bytes_written is not None:
            # The agent's exact total: its last progress report may be up to a second old.
            runtime.metrics.observe_written(uid, generation_of(snapshot), outcome.bytes_written)


def _peers(
    body: Mapping[str, Any],
    jobs: kopf.Index[str, JobView],
    pods: kopf.Index[str, PodView],
    streams: kopf.Index[tuple[str, str], dict[str, Any]],
) -> tuple[decisions.Peer, ...]:
    key = target_key_of(body)
    if key is None:
        return ()
    uid = str(body["metadata"]["uid"])
    others: Iterable[dict[str, Any]] = streams.get(key, ())
    return tuple(
        decisions.peer(other, tuple(jobs.get(other_uid, ())), tuple(pods.get(other_uid, ())))
        for other in others
        if (other_uid := str(other["metadata"]["uid"])) != uid
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
def cleanup(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Cancel the stream and wait until its Jobs and Pods are gone; then kopf lets it go."""
    runtime = runtime_of(memo)
    namespace = str(body.metadata.namespace)
    uid = str(body.metadata.uid)
    with runtime.lock(uid):
        found = runtime.kube.delete_all(namespace, uid)
    if found:
        message = f"deleting {found} agent Job(s)/Pod(s) of this ImageStream"
        raise kopf.TemporaryError(message, delay=CLEANUP_POLL)
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
    status = body.get("status") or {}
    metrics.observe_stream(uid, status.get("phase"))
    written = (status.get("progress") or {}).get("bytesWritten")
    if isinstance(written, int):
        metrics.observe_written(uid, generation_of(body), written)
