"""A kubelet and Job controller stand-in: runs each Job's container command as a local process.

It is a client of the API stand-in (:mod:`tests.support.kube_api`) like the real components are
clients of a real API server: it lists and watches Jobs and Pods over HTTP, creates a Pod per
attempt, runs the Pod's single container as a local process with the Pod's environment and
volumes, and reports the outcome in the Pod's and the Job's status. It never reaches into the
stand-in's memory, so it works against any API server.

How it differs from a real kubelet and Job controller (tests relying on one of these say so):

- **No containers.** The image is ignored; ``command`` + ``args`` run on the host (resolved on
  the ``PATH`` the stand-in was given), as root, with no namespaces or cgroups. Volumes are not
  mounted: a Secret/ConfigMap volume is written into a directory per Pod, an ``emptyDir`` is a
  directory per Pod, a ``hostPath`` is the host path itself (or the directory
  :attr:`Kubelet.host_paths` maps it to: the node as a test sets it up, e.g. a ``/proc`` whose
  ``1/mountinfo`` shows the root file system the test chose). Because the process sees the host's
  file system, **paths are translated**: every argument and env value that equals or starts with
  a volumeMount's ``mountPath`` (or the ``terminationMessagePath``) is rewritten to where the
  stand-in put that volume (``subPath`` is honoured). A path built inside the process, or one
  embedded in a longer argument (``--opt=/mnt/x``), is not translated. ``readOnly`` is not
  enforced. A real kubelet mounts the volumes at the real paths in the container's mount
  namespace.
- **API credentials:** a real Pod gets a service-account token under
  ``/var/run/secrets/kubernetes.io/serviceaccount`` and ``KUBERNETES_SERVICE_HOST``/``PORT``;
  the kubernetes client reads those fixed paths, which a local process cannot have. The
  stand-in sets ``KUBECONFIG`` instead (when given a kubeconfig), so a program that calls
  ``kubernetes.config.load_config()`` finds the API either way.
- The environment holds only what the Pod defines plus ``PATH``, ``HOSTNAME`` and
  ``KUBECONFIG``. Only the first container runs; init containers and probes are ignored.
- **Scheduling:** the stand-in binds each Pod itself (``spec.nodeName`` is set when the Pod is
  created, not by a later binding): to its ``nodeName``, else the node a required node affinity
  (``matchFields`` ``metadata.name In``) or a ``kubernetes.io/hostname`` node selector names,
  else the first node. Resources, taints and other affinities are not looked at. With
  ``nodes=None`` every Pod runs whatever its node; with a list of node names, Node objects are
  registered and only Pods bound to them run (others stay Pending, as on a node with no
  kubelet).
- **Pod refused:** when the API server refuses a Job's Pod (403, e.g. Pod Security in a
  namespace labelled ``pod-security.kubernetes.io/enforce=baseline``), the stand-in posts the
  Job controller's ``FailedCreate`` Warning Event on the Job (``Error creating: <the server's
  message>``) and, unlike the real controller, does not try again (a real one retries with a
  backoff and counts the Event up).
- **Job controller:** one Pod at a time (``parallelism``/``completions`` > 1 are not
  modelled), a failed Pod is replaced at once (the real controller backs off 10 s, 20 s, ...),
  ``restartPolicy: OnFailure`` is treated as ``Never`` (a new Pod per retry, not a container
  restart). Conditions: ``SuccessCriteriaMet`` + ``Complete``, or ``FailureTarget`` +
  ``Failed`` (reasons ``BackoffLimitExceeded``, ``DeadlineExceeded``), as Kubernetes 1.32 sets
  them. ``ttlSecondsAfterFinished`` deletes the Job, as the TTL controller does.
- **Garbage collection:** when a Job is deleted (or gets a ``deletionTimestamp``), its Pods are
  deleted by the stand-in — the real garbage collector does that; nothing else is collected.
- **Termination:** deleting a Pod (or its Job) sends SIGTERM to the process, then SIGKILL to its
  whole process group after the grace period (``deletionGracePeriodSeconds``, else the Pod's
  ``terminationGracePeriodSeconds``, default 30; :attr:`Kubelet.max_grace_seconds` caps it for
  tests). The API stand-in keeps a deleted, bound, running Pod with a ``deletionTimestamp``
  until this stand-in confirms the kill, as a real API server and kubelet do.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from .kube_store import JSON, now_rfc3339

#: Where a container's termination message goes unless the Pod says otherwise.
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
#: The kubelet reads at most this much of the termination message file.
TERMINATION_MESSAGE_LIMIT = 4096
#: FallbackToLogsOnError takes at most this much / these many lines from the end of the log.
LOG_FALLBACK_BYTES = 2048
LOG_FALLBACK_LINES = 80
DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_BACKOFF_LIMIT = 6
OOM_EXIT_CODE = 137
JOBS = "/apis/batch/v1"
#: The node a Pod with no node preference is bound to when the stand-in serves any node.
DEFAULT_NODE = "standin-node"
CORE = "/api/v1"


#: What the ``kubelet_factory`` fixture is: ``factory(**Kubelet options) -> started Kubelet``.
KubeletFactory = Callable[..., "Kubelet"]


class KubeletError(RuntimeError):
    """The stand-in could not do what the Pod asked (unreachable API, bad volume, ...)."""


@dataclass
class PodRun:
    """One Pod the stand-in runs; tests read its attributes (do not modify them).

    ``popen`` is None until the process started (or when it could not start); ``exit_code`` and
    ``reason`` are set once the exit has been reported to the API.
    """

    namespace: str
    job_name: str
    job_uid: str
    pod_name: str
    workdir: Path
    log_path: Path
    termination_path: Path
    node_name: str = ""
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    exit_code: int | None = None
    reason: str | None = None
    message: str = ""
    #: Set by :meth:`Kubelet.kill` (report OOMKilled) or :meth:`Kubelet.node_lost`.
    oom: bool = False
    node_lost: bool = False
    #: Set once SIGTERM was sent because the Pod (or its Job) is being deleted.
    terminating: bool = False
    reported: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int | None:
        """The process id, or None when no process started."""
        return None if self.popen is None else self.popen.pid

    def log_text(self) -> str:
        """What the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class _JobRun:
    namespace: str
    name: str
    uid: str
    spec: JSON
    pods: list[PodRun] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    start_time: str = ""
    finished: bool = False
    gone: bool = False
    deadline_exceeded: bool = False
    timers: list[threading.Timer] = field(default_factory=list)
    #: The API server's answers to the Pods it refused (403), one per attempt.
    refused: list[str] = field(default_factory=list)

    @property
    def active(self) -> PodRun | None:
        return next((pod for pod in reversed(self.pods) if pod.exit_code is None), None)


@dataclass(frozen=True)
class _Mount:
    """Where a volumeMount's ``mount_path`` really is on the host."""

    mount_path: str
    local_path: str


def translate_path(value: str, mounts: Sequence[_Mount]) -> str:
    """Rewrite ``value`` if it is, or lies under, one of the mount paths (longest first)."""
    for mount in sorted(mounts, key=lambda item: len(item.mount_path), reverse=True):
        base = mount.mount_path.rstrip("/") or "/"
        if value == base:
            return mount.local_path
        prefix = base if base.endswith("/") else base + "/"
        if value.startswith(prefix):
            return str(Path(mount.local_path) / value[len(prefix) :])
    return value


def tail_of_log(path: Path) -> str:
    """The end of a log as FallbackToLogsOnError takes it (2048 bytes, 80 lines at most)."""
    try:
        data = path.read_bytes()[-LOG_FALLBACK_BYTES:]
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()[-LOG_FALLBACK_LINES:]
    return "\n".join(lines)


class Kubelet:
    """The stand-in; ``with Kubelet(api_url, ["ns"], workdir) as kubelet: ...``.

    ``path`` is the ``PATH`` processes get (executables are resolved on it); ``kubeconfig`` is
    given to processes as ``KUBECONFIG``; ``max_grace_seconds`` caps termination grace periods;
    ``host_paths`` serves hostPath volumes from other directories (see :attr:`host_paths`).
    """

    def __init__(
        self,
        api_url: str,
        namespaces: Sequence[str],
        workdir: Path,
        *,
        token: str = "test-token",
        nodes: Sequence[str] | None = None,
        path: str | None = None,
        kubeconfig: Path | None = None,
        max_grace_seconds: float | None = None,
        host_paths: Mapping[str, Path] | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        #: hostPath volumes served from another directory (path -> directory); may be changed
        #: until the Pod starts.
        self.host_paths = dict(host_paths or {})
        self.namespaces = list(namespaces)
        self.workdir = Path(workdir)
        self.nodes = None if nodes is None else list(nodes)
        self.path = path if path is not None else os.environ.get("PATH", os.defpath)
        self.kubeconfig = kubeconfig
        self.max_grace_seconds = max_grace_seconds
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": "kubelet-standin"}
        self._client = httpx.Client(base_url=self.api_url, headers=self._headers, timeout=10)
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._jobs: dict[str, _JobRun] = {}
        self._pods: dict[tuple[str, str], PodRun] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Register the nodes, start the watches and the worker."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes or []:
            self._api("POST", f"{CORE}/nodes", {"metadata": {"name": node}}, ok_codes=(409,))
        self._spawn(self._worker, "kubelet-worker")
        for namespace in self.namespaces:
            for path in (
                f"{JOBS}/namespaces/{namespace}/jobs",
                f"{CORE}/namespaces/{namespace}/pods",
            ):
                self._spawn(functools.partial(self._watch, path), f"watch {path}")
        return self

    def stop(self) -> None:
        """Kill every process it started (SIGKILL, process group) and stop its threads."""
        self._stopping.set()
        self._work.put(None)
        with self._lock:
            runs = list(self._pods.values())
            for job in self._jobs.values():
                for timer in job.timers:
                    timer.cancel()
        for run in runs:
            self._kill_group(run)
            if run.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.popen.wait(timeout=10)
        for thread in self._threads:
            if thread.name == "kubelet-worker":
                thread.join(timeout=10)
        self._client.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- test hooks ---------------------------------------------------------------------------

    @property
    def processes(self) -> list[PodRun]:
        """Every Pod run so far (including finished ones), in start order."""
        with self._lock:
            return list(self._pods.values())

    def refusals(self, job_name: str) -> list[str]:
        """The API server's answers to the Pods of the Job(s) named ``job_name`` it refused."""
        with self._lock:
            return [
                message
                for job in self._jobs.values()
                if job.name == job_name
                for message in job.refused
            ]

    def runs(self, job_name: str, namespace: str | None = None) -> list[PodRun]:
        """The Pod runs of the Job(s) named ``job_name``, oldest first."""
        with self._lock:
            return [
                run
                for run in self._pods.values()
                if run.job_name == job_name and namespace in (None, run.namespace)
            ]

    def wait_for_pod(
        self, job_name: str, *, namespace: str | None = None, attempt: int = 1, timeout: float = 10
    ) -> PodRun:
        """Wait until the ``attempt``-th Pod of the Job has a running (or finished) process."""

        def ready() -> PodRun | None:
            runs = self.runs(job_name, namespace)
            if len(runs) >= attempt and (
                runs[attempt - 1].popen or runs[attempt - 1].reported.is_set()
            ):
                return runs[attempt - 1]
            return None

        return self._wait(ready, timeout, f"pod {attempt} of job {job_name!r} to start")

    def wait_for_exit(
        self, job_name: str, *, namespace: str | None = None, attempt: int = 1, timeout: float = 10
    ) -> PodRun:
        """Wait until the ``attempt``-th Pod's exit has been reported to the API."""
        run = self.wait_for_pod(job_name, namespace=namespace, attempt=attempt, timeout=timeout)
        if not run.reported.wait(timeout):
            raise TimeoutError(
                f"pod {run.pod_name} did not finish within {timeout}s:\n{run.log_text()}"
            )
        return run

    def kill(self, job_name: str, *, oom: bool = False, namespace: str | None = None) -> PodRun:
        """SIGKILL the Job's running process (a crash; with ``oom`` reported as OOMKilled)."""
        run = self._running(job_name, namespace)
        run.oom = oom
        self._kill_group(run)
        return run

    def node_lost(self, job_name: str, *, namespace: str | None = None) -> PodRun:
        """Lose the node under the Job's Pod: the process dies, the Pod fails with NodeLost."""
        run = self._running(job_name, namespace)
        run.node_lost = True
        self._kill_group(run)
        return run

    def _running(self, job_name: str, namespace: str | None) -> PodRun:
        runs = [
            run for run in self.runs(job_name, namespace) if run.popen and run.exit_code is None
        ]
        if not runs:
            raise KubeletError(f"no running process for job {job_name!r}")
        return runs[-1]

    def _wait(self, probe: Callable[[], PodRun | None], timeout: float, what: str) -> PodRun:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := probe()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"timed out after {timeout}s waiting for {what}; errors: {self.errors}"
                    )
                self._changed.wait(remaining)
        return found

    # -- API access ---------------------------------------------------------------------------

    def _api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        patch: bool = False,
        ok_codes: Sequence[int] = (),
    ) -> JSON | None:
        """One API call; retried while the API is unreachable (as a kubelet keeps trying).

        Returns the response object, or None for a status in ``ok_codes`` (e.g. 404 on delete).
        """
        headers = {"Content-Type": "application/merge-patch+json"} if patch else {}
        while True:
            try:
                response = self._client.request(
                    method, path, json=body, params=params, headers=headers
                )
            except httpx.TransportError:
                if self._stopping.wait(0.1):
                    raise KubeletError("stopped while the API was unreachable") from None
                continue
            if response.status_code in ok_codes:
                return None
            if response.status_code >= 400:
                raise KubeletError(f"{method} {path}: {response.status_code} {response.text}")
            result: JSON = response.json()
            return result

    def _watch(self, path: str) -> None:
        """List, then watch ``path`` from the list's resourceVersion, forever (reconnecting)."""
        kind = "Job" if path.endswith("/jobs") else "Pod"
        since: str | None = None
        with httpx.Client(base_url=self.api_url, headers=self._headers, timeout=None) as client:
            while not self._stopping.is_set():
                try:
                    if since is None:
                        listed = client.get(path).raise_for_status().json()
                        since = listed["metadata"]["resourceVersion"]
                        for item in listed["items"]:
                            self._submit(kind, "ADDED", item)
                    params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "60"}
                    with client.stream("GET", path, params=params) as response:
                        for line in response.iter_lines():
                            if self._stopping.is_set():
                                return
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            if event["type"] == "ERROR":
                                since = None  # 410 Gone: list again
                                break
                            since = event["object"]["metadata"]["resourceVersion"]
                            self._submit(kind, event["type"], event["object"])
                except (httpx.TransportError, httpx.HTTPStatusError):
                    self._stopping.wait(0.1)

    def _submit(self, kind: str, event_type: str, obj: JSON) -> None:
        handler = self._on_job if kind == "Job" else self._on_pod
        self._work.put(lambda: handler(event_type, obj))

    def _worker(self) -> None:
        """Handle events one at a time, so the Job bookkeeping needs no finer locking."""
        while (task := self._work.get()) is not None:
            if self._stopping.is_set():
                return
            try:
                task()
            except Exception as exc:  # a broken Pod must not stop the kubelet; tests see it
                self.errors.append(repr(exc))
            with self._changed:
                self._changed.notify_all()

    # -- the Job controller -------------------------------------------------------------------

    def _on_job(self, event_type: str, job: JSON) -> None:
        meta = job["metadata"]
        with self._lock:
            run = self._jobs.get(meta["uid"])
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            if run is not None and not run.gone:
                run.gone = True
                self._collect_pods(run)
            return
        if run is not None or _finished(job) or job.get("spec", {}).get("suspend"):
            return
        run = _JobRun(meta["namespace"], meta["name"], meta["uid"], job.get("spec", {}))
        run.start_time = now_rfc3339()
        with self._lock:
            self._jobs[run.uid] = run
        deadline = run.spec.get("activeDeadlineSeconds")
        if deadline is not None:
            self._timer(run, float(deadline), lambda: self._deadline(run))
        self._start_pod(run)

    def _collect_pods(self, job: _JobRun) -> None:
        """What the garbage collector does for a deleted Job: delete its Pods."""
        for pod in job.pods:
            self._api(
                "DELETE",
                f"{CORE}/namespaces/{pod.namespace}/pods/{pod.pod_name}",
                ok_codes=(404,),
            )

    def _deadline(self, job: _JobRun) -> None:
        if job.finished or job.gone:
            return
        job.deadline_exceeded = True
        active = job.active
        if active is None:
            self._finish(
                job, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline"
            )
            return
        self._api(
            "DELETE", f"{CORE}/namespaces/{job.namespace}/pods/{active.pod_name}", ok_codes=(404,)
        )

    def _job_status(self, job: _JobRun, extra: JSON | None = None) -> None:
        active = job.active
        status: JSON = {
            "startTime": job.start_time,
            "active": 1 if active is not None else None,
            "ready": 1 if active is not None and active.popen is not None else None,
            "succeeded": job.succeeded or None,
            "failed": job.failed or None,
            "terminating": 0,
            **(extra or {}),
        }
        self._api(
            "PATCH",
            f"{JOBS}/namespaces/{job.namespace}/jobs/{job.name}/status",
            {"status": status},
            patch=True,
            ok_codes=(404,),
        )

    def _finish(self, job: _JobRun, outcome: str, reason: str, message: str) -> None:
        job.finished = True
        now = now_rfc3339()
        interim = "SuccessCriteriaMet" if outcome == "Complete" else "FailureTarget"
        conditions = [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
            for kind in (interim, outcome)
        ]
        extra: JSON = {"conditions": conditions}
        if outcome == "Complete":
            extra["completionTime"] = now
        self._job_status(job, extra)
        ttl = job.spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            self._timer(job, float(ttl), lambda: self._delete_job(job))

    def _delete_job(self, job: _JobRun) -> None:
        self._api(
            "DELETE",
            f"{JOBS}/namespaces/{job.namespace}/jobs/{job.name}",
            {"propagationPolicy": "Background"},
            ok_codes=(404,),
        )

    def _timer(self, job: _JobRun, seconds: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, lambda: self._work.put(action))
        timer.daemon = True
        job.timers.append(timer)
        timer.start()

    def _after_exit(self, job: _JobRun, pod: PodRun) -> None:
        """The Job controller's view of a finished Pod: count it, retry, or finish the Job."""
        if job.gone or job.finished:
            return
        if pod.exit_code == 0 and not pod.node_lost:
            job.succeeded += 1
            self._finish(
                job, "Complete", "CompletionsReached", "Reached expected number of succeeded pods"
            )
            return
        job.failed += 1
        backoff_limit = int(job.spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT))
        if job.deadline_exceeded:
            self._finish(
                job, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline"
            )
        elif job.failed > backoff_limit:
            self._finish(
                job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            )
        else:
            self._start_pod(job)

    # -- the kubelet --------------------------------------------------------------------------

    def _start_pod(self, job: _JobRun) -> None:
        template = job.spec.get("template", {})
        labels = {
            **(template.get("metadata", {}).get("labels") or {}),
            "job-name": job.name,
            "batch.kubernetes.io/job-name": job.name,
            "controller-uid": job.uid,
            "batch.kubernetes.io/controller-uid": job.uid,
        }
        spec = dict(template.get("spec", {}))
        spec["nodeName"] = spec.get("nodeName") or self._schedule(spec)
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{job.name}-",
                "namespace": job.namespace,
                "labels": labels,
                "annotations": template.get("metadata", {}).get("annotations") or {},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job.name,
                        "uid": job.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        pod = self._create_pod(job, body)
        if pod is None:
            return
        name = pod["metadata"]["name"]
        workdir = self.workdir / job.namespace / name
        workdir.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            namespace=job.namespace,
            job_name=job.name,
            job_uid=job.uid,
            pod_name=name,
            workdir=workdir,
            log_path=workdir / "output.log",
            termination_path=workdir / "termination-log",
            node_name=spec["nodeName"],
        )
        with self._lock:
            job.pods.append(run)
            self._pods[(job.namespace, name)] = run
        if self.nodes is not None and spec["nodeName"] not in self.nodes:
            self._job_status(job)  # bound to a node with no kubelet: stays Pending
            return
        self._run(job, run, pod)

    def _create_pod(self, job: _JobRun, body: JSON) -> JSON | None:
        """POST the Job's Pod; a refusal (403, e.g. Pod Security) becomes the Job controller's
        ``FailedCreate`` Event on the Job, and None."""
        path = f"{CORE}/namespaces/{job.namespace}/pods"
        while True:
            try:
                response = self._client.post(path, json=body)
                break
            except httpx.TransportError:
                if self._stopping.wait(0.1):
                    raise KubeletError("stopped while the API was unreachable") from None
        if response.status_code != 403:
            if response.status_code >= 400:
                raise KubeletError(f"POST {path}: {response.status_code} {response.text}")
            created: JSON = response.json()
            return created
        now = now_rfc3339()
        message = str(response.json().get("message", response.text))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{job.name}.", "namespace": job.namespace},
            "involvedObject": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job.name,
                "namespace": job.namespace,
                "uid": job.uid,
            },
            "type": "Warning",
            "reason": "FailedCreate",
            "message": f"Error creating: {message}",
            "source": {"component": "job-controller"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._api("POST", f"{CORE}/namespaces/{job.namespace}/events", event)
        job.refused.append(message)
        return None

    def _schedule(self, spec: JSON) -> str:
        """The scheduler's choice: the node a required node affinity (``matchFields``
        ``metadata.name In [...]``) or the ``kubernetes.io/hostname`` node selector names,
        else the first served node."""
        terms = (
            spec.get("affinity", {})
            .get("nodeAffinity", {})
            .get("requiredDuringSchedulingIgnoredDuringExecution", {})
            .get("nodeSelectorTerms", [])
        )
        for term in terms:
            for requirement in term.get("matchFields", []):
                if (
                    requirement.get("key") == "metadata.name"
                    and requirement.get("operator") == "In"
                ):
                    return str(requirement["values"][0])
        hostname = (spec.get("nodeSelector") or {}).get("kubernetes.io/hostname")
        if hostname:
            return str(hostname)
        return (self.nodes or [DEFAULT_NODE])[0]

    def _run(self, job: _JobRun, run: PodRun, pod: JSON) -> None:
        container = (pod["spec"].get("containers") or [{}])[0]
        try:
            mounts = self._prepare_volumes(run, pod, container)
            env = self._environment(run, pod, container)
            command = [*container.get("command", []), *container.get("args", [])]
            if not command:
                raise KubeletError("the stand-in cannot run an image's entrypoint: set command")
            run.argv = [translate_path(arg, mounts) for arg in command]
            run.env = {key: translate_path(value, mounts) for key, value in env.items()}
            executable = shutil.which(run.argv[0], path=run.env.get("PATH", self.path))
            if executable is None:
                raise KubeletError(f'exec: "{run.argv[0]}": executable file not found in $PATH')
            cwd = translate_path(container.get("workingDir", str(run.workdir)), mounts)
            with run.log_path.open("wb") as log:
                run.popen = subprocess.Popen(
                    [executable, *run.argv[1:]],
                    env=run.env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
        except (KubeletError, OSError) as exc:
            # A container that cannot start ends like a real one: StartError, exit code 128.
            run.started_at = now_rfc3339()
            run.exit_code, run.reason, run.message = 128, "StartError", str(exc)
            self._report_exit(job, run, container)
            return
        started = run.started_at = now_rfc3339()
        self._pod_status(
            run,
            {
                "phase": "Running",
                "startTime": started,
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": started}],
                "containerStatuses": [
                    _container_status(container, {"running": {"startedAt": started}}, ready=True)
                ],
            },
        )
        self._job_status(job)
        self._spawn(lambda: self._await_exit(job, run, container), f"wait-{run.pod_name}")

    def _await_exit(self, job: _JobRun, run: PodRun, container: JSON) -> None:
        assert run.popen is not None
        run.popen.wait()
        self._work.put(lambda: self._exited(job, run, container))

    def _exited(self, job: _JobRun, run: PodRun, container: JSON) -> None:
        assert run.popen is not None
        code = run.popen.returncode
        # A process killed by signal N exits, as a container's PID 1 is reported, with 128 + N.
        run.exit_code = OOM_EXIT_CODE if run.oom else (128 - code if code < 0 else code)
        run.reason = "OOMKilled" if run.oom else ("Completed" if run.exit_code == 0 else "Error")
        run.message = _termination_message(run, container, run.exit_code)
        self._report_exit(job, run, container)

    def _report_exit(self, job: _JobRun, run: PodRun, container: JSON) -> None:
        """Write the finished container's state to the Pod, then let the Job controller act."""
        terminated: JSON = {
            "exitCode": run.exit_code,
            "reason": run.reason,
            "startedAt": run.started_at,
            "finishedAt": now_rfc3339(),
        }
        if run.message:
            terminated["message"] = run.message
        status: JSON = {
            "phase": "Succeeded" if run.exit_code == 0 and not run.node_lost else "Failed",
            "conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": now_rfc3339()}
            ],
            "containerStatuses": [
                _container_status(container, {"terminated": terminated}, ready=False)
            ],
        }
        if run.node_lost:
            status["reason"] = "NodeLost"
            status["message"] = (
                f"Node {run.node_name} which was running pod {run.pod_name} is unresponsive"
            )
        self._pod_status(run, status)
        if run.terminating or job.gone:
            self._api(
                "DELETE",
                f"{CORE}/namespaces/{run.namespace}/pods/{run.pod_name}",
                params={"gracePeriodSeconds": "0"},
                ok_codes=(404,),
            )
        self._after_exit(job, run)
        run.reported.set()

    def _pod_status(self, run: PodRun, status: JSON) -> None:
        self._api(
            "PATCH",
            f"{CORE}/namespaces/{run.namespace}/pods/{run.pod_name}/status",
            {"status": status},
            patch=True,
            ok_codes=(404,),
        )

    def _on_pod(self, event_type: str, pod: JSON) -> None:
        meta = pod["metadata"]
        with self._lock:
            run = self._pods.get((meta["namespace"], meta["name"]))
        if run is None or run.exit_code is not None:
            return
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod.get("spec", {}).get(
                    "terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS
                )
            self._terminate(run, float(grace))

    def _terminate(self, run: PodRun, grace: float) -> None:
        """SIGTERM the container's main process; SIGKILL its group after the grace period."""
        if run.terminating or run.popen is None:
            return
        run.terminating = True
        if self.max_grace_seconds is not None:
            grace = min(grace, self.max_grace_seconds)
        with contextlib.suppress(ProcessLookupError):
            run.popen.send_signal(signal.SIGTERM)
        timer = threading.Timer(grace, lambda: self._kill_group(run))
        timer.daemon = True
        timer.start()

    @staticmethod
    def _kill_group(run: PodRun) -> None:
        if run.popen is None or run.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.popen.pid, signal.SIGKILL)

    # -- Pod contents -------------------------------------------------------------------------

    def _prepare_volumes(self, run: PodRun, pod: JSON, container: JSON) -> list[_Mount]:
        """Make each mounted volume real on the host; return where each mountPath went."""
        volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes", [])}
        local: dict[str, Path] = {}
        for name, volume in volumes.items():
            local[name] = self._materialise(run, name, volume)
        mounts = []
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in local:
                raise KubeletError(f"volumeMount {mount['name']!r} names no volume")
            target = local[mount["name"]]
            if mount.get("subPath"):
                target = target / mount["subPath"]
            mounts.append(_Mount(mount["mountPath"], str(target)))
        termination = container.get("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
        run.termination_path.write_bytes(b"")
        mounts.append(_Mount(termination, str(run.termination_path)))
        return mounts

    def _materialise(self, run: PodRun, name: str, volume: JSON) -> Path:
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            return self.host_paths.get(path, Path(path))
        directory = run.workdir / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return directory
        if "secret" in volume:
            source = volume["secret"]
            obj = self._api(
                "GET",
                f"{CORE}/namespaces/{run.namespace}/secrets/{source['secretName']}",
                ok_codes=(404,),
            )
            data = {
                key: base64.b64decode(value)
                for key, value in ((obj or {}).get("data") or {}).items()
            }
        elif "configMap" in volume:
            source = volume["configMap"]
            obj = self._api(
                "GET",
                f"{CORE}/namespaces/{run.namespace}/configmaps/{source['name']}",
                ok_codes=(404,),
            )
            data = {key: value.encode() for key, value in ((obj or {}).get("data") or {}).items()}
            data.update(
                (key, base64.b64decode(value))
                for key, value in ((obj or {}).get("binaryData") or {}).items()
            )
        else:
            raise KubeletError(
                f"volume {name!r}: only hostPath, emptyDir, secret, configMap are supported"
            )
        if obj is None and not source.get("optional"):
            raise KubeletError(f"volume {name!r}: {next(iter(volume.keys() - {'name'}))} not found")
        _write_items(directory, data, source.get("items"))
        return directory

    def _environment(self, run: PodRun, pod: JSON, container: JSON) -> dict[str, str]:
        env = {"PATH": self.path, "HOSTNAME": run.pod_name}
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            for key, value in self._source_data(run, source).items():
                env[prefix + key] = value
        for var in container.get("env", []):
            if "valueFrom" in var:
                resolved = self._value_from(run, pod, var["valueFrom"])
                if resolved is not None:
                    env[var["name"]] = resolved
            else:
                env[var["name"]] = str(var.get("value", ""))
        return env

    def _source_data(self, run: PodRun, source: JSON) -> dict[str, str]:
        if "secretRef" in source:
            ref, plural, decode = source["secretRef"], "secrets", True
        else:
            ref, plural, decode = source["configMapRef"], "configmaps", False
        obj = self._api(
            "GET", f"{CORE}/namespaces/{run.namespace}/{plural}/{ref['name']}", ok_codes=(404,)
        )
        if obj is None:
            if ref.get("optional"):
                return {}
            raise KubeletError(f"{plural} {ref['name']!r} not found")
        data: dict[str, str] = obj.get("data") or {}
        return {
            key: base64.b64decode(value).decode() if decode else value
            for key, value in data.items()
        }

    def _value_from(self, run: PodRun, pod: JSON, source: JSON) -> str | None:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path.startswith("metadata.labels['") or path.startswith("metadata.annotations['"):
                section, _, key = path.partition("['")
                return str((pod["metadata"].get(section.split(".")[1]) or {}).get(key[:-2], ""))
            value: Any = pod
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if path in ("status.podIP", "status.hostIP"):
                value = "127.0.0.1"
            return "" if value is None else str(value)
        for ref_key, plural, decode in (
            ("secretKeyRef", "secrets", True),
            ("configMapKeyRef", "configmaps", False),
        ):
            if ref_key in source:
                ref = source[ref_key]
                obj = self._api(
                    "GET",
                    f"{CORE}/namespaces/{run.namespace}/{plural}/{ref['name']}",
                    ok_codes=(404,),
                )
                raw = ((obj or {}).get("data") or {}).get(ref["key"])
                if raw is None:
                    if ref.get("optional"):
                        return None
                    raise KubeletError(f"{plural} {ref['name']!r} has no key {ref['key']!r}")
                return base64.b64decode(raw).decode() if decode else str(raw)
        raise KubeletError(f"unsupported valueFrom: {sorted(source)}")


def _write_items(directory: Path, data: dict[str, bytes], items: list[JSON] | None) -> None:
    """Write a Secret/ConfigMap's keys as files (only ``items`` when given, at their paths)."""
    selected = (
        [(item["key"], item["path"]) for item in items] if items else [(key, key) for key in data]
    )
    for key, relative in selected:
        if key not in data:
            raise KubeletError(f"key {key!r} is not in the volume source")
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[key])


def _container_status(container: JSON, state: JSON, *, ready: bool) -> JSON:
    return {
        "name": container.get("name", ""),
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "started": ready,
        "state": state,
    }


def _termination_message(run: PodRun, container: JSON, exit_code: int) -> str:
    """The termination message as a kubelet reads it: the file (4096 bytes at most), or the end
    of the log for FallbackToLogsOnError after a failure with an empty file."""
    try:
        with run.termination_path.open("rb") as file:
            message = file.read(TERMINATION_MESSAGE_LIMIT).decode("utf-8", errors="replace")
    except FileNotFoundError:
        message = ""
    if (
        not message
        and exit_code != 0
        and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
    ):
        message = tail_of_log(run.log_path)
    return message


def _finished(job: JSON) -> bool:
    return any(
        condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True"
        for condition in job.get("status", {}).get("conditions") or []
    )
