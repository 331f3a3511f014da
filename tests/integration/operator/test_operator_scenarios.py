"""End-to-end operator scenarios: the real controller process, real kubectl, real agents.

Every test runs the `imagestream controller` process against the Kubernetes API stand-in on
127.0.0.1, applies the product's CRD and ImageStreams with `kubectl apply` (each manifest first
admitted by the CRD's own schema and CEL rules, which the stand-in does not enforce), and lets
the kubelet stand-in run each agent Job's container command (`imagestream agent`) as a local
process. The agent streams a zstd image from a real nginx, throttled so a stream lasts a few
seconds, onto a real loop device, and the kubelet stand-in reports the outcome as the Job
controller would.

What the stand-ins change for all of these tests (each test names what else it relies on):

- The agent runs as a root process on this host, not in a privileged container: the Pod's
  hostPath `/dev` mounted at `/host/dev` is translated back, so `IMAGESTREAM_TARGET=
  /host/dev/loopN` opens `/dev/loopN`; a real kubelet bind-mounts `/dev` there instead.
- The agent finds the API through `KUBECONFIG` rather than a service-account token, and no
  RBAC limits it to `imagestreams/status`.
- The API stand-in has no admission (the manifests are admitted by the CRD's rules in the test)
  and no garbage collector (the controller deletes Jobs and Pods itself; the kubelet stand-in
  deletes a deleted Job's Pods, as the collector would).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml
from tests.support.blockdev import LoopDeviceFactory, mounted_ext4
from tests.support.blockdev import run as run_command
from tests.support.controller import ControllerFactory, ControllerProcess, metric_value
from tests.support.cosi import build_cosi
from tests.support.crd import CRD_PATH
from tests.support.extension_images import build_extension_image, make_host_root
from tests.support.kube_api import KubeApi
from tests.support.kubectl import Kubectl
from tests.support.kubelet import OOM_EXIT_CODE, Kubelet, KubeletFactory, PodRun
from tests.support.nginx import Nginx, NginxFactory
from tests.support.targets import MIB, fill_pattern, read_device, sha384_of
from tests.support.tools import require_tool, wait_until

from imagestream.demo.image import SampleImage, iter_raw_data, write_sample_image
from imagestream.errors import Cancelled, IntegrityError
from imagestream.targets.extension import DIRECTORIES

GROUP = "imagestream.dev"
VERSION = "v1alpha1"
PLURAL = "imagestreams"
NODE = "node-7"
LABEL_UID = "imagestream.dev/uid"
#: 24 MiB of sample data compress to 8-10 MiB; at 2 MiB/s a stream lasts about 4 s, long
#: enough for progress reports from its middle (one a second).
RAW_SIZE = 24 * MIB
#: About 7 s: the stream outlasts a 3 s API outage that starts once it streams.
LONG_RAW_SIZE = 48 * MIB
DEVICE_SIZE = 64 * MIB
THROTTLE = "limit_rate 2m;"
#: "Mid-stream": bytes written, less than this share of the source fetched.
MID_STREAM = 0.8
#: Generous: a stream lasts seconds, a controller starts in one or two.
TIMEOUT = 45.0
#: The agent's status writes: at most one per report interval (1 s), plus the final one.
REPORT_INTERVAL = 1.0
#: kubelet stand-in: a process killed by SIGKILL is reported with 128 + 9.
SIGKILL_EXIT_CODE = 128 + signal.SIGKILL
CONDITIONS = {
    "Succeeded": {"Ready": "True", "Reconciling": "False", "Stalled": "False"},
    "Failed": {"Ready": "False", "Reconciling": "False", "Stalled": "True"},
}

Json = dict[str, Any]


def extension_dirs() -> list[str]:
    """The host directories an extension target's Job mounts."""
    return list(DIRECTORIES.values())


@dataclass(frozen=True)
class Image:
    """A sample image served by nginx."""

    url: str
    sample: SampleImage


@dataclass(frozen=True, kw_only=True)
class Stand:
    """One test's cluster: API stand-in, kubectl, kubelet stand-in, controller, nginx, devices."""

    api: KubeApi
    kubectl: Kubectl
    kubelet: Kubelet
    controller: ControllerProcess
    nginx: Nginx
    docroot: Path
    devices: LoopDeviceFactory
    namespace: str
    #: The node's filesystem for hostPath volumes other than /dev and /proc (the extension
    #: directories), so no test writes this machine's own /var/lib; None: not served.
    host_root: Path | None = None

    # -- inputs -------------------------------------------------------------------------------

    def image(self, seed: int, raw_size: int = RAW_SIZE) -> Image:
        """A zstd sample image in nginx's docroot; its first MiB is not all zeros."""
        filename = f"image-{seed}-{raw_size}.raw.zst"
        sample = write_sample_image(self.docroot / filename, raw_size, seed=seed)
        head = b"".join(iter_raw_data(MIB, seed=seed))
        assert head != bytes(MIB), "an invalid target would look like this image"
        return Image(self.nginx.url_for(filename), sample)

    def device(self) -> Path:
        """A loop device whose first MiBs hold a pattern (neither zeros nor an image)."""
        device = self.devices(DEVICE_SIZE)
        fill_pattern(device, 2 * MIB)
        return device

    def apply(
        self,
        name: str,
        image: Image,
        device: Path,
        *,
        sha384: str | None = None,
        target: Json | None = None,
    ) -> None:
        """`kubectl apply -f -` an ImageStream writing `image` onto `device` of NODE (or onto
        `target`, a whole `spec.target`)."""
        manifest = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ImageStream",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "nodeName": NODE,
                "source": {
                    "url": image.url,
                    "sha384": sha384 or image.sample.sha384,
                    "compression": "zstd",
                },
                "target": target or {"device": str(device)},
            },
        }
        # The API stand-in admits it by the CRD's schema and CEL rules, as a real server does.
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    # -- reading ------------------------------------------------------------------------------

    def ims(self, name: str) -> Json:
        """The ImageStream as kubectl reads it."""
        found: Json = self.kubectl.json("get", "ims", name)
        return found

    def table_row(self, name: str) -> dict[str, str]:
        """`kubectl get ims NAME`: the printer columns by header ("" for an empty cell)."""
        header, row = self.kubectl("get", "ims", name).stdout.splitlines()
        # kubectl aligns every cell under its header, and leaves empty cells blank.
        starts = [found.start() for found in re.finditer(r"\S+", header)]
        ends = [*starts[1:], None]
        names = header.split()
        return {
            key: row[start:end].strip() for key, start, end in zip(names, starts, ends, strict=True)
        }

    def table_until_finished(self, name: str, timeout: float = TIMEOUT) -> list[dict[str, str]]:
        """Poll `kubectl get ims NAME` until the phase is final; every row seen before that."""
        deadline = time.monotonic() + timeout
        rows = []
        while (row := self.table_row(name))["PHASE"] not in CONDITIONS:
            rows.append(row)
            assert time.monotonic() < deadline, f"no outcome within {timeout} s: {rows[-3:]}"
        return rows

    def wait(
        self, name: str, predicate: Callable[[Json], bool], what: str, timeout: float = TIMEOUT
    ) -> Json:
        """Wait until the ImageStream exists and `predicate(its status)` holds."""
        found = self.api.wait_for(
            GROUP,
            PLURAL,
            self.namespace,
            name,
            lambda obj: obj is not None and predicate(obj.get("status") or {}),
            timeout=timeout,
            what=what,
        )
        assert found is not None
        return found

    def wait_streaming(self, name: str, generation: int = 1) -> str:
        """Wait until the status shows `generation` Running with bytes fetched; its Job name."""
        found = self.wait(
            name,
            lambda status: (
                status.get("phase") == "Running"
                and status.get("observedGeneration") == generation
                and (status.get("progress") or {}).get("bytesFetched", 0) > 0
            ),
            f"generation {generation} streaming",
        )
        return str(found["status"]["jobName"])

    def agent_mid_stream(self, name: str) -> PodRun:
        """Wait for a progress report of `name`'s agent from the middle of its stream: bytes
        written (so the target was touched), under MID_STREAM of the source fetched (so the
        stream has a second or so left); return the agent's run.

        The agent's own report (seen at the API within milliseconds), not the controller's
        Running, which lags it by up to a second: a short stream may be nearly done by then.
        """

        def mid_stream() -> bool:
            return any(
                patch["bytesWritten"] > 0
                and patch["bytesFetched"] < MID_STREAM * patch.get("bytesTotal", 0)
                for patch in self.agent_status_patches(name)
            )

        wait_until(mid_stream, TIMEOUT, what=f"{name}'s agent mid-stream", interval=0.005)
        job = self.api.get(GROUP, PLURAL, self.namespace, name)["status"]["jobName"]
        return self.kubelet.wait_for_pod(job)

    def wait_finished(self, name: str, generation: int = 1) -> Json:
        """Wait for an outcome of `generation`; the ImageStream as kubectl then reads it."""
        self.wait(
            name,
            lambda status: (
                status.get("phase") in CONDITIONS and status.get("observedGeneration") == generation
            ),
            f"an outcome of generation {generation}",
        )
        return self.ims(name)

    def wait_gone(self, name: str) -> None:
        """Wait until the ImageStream no longer exists."""
        self.api.wait_for(
            GROUP, PLURAL, self.namespace, name, lambda obj: obj is None, timeout=TIMEOUT
        )

    def jobs(self, uid: str) -> list[Json]:
        """The agent Jobs of the ImageStream with `uid`."""
        return self.api.objects(
            "batch", "jobs", self.namespace, label_selector=f"{LABEL_UID}={uid}"
        )

    def pods(self, uid: str) -> list[Json]:
        """The agent Pods of the ImageStream with `uid`."""
        return self.api.objects("", "pods", self.namespace, label_selector=f"{LABEL_UID}={uid}")

    def events(self, name: str) -> list[tuple[str, str]]:
        """(type, reason) of the Events about the ImageStream `name`, as kubectl lists them."""
        listed = self.kubectl.json("get", "events", f"--field-selector=involvedObject.name={name}")
        return [(item["type"], item["reason"]) for item in listed["items"]]

    def job_creations(self) -> list[str]:
        """Names of the Jobs POSTed so far, in order."""
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        return [
            str(request.body["metadata"]["name"])
            for request in self.api.requests
            if request.method == "POST" and request.path == path
        ]

    def agent_status_patches(self, name: str) -> list[Json]:
        """The progress the agents PATCHed into `name`'s status (kopf's own patches left out)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{name}/status"
        # The agent's patches are JSON patches: a uid test, then the add of status.progress.
        return [
            request.body[-1]["value"]
            for request in self.api.requests
            if request.method == "PATCH"
            and request.path == path
            and not request.user_agent.startswith("kopf")
        ]

    def agent_logs(self) -> str:
        """Every agent process's output, for a failing test's report."""
        return "\n".join(
            f"--- agent {run.pod_name} (exit {run.exit_code}) ---\n{run.log_text()}"
            for run in self.kubelet.processes
        )


def agent_result(pod: Json) -> Json:
    """The agent's verdict: the JSON termination message the kubelet put into the Pod."""
    (container,) = pod["status"]["containerStatuses"]
    result: Json = json.loads(container["state"]["terminated"]["message"])
    return result


def expected_job_name(name: str, uid: str, generation: int) -> str:
    """`NAME-<sha256(uid)[:8]>-g<generation>`, as the design names agent Jobs."""
    return f"{name}-{hashlib.sha256(uid.encode()).hexdigest()[:8]}-g{generation}"


def only_run(kubelet: Kubelet, job: str) -> PodRun:
    """The single Pod run of `job`, after its exit was reported."""
    run = kubelet.wait_for_exit(job, timeout=TIMEOUT)
    assert len(kubelet.runs(job)) == 1, "backoffLimit 0: the Job never retries"
    assert run.node_name == NODE
    return run


def assert_outcome(
    stand: Stand, name: str, *, phase: str, reason: str, device: Path, generation: int = 1
) -> Json:
    """The status records `phase`/`reason` for `generation`, consistently; return the status."""
    obj = stand.wait_finished(name, generation)
    status: Json = obj["status"]
    uid = obj["metadata"]["uid"]
    assert (status["phase"], status["reason"]) == (phase, reason), status.get("message")
    assert status["observedGeneration"] == generation
    assert status["jobName"] == expected_job_name(name, uid, generation)
    assert status["target"] == str(device)
    assert status["startTime"]
    assert status["completionTime"]
    conditions = {item["type"]: item for item in status["conditions"]}
    assert {kind: item["status"] for kind, item in conditions.items()} == CONDITIONS[phase]
    for item in conditions.values():
        assert (item["reason"], item["observedGeneration"]) == (reason, generation)
    kind = "Normal" if phase == "Succeeded" else "Warning"
    assert (kind, reason) in stand.events(name)
    assert stand.table_row(name)["PHASE"] == phase
    return status


def assert_succeeded(
    stand: Stand, name: str, image: Image, device: Path, *, generation: int = 1
) -> Json:
    """A verified success of `image` on `device`: status, Job, Pod, agent and device agree."""
    status = assert_outcome(
        stand, name, phase="Succeeded", reason="Succeeded", device=device, generation=generation
    )
    sample = image.sample
    assert status["sha384"] == sample.sha384
    progress = status["progress"]
    # The agent's last report, sent when the stream ended: the whole image.
    assert (progress["bytesFetched"], progress["bytesTotal"]) == (sample.compressed_size,) * 2
    assert progress["bytesWritten"] == sample.raw_size
    assert progress["percent"] == 100
    job = stand.api.get("batch", "jobs", stand.namespace, status["jobName"])
    assert {item["type"] for item in job["status"]["conditions"]} >= {"Complete"}
    run = only_run(stand.kubelet, status["jobName"])
    assert run.exit_code == 0, run.log_text()
    assert_device_holds(device, sample)
    return status


def assert_failed(stand: Stand, name: str, reason: str, device: Path) -> tuple[Json, PodRun]:
    """A failure with `reason`: status, Job and device agree; return the status and the run."""
    status = assert_outcome(stand, name, phase="Failed", reason=reason, device=device)
    assert status.get("sha384") is None, "no SHA-384 is reported for a failed stream"
    job = stand.api.get("batch", "jobs", stand.namespace, status["jobName"])
    assert {item["type"] for item in job["status"]["conditions"]} >= {"Failed"}
    assert_device_invalid(device)
    return status, only_run(stand.kubelet, status["jobName"])


def assert_device_holds(device: Path, sample: SampleImage) -> None:
    """The device starts with the image's raw bytes."""
    assert sha384_of(device, sample.raw_size) == sample.raw_sha384


def assert_device_invalid(device: Path) -> None:
    """The target does not look valid: its first MiB is zeros (the pattern is gone too)."""
    assert read_device(device, MIB) == bytes(MIB)


def assert_no_agent(stand: Stand, uid: str) -> None:
    """No Job, no Pod and no running process is left of the ImageStream with `uid`."""
    assert stand.jobs(uid) == []
    assert stand.pods(uid) == []
    assert all(run.exit_code is not None for run in stand.kubelet.processes)


@contextlib.contextmanager
def paused(run: PodRun) -> Iterator[None]:
    """Freeze the agent (SIGSTOP to its process group) for the block.

    Its stream cannot end meanwhile however slow the machine is, which pins "mid-stream"
    down; to the controller and the API nothing changes (the Pod runs, as on a slow link).
    A signal sent meanwhile (the kubelet's SIGTERM) is delivered when it resumes; a SIGKILL
    ends it at once.
    """
    assert run.pid is not None
    os.killpg(run.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile
            os.killpg(run.pid, signal.SIGCONT)


def wait_terminating(run: PodRun) -> None:
    """Wait until the kubelet stand-in has sent the agent SIGTERM (its Pod is being deleted)."""
    wait_until(lambda: run.terminating, TIMEOUT, what=f"SIGTERM to the agent {run.pod_name}")


class OverlapMonitor:
    """Samples the kubelet's processes: the most agents that ran on one device at once."""

    def __init__(self, kubelet: Kubelet, device: Path, interval: float = 0.005) -> None:
        self.kubelet = kubelet
        self.device = str(device)
        self.interval = interval
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="overlap-monitor", daemon=True)

    def __enter__(self) -> OverlapMonitor:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            running = [
                run
                for run in self.kubelet.processes
                if run.env.get("IMAGESTREAM_TARGET") == self.device
                and run.popen is not None
                and run.popen.poll() is None
            ]
            self.most = max(self.most, len(running))


@pytest.fixture
def stand(
    *,
    kube_api: KubeApi,
    kubectl: Kubectl,
    kubelet_factory: KubeletFactory,
    controller_factory: ControllerFactory,
    nginx_factory: NginxFactory,
    nginx_docroot: Path,
    loop_device_factory: LoopDeviceFactory,
    operator_namespace: str,
    tmp_path: Path,
) -> Iterator[Stand]:
    """The CRD applied, a kubelet serving NODE, the controller started, a throttled nginx.

    The CRD comes first: the controller finds the resource when it starts, as in a cluster
    where the chart installs the CRD before the Deployment.
    """
    kubectl("apply", "-f", str(CRD_PATH))
    nginx = nginx_factory(nginx_docroot, extra_server_config=THROTTLE)
    host_root = make_host_root(tmp_path / "node-root")
    kubelet = kubelet_factory(
        nodes=[NODE],
        host_paths={directory: host_root / directory.lstrip("/") for directory in extension_dirs()},
    )
    stand = Stand(
        api=kube_api,
        kubectl=kubectl,
        kubelet=kubelet,
        controller=controller_factory(),
        nginx=nginx,
        docroot=nginx_docroot,
        devices=loop_device_factory,
        namespace=operator_namespace,
        host_root=host_root,
    )
    yield stand
    print(stand.agent_logs())
    assert kubelet.errors == [], "the kubelet stand-in could not do what a Pod asked"


# -- scenarios ----------------------------------------------------------------------------------


def test_success_shows_progress_then_verified_image(stand: Stand) -> None:
    """A stream's progress shows in `kubectl get ims` while it runs; it ends Succeeded with
    the image on the device, Events and metrics, and at most one status write a second.

    Stand-in: the agent's status PATCHes are counted at the API stand-in; a real API server
    would also rate-limit clients (APF), which the agent's own throttle keeps it clear of.
    """
    image = stand.image(seed=1)
    device = stand.device()
    stand.apply("root-b", image, device)

    rows = stand.table_until_finished("root-b")
    running = [
        int(row["PROGRESS"])
        for row in rows
        if row["PHASE"] == "Running" and row["PROGRESS"].isdigit()
    ]
    assert any(0 < percent < 100 for percent in running), rows
    assert all(row["NODE"] == NODE for row in rows)

    status = assert_succeeded(stand, "root-b", image, device)
    events = stand.events("root-b")
    assert {("Normal", "JobCreated"), ("Normal", "Streaming")} <= set(events), events

    run = only_run(stand.kubelet, status["jobName"])
    (pod,) = stand.pods(stand.ims("root-b")["metadata"]["uid"])
    result = agent_result(pod)
    assert (result["outcome"], result["sha384"]) == ("Succeeded", image.sample.sha384)
    patches = stand.agent_status_patches("root-b")
    # One write per report interval while it ran, plus the final one.
    assert 2 <= len(patches) <= math.ceil(result["seconds"] / REPORT_INTERVAL) + 1, patches
    fetched = [patch["bytesFetched"] for patch in patches]
    assert fetched == sorted(fetched)
    assert fetched[-1] == image.sample.compressed_size
    assert run.env["IMAGESTREAM_TARGET"] == str(device)

    page = stand.controller.metrics()
    assert metric_value(page, "imagestream_streams", phase="Succeeded") == 1
    assert metric_value(page, "imagestream_streams", phase="Running") == 0
    assert metric_value(page, "imagestream_bytes_written_total") == image.sample.raw_size
    outcome = {"phase": "Succeeded", "reason": "Succeeded"}
    assert metric_value(page, "imagestream_stream_outcomes_total", **outcome) == 1
    assert metric_value(page, "imagestream_stream_duration_seconds_count", phase="Succeeded") == 1


def test_hash_mismatch_fails_and_leaves_target_invalid(stand: Stand) -> None:
    """A spec whose sha384 is not the image's ends Failed/HashMismatch (Stalled), the agent
    exits with the integrity exit code and the device's first MiB stays zero.

    Stand-in: nothing beyond the module's list; a real kubelet would also keep the agent's log
    for `kubectl logs`, which the stand-in does not serve.
    """
    image = stand.image(seed=1)
    device = stand.device()
    wrong = hashlib.sha384(b"not the image").hexdigest()
    stand.apply("root-b", image, device, sha384=wrong)

    status, run = assert_failed(stand, "root-b", "HashMismatch", device)
    assert run.exit_code == IntegrityError.exit_code
    assert wrong in status["message"]
    assert image.sample.sha384 in status["message"]
    (pod,) = stand.pods(stand.ims("root-b")["metadata"]["uid"])
    result = agent_result(pod)
    assert (result["outcome"], result["reason"]) == ("Failed", "HashMismatch")
    # The whole image was fetched and written (then refused): the report says so.
    assert result["bytesFetched"] == image.sample.compressed_size
    page = stand.controller.metrics()
    outcome = {"phase": "Failed", "reason": "HashMismatch"}
    assert metric_value(page, "imagestream_stream_outcomes_total", **outcome) == 1
    assert metric_value(page, "imagestream_streams", phase="Failed") == 1


@pytest.mark.parametrize(
    ("oom", "reason"), [(False, "AgentCrashed"), (True, "AgentOOMKilled")], ids=["crash", "oom"]
)
def test_agent_killed_mid_stream_fails(stand: Stand, oom: bool, reason: str) -> None:
    """An agent killed mid-stream (no termination message) ends Failed with a reason from
    the container's state, and the device stays invalid. (The agent is paused first, so the
    kill lands mid-stream however slow the machine.)

    Stand-in: the kubelet stand-in SIGKILLs the process and, for `oom`, reports OOMKilled
    itself; a real kubelet learns that from the kernel's cgroup OOM killer. With no JSON
    termination message, a real kubelet would fall back to the log tail as the stand-in does.
    """
    image = stand.image(seed=1)
    device = stand.device()
    stand.apply("root-b", image, device)
    with paused(stand.agent_mid_stream("root-b")):
        job = stand.wait_streaming("root-b")
        killed = stand.kubelet.kill(job, oom=oom)

    status, run = assert_failed(stand, "root-b", reason, device)
    assert run is killed
    assert run.exit_code == (OOM_EXIT_CODE if oom else SIGKILL_EXIT_CODE)
    assert f"code {run.exit_code}" in status["message"]
    # The last progress report is what the agent got to before it died.
    assert 0 < status["progress"]["bytesWritten"] < image.sample.raw_size


def test_delete_while_running_stops_agent_and_cleans_up(stand: Stand) -> None:
    """Deleting a running ImageStream stops its agent (SIGTERM, a clean cancel), removes its
    Job and Pod, and only then lets the object go; the device stays invalid.

    The agent is paused while the deletion is underway, so it is still running when the
    controller acts, however slow the machine.

    Stand-in: the API stand-in has no garbage collector, so the controller's own deletes (and
    the kubelet stand-in's Pod cleanup for a deleted Job) are all that remove the Job and Pod;
    a real cluster's collector would also remove them, after the ownerReference's owner went.
    """
    image = stand.image(seed=1)
    device = stand.device()
    stand.apply("root-b", image, device)
    run = stand.agent_mid_stream("root-b")
    uid = stand.ims("root-b")["metadata"]["uid"]

    with paused(run):
        stand.wait_streaming("root-b")
        stand.kubectl("delete", "ims", "root-b", "--wait=false")
        wait_terminating(run)
        # The finalizer holds the object while its agent still runs.
        held = stand.api.get(GROUP, PLURAL, stand.namespace, "root-b")
        assert held["metadata"]["deletionTimestamp"]
        assert held["metadata"]["finalizers"] == ["imagestream.dev/cleanup"]
    stand.wait_gone("root-b")

    assert only_run(stand.kubelet, run.job_name) is run
    assert run.exit_code == Cancelled.exit_code, run.log_text()
    assert_no_agent(stand, uid)
    assert stand.kubectl("get", "ims", "-o", "name").stdout == ""
    assert_device_invalid(device)
    # Waiting for the agent to stop is the normal course of a deletion: an Event says the
    # stream was cancelled, the log has no error about it.
    assert ("Normal", "Cancelled") in stand.events("root-b")
    log = stand.controller.log_text()
    assert "failed temporarily" not in log
    assert not [line for line in log.splitlines() if " ERROR " in line], log[-3000:]


def test_watches_use_integer_timeouts_a_real_api_server_accepts(stand: Stand) -> None:
    """The controller's watches carry `timeoutSeconds` as an integer: a real API server parses
    it with strconv.ParseInt and refuses `60.0` with 400, and so does the stand-in, so with a
    float no watch would start and no stream would ever leave `Pending`.
    """
    image = stand.image(seed=1)
    device = stand.device()
    stand.apply("root-b", image, device)
    stand.wait(
        "root-b",
        lambda status: status.get("reason") == "JobCreated" or "phase" in status,
        "a status",
    )
    watches = [
        request
        for request in stand.api.requests
        if request.is_watch and request.user_agent.startswith("kopf")
    ]
    watched = {request.path for request in watches}
    assert f"/apis/{GROUP}/{VERSION}/namespaces/{stand.namespace}/{PLURAL}" in watched, watched
    assert all(re.fullmatch(r"[0-9]+", request.params["timeoutSeconds"]) for request in watches)
    assert_succeeded(stand, "root-b", image, device)


def test_pod_security_baseline_refusing_the_agent_fails_the_stream(stand: Stand) -> None:
    """In a namespace whose Pod Security level is `baseline`, the API server refuses the
    privileged agent Pod; the cause is only in the Job's FailedCreate Event. The stream ends
    Failed/AgentPodRejected with the server's message (seen at `kubectl get ims`), its Job is
    deleted, no agent runs and the device is untouched.

    Stand-in: the API stand-in's Pod Security admission checks hostPath volumes, privileged
    containers and host namespaces only; the kubelet stand-in posts the FailedCreate Event once
    (a real Job controller retries with a backoff and counts the Event up).
    """
    stand.kubectl(
        "label", "namespace", stand.namespace, "pod-security.kubernetes.io/enforce=baseline"
    )
    image = stand.image(seed=1)
    device = stand.device()
    before = read_device(device, 2 * MIB)
    stand.apply("root-b", image, device)

    obj = stand.wait_finished("root-b")
    status = obj["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "AgentPodRejected"), status
    assert 'violates PodSecurity "baseline:latest"' in status["message"]
    assert "hostPath volumes" in status["message"]
    assert "privileged" in status["message"]
    assert stand.table_row("root-b")["PHASE"] == "Failed"
    assert "AgentPodRejected" in stand.kubectl("get", "ims", "root-b", "-o", "wide").stdout
    assert ("Warning", "AgentPodRejected") in stand.events("root-b")
    job = status["jobName"]
    assert stand.kubelet.refusals(job), "the API server refused the agent Pod"
    stand.api.wait_for(
        "batch", "jobs", stand.namespace, job, lambda found: found is None, timeout=TIMEOUT
    )
    assert stand.kubelet.runs(job) == []
    assert read_device(device, 2 * MIB) == before
    page = stand.controller.metrics()
    outcome = {"phase": "Failed", "reason": "AgentPodRejected"}
    assert metric_value(page, "imagestream_stream_outcomes_total", **outcome) == 1


def test_spec_change_mid_stream_replaces_the_stream(stand: Stand) -> None:
    """Applying a new source while generation 1 streams cancels it (Job deleted, agent
    stopped), then generation 2's Job writes the new image and ends Succeeded.

    The gen-1 agent is paused until it is told to stop, so the change lands mid-stream
    however slow the machine.

    Stand-in: the kubelet stand-in deletes the gen-1 Pod when its Job is deleted (the real
    garbage collector would; the controller deletes the Pod too).
    """
    first, second = stand.image(seed=1), stand.image(seed=2)
    device = stand.device()
    with OverlapMonitor(stand.kubelet, device) as monitor:
        stand.apply("root-b", first, device)
        old = stand.agent_mid_stream("root-b")
        with paused(old):
            stand.wait_streaming("root-b")
            stand.apply("root-b", second, device)
            assert stand.ims("root-b")["metadata"]["generation"] == 2
            wait_terminating(old)
        status = assert_succeeded(stand, "root-b", second, device, generation=2)
    assert monitor.most == 1, "the gen-2 agent started before the gen-1 agent stopped"

    old_job = old.job_name
    assert only_run(stand.kubelet, old_job) is old
    assert old.exit_code == Cancelled.exit_code, old.log_text()
    assert stand.api.find("batch", "jobs", stand.namespace, old_job) is None
    uid = stand.ims("root-b")["metadata"]["uid"]
    assert [job["metadata"]["name"] for job in stand.jobs(uid)] == [status["jobName"]]
    assert stand.job_creations() == [old_job, status["jobName"]]
    assert ("Normal", "Cancelling") in stand.events("root-b")


def test_two_streams_to_one_target_run_one_after_the_other(stand: Stand) -> None:
    """A second ImageStream for the same node and device waits (Pending/TargetBusy) while the
    first one's agent writes, then runs; the device ends holding the second image.

    The first agent is paused until the second stream waits, so they overlap however slow
    the machine.

    Stand-in: the kubelet stand-in runs Pods as soon as they are bound; a real node could
    also hold a Pod in ContainerCreating, which the controller treats as holding the target.
    """
    first, second = stand.image(seed=1), stand.image(seed=2)
    device = stand.device()
    with OverlapMonitor(stand.kubelet, device) as monitor:
        stand.apply("first", first, device)
        with paused(stand.agent_mid_stream("first")):
            stand.wait_streaming("first")
            stand.apply("second", second, device)
            waiting = stand.wait(
                "second",
                lambda status: (
                    (status.get("phase"), status.get("reason")) == ("Pending", "TargetBusy")
                ),
                "second to wait for the target",
            )
        assert "first" in waiting["status"]["message"]
        assert_succeeded(stand, "first", first, device)
        assert_succeeded(stand, "second", second, device)
    assert monitor.most == 1, "two agents wrote the device at once"
    assert ("Normal", "TargetBusy") in stand.events("second")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_controller_restart_mid_stream_adopts_the_job(stand: Stand, sig: signal.Signals) -> None:
    """A controller stopped (crash or rollout) while the agent streams is replaced by a new
    process, which finds the running Job instead of creating another, and records Succeeded.

    The agent is paused while the controller restarts, so the new controller meets a running
    stream however slow the machine.

    Stand-in: the API stand-in keeps every object across the restart as etcd would; a real
    API server may also answer the new controller's first watch with 410 Gone after a long
    gap, which kopf handles by listing again.
    """
    image = stand.image(seed=1)
    device = stand.device()
    stand.apply("root-b", image, device)
    with paused(stand.agent_mid_stream("root-b")):
        job = stand.wait_streaming("root-b")
        stand.controller.restart(sig=sig)
    assert stand.controller.exit_codes == [0 if sig == signal.SIGTERM else -sig]

    status = assert_succeeded(stand, "root-b", image, device)
    assert status["jobName"] == job
    assert stand.job_creations() == [job]
    uid = stand.ims("root-b")["metadata"]["uid"]
    assert [item["metadata"]["name"] for item in stand.jobs(uid)] == [job]


def test_api_outage_during_progress_reporting(stand: Stand) -> None:
    """The API going away for a few seconds while the agent reports progress costs status
    freshness only: the agent keeps streaming, reports again afterwards, and the stream ends
    Succeeded.

    Stand-in: the outage closes the listening socket, so clients get "connection refused" at
    once; a real outage (an API server restart, a network partition) can also leave requests
    hanging until their timeouts, and a real API server may answer resumed watches with 410
    Gone. The objects survive, as etcd keeps them.
    """
    image = stand.image(seed=1, raw_size=LONG_RAW_SIZE)
    device = stand.device()
    stand.apply("root-b", image, device)
    run = stand.agent_mid_stream("root-b")
    before = stand.agent_status_patches("root-b")

    with stand.api.down():
        time.sleep(3)
    assert run.exit_code is None, "the stream ended during the outage: nothing was tested"

    assert_succeeded(stand, "root-b", image, device)
    after = stand.agent_status_patches("root-b")[len(before) :]
    assert any(patch["phase"] == "Running" for patch in after), "no progress after the outage"
    assert after[0]["bytesFetched"] > before[-1]["bytesFetched"]
    assert "status progress update failed" in run.log_text()


def test_missing_device_fails_target_not_found(stand: Stand) -> None:
    """A `spec.target.device` the node does not have ends Failed/TargetNotFound, naming the
    device as the host knows it; nothing is created in the node's /dev.

    Stand-in: the kubelet stand-in translates the agent's `/host/dev/...` back to `/dev/...`,
    so this agent opens the path without the `/host` prefix a real Pod sees; the prefixed
    case (where a missing device used to become a new regular file) is covered by
    `tests/integration/test_agent.py::test_a_missing_device_fails_target_not_found_and_creates_nothing`.
    """
    image = stand.image(seed=1)
    missing = Path(f"/dev/disk/by-partlabel/imagestream-missing-{os.getpid()}")
    stand.apply("root-b", image, missing)

    status = assert_outcome(
        stand, "root-b", phase="Failed", reason="TargetNotFound", device=missing
    )
    assert str(missing) in status["message"]
    assert "/host" not in status["message"]
    assert status.get("sha384") is None
    run = only_run(stand.kubelet, status["jobName"])
    assert run.exit_code == 5, run.log_text()
    assert not missing.exists()


def test_cosi_image_onto_a_whole_disk(stand: Stand, tmp_path: Path) -> None:
    """`spec.target.disk`: a COSI image (real ext4 and FAT, a real GPT) streams through the
    agent Job onto a whole loop disk; the status names the disk and the agent's progress the
    partition image it writes; the GPT verifies with sgdisk and the partitions hold the images.

    Stand-in: nothing beyond the module's list (the loop disk is larger than the image's disk:
    the backup GPT goes to its end, as on a real node).
    """
    image = build_cosi(tmp_path / "cosi")
    os.link(image.path, stand.docroot / "disk.cosi")
    disk = stand.devices(DEVICE_SIZE)
    fill_pattern(disk, 2 * MIB)
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageStream",
        "metadata": {"name": "whole-disk", "namespace": stand.namespace},
        "spec": {
            "nodeName": NODE,
            "source": {"url": stand.nginx.url_for("disk.cosi"), "sha384": image.metadata_sha384},
            "target": {"disk": str(disk)},
        },
    }
    stand.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    status = assert_outcome(stand, "whole-disk", phase="Succeeded", reason="Succeeded", device=disk)
    assert status["sha384"] == image.metadata_sha384
    progress = status["progress"]
    assert progress["bytesFetched"] == progress["bytesTotal"] == image.path.stat().st_size
    assert progress["bytesWritten"] == sum(part.raw.stat().st_size for part in image.partitions)
    assert (progress["partition"], progress["partitions"]) == (2, 2)
    run = only_run(stand.kubelet, status["jobName"])
    assert run.env["IMAGESTREAM_TARGET_KIND"] == "disk"
    assert "No problems found" in run_command([require_tool("sgdisk"), "-v", disk])
    for part in image.partitions:
        raw = part.raw.read_bytes()
        assert read_device(disk, len(raw), part.offset) == raw


def test_ab_update_writes_the_volume_the_node_does_not_run_from(
    stand: Stand, tmp_path: Path
) -> None:
    """An abUpdate pair on a node whose / is volume A (a real ext4 on a loop device, mounted):
    the agent writes B, status.target and the Succeeded Event name it, A is untouched.

    Stand-in: the node's /proc (the agent's host-proc hostPath volume) is a directory whose
    `1/mountinfo` holds this machine's real mountinfo line of A's mount, its mount point shown
    as `/`, as the node's PID 1 would show its root; sysfs is this machine's own.
    """
    image = stand.image(seed=5)
    volume_a, volume_b = stand.device(), stand.device()
    with mounted_ext4(volume_a, tmp_path / "root-a", read_only=True) as root_a:
        line = next(
            fields
            for fields in map(str.split, Path("/proc/self/mountinfo").read_text().splitlines())
            if fields[4] == str(root_a)
        )
        line[4] = "/"
        node_proc = tmp_path / "node-proc"
        (node_proc / "1").mkdir(parents=True)
        (node_proc / "1/mountinfo").write_text(" ".join(line) + "\n")
        (node_proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
        stand.kubelet.host_paths["/proc"] = node_proc
        before = read_device(volume_a, 2 * MIB)
        volumes = [str(volume_a), str(volume_b)]
        stand.apply("root", image, volume_b, target={"abUpdate": {"volumes": volumes}})

        status = assert_succeeded(stand, "root", image, volume_b)
        assert read_device(volume_a, 2 * MIB) == before, "the running volume was written"
    run = only_run(stand.kubelet, status["jobName"])
    assert run.env["IMAGESTREAM_TARGET_KIND"] == "abUpdate"
    assert (run.env["IMAGESTREAM_TARGET"], run.env["IMAGESTREAM_TARGET_B"]) == tuple(volumes)
    assert stand.table_row("root")["TARGET"] == str(volume_b)
    listed = stand.kubectl.json("get", "events", "--field-selector=involvedObject.name=root")
    [succeeded] = [item for item in listed["items"] if item["reason"] == "Succeeded"]
    assert succeeded["message"] == (
        f"wrote {volume_b}, the inactive A/B volume ({volume_a} runs the node): SHA-384 verified"
    )


def test_a_sysext_lands_in_the_nodes_extension_directory_then_is_already_current(
    stand: Stand,
) -> None:
    """`target.extension` end to end: the Job mounts the node's /var/lib/extensions (stand-in:
    the kubelet serves that hostPath from `stand.host_root`), the agent writes tools.raw into
    it, and a second ImageStream for the same image finds it current and rewrites nothing."""
    assert stand.host_root is not None
    image = build_extension_image(stand.docroot, "tools", seed=21)
    written = stand.host_root / "var/lib/extensions/tools.raw"
    url = stand.nginx.url_for(image.compressed.name)

    def apply(name: str) -> None:
        manifest = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ImageStream",
            "metadata": {"name": name, "namespace": stand.namespace},
            "spec": {
                "nodeName": NODE,
                "source": {
                    "url": url,
                    "sha384": image.sha384,
                },
                "target": {"extension": {"type": "sysext", "name": "tools"}},
            },
        }
        stand.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    apply("tools")
    status = stand.wait_finished("tools")["status"]

    assert (status["phase"], status["reason"]) == ("Succeeded", "Succeeded"), status.get("message")
    assert status["target"] == "/var/lib/extensions/tools.raw"
    assert status["sha384"] == image.sha384
    assert written.read_bytes() == image.raw_bytes
    run = only_run(stand.kubelet, status["jobName"])
    assert (run.env["IMAGESTREAM_TARGET_KIND"], run.env["IMAGESTREAM_TARGET"]) == (
        "sysext",
        "tools",
    )
    assert stand.table_row("tools")["TARGET"] == "/var/lib/extensions/tools.raw"
    before = written.stat()

    apply("tools-again")
    again = stand.wait_finished("tools-again")["status"]

    assert again["phase"] == "Succeeded", again.get("message")
    assert "already current, not rewritten" in again["message"]
    after = written.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
