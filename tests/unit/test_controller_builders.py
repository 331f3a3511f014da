"""The agent Job builder and the status conditions: pure functions, checked field by field.

The Job is also validated against the Kubernetes 1.32 OpenAPI schemas (`kubernetes-validate`),
which catches misspelt fields and wrong types the way `kubectl apply --validate=strict` would;
a real API server would additionally run admission (defaulting, Pod Security, quota).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from tests.support.streams import SETTINGS, SHA384, stream_body

from imagestream.agent.contract import AgentInstructions
from imagestream.controller.builders import (
    AUTH_DIR,
    LABEL_GENERATION,
    LABEL_UID,
    JobSettings,
    agent_instructions,
    agent_memory,
    build_job,
    condition_reason,
    conditions,
    job_name,
    selector,
)
from imagestream.controller.spec import parse_stream

KUBERNETES_VERSION = "1.32"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
UID = "0d6a1c3e-4a3f-4b8e-9c1d-2f3e4a5b6c7d"


def _container(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _mounts(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in _container(job)["volumeMounts"]}


def _volumes(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in job["spec"]["template"]["spec"]["volumes"]}


def test_job_name_is_deterministic_and_distinguishes_owner_and_generation() -> None:
    name = job_name("node-7-root-b", UID, 3)
    assert name == job_name("node-7-root-b", UID, 3)
    assert name.startswith("node-7-root-b-")
    assert name.endswith("-g3")
    assert name != job_name("node-7-root-b", UID, 4)
    # A recreated ImageStream of the same name has a new uid, so never the old one's Job.
    assert name != job_name("node-7-root-b", "another-uid", 3)


@pytest.mark.parametrize(
    "name",
    ["a", "x" * 253, "node-7.example.com.root-b", "-lead-and-trail-", "UPPER.case", "a" * 60 + "-"],
)
@pytest.mark.parametrize("generation", [1, 9_223_372_036_854_775_807])
def test_job_name_is_a_dns_label_of_at_most_63(name: str, generation: int) -> None:
    result = job_name(name, UID, generation)
    assert len(result) <= 63
    assert DNS_LABEL.fullmatch(result), result


def test_selector() -> None:
    assert selector("u") == f"{LABEL_UID}=u"
    assert selector("u", 2) == f"{LABEL_UID}=u,{LABEL_GENERATION}=2"


def test_job_shape_for_a_device_target() -> None:
    body = stream_body(uid=UID, generation=2, activeDeadlineSeconds=900)
    job = build_job(parse_stream(body), SETTINGS)
    metadata = job["metadata"]
    assert metadata["name"] == job_name("root-b", UID, 2)
    assert metadata["namespace"] == "imagestream-system"
    assert metadata["labels"][LABEL_UID] == UID
    assert metadata["labels"][LABEL_GENERATION] == "2"
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "imagestream-controller"
    assert metadata["ownerReferences"] == [
        {
            "apiVersion": "imagestream.dev/v1alpha1",
            "kind": "ImageStream",
            "name": "root-b",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 900
    assert spec["ttlSecondsAfterFinished"] == SETTINGS.ttl_seconds_after_finished
    template = spec["template"]
    # The Pods carry the labels that find them (a real Job controller adds its own too).
    assert template["metadata"]["labels"] == metadata["labels"]
    pod = template["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-7"]}]}
    ]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "imagestream-agent"
    assert pod["terminationGracePeriodSeconds"] == 60
    container = _container(job)
    assert container["image"] == SETTINGS.agent_image
    assert container["command"] == ["imagestream", "agent"]
    assert container["securityContext"] == {"privileged": True}
    assert container["resources"] == {  # sized for the default maxWindowLog, 27
        "requests": {"cpu": "250m", "memory": "216Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = _mounts(job)
    assert set(mounts) == {"/host/dev", "/host/proc"}
    assert mounts["/host/proc"]["readOnly"] is True
    volumes = _volumes(job)
    assert volumes["host-dev"]["hostPath"]["path"] == "/dev"
    assert volumes["host-proc"]["hostPath"]["path"] == "/proc"


#: The agent's peak RSS beside its window, measured (see `agent_memory`): 80 MiB.
MEASURED_BESIDE_WINDOW_MIB = 80


@pytest.mark.parametrize(
    ("window_log", "low_mib", "high_mib"),
    [(27, 240, 272), (30, 1024 + 128, 1280), (31, 2048 + 192, 2400)],
)
def test_the_agent_memory_covers_the_window(window_log: int, low_mib: int, high_mib: int) -> None:
    """27 stays near the old 256 Mi; 30 and 31 add their 1 and 2 GiB windows on top of what the
    agent measurably holds beside the window, with headroom past the request."""
    memory = agent_memory(window_log)
    assert low_mib <= memory.limit_mib <= high_mib
    assert memory.request_mib >= (1 << window_log >> 20) + MEASURED_BESIDE_WINDOW_MIB
    assert memory.limit_mib > memory.request_mib


def test_the_agent_memory_grows_with_every_window_log() -> None:
    limits = [agent_memory(log).limit_mib for log in range(10, 32)]
    assert limits == sorted(limits)
    assert agent_memory(10).limit_mib >= MEASURED_BESIDE_WINDOW_MIB


def test_the_readme_table_is_the_formula() -> None:
    """The README's memory table is what `agent_memory` computes, row by row."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    row = re.compile(r"^ *\| (\d+)(?: \(default\))? \| [^|]+ \| (\d+)Mi \| (\d+)Mi \|$", re.M)
    rows = row.findall(readme)
    assert [int(log) for log, _, _ in rows] == [27, 30, 31]
    for log, request, limit in rows:
        memory = agent_memory(int(log))
        assert (memory.request_mib, memory.limit_mib) == (int(request), int(limit)), log


def test_max_window_log_reaches_the_container_and_sizes_it() -> None:
    source = {"url": "https://images.example/disk.raw.zst", "sha384": SHA384, "maxWindowLog": 30}
    container = _container(build_job(parse_stream(stream_body(source=source)), SETTINGS))
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["IMAGESTREAM_MAX_WINDOW_LOG"] == "30"
    memory = agent_memory(30)
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": f"{memory.request_mib}Mi"},
        "limits": {"memory": f"{memory.limit_mib}Mi"},
    }
    default = _container(build_job(parse_stream(stream_body()), SETTINGS))
    assert {"name": "IMAGESTREAM_MAX_WINDOW_LOG", "value": "27"} in default["env"]


def test_the_env_round_trips_to_the_instructions_the_agent_reads() -> None:
    stream = parse_stream(stream_body(uid=UID, verifyAfterWrite=True, maxRetries=3))
    env = {item["name"]: item["value"] for item in _container(build_job(stream, SETTINGS))["env"]}
    instructions = AgentInstructions.from_env(env)
    assert instructions == agent_instructions(stream)
    assert instructions.target == "/host/dev/disk/by-partlabel/root-b"
    assert instructions.target_kind == "device"
    assert instructions.sha384 == SHA384
    assert instructions.host_proc == "/host/proc"
    assert instructions.host_prefix == "/host"
    assert (instructions.verify_after_write, instructions.max_retries) == (True, 3)
    assert (instructions.auth_dir, instructions.ca_file, instructions.allowed_dir) == (
        None,
        None,
        None,
    )


def test_credentials_and_ca_are_mounted_files_never_env() -> None:
    source = {
        "url": "https://images.example/root.raw.zst",
        "sha384": SHA384,
        "authSecretRef": {"name": "registry-creds"},
        "caConfigMapRef": {"name": "corp-ca", "key": "bundle.pem"},
    }
    job = build_job(parse_stream(stream_body(source=source)), SETTINGS)
    volumes = _volumes(job)
    assert volumes["auth"]["secret"] == {"secretName": "registry-creds", "defaultMode": 0o400}
    assert volumes["ca"]["configMap"] == {"name": "corp-ca"}
    mounts = _mounts(job)
    assert mounts[AUTH_DIR]["readOnly"] is True
    assert mounts["/etc/imagestream/ca"]["readOnly"] is True
    env = {item["name"]: item["value"] for item in _container(job)["env"]}
    assert env["IMAGESTREAM_AUTH_DIR"] == AUTH_DIR
    assert env["IMAGESTREAM_CA_FILE"] == "/etc/imagestream/ca/bundle.pem"
    assert all("valueFrom" not in item for item in _container(job)["env"])


def test_extension_target_mounts_the_host_directory_as_the_allowed_dir() -> None:
    body = stream_body(target={"extension": {"type": "confext", "name": "motd"}})
    job = build_job(parse_stream(body), SETTINGS)
    volume = _volumes(job)["host-target-dir"]
    assert volume["hostPath"] == {"path": "/var/lib/confexts", "type": "DirectoryOrCreate"}
    assert "/host/var/lib/confexts" in _mounts(job)
    env = {item["name"]: item["value"] for item in _container(job)["env"]}
    assert env["IMAGESTREAM_TARGET"] == "motd"
    assert env["IMAGESTREAM_ALLOWED_DIR"] == "/host/var/lib/confexts"
    assert env["IMAGESTREAM_TARGET_KIND"] == "confext"
    assert env["IMAGESTREAM_REFRESH"] == "false"


def test_an_extension_refresh_reaches_the_agent() -> None:
    target = {"extension": {"type": "sysext", "name": "tools", "refresh": True}}
    job = build_job(parse_stream(stream_body(target=target)), SETTINGS)
    env = {item["name"]: item["value"] for item in _container(job)["env"]}
    assert (env["IMAGESTREAM_TARGET_KIND"], env["IMAGESTREAM_REFRESH"]) == ("sysext", "true")


def test_settings_reach_the_job() -> None:
    settings = JobSettings(agent_image="img:1", service_account="sa", ttl_seconds_after_finished=60)
    job = build_job(parse_stream(stream_body()), settings)
    assert job["spec"]["ttlSecondsAfterFinished"] == 60
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "sa"
    assert _container(job)["image"] == "img:1"


@pytest.mark.parametrize(
    "body",
    [
        stream_body(),
        stream_body(
            source={
                "url": "oci://registry.example/os/root:1",
                "sha384": SHA384,
                "authSecretRef": {"name": "c"},
                "caConfigMapRef": {"name": "ca"},
            },
            target={"extension": {"type": "sysext", "name": "tools"}},
        ),
    ],
)
def test_job_validates_against_the_kubernetes_schema(body: dict[str, Any]) -> None:
    job = build_job(parse_stream(body), SETTINGS)
    assert kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_conditions_follow_kstatus() -> None:
    def status_of(phase: str) -> dict[str, str]:
        found = conditions(phase, "R", "m", generation=2, previous=[], now="t")
        return {item["type"]: item["status"] for item in found}

    assert status_of("Pending") == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    assert status_of("Running") == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    assert status_of("Verifying") == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    assert status_of("Succeeded") == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    assert status_of("Failed") == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}


def test_condition_transition_time_moves_only_when_the_status_flips() -> None:
    first = conditions("Pending", "JobCreated", "a", generation=1, previous=[], now="t1")
    second = conditions("Running", "Streaming", "b", generation=1, previous=first, now="t2")
    assert {item["lastTransitionTime"] for item in second} == {"t1"}
    assert {item["reason"] for item in second} == {"Streaming"}
    third = conditions("Succeeded", "Succeeded", "c", generation=1, previous=second, now="t3")
    times = {item["type"]: item["lastTransitionTime"] for item in third}
    assert times == {"Ready": "t3", "Reconciling": "t3", "Stalled": "t1"}
    assert all(item["observedGeneration"] == 1 for item in third)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("TargetBusy", "TargetBusy"),
        ("bad reason!", "badreason"),
        ("9Lives", "Lives"),
        ("", "Unknown"),
    ],
)
def test_condition_reason_fits_the_crd_pattern(raw: str, clean: str) -> None:
    assert condition_reason(raw) == clean
