"""Pure builders: the agent Job of one generation, and the status conditions.

Nothing here talks to the API; the same input always gives the same object, which is what lets
a restarted controller recognise (and adopt) the Job it created before.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagestream.agent.contract import TERMINATION_LOG, AgentInstructions
from imagestream.controller.spec import HOST_PREFIX, StreamSpec

API_VERSION = "imagestream.dev/v1alpha1"
KIND = "ImageStream"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
#: The owning ImageStream's uid: how Jobs and Pods are found (names can be reused, uids not).
LABEL_UID = "imagestream.dev/uid"
#: The spec generation a Job streams; older generations' Jobs are cancelled.
LABEL_GENERATION = "imagestream.dev/generation"
#: `namespace/name` of the owning ImageStream, for people reading `kubectl describe job`.
ANNOTATION_STREAM = "imagestream.dev/stream"
#: The host path the Job writes.
ANNOTATION_TARGET = "imagestream.dev/target"

APP_NAME = "imagestream-operator"
MANAGED_BY = "imagestream-controller"
COMPONENT = "agent"
CONTAINER_NAME = "agent"

AUTH_DIR = "/etc/imagestream/auth"
CA_DIR = "/etc/imagestream/ca"
HOST_DEV = HOST_PREFIX + "/dev"
HOST_PROC = HOST_PREFIX + "/proc"

#: What the agent holds besides the zstd window, in MiB (measured; see `agent_memory`).
AGENT_INTERPRETER_MIB = 56
AGENT_BUFFERS_MIB = 32
AGENT_HEADROOM_MIB = 32
#: The headroom's share that grows with the window: 1/16 of it.
AGENT_WINDOW_HEADROOM_SHIFT = 4

#: A Job name is also a label value on its Pods: a DNS-1123 label of at most 63 characters.
MAX_JOB_NAME = 63
MAX_CONDITION_MESSAGE = 4096

ACTIVE_PHASES = ("Pending", "Running", "Verifying")
FINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class JobSettings:
    """What the controller's command line decides about every agent Job."""

    agent_image: str
    service_account: str = "imagestream-agent"
    ttl_seconds_after_finished: int = 3600
    image_pull_policy: str = "IfNotPresent"
    termination_grace_seconds: int = 60
    #: (name, value) pairs every agent container gets besides its instructions (proxies).
    extra_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AgentMemory:
    """The agent container's memory request and limit, in MiB."""

    request_mib: int
    limit_mib: int

    def resources(self) -> dict[str, dict[str, str]]:
        """As a container's `resources` (the CPU request rides along)."""
        return {
            "requests": {"cpu": "250m", "memory": f"{self.request_mib}Mi"},
            "limits": {"memory": f"{self.limit_mib}Mi"},
        }


def agent_memory(max_window_log: int) -> AgentMemory:
    """The memory an agent needs to decode windows up to `2^max_window_log` bytes.

    request = window + buffers + interpreter, the working set of an image longer than its
    window (zstd's decoder fills its whole window buffer then); limit = request + headroom.

    - window: `1 << max_window_log`, zstd's window buffer (plus 256 KiB of block margins).
    - buffers, 32 MiB: the pool of 4 x 4 MiB write buffers (16), the held and zero first MiB of
      the sink (2), the fetch queues of 4 chunks of 1 MiB and the chunks in flight in each stage
      (about 8), the 4 MiB read-back buffer, and zstd's decoder state (under 1 MiB).
    - interpreter, 56 MiB: the agent process with its imports, before streaming (54.4 MiB).
    - headroom, 32 MiB + window/16: glibc's arenas (5-9 MiB of growth over a long stream, see
      tests/integration/test_memory.py), the status reporter's TLS, and what the kernel
      charges the container beyond RSS that grows with the mapping (page tables).

    Measured peak RSS of `imagestream agent` (wait4's ru_maxrss) on images longer than the
    window, against this formula's request / limit: from a file, without status patches,
    window 2^20, 64 MiB image: 80.2 MiB (81.0 with verifyAfterWrite); 2^27, 256 MiB: 208.0
    MiB (216 / 256 Mi); 2^30, 1.25 GiB: 1104.0 MiB (1112 / 1208 Mi). Over HTTP from nginx
    with status patches (tests/integration/test_agent.py, which checks them against the
    limits): 2^27, 384 MiB: 215.0 MiB; 2^30, 1.25 GiB: 1111.4 MiB.
    """
    window_mib = (1 << max_window_log) >> 20
    request = window_mib + AGENT_BUFFERS_MIB + AGENT_INTERPRETER_MIB
    headroom = AGENT_HEADROOM_MIB + (window_mib >> AGENT_WINDOW_HEADROOM_SHIFT)
    return AgentMemory(request_mib=request, limit_mib=request + headroom)


def job_name(name: str, uid: str, generation: int) -> str:
    """`NAME-UIDHASH-gGEN`: deterministic, a DNS-1123 label, at most 63 characters.

    The uid hash keeps a Job of a deleted-and-recreated ImageStream of the same name apart, so
    adopting an existing Job on a name conflict can never adopt someone else's.
    """
    suffix = f"-{hashlib.sha256(uid.encode()).hexdigest()[:8]}-g{generation}"
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    base = base[: MAX_JOB_NAME - len(suffix)].rstrip("-") or "imagestream"
    return base + suffix


def selector(uid: str, generation: int | None = None) -> str:
    """Label selector of the Jobs and Pods of one ImageStream (optionally one generation)."""
    terms = [f"{LABEL_UID}={uid}"]
    if generation is not None:
        terms.append(f"{LABEL_GENERATION}={generation}")
    return ",".join(terms)


def agent_instructions(stream: StreamSpec) -> AgentInstructions:
    """The contract's instructions for this generation, with paths as the agent sees them."""
    source = stream.source
    options = stream.options
    return AgentInstructions(
        name=stream.name,
        namespace=stream.namespace,
        uid=stream.uid,
        generation=stream.generation,
        source=source.url,
        sha384=source.sha384,
        target=stream.target.agent_path,
        target_kind=stream.target.agent_kind,
        target_b=stream.target.agent_volumes[1] if stream.target.volumes else None,
        compression=source.compression,
        max_window_log=source.max_window_log,
        allowed_dir=stream.target.agent_dir,
        platform=source.platform,
        layer=source.layer,
        auth_dir=AUTH_DIR if source.auth_secret else None,
        ca_file=f"{CA_DIR}/{source.ca_key}" if source.ca_config_map else None,
        host_proc=HOST_PROC,
        host_prefix=HOST_PREFIX,
        termination_log=TERMINATION_LOG,
        stall_timeout=float(options.stall_timeout_seconds),
        max_retries=options.max_retries,
        verify_after_write=options.verify_after_write,
        force=options.force,
    )


def labels(stream: StreamSpec) -> dict[str, str]:
    """Labels of the Job and its Pods."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_COMPONENT: COMPONENT,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_UID: stream.uid,
        LABEL_GENERATION: str(stream.generation),
    }


def owner_reference(stream: StreamSpec) -> dict[str, Any]:
    """The ImageStream as the controlling owner: its deletion garbage-collects the Job."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": stream.name,
        "uid": stream.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_job(stream: StreamSpec, settings: JobSettings) -> dict[str, Any]:
    """The agent Job of one generation: one privileged Pod on `spec.nodeName`, never retried.

    backoffLimit is 0 because a second attempt must not start behind a failed one's back: the
    failure is reported and a new generation (a spec change) is the retry.
    """
    annotations = {
        ANNOTATION_STREAM: f"{stream.namespace}/{stream.name}",
        ANNOTATION_TARGET: stream.target.description,
    }
    metadata = {
        "name": job_name(stream.name, stream.uid, stream.generation),
        "namespace": stream.namespace,
        "labels": labels(stream),
        "annotations": annotations,
        "ownerReferences": [owner_reference(stream)],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": stream.options.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": labels(stream), "annotations": annotations},
                "spec": _pod_spec(stream, settings),
            },
        },
    }


def _pod_spec(stream: StreamSpec, settings: JobSettings) -> dict[str, Any]:
    volumes, mounts = _volumes(stream)
    env = [
        {"name": key, "value": value}
        for key, value in sorted(agent_instructions(stream).to_env().items())
    ] + [{"name": key, "value": value} for key, value in settings.extra_env]
    container = {
        "name": CONTAINER_NAME,
        "image": settings.agent_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["imagestream", "agent"],
        "env": env,
        "securityContext": {"privileged": True},
        "resources": agent_memory(stream.source.max_window_log).resources(),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        # Pinned as DaemonSet Pods are: through the scheduler (resources, taints are seen)
        # rather than spec.nodeName, which would bypass it.
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {
                                    "key": "metadata.name",
                                    "operator": "In",
                                    "values": [stream.node_name],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        # A node being reimaged is often cordoned or tainted for maintenance on purpose.
        "tolerations": [{"operator": "Exists"}],
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "containers": [container],
        "volumes": volumes,
    }


def _volumes(stream: StreamSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "host-dev", "hostPath": {"path": "/dev", "type": "Directory"}},
        {"name": "host-proc", "hostPath": {"path": "/proc", "type": "Directory"}},
    ]
    mounts: list[dict[str, Any]] = [
        # HostToContainer: device nodes and by-* links udev creates later still show up.
        {"name": "host-dev", "mountPath": HOST_DEV, "mountPropagation": "HostToContainer"},
        {"name": "host-proc", "mountPath": HOST_PROC, "readOnly": True},
    ]
    target = stream.target
    if target.host_dir is not None and target.agent_dir is not None:
        volumes.append(
            {
                "name": "host-target-dir",
                "hostPath": {"path": target.host_dir, "type": "DirectoryOrCreate"},
            }
        )
        mounts.append({"name": "host-target-dir", "mountPath": target.agent_dir})
    source = stream.source
    if source.auth_secret:
        secret = {"secretName": source.auth_secret, "defaultMode": 0o400}
        volumes.append({"name": "auth", "secret": secret})
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
    if source.ca_config_map:
        volumes.append({"name": "ca", "configMap": {"name": source.ca_config_map}})
        mounts.append({"name": "ca", "mountPath": CA_DIR, "readOnly": True})
    return volumes, mounts


def condition_reason(reason: str) -> str:
    """A reason as the CRD's condition schema accepts it (CamelCase, `[A-Za-z0-9_,:]`)."""
    cleaned = re.sub(r"[^A-Za-z0-9_,:]", "", reason).lstrip("0123456789_,:").rstrip(",:")
    return cleaned or "Unknown"


def conditions(
    phase: str,
    reason: str,
    message: str,
    *,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> list[dict[str, Any]]:
    """kstatus conditions for a phase: Ready, Reconciling and Stalled.

    Tools that follow kstatus (Flux, Argo CD, `kubectl wait`) read Reconciling=True as "in
    progress", Stalled=True as "failed, needs a change", Ready=True as done. A condition's
    lastTransitionTime moves only when its status flips.
    """
    wanted = {
        "Ready": phase == "Succeeded",
        "Reconciling": phase in ACTIVE_PHASES,
        "Stalled": phase == "Failed",
    }
    before = {str(item.get("type")): item for item in previous}
    result = []
    for kind, true in wanted.items():
        status = "True" if true else "False"
        old = before.get(kind)
        since = now
        if old is not None and old.get("status") == status and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
        result.append(
            {
                "type": kind,
                "status": status,
                "reason": condition_reason(reason),
                "message": message[:MAX_CONDITION_MESSAGE],
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return result
