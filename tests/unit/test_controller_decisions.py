"""Reconcile decisions: every branch, idempotence, restart adoption, TargetBusy, failure mapping.

Jobs and Pods are built as the API would return them (the controller's own Job, the Job
controller's conditions, the kubelet's container states). Every status a decision writes is
checked against the CRD's status schema, as the API server would on the status patch.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.support.crd import load_crd
from tests.support.streams import (
    OTHER_SHA384,
    SETTINGS,
    SHA384,
    agent_result,
    job_body,
    job_condition,
    pod_body,
    stream_body,
    terminated,
)

from imagestream.controller import decisions
from imagestream.controller.builders import job_name
from imagestream.controller.decisions import (
    CreateJob,
    Decision,
    DeleteJob,
    Event,
    JobEvent,
    JobView,
    Observation,
    Peer,
    PodView,
    decide,
)
from imagestream.reasons import Reason

NOW = datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
CRD = load_crd()


def observe(
    body: dict[str, Any],
    jobs: list[dict[str, Any]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    peers: tuple[Peer, ...] = (),
    now: datetime = NOW,
) -> Observation:
    """An observation from API-shaped bodies (parsed by the same views the handlers use)."""
    job_views = [JobView.from_body(job) for job in jobs or []]
    pod_views = [PodView.from_body(pod) for pod in pods or []]
    return Observation(
        body=body,
        settings=SETTINGS,
        now=now,
        jobs=tuple(view for view in job_views if view is not None),
        pods=tuple(view for view in pod_views if view is not None),
        peers=peers,
    )


def applied(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The body after the decision's status merge patch, checked against the CRD."""
    result = copy.deepcopy(body)
    status = result.setdefault("status", {})
    for key, value in decision.status.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    # The status alone, on a valid spec: a few tests feed specs an older CRD would have let in.
    validation = CRD.validate({**stream_body(), "status": status})
    assert validation.ok, validation.describe()
    return result


def settle(
    body: dict[str, Any], jobs: list[dict[str, Any]], pods: list[dict[str, Any]], **kwargs: Any
) -> tuple[dict[str, Any], Decision]:
    """Decide, apply, and check that deciding again on the same children does nothing new.

    Only a deletion the watch has not shown yet is repeated (the API treats it as a no-op).
    """
    decision = decide(observe(body, jobs, pods, **kwargs))
    after = applied(body, decision)
    again = decide(observe(after, jobs, pods, **kwargs))
    assert again == Decision(actions=tuple(of_type(decision, DeleteJob))), f"again: {again}"
    return after, decision


def of_type(decision: Decision, kind: type) -> list[Any]:
    return [action for action in decision.actions if isinstance(action, kind)]


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        item for item in body["status"]["conditions"] if item["type"] == kind
    )
    return found


def started(body: dict[str, Any]) -> dict[str, Any]:
    """`body` after its Job was created (the status the first decision writes)."""
    after, _ = settle(body, [], [])
    return after


def running(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`body` with a running Job and Pod, its status caught up."""
    job = job_body(body)
    pod = pod_body(job)
    after, _ = settle(started(body), [job], [pod])
    return after, job, pod


# -- starting ---------------------------------------------------------------------------------


def test_a_new_stream_creates_its_job_and_says_pending() -> None:
    body = stream_body()
    after, decision = settle(body, [], [])
    [create] = of_type(decision, CreateJob)
    assert create.name == job_name("root-b", body["metadata"]["uid"], 1)
    assert create.body["spec"]["template"]["spec"]["containers"][0]["image"] == (
        SETTINGS.agent_image
    )
    status = after["status"]
    assert status["phase"] == "Pending"
    assert status["reason"] == Reason.JOB_CREATED
    assert status["jobName"] == create.name
    assert status["observedGeneration"] == 1
    assert status["target"] == "/dev/disk/by-partlabel/root-b"
    assert status["startTime"] == "2026-01-01T00:00:02Z"
    assert condition(after, "Reconciling")["status"] == "True"
    assert condition(after, "Ready")["status"] == "False"
    [event] = of_type(decision, Event)
    assert (event.type, event.reason) == ("Normal", Reason.JOB_CREATED)


def test_a_job_not_yet_seen_by_the_watch_is_waited_for_not_recreated() -> None:
    after = started(stream_body())
    soon = decide(observe(after, now=NOW + timedelta(seconds=5)))
    assert soon == Decision()


def test_a_job_that_never_shows_up_or_vanished_is_agent_lost_never_recreated() -> None:
    after = started(stream_body())
    later = NOW + decisions.JOB_VISIBILITY_GRACE + timedelta(seconds=1)
    final, decision = settle(after, [], [], now=later)
    assert not of_type(decision, CreateJob)
    assert final["status"]["phase"] == "Failed"
    assert final["status"]["reason"] == Reason.AGENT_LOST


def test_restart_adopts_the_existing_job_and_never_creates_another() -> None:
    """A controller that lost its status patch (or restarted) finds the Job by its labels."""
    body = stream_body()
    job = job_body(body)
    pod = pod_body(job)
    after, decision = settle(body, [job], [pod])
    assert not of_type(decision, CreateJob)
    assert after["status"]["phase"] == "Running"
    assert after["status"]["jobName"] == job["metadata"]["name"]
    assert after["status"]["startTime"] == job["status"]["startTime"]


def test_pod_not_yet_running_is_pending_with_the_kubelets_reason() -> None:
    body = started(stream_body())
    job = job_body(body)
    waiting = {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
    after, decision = settle(body, [job], [pod_body(job, phase="Pending", waiting=waiting)])
    assert after["status"]["phase"] == "Pending"
    assert after["status"]["reason"] == Reason.AGENT_STARTING
    assert "ImagePullBackOff: Back-off pulling image" in after["status"]["message"]
    assert [event.reason for event in of_type(decision, Event)] == [Reason.AGENT_STARTING]


def test_job_without_pod_is_pending() -> None:
    body = started(stream_body())
    after, _ = settle(body, [job_body(body)], [])
    assert (after["status"]["phase"], after["status"]["reason"]) == (
        "Pending",
        Reason.AGENT_STARTING,
    )


def test_unschedulable_pod_says_why() -> None:
    body = started(stream_body())
    job = job_body(body)
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available",
    }
    pod = pod_body(job, phase="Pending", conditions=[unschedulable])
    after, _ = settle(body, [job], [pod])
    assert "Unschedulable: 0/3 nodes are available" in after["status"]["message"]


def test_running_then_verifying_follow_the_pod_and_the_agents_progress() -> None:
    after, _, _ = running(stream_body())
    assert (after["status"]["phase"], after["status"]["reason"]) == (
        "Running",
        Reason.STREAMING,
    )
    start = after["status"]["startTime"]
    after["status"]["progress"] = {"phase": "Verifying", "bytesWritten": 10}
    job = job_body(after)
    verifying, decision = settle(after, [job], [pod_body(job)])
    assert verifying["status"]["phase"] == "Verifying"
    assert verifying["status"]["startTime"] == start
    assert verifying["status"]["progress"] == {"phase": "Verifying", "bytesWritten": 10}
    assert [event.reason for event in of_type(decision, Event)] == [Reason.VERIFYING]


# -- outcomes ---------------------------------------------------------------------------------


def finish(
    body: dict[str, Any],
    job_conditions: list[dict[str, Any]],
    pods: list[dict[str, Any]] | None = None,
    *,
    state: dict[str, Any] | None = None,
    pod_phase: str = "Succeeded",
    pod_reason: str | None = None,
    pod_conditions: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], Decision]:
    """Settle a running stream whose Job ended with `job_conditions`."""
    before, _, _ = running(body)
    job = job_body(before, conditions=job_conditions, completion_time="2026-01-01T00:00:45Z")
    if pods is None:
        pod = pod_body(
            job,
            phase=pod_phase,
            terminated=state,
            reason=pod_reason,
            conditions=pod_conditions,
        )
        pods = [pod]
    after, decision = settle(before, [job], pods)
    assert decide(observe(after)) == Decision(), "a finished stream must need nothing more"
    return after, decision


# A sha512 blob digest is verified by the pipeline like a sha256 one: the status keeps it.
@pytest.mark.parametrize("digest", ["sha256:" + "e" * 64, "sha512:" + "e" * 128])
def test_success_needs_the_job_complete_and_the_matching_hash(digest: str) -> None:
    state = terminated(0, agent_result(digest=digest), "Completed")
    after, decision = finish(stream_body(), [job_condition("Complete")], state=state)
    status = after["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", Reason.SUCCEEDED)
    assert status["sha384"] == SHA384
    assert status["digest"] == digest
    assert status["target"] == "/dev/disk/by-partlabel/root-b"
    assert status["completionTime"] == "2026-01-01T00:00:45Z"
    assert condition(after, "Ready")["status"] == "True"
    assert condition(after, "Reconciling")["status"] == "False"
    assert decision.outcome == decisions.Outcome("Succeeded", "Succeeded", 43.0, 4000)
    [event] = of_type(decision, Event)
    assert (event.type, event.reason) == ("Normal", "Succeeded")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (agent_result(sha384=OTHER_SHA384), f"reported SHA-384 {OTHER_SHA384}"),
        (agent_result(sha384=None), "reported SHA-384 none"),
        ("", "without reporting a verified result"),
        ("all good, trust me", "without reporting a verified result"),
        (agent_result(outcome="Failed", reason="X"), "without reporting a verified result"),
    ],
)
def test_a_complete_job_without_a_matching_hash_is_never_succeeded(
    message: str, expected: str
) -> None:
    state = terminated(0, message, "Completed")
    after, decision = finish(stream_body(), [job_condition("Complete")], state=state)
    assert (after["status"]["phase"], after["status"]["reason"]) == (
        "Failed",
        Reason.RESULT_UNVERIFIED,
    )
    assert expected in after["status"]["message"]
    assert condition(after, "Stalled")["status"] == "True"
    assert condition(after, "Ready")["status"] == "False"
    [event] = of_type(decision, Event)
    assert event.type == "Warning"


def test_a_complete_job_whose_pod_is_gone_is_unverified() -> None:
    after, _ = finish(stream_body(), [job_condition("Complete")], pods=[])
    assert after["status"]["reason"] == Reason.RESULT_UNVERIFIED


def test_the_agents_own_failure_reason_and_message_are_reported() -> None:
    result = agent_result(
        outcome="Failed",
        reason="IntegrityCheckFailed",
        message="SHA-384 mismatch: the target was left invalid",
        sha384=OTHER_SHA384,
    )
    state = terminated(4, result, "Error")
    after, decision = finish(
        stream_body(), [job_condition("Failed", "BackoffLimitExceeded")], state=state
    )
    status = after["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "IntegrityCheckFailed")
    assert status["message"] == "SHA-384 mismatch: the target was left invalid"
    assert status["sha384"] == OTHER_SHA384  # what was computed, for the user to compare
    assert decision.outcome is not None
    assert decision.outcome.reason == "IntegrityCheckFailed"


@pytest.mark.parametrize(
    ("job_conditions", "kwargs", "reason", "text"),
    [
        (
            [job_condition("Failed", "DeadlineExceeded", "Job was active longer")],
            {"state": terminated(130, agent_result(outcome="Failed", reason="Cancelled"))},
            Reason.DEADLINE_EXCEEDED,
            "activeDeadlineSeconds (7200 s)",
        ),
        (
            [job_condition("Failed", "BackoffLimitExceeded")],
            {"state": terminated(137, "", "OOMKilled"), "pod_phase": "Failed"},
            Reason.AGENT_OOM_KILLED,
            "memory limit (exit code 137)",
        ),
        (
            [job_condition("Failed", "BackoffLimitExceeded")],
            {
                "state": terminated(1, "Traceback ...\nKeyError: 'x'", "Error"),
                "pod_phase": "Failed",
            },
            Reason.AGENT_CRASHED,
            "exited with code 1: Traceback ...\nKeyError: 'x'",
        ),
        (
            [job_condition("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit")],
            {"pods": []},
            Reason.AGENT_LOST,
            "is gone",
        ),
        (
            [job_condition("FailureTarget", "BackoffLimitExceeded")],
            {"pod_phase": "Failed", "pod_reason": "NodeLost"},
            Reason.AGENT_LOST,
            "stopped by Kubernetes: NodeLost",
        ),
        (
            [job_condition("Failed", "BackoffLimitExceeded")],
            {
                "state": terminated(137, "", "Error"),
                "pod_phase": "Failed",
                "pod_conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "TerminationByKubelet",
                        "message": "node shutdown",
                    }
                ],
            },
            Reason.AGENT_LOST,
            "TerminationByKubelet: node shutdown",
        ),
        (
            [job_condition("Failed", "PodFailurePolicy", "odd")],
            {"state": terminated(0, "", "Completed"), "pod_phase": "Failed"},
            Reason.AGENT_FAILED,
            "PodFailurePolicy: odd",
        ),
    ],
)
def test_failures_without_an_agent_verdict_are_mapped_to_reasons(
    job_conditions: list[dict[str, Any]], kwargs: dict[str, Any], reason: str, text: str
) -> None:
    after, decision = finish(stream_body(), job_conditions, **kwargs)
    assert (after["status"]["phase"], after["status"]["reason"]) == ("Failed", reason)
    assert text in after["status"]["message"]
    assert condition(after, "Stalled")["reason"] == reason
    assert decision.outcome is not None
    assert decision.outcome.phase == "Failed"


def test_a_job_deleted_behind_the_controllers_back_is_agent_lost() -> None:
    before, _, pod = running(stream_body())
    gone = job_body(before, deleting=True)
    after, _ = settle(before, [gone], [pod])
    assert (after["status"]["phase"], after["status"]["reason"]) == ("Failed", "AgentLost")


def test_finished_stays_finished_even_when_ttl_removed_the_job() -> None:
    state = terminated(0, agent_result(), "Completed")
    after, _ = finish(stream_body(), [job_condition("Complete")], state=state)
    assert decisions.is_finished(after)
    assert decide(observe(after, now=NOW + timedelta(days=1))) == Decision()


def test_invalid_specs_fail_without_a_job() -> None:
    bad = stream_body()
    bad["spec"]["source"]["sha384"] = "nope"
    after, decision = settle(bad, [], [])
    assert (after["status"]["phase"], after["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert not of_type(decision, CreateJob)


def test_job_rejected_by_the_api_fails_the_stream() -> None:
    body = stream_body()
    decision = decisions.job_rejected(observe(body), "422 Unprocessable: bad volume")
    after = applied(body, decision)
    assert (after["status"]["phase"], after["status"]["reason"]) == ("Failed", "JobRejected")
    assert "bad volume" in after["status"]["message"]


def test_a_stream_being_deleted_is_left_to_the_finalizer() -> None:
    before, job, pod = running(stream_body())
    before["metadata"]["deletionTimestamp"] = "2026-01-01T00:02:00Z"
    assert decide(observe(before, [job], [pod])) == Decision()


def test_a_finished_stream_stays_finished_while_it_is_deleted() -> None:
    """A real API server bumps metadata.generation when it sets deletionTimestamp: the stream
    finished for its spec is still finished, and no longer holds its target for a peer."""
    state = terminated(0, agent_result(), "Completed")
    after, _ = finish(stream_body(), [job_condition("Complete")], state=state)
    assert decisions.is_finished(after)
    deleting = copy.deepcopy(after)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:02:00Z"
    deleting["metadata"]["generation"] = after["metadata"]["generation"] + 1
    assert decisions.is_finished(deleting)
    assert not decisions.peer(deleting, [], []).active
    # A spec patched during the deletion (a further bump) is a spec the stream did not finish.
    deleting["metadata"]["generation"] += 1
    assert not decisions.is_finished(deleting)


def refusal(job: dict[str, Any], message: str) -> JobEvent:
    """The Job controller's FailedCreate Event about `job`, as the controller's index keeps it."""
    view = JobEvent.from_body(
        {
            "metadata": {"name": f"{job['metadata']['name']}.17a0", "namespace": "ns"},
            "involvedObject": {
                "kind": "Job",
                "name": job["metadata"]["name"],
                "namespace": job["metadata"]["namespace"],
            },
            "type": "Warning",
            "reason": "FailedCreate",
            "message": message,
        }
    )
    assert view is not None
    return view


POD_SECURITY = (
    'Error creating: pods "ims-a-g1-x7k2p" is forbidden: violates PodSecurity "baseline:latest":'
    ' hostPath volumes (volume "host-dev"), privileged (container "agent" must not set '
    "securityContext.privileged=true)"
)


def test_a_pod_the_api_server_refuses_fails_the_stream_and_deletes_its_job() -> None:
    """Pod Security refuses the agent Pod: the cause is only in the Job's FailedCreate Event.
    The stream ends Failed/AgentPodRejected with the server's message, and its Job goes (it
    would start the agent of a failed stream once the namespace's policy changes)."""
    body = started(stream_body())
    job = job_body(body)
    observation = replace(observe(body, [job], []), job_events=(refusal(job, POD_SECURITY),))
    decision = decide(observation)
    after = applied(body, decision)
    status = after["status"]
    assert (status["phase"], status["reason"]) == ("Failed", Reason.AGENT_POD_REJECTED)
    assert POD_SECURITY in status["message"]
    assert DeleteJob(job["metadata"]["name"], 1) in decision.actions
    [event] = of_type(decision, Event)
    assert (event.type, event.reason) == ("Warning", Reason.AGENT_POD_REJECTED)
    assert decision.outcome is not None
    assert decision.outcome.event == event
    assert decisions.is_finished(after)


def test_a_pod_not_created_for_another_reason_is_pending_with_it() -> None:
    body = started(stream_body())
    job = job_body(body)
    quota = "Error creating: Internal error occurred: resource quota evaluation timed out"
    decision = decide(replace(observe(body, [job], []), job_events=(refusal(job, quota),)))
    status = applied(body, decision)["status"]
    assert (status["phase"], status["reason"]) == ("Pending", Reason.AGENT_STARTING)
    assert quota in status["message"]
    assert of_type(decision, DeleteJob) == []


def test_a_job_without_a_pod_for_long_says_where_to_look() -> None:
    """No Event explains the missing Pod (expired, or not visible): past a grace, the message
    says where the cause is; before it, the stream is simply starting."""
    body = started(stream_body())
    job = job_body(body)
    soon = applied(body, decide(observe(body, [job], [])))["status"]["message"]
    assert "no Pod" not in soon
    later = NOW + decisions.POD_CREATION_GRACE
    status = applied(body, decide(observe(body, [job], [], now=later)))["status"]
    assert (status["phase"], status["reason"]) == ("Pending", Reason.AGENT_STARTING)
    assert f"kubectl describe job {job['metadata']['name']}" in status["message"]


def test_an_outcome_decided_again_is_announced_once() -> None:
    """Without its outcome, the repeated decision keeps its status patch and other actions."""
    state = terminated(0, agent_result(), "Completed")
    _, decision = finish(stream_body(), [job_condition("Complete")], state=state)
    assert decision.outcome is not None
    assert decision.outcome.event in decision.actions
    repeated = decisions.without_outcome(decision)
    assert repeated.outcome is None
    assert repeated.status == decision.status
    assert of_type(repeated, Event) == []


def test_views_read_bodies_whose_sections_are_null() -> None:
    """A body from the API may carry `null` sections: the typed views read them as empty."""
    body = stream_body()
    assert JobView.from_body({"metadata": body["metadata"], "status": None}) is None
    job = job_body(started(body))
    job["status"] = None
    view = JobView.from_body(job)
    assert view is not None
    assert not view.finished
    pod = pod_body(job_body(started(body)))
    pod["status"] = None
    pod_view = PodView.from_body(pod)
    assert pod_view is not None
    assert pod_view.phase == "Pending"
    assert not decisions.is_finished({**body, "status": None})


# -- a new generation -------------------------------------------------------------------------


def test_a_spec_change_cancels_the_old_job_then_starts_the_new_one() -> None:
    before, old_job, old_pod = running(stream_body())
    before["status"]["progress"] = {"bytesWritten": 123, "phase": "Running"}
    changed = copy.deepcopy(before)
    changed["metadata"]["generation"] = 2
    changed["spec"]["source"]["sha384"] = OTHER_SHA384

    waiting, decision = settle(changed, [old_job], [old_pod])
    [delete] = of_type(decision, DeleteJob)
    assert delete == DeleteJob(old_job["metadata"]["name"], 1)
    assert not of_type(decision, CreateJob)
    assert [event.reason for event in of_type(decision, Event)] == [
        Reason.CANCELLING,
        Reason.CANCELLING_PREVIOUS,
    ]
    status = waiting["status"]
    assert (status["phase"], status["reason"]) == ("Pending", Reason.CANCELLING_PREVIOUS)
    assert status["observedGeneration"] == 2
    assert "progress" not in status  # the old generation's numbers are gone
    assert "jobName" not in status

    # The Job is being deleted and its Pod terminates (SIGTERM, grace period): still waiting.
    deleting_job = job_body(before, deleting=True)
    terminating = pod_body(old_job, deleting=True)
    assert decide(observe(waiting, [deleting_job], [terminating])) == Decision()

    # Once the old Pod is gone the new generation's Job is created.
    after, decision = settle(waiting, [deleting_job], [])
    [create] = of_type(decision, CreateJob)
    assert create.name == job_name("root-b", changed["metadata"]["uid"], 2)
    assert create.body["metadata"]["labels"]["imagestream.dev/generation"] == "2"
    assert after["status"]["jobName"] == create.name


def test_a_spec_change_after_the_outcome_starts_a_new_stream() -> None:
    state = terminated(0, agent_result(), "Completed")
    done, _ = finish(stream_body(), [job_condition("Complete")], state=state)
    done["status"]["progress"] = {"bytesWritten": 4000}
    done["metadata"]["generation"] = 2
    assert not decisions.is_finished(done)
    old_job = job_body(stream_body(), conditions=[job_condition("Complete")])
    after, decision = settle(done, [old_job], [])
    assert not of_type(decision, DeleteJob)  # a finished Job is left to its TTL
    assert len(of_type(decision, CreateJob)) == 1
    status = after["status"]
    assert (status["phase"], status["observedGeneration"]) == ("Pending", 2)
    assert "sha384" not in status
    assert "completionTime" not in status
    assert "progress" not in status
    assert condition(after, "Ready")["status"] == "False"


def test_a_spec_change_to_an_invalid_spec_still_cancels_the_running_job() -> None:
    before, old_job, old_pod = running(stream_body())
    changed = copy.deepcopy(before)
    changed["metadata"]["generation"] = 2
    changed["spec"]["target"] = {"disk": "/dev/../sda"}
    decision = decide(observe(changed, [old_job], [old_pod]))
    assert of_type(decision, DeleteJob) == [DeleteJob(old_job["metadata"]["name"], 1)]
    after = applied(changed, decision)
    assert after["status"]["reason"] == "InvalidSpec"
    # Finished for generation 2, but an old Pod still running is still cancelled.
    again = decide(observe(after, [old_job], [old_pod]))
    assert of_type(again, DeleteJob) == [DeleteJob(old_job["metadata"]["name"], 1)]
    assert not again.status


# -- TargetBusy -------------------------------------------------------------------------------


def peer(
    name: str, created: str, *, active: bool = True, holds: bool = False, namespace: str = "a"
) -> Peer:
    return Peer(namespace, name, f"uid-{name}", created, active=active, holds_target=holds)


@pytest.mark.parametrize(
    ("peers", "busy"),
    [
        ((), False),
        ((peer("older", "2025-12-31T00:00:00Z"),), True),
        ((peer("newer", "2026-01-02T00:00:00Z"),), False),
        ((peer("newer-writing", "2026-01-02T00:00:00Z", holds=True),), True),
        ((peer("older-done", "2025-12-31T00:00:00Z", active=False),), False),
        # Same second: namespace/name breaks the tie (ours is imagestream-system/root-b).
        ((peer("x", "2026-01-01T00:00:00Z", namespace="default"),), True),
        ((peer("x", "2026-01-01T00:00:00Z", namespace="zzz"),), False),
    ],
)
def test_target_busy_ordering(peers: tuple[Peer, ...], busy: bool) -> None:
    after, decision = settle(stream_body(), [], [], peers=peers)
    if busy:
        assert (after["status"]["phase"], after["status"]["reason"]) == (
            "Pending",
            Reason.TARGET_BUSY,
        )
        assert not of_type(decision, CreateJob)
        assert peers[0].name in after["status"]["message"]
        assert "jobName" not in after["status"]
    else:
        assert len(of_type(decision, CreateJob)) == 1


def test_two_streams_for_one_target_run_one_after_the_other() -> None:
    first = stream_body(name="first", uid="uid-first", created="2026-01-01T00:00:00Z")
    second = stream_body(name="second", uid="uid-second", created="2026-01-01T00:00:01Z")

    def peer_of(body: dict[str, Any], jobs: list[dict[str, Any]]) -> Peer:
        views = [view for view in map(JobView.from_body, jobs) if view is not None]
        return decisions.peer(body, views, [])

    # Neither has a Job yet: only the earlier one starts.
    first_decision = decide(observe(first, peers=(peer_of(second, []),)))
    second_waits, _ = settle(second, [], [], peers=(peer_of(first, []),))
    assert len(of_type(first_decision, CreateJob)) == 1
    assert second_waits["status"]["reason"] == Reason.TARGET_BUSY

    # The first is running: the second keeps waiting (no new status, no action).
    first = applied(first, first_decision)
    first_job = job_body(first)
    assert decide(observe(second_waits, peers=(peer_of(first, [first_job]),))) == Decision()

    # The first ends: the second starts.
    state = terminated(0, agent_result(), "Completed")
    done_job = job_body(first, conditions=[job_condition("Complete")])
    first_done, _ = settle(
        first, [done_job], [pod_body(done_job, phase="Succeeded", terminated=state)]
    )
    assert first_done["status"]["phase"] == "Succeeded"
    started_second = decide(observe(second_waits, peers=(peer_of(first_done, [done_job]),)))
    assert len(of_type(started_second, CreateJob)) == 1


def test_peer_holds_the_target_while_its_pod_runs_even_if_finished() -> None:
    body = stream_body(name="other", uid="uid-other")
    job = job_body(body, deleting=True)
    pod = PodView.from_body(pod_body(job, deleting=True))
    assert pod is not None
    view = JobView.from_body(job)
    assert view is not None
    assert decisions.peer(body, [view], [pod]).holds_target
    finished_pod = PodView.from_body(pod_body(job, phase="Failed"))
    assert finished_pod is not None
    assert not decisions.peer(body, [view], [finished_pod]).holds_target


# -- views ------------------------------------------------------------------------------------


def test_views_ignore_objects_without_the_imagestream_labels() -> None:
    assert JobView.from_body({"metadata": {"name": "x", "labels": {}}}) is None
    labels = {"imagestream.dev/uid": "u", "imagestream.dev/generation": "two"}
    assert PodView.from_body({"metadata": {"name": "x", "labels": labels}}) is None


def test_pod_view_reads_the_last_termination_of_a_restarted_container() -> None:
    job = job_body(stream_body())
    pod = pod_body(job)
    pod["status"]["containerStatuses"][0]["lastState"] = {"terminated": terminated(3, "boom")}
    view = PodView.from_body(pod)
    assert view is not None
    assert view.terminated == decisions.Termination(3, "", "boom")
