"""The A/B target's words: `ab:DEV_A,DEV_B` parsed, and refusals that need no device.

Choosing the volume on real devices is tested in tests/integration/test_ab_targets.py.
"""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from tests.support.streams import (
    SETTINGS,
    SHA384,
    agent_result,
    job_body,
    job_condition,
    pod_body,
    stream_body,
    terminated,
)

from imagestream.agent.contract import AgentInstructions
from imagestream.agent.runner import run_agent
from imagestream.controller import handlers
from imagestream.controller.builders import agent_instructions, build_job
from imagestream.controller.decisions import (
    CreateJob,
    Decision,
    Event,
    JobView,
    Observation,
    PodView,
    decide,
)
from imagestream.controller.spec import parse_stream
from imagestream.errors import TargetError, UsageError
from imagestream.pipeline.safety import HostView
from imagestream.reasons import Reason
from imagestream.targets import ab, target_from_argument
from imagestream.targets.parse import ab_volumes


def of_type(decision: Decision, kind: type) -> list[Any]:
    return [action for action in decision.actions if isinstance(action, kind)]


def test_a_pair_is_two_volumes_named_as_written() -> None:
    volumes = ab_volumes("/dev/disk/by-partlabel/root-a,/dev/disk/by-partlabel/root-b")
    assert volumes == [
        ab.Volume(Path("/dev/disk/by-partlabel/root-a"), "/dev/disk/by-partlabel/root-a"),
        ab.Volume(Path("/dev/disk/by-partlabel/root-b"), "/dev/disk/by-partlabel/root-b"),
    ]


@pytest.mark.parametrize(
    ("pair", "words"),
    [
        ("/dev/a", "must name two volumes"),
        ("/dev/a,", "must name two volumes"),
        (",/dev/b", "must name two volumes"),
        ("/dev/a,/dev/b,/dev/c", "must name two volumes"),
        ("", "must name two volumes"),
        ("/dev/a,/dev/a", "names the same volume twice"),
        ("/dev/a,/dev/../dev/a", "names the same volume twice"),
    ],
)
def test_a_malformed_pair_is_a_usage_error(pair: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused:
        target_from_argument(f"ab:{pair}", host_root=tmp_path)
    assert words in refused.value.message
    assert refused.value.exit_code == 2


def test_without_the_host_mount_table_no_volume_is_chosen(tmp_path: Path) -> None:
    """Read before anything else: an unreadable table is ActiveVolumeUnknown, not a guess."""
    with pytest.raises(TargetError) as refused:
        target_from_argument("ab:/dev/a,/dev/b", host_root=tmp_path, force=True)
    assert refused.value.reason == Reason.ACTIVE_VOLUME_UNKNOWN
    assert str(tmp_path / "proc/1/mountinfo") in refused.value.message
    assert refused.value.exit_code == 5


def test_a_missing_volume_is_not_found(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("21 1 254:3 / / rw - ext4 /dev/vda3 rw\n")
    missing = tmp_path / "no-such-volume"
    with pytest.raises(TargetError) as refused:
        ab.plan(
            [ab.Volume(missing, "/dev/root-a"), ab.Volume(missing, "/dev/root-b")],
            host=HostView(mountinfo=mountinfo),
        )
    assert refused.value.reason == Reason.TARGET_NOT_FOUND
    assert "A/B volume /dev/root-a does not exist" in refused.value.message


def test_a_volume_that_is_no_block_device_is_refused(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("")
    regular = tmp_path / "image"
    regular.write_bytes(b"")
    with pytest.raises(TargetError) as refused:
        ab.plan(
            [ab.Volume(regular, "a"), ab.Volume(regular, "b")], host=HostView(mountinfo=mountinfo)
        )
    assert refused.value.reason == Reason.TARGET_INVALID
    assert "A/B volume a is not a block device" in refused.value.message


# -- the operator: spec.target.abUpdate through the Job, the held-target rule, the status --------

VOLUME_A = "/dev/disk/by-partlabel/root-a"
VOLUME_B = "/dev/disk/by-partlabel/root-b"
NOW = datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)


def ab_body(**options: Any) -> dict[str, Any]:
    return stream_body(target={"abUpdate": {"volumes": [VOLUME_A, VOLUME_B]}}, **options)


def observed(body: dict[str, Any], **options: Any) -> Observation:
    return Observation(body=body, settings=SETTINGS, now=NOW, **options)


def patched(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
    after = copy.deepcopy(body)
    status = after.setdefault("status", {})
    for key, value in decision.status.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    return after


def test_the_agent_job_carries_both_volumes_and_the_host_views_it_needs() -> None:
    stream = parse_stream(ab_body())
    job = build_job(stream, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"]}
    assert env["IMAGESTREAM_TARGET_KIND"] == "abUpdate"
    assert env["IMAGESTREAM_TARGET"] == "/host" + VOLUME_A
    assert env["IMAGESTREAM_TARGET_B"] == "/host" + VOLUME_B
    assert AgentInstructions.from_env(env) == agent_instructions(stream)
    # The volumes under the host's /dev, PID 1's mount table under its /proc; sysfs block
    # devices are not namespaced (the container's /sys shows the host's holders).
    mounts = {mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"/host/dev", "/host/proc"}
    assert job["metadata"]["annotations"]["imagestream.dev/target"] == (
        f"the A/B pair {VOLUME_A}, {VOLUME_B}"
    )


def test_an_ab_stream_is_indexed_under_both_volumes() -> None:
    index: Any = handlers.streams_by_target
    keys = index(body=kopf.Body(cast(kopf.RawBody, ab_body())))
    # Both volumes, beside the node-wide key a whole-disk stream of the node waits on.
    assert {("node-7", VOLUME_A), ("node-7", VOLUME_B)} <= set(keys)
    assert all(node == "node-7" for node, _ in keys)


def test_a_device_stream_on_either_volume_holds_the_pair_and_the_pair_holds_it() -> None:
    ab = ab_body(name="pair", uid="uid-pair", created="2026-01-01T00:00:00Z")
    device = stream_body(
        name="one", uid="uid-one", created="2026-01-01T00:00:01Z", target={"device": VOLUME_B}
    )
    twin = ab_body(name="twin", uid="uid-twin", created="2026-01-01T00:00:02Z")
    index: Any = handlers.streams_by_target
    # As reconcile calls it, with plain dicts for kopf's indexes.
    peers_of: Any = handlers._peers
    streams: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for body in (ab, device, twin):
        for key, summary in index(body=kopf.Body(cast(kopf.RawBody, body))).items():
            streams.setdefault(key, []).append(summary)
    running_job = job_body(ab)
    job_view = JobView.from_body(running_job)
    assert job_view is not None

    # The device stream waits for the pair's agent, which may be writing root-b.
    peers = peers_of(device, {"uid-pair": [job_view]}, {}, streams)
    assert sorted(item.name for item in peers) == ["pair", "twin"]
    decision = decide(observed(device, peers=peers))
    assert decision.status["reason"] == Reason.TARGET_BUSY
    assert "ImageStream imagestream-system/pair" in decision.status["message"]

    # A second stream on the same pair sees the first once, not once per volume, and waits.
    twin_peers = peers_of(twin, {"uid-pair": [job_view]}, {}, streams)
    assert sorted(item.name for item in twin_peers) == ["one", "pair"]
    decision = decide(observed(twin, peers=twin_peers))
    assert decision.status["reason"] == Reason.TARGET_BUSY
    assert decision.status["message"].startswith(
        f"the A/B pair {VOLUME_A}, {VOLUME_B} on node node-7 is being written by"
    )

    # Nothing runs on root-b yet: the pair, first to come, starts.
    first_peers = peers_of(ab, {}, {}, streams)
    assert not first_peers[0].holds_target
    assert of_type(decide(observed(ab, peers=first_peers)), CreateJob)


def test_status_target_is_the_volume_the_agent_chose_and_the_event_names_it() -> None:
    body = ab_body()
    created = decide(observed(body))
    started = patched(body, created)
    # Until the agent says which, the status names no volume.
    assert "target" not in started["status"]
    job = job_body(started, conditions=[job_condition("Complete")])
    message = "wrote /dev/nvme0n1p5, the inactive A/B volume (/dev/nvme0n1p4 runs the node): ok"
    result = agent_result(target="/dev/nvme0n1p5", message=message)
    pod = pod_body(job, phase="Succeeded", terminated=terminated(0, result, "Completed"))
    job_view, pod_view = JobView.from_body(job), PodView.from_body(pod)
    assert job_view is not None
    assert pod_view is not None
    decision = decide(observed(started, jobs=(job_view,), pods=(pod_view,)))
    assert decision.status["phase"] == "Succeeded"
    assert decision.status["target"] == "/dev/nvme0n1p5"
    [event] = of_type(decision, Event)
    assert (event.type, event.reason, event.message) == ("Normal", Reason.SUCCEEDED, message)


def test_the_agent_refuses_an_ab_target_without_its_second_volume() -> None:
    instructions = AgentInstructions(
        name="root",
        namespace="ns",
        uid="u",
        generation=1,
        source="https://images.example/root.raw.zst",
        sha384=SHA384,
        target="/host/dev/root-a",
        target_kind="abUpdate",
    )
    run = run_agent(instructions, threading.Event())
    assert run.exit_code == 2
    assert run.result.reason == Reason.INVALID_REQUEST
    assert "IMAGESTREAM_TARGET_B is not set" in run.result.message
    assert run.result.target == ""  # no volume was chosen
