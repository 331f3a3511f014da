"""The Kubernetes stand-ins behave as the operator's tests assume: real clients (kubectl, the
kubernetes Python client, kopf) against the API stand-in, real processes under the kubelet
stand-in.

These tests are about the stand-ins themselves, so each names what a real cluster does
differently where that matters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, cast

import httpx
import kubernetes
import pytest
import yaml
from tests.support.kube_api import KubeApi
from tests.support.kubectl import Kubectl
from tests.support.kubelet import Kubelet, KubeletFactory
from tests.support.process import read_text_or_empty
from tests.support.tools import die_with_parent, stop_process, wait_until

GROUP = "example.dev"
PLURAL = "widgets"

#: A CRD of the stand-ins' own (not the product's): these tests check the stand-in, and must not
#: change when the product's CRD does.
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "plural": PLURAL,
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wdg"],
            "categories": ["gadgets"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                # Without preserve-unknown-fields, a server prunes every field a schema lacks.
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
                "additionalPrinterColumns": [
                    {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
                    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }
        ],
    },
}


def widget(name: str, namespace: str, node: str = "node-7") -> dict[str, Any]:
    """A Widget manifest."""
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node},
    }


def apply(kubectl: Kubectl, tmp_path: Path, manifest: dict[str, Any]) -> None:
    """``kubectl apply -f`` a manifest written to a file (as users apply files)."""
    path = tmp_path / f"{manifest['kind']}-{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    kubectl("apply", "-f", str(path))


def custom_objects(kubeconfig: Path) -> kubernetes.client.CustomObjectsApi:
    """The kubernetes client's custom-objects API, configured from ``kubeconfig``."""
    api_client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return kubernetes.client.CustomObjectsApi(api_client)


def http(api: KubeApi) -> httpx.Client:
    """A plain HTTP client for exact status codes and bodies."""
    return httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.token}"})


WIDGETS = f"/apis/{GROUP}/v1/namespaces/{{ns}}/{PLURAL}"
MERGE = {"Content-Type": "application/merge-patch+json"}


# -- API stand-in ---------------------------------------------------------------------------


def test_kubectl_applies_crd_and_object_and_shows_printer_columns(
    kubectl: Kubectl, kube_api: KubeApi, operator_namespace: str, tmp_path: Path
) -> None:
    """kubectl discovers a CRD's resource, applies an object, prints the CRD's columns.

    Stand-in: the CRD is established in the same request (a real server takes a moment, so
    real tests wait for the Established condition), and its schema is not enforced.
    """
    apply(kubectl, tmp_path, WIDGET_CRD)
    apply(kubectl, tmp_path, widget("w1", operator_namespace))
    kube_api.store.patch(
        kube_api.resource(GROUP, PLURAL),
        operator_namespace,
        "w1",
        {"status": {"progress": {"percent": 42}}},
        "application/merge-patch+json",
        subresource="status",
    )

    table = kubectl("get", "wdg").stdout.splitlines()
    assert table[0].split() == ["NAME", "NODE", "PROGRESS", "AGE"]
    assert table[1].split()[:3] == ["w1", "node-7", "42"]
    assert "w1" in kubectl("get", "gadgets", "-o", "name").stdout
    # Applying an unchanged file again is a no-op; a changed spec is a new generation.
    assert "unchanged" in kubectl("apply", "-f", str(tmp_path / "Widget-w1.yaml")).stdout
    apply(kubectl, tmp_path, widget("w1", operator_namespace, node="node-8"))
    assert kubectl.json("get", "widget", "w1")["metadata"]["generation"] == 2


def test_kubernetes_client_watch_sees_added_and_modified(
    kube_api: KubeApi, kubeconfig: Path, operator_namespace: str
) -> None:
    """A kubernetes-client watch gets ADDED then MODIFIED, resuming from a list's version."""
    kube_api.put("apiextensions.k8s.io", "customresourcedefinitions", WIDGET_CRD)
    client = custom_objects(kubeconfig)
    listed = cast(
        dict[str, Any],
        client.list_namespaced_custom_object(GROUP, "v1", operator_namespace, PLURAL),
    )
    events: list[tuple[str, str]] = []

    def watch() -> None:
        # Resuming from the list's version, the watch cannot miss what happens before it opens.
        stream = kubernetes.watch.Watch().stream(  # type: ignore[no-untyped-call]
            client.list_namespaced_custom_object,
            GROUP,
            "v1",
            operator_namespace,
            PLURAL,
            resource_version=listed["metadata"]["resourceVersion"],
            timeout_seconds=10,
        )
        for event in stream:
            events.append((event["type"], event["object"]["metadata"]["resourceVersion"]))
            if event["type"] == "MODIFIED":
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    created = cast(
        dict[str, Any],
        client.create_namespaced_custom_object(
            GROUP, "v1", operator_namespace, PLURAL, widget("w1", operator_namespace)
        ),
    )
    patched = cast(
        dict[str, Any],
        client.patch_namespaced_custom_object(
            GROUP, "v1", operator_namespace, PLURAL, "w1", {"metadata": {"labels": {"a": "b"}}}
        ),
    )
    watcher.join(15)
    assert events == [
        ("ADDED", created["metadata"]["resourceVersion"]),
        ("MODIFIED", patched["metadata"]["resourceVersion"]),
    ]


def test_status_subresource_generation_and_conflicts(
    kube_api: KubeApi, operator_namespace: str
) -> None:
    """Status is written only through ``/status``; generation counts spec changes only; a PUT
    with a stale resourceVersion is a 409 Conflict; errors are Status objects."""
    kube_api.put("apiextensions.k8s.io", "customresourcedefinitions", WIDGET_CRD)
    url = WIDGETS.format(ns=operator_namespace)
    with http(kube_api) as client:
        body = {**widget("w1", operator_namespace), "status": {"phase": "Bogus"}}
        created = client.post(url, json=body)
        assert created.status_code == 201
        obj = created.json()
        assert obj["metadata"]["generation"] == 1
        assert obj["metadata"]["uid"]
        assert obj["metadata"]["creationTimestamp"]
        assert "status" not in obj  # status on create is dropped for a status subresource

        status = client.patch(
            f"{url}/w1/status",
            json={"status": {"phase": "Running"}, "spec": {"x": 1}},
            headers=MERGE,
        ).json()
        assert status["status"] == {"phase": "Running"}
        assert status["spec"] == {"nodeName": "node-7"}  # /status ignores the spec
        assert status["metadata"]["generation"] == 1

        main = client.patch(
            f"{url}/w1", json={"spec": {"nodeName": "n2"}, "status": {"phase": "X"}}, headers=MERGE
        ).json()
        assert main["metadata"]["generation"] == 2
        assert main["status"] == {"phase": "Running"}  # the main resource ignores status

        labels = client.patch(f"{url}/w1", json={"metadata": {"labels": {"a": "b"}}}, headers=MERGE)
        assert labels.json()["metadata"]["generation"] == 2  # metadata is not the spec

        stale = {**main, "spec": {"nodeName": "n3"}}
        conflict = client.put(f"{url}/w1", json=stale)
        assert conflict.status_code == 409
        assert conflict.json()["reason"] == "Conflict"

        fresh = client.put(f"{url}/w1", json={**labels.json(), "spec": {"nodeName": "n3"}})
        assert fresh.status_code == 200
        assert fresh.json()["metadata"]["generation"] == 3

        duplicate = client.post(url, json=widget("w1", operator_namespace))
        assert (duplicate.status_code, duplicate.json()["reason"]) == (409, "AlreadyExists")
        missing = client.get(f"{url}/nope")
        assert (missing.status_code, missing.json()["reason"]) == (404, "NotFound")
        assert missing.json()["kind"] == "Status"
        no_version = client.put(f"{url}/w1", json=widget("w1", operator_namespace))
        assert (no_version.status_code, no_version.json()["reason"]) == (422, "Invalid")
        garbage = client.post(
            url, content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert garbage.status_code == 400


def test_uid_guards_of_writes_to_a_re_created_object(
    kube_api: KubeApi, operator_namespace: str
) -> None:
    """A write meant for a deleted object must not land on its namesake: a uid in a PUT is a
    storage precondition (409), a changed uid in a patch is invalid (422), but the status
    subresource of a custom resource keeps only ``.status`` and drops the uid silently — there
    only a JSON patch ``test`` of ``/metadata/uid`` guards (422, with the real server's generic
    message). The real server's 409 names its etcd key, which depends on its storage prefix."""
    kube_api.put("apiextensions.k8s.io", "customresourcedefinitions", WIDGET_CRD)
    url = WIDGETS.format(ns=operator_namespace)
    with http(kube_api) as client:
        old = client.post(url, json=widget("w1", operator_namespace)).json()
        assert client.delete(f"{url}/w1").status_code == 200
        new = client.post(url, json=widget("w1", operator_namespace)).json()
        stale_uid, uid = old["metadata"]["uid"], new["metadata"]["uid"]
        assert stale_uid != uid

        stale_put = {**new, "metadata": {**new["metadata"], "uid": stale_uid}}
        precondition = client.put(f"{url}/w1/status", json=stale_put)
        assert precondition.status_code == 409
        failure = precondition.json()
        assert failure["reason"] == "Conflict"
        assert failure["details"] == {"name": "w1", "group": GROUP, "kind": PLURAL}
        assert failure["message"] == (
            f'Operation cannot be fulfilled on {PLURAL}.{GROUP} "w1": StorageError: invalid '
            f"object, Code: 4, Key: /registry/{GROUP}/{PLURAL}/{operator_namespace}/w1, "
            f"ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: UID in precondition: "
            f"{stale_uid}, UID in object meta: {uid}"
        )

        immutable = client.patch(
            f"{url}/w1",
            json={"metadata": {"uid": stale_uid, "labels": {"a": "b"}}},
            headers=MERGE,
        )
        assert (immutable.status_code, immutable.json()["reason"]) == (422, "Invalid")
        assert immutable.json()["details"]["causes"][0]["field"] == "metadata.uid"
        assert "field is immutable" in immutable.json()["message"]

        dropped = client.patch(
            f"{url}/w1/status",
            json={"metadata": {"uid": stale_uid}, "status": {"phase": "Stale"}},
            headers=MERGE,
        )
        assert dropped.status_code == 200
        assert dropped.json()["metadata"]["uid"] == uid
        assert dropped.json()["status"] == {"phase": "Stale"}

        def guarded(with_uid: str, phase: str) -> httpx.Response:
            ops = [
                {"op": "test", "path": "/metadata/uid", "value": with_uid},
                {"op": "add", "path": "/status/phase", "value": phase},
            ]
            return client.patch(
                f"{url}/w1/status",
                content=json.dumps(ops),
                headers={"Content-Type": "application/json-patch+json"},
            )

        refused = guarded(stale_uid, "Guarded")
        assert refused.status_code == 422
        assert refused.json()["reason"] == "Invalid"
        assert refused.json()["message"] == (
            "the server rejected our request due to an error in our request"
        )
        assert client.get(f"{url}/w1").json()["status"] == {"phase": "Stale"}
        assert guarded(uid, "Guarded").json()["status"] == {"phase": "Guarded"}


def test_finalizers_hold_deletion_until_removed(kube_api: KubeApi, operator_namespace: str) -> None:
    """DELETE of an object with finalizers only sets deletionTimestamp; removing the last
    finalizer deletes it, and a watch sees MODIFIED then DELETED."""
    kube_api.put("apiextensions.k8s.io", "customresourcedefinitions", WIDGET_CRD)
    url = WIDGETS.format(ns=operator_namespace)
    with http(kube_api) as client:
        body = widget("w1", operator_namespace)
        body["metadata"]["finalizers"] = ["example.dev/cleanup"]
        since = client.post(url, json=body).json()["metadata"]["resourceVersion"]

        deleted = client.delete(f"{url}/w1", params={"propagationPolicy": "Foreground"})
        assert deleted.status_code == 200
        assert deleted.json()["metadata"]["deletionTimestamp"]
        assert client.get(f"{url}/w1").status_code == 200

        client.patch(f"{url}/w1", json={"metadata": {"finalizers": None}}, headers=MERGE)
        assert client.get(f"{url}/w1").status_code == 404

        watch = client.get(
            url, params={"watch": "1", "resourceVersion": since, "timeoutSeconds": "1"}
        )
        events = [json.loads(line) for line in watch.text.splitlines()]
        assert [event["type"] for event in events] == ["MODIFIED", "DELETED"]


def test_watch_resumes_filters_and_expires(kube_api: KubeApi, operator_namespace: str) -> None:
    """A watch from a resourceVersion replays what followed; a label selector turns an object
    leaving the selection into DELETED; after compaction an old version gets 410 Gone.

    Stand-in: history is kept until :meth:`KubeApi.compact` (a real server keeps ~5 minutes).
    """
    url = f"/api/v1/namespaces/{operator_namespace}/configmaps"
    with http(kube_api) as client:
        since = client.get(url).json()["metadata"]["resourceVersion"]
        client.post(url, json={"metadata": {"name": "a", "labels": {"app": "x"}}})
        client.post(url, json={"metadata": {"name": "b", "labels": {"app": "y"}}})
        client.patch(f"{url}/a", json={"metadata": {"labels": {"app": "z"}}}, headers=MERGE)
        params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "1"}
        selected = client.get(url, params={**params, "labelSelector": "app in (x,y)"})
        events = [json.loads(line) for line in selected.text.splitlines()]
        names = [(event["type"], event["object"]["metadata"]["name"]) for event in events]
        assert names == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a")]

        kube_api.compact()
        expired = client.get(url, params=params)
        (event,) = [json.loads(line) for line in expired.text.splitlines()]
        assert event["type"] == "ERROR"
        assert event["object"]["code"] == 410


def test_lists_page_and_serve_exact_revisions(kube_api: KubeApi) -> None:
    """``limit``/``continue`` pages through every namespace in order, each object once, from
    one snapshot; ``resourceVersionMatch=Exact`` lists the state at an older revision (410 once
    compacted away, 504 for one in the future); integer parameters are parsed as integers.

    Stand-in: the whole history is kept until :meth:`KubeApi.compact` (a real server compacts
    etcd every 5 minutes).
    """
    for namespace in ("a", "a-b"):
        kube_api.ensure_namespace(namespace)
    with http(kube_api) as client:
        for namespace, name in (("a-b", "x"), ("a", "y"), ("a", "z")):
            path = f"/api/v1/namespaces/{namespace}/configmaps"
            client.post(path, json={"metadata": {"name": name}}).raise_for_status()
        listed = client.get("/api/v1/configmaps").json()
        before = listed["metadata"]["resourceVersion"]
        everything = [
            (item["metadata"]["namespace"], item["metadata"]["name"]) for item in listed["items"]
        ]
        assert everything == [("a", "y"), ("a", "z"), ("a-b", "x")]

        seen: list[tuple[str, str]] = []
        params = {"limit": "1"}
        while True:
            page = client.get("/api/v1/configmaps", params=params).json()
            seen += [
                (item["metadata"]["namespace"], item["metadata"]["name"]) for item in page["items"]
            ]
            if not page["metadata"]["continue"]:
                break
            assert page["metadata"]["remainingItemCount"] >= 1
            params = {"limit": "1", "continue": page["metadata"]["continue"]}
            # A change between pages is not seen: the pages are one snapshot.
            client.delete("/api/v1/namespaces/a/configmaps/z")
        assert seen == everything

        exact = {"resourceVersion": before, "resourceVersionMatch": "Exact"}
        old = client.get("/api/v1/namespaces/a/configmaps", params=exact).json()
        assert [item["metadata"]["name"] for item in old["items"]] == ["y", "z"]
        now = client.get("/api/v1/namespaces/a/configmaps").json()
        assert [item["metadata"]["name"] for item in now["items"]] == ["y"]
        assert client.get("/api/v1/configmaps", params={"limit": "1.0"}).status_code == 400
        future = {**exact, "resourceVersion": str(kube_api.store.revision + 100)}
        assert client.get("/api/v1/configmaps", params=future).status_code == 504
        kube_api.compact()
        assert client.get("/api/v1/configmaps", params=exact).status_code == 410


def test_outage_refuses_connections_and_keeps_state(
    kube_api: KubeApi, operator_namespace: str
) -> None:
    """While down, connections are refused and open watches are cut; afterwards the same port
    serves the same objects.

    Stand-in: a real outage may also time out instead of refusing.
    """
    url = f"/api/v1/namespaces/{operator_namespace}/configmaps"
    with http(kube_api) as client:
        client.post(url, json={"metadata": {"name": "kept"}})
        cut = threading.Event()

        def watch() -> None:
            with httpx.Client(base_url=kube_api.url, timeout=10) as watcher:
                try:
                    with watcher.stream("GET", url, params={"watch": "true"}) as response:
                        for _line in response.iter_lines():
                            pass
                except httpx.HTTPError:
                    pass
                cut.set()

        thread = threading.Thread(target=watch)
        thread.start()
        wait_until(lambda: any(r.is_watch for r in kube_api.requests), 5, what="the watch")
        with kube_api.down():
            assert cut.wait(5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{kube_api.url}/version")
        thread.join(5)
        assert client.get(f"{url}/kept").status_code == 200


# -- kubelet stand-in -------------------------------------------------------------------------


def job(name: str, namespace: str, script: str, **extra: Any) -> dict[str, Any]:
    """A Job whose container runs ``sh -c script`` with RESULT=/dev/termination-log."""
    container: dict[str, Any] = {
        "name": "agent",
        "image": "ignored.example/agent:1",
        "command": ["sh", "-c", script],
        "env": [{"name": "RESULT", "value": "/dev/termination-log"}],
    }
    container.update(extra.pop("container", {}))
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    pod_spec.update(extra.pop("pod", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}, **extra},
    }


def job_condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The Job's condition of type ``kind`` when it is True, else None."""
    for condition in (obj or {}).get("status", {}).get("conditions", []):
        if condition["type"] == kind and condition["status"] == "True":
            return dict(condition)
    return None


def wait_for_condition(api: KubeApi, namespace: str, name: str, kind: str) -> dict[str, Any]:
    """Wait until the Job has condition ``kind`` and return it."""
    obj = api.wait_for(
        "batch", "jobs", namespace, name, lambda job: job_condition(job, kind) is not None
    )
    found = job_condition(obj, kind)
    assert found is not None
    return found


def terminated_state(api: KubeApi, namespace: str, pod_name: str) -> dict[str, Any]:
    """The Pod's container ``state.terminated``."""
    pod = api.get("", "pods", namespace, pod_name)
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def test_failing_job_reports_termination_message(
    kubelet: Kubelet, kube_api: KubeApi, kubectl: Kubectl, operator_namespace: str, tmp_path: Path
) -> None:
    """The container writes its result to $RESULT (= /dev/termination-log, translated) and
    exits 3: the Pod is Failed with that message, the Job Failed with BackoffLimitExceeded.

    Stand-in: the process runs on the host, so /dev/termination-log is rewritten to a file per
    Pod; a real kubelet bind-mounts that file at /dev/termination-log in the container.
    """
    manifest = job("fails", operator_namespace, 'echo \'{"x":1}\' > "$RESULT"; exit 3')
    apply(kubectl, tmp_path, manifest)

    run = kubelet.wait_for_exit("fails")
    assert run.env["RESULT"] == str(run.termination_path)
    state = terminated_state(kube_api, operator_namespace, run.pod_name)
    assert (state["exitCode"], state["reason"]) == (3, "Error")
    assert json.loads(state["message"]) == {"x": 1}
    assert kube_api.get("", "pods", operator_namespace, run.pod_name)["status"]["phase"] == "Failed"
    condition = wait_for_condition(kube_api, operator_namespace, "fails", "Failed")
    assert condition["reason"] == "BackoffLimitExceeded"
    pod = kube_api.get("", "pods", operator_namespace, run.pod_name)
    assert pod["metadata"]["labels"]["job-name"] == "fails"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Job"


def test_secret_volume_and_env_reach_the_process(
    kubelet: Kubelet, kube_api: KubeApi, kubectl: Kubectl, operator_namespace: str, tmp_path: Path
) -> None:
    """A Secret volume's key is a file at the (translated) mount path; fieldRef env works; the
    Job completes.

    Stand-in: the Secret is written to a directory per Pod instead of a tmpfs mounted at
    /etc/creds in the container.
    """
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds", "namespace": operator_namespace},
        "stringData": {"token": "s3cret"},
    }
    apply(kubectl, tmp_path, secret)
    manifest = job(
        "reads",
        operator_namespace,
        'printf "%s %s" "$(cat "$CREDS")" "$POD" > "$RESULT"',
        container={
            "env": [
                {"name": "RESULT", "value": "/dev/termination-log"},
                {"name": "CREDS", "value": "/etc/creds/token"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "readOnly": True}],
        },
        pod={"volumes": [{"name": "creds", "secret": {"secretName": "creds"}}]},
    )
    apply(kubectl, tmp_path, manifest)

    run = kubelet.wait_for_exit("reads")
    assert run.exit_code == 0, run.log_text()
    assert terminated_state(kube_api, operator_namespace, run.pod_name)["message"] == (
        f"s3cret {run.pod_name}"
    )
    assert Path(run.env["CREDS"]).read_text() == "s3cret"
    completed = wait_for_condition(kube_api, operator_namespace, "reads", "Complete")
    assert completed["reason"] == "CompletionsReached"
    assert kube_api.get("batch", "jobs", operator_namespace, "reads")["status"]["succeeded"] == 1


def test_deleting_a_running_job_terminates_its_process(
    kubelet: Kubelet, kube_api: KubeApi, kubectl: Kubectl, operator_namespace: str, tmp_path: Path
) -> None:
    """Deleting the Job deletes its Pod, whose process gets SIGTERM and may exit cleanly.

    Stand-in: the kubelet stand-in deletes the Job's Pods itself; in a real cluster the garbage
    collector does (the API stand-in has none).
    """
    script = (
        "trap 'echo TERM > \"$RESULT\"; exit 143' TERM; echo started; while :; do sleep 0.05; done"
    )
    apply(kubectl, tmp_path, job("runs", operator_namespace, script))
    run = kubelet.wait_for_pod("runs")
    wait_until(lambda: "started" in run.log_text(), 10, what="the script to start")
    # The process runs before its Pod reports it, as with a real kubelet's status sync.
    pod = kube_api.wait_for(
        "",
        "pods",
        operator_namespace,
        run.pod_name,
        lambda obj: obj is not None and "status" in obj,
        what="the Pod's status",
    )
    assert pod is not None
    assert pod["status"]["phase"] == "Running"

    kubectl("delete", "job", "runs", "--wait=false")
    kubelet.wait_for_exit("runs")
    assert (run.exit_code, run.termination_path.read_text()) == (143, "TERM\n")
    wait_until(
        lambda: kube_api.find("", "pods", operator_namespace, run.pod_name) is None,
        10,
        what="the pod to be deleted",
    )


def test_oom_kill_and_deadline(
    kubelet: Kubelet, kube_api: KubeApi, operator_namespace: str
) -> None:
    """``kill(oom=True)`` ends the Pod as OOMKilled (137); activeDeadlineSeconds ends the Job
    Failed with DeadlineExceeded after SIGTERM.

    Stand-in: the OOM kill is a SIGKILL the test asks for; a real one comes from the cgroup.
    """
    loop = "while :; do sleep 0.05; done"
    kube_api.put("batch", "jobs", job("oom", operator_namespace, loop))
    kube_api.put("batch", "jobs", job("slow", operator_namespace, loop, activeDeadlineSeconds=1))
    kubelet.wait_for_pod("oom")
    run = kubelet.kill("oom", oom=True)
    kubelet.wait_for_exit("oom")
    state = terminated_state(kube_api, operator_namespace, run.pod_name)
    assert (state["exitCode"], state["reason"]) == (137, "OOMKilled")
    assert wait_for_condition(kube_api, operator_namespace, "oom", "Failed")["reason"] == (
        "BackoffLimitExceeded"
    )
    deadline = wait_for_condition(kube_api, operator_namespace, "slow", "Failed")
    assert deadline["reason"] == "DeadlineExceeded"
    assert kubelet.runs("slow")[0].exit_code == 128 + 15  # SIGTERM, not the kill after grace


def test_pods_run_only_on_served_nodes(
    kubelet_factory: KubeletFactory, kube_api: KubeApi, operator_namespace: str
) -> None:
    """A Pod pinned by node affinity to a served node runs there; one pinned to another node
    stays Pending with no process.

    Stand-in: the kubelet stand-in also plays the scheduler and binds at creation, looking only
    at ``matchFields metadata.name``; a real scheduler reports FailedScheduling for a missing
    node.
    """
    kubelet = kubelet_factory(nodes=["node-7"])
    for name, node in (("here", "node-7"), ("elsewhere", "node-9")):
        affinity = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [node]}
                            ]
                        }
                    ]
                }
            }
        }
        kube_api.put(
            "batch", "jobs", job(name, operator_namespace, "true", pod={"affinity": affinity})
        )
    assert kube_api.find("", "nodes", None, "node-7") is not None
    ran = kubelet.wait_for_exit("here")
    assert (
        kube_api.get("", "pods", operator_namespace, ran.pod_name)["spec"]["nodeName"] == "node-7"
    )
    wait_for_condition(kube_api, operator_namespace, "here", "Complete")
    (pending,) = kube_api.objects(
        "", "pods", operator_namespace, label_selector="job-name=elsewhere"
    )
    assert pending["spec"]["nodeName"] == "node-9"
    assert pending["status"] == {"phase": "Pending"}  # as created: no kubelet reported on it
    assert kubelet.runs("elsewhere")[0].popen is None


# -- kopf -------------------------------------------------------------------------------------

KOPF_OPERATOR = """
import kopf

@kopf.on.create("example.dev", "v1", "widgets")
def created(spec, patch, **_):
    patch.status["phase"] = "Seen"
    patch.status["node"] = spec.get("nodeName")
"""


def test_kopf_operator_sees_objects_and_patches_status(
    kube_api: KubeApi, kubeconfig: Path, operator_namespace: str, tmp_path: Path
) -> None:
    """A minimal kopf operator (``kopf run --standalone -n NS``) reacts to a created object and
    patches its status through the stand-in's ``/status`` subresource."""
    kube_api.put("apiextensions.k8s.io", "customresourcedefinitions", WIDGET_CRD)
    script = tmp_path / "operator.py"
    script.write_text(KOPF_OPERATOR, encoding="utf-8")
    log = tmp_path / "kopf.log"
    kopf_run = [sys.executable, "-m", "kopf", "run", "--standalone"]
    with log.open("wb") as output:
        process = subprocess.Popen(
            die_with_parent([*kopf_run, "-n", operator_namespace, str(script)]),
            env={"KUBECONFIG": str(kubeconfig), "PATH": os.environ.get("PATH", os.defpath)},
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: any(r.is_watch and PLURAL in r.path for r in kube_api.requests),
            15,
            what="kopf to watch widgets",
            process=process,
        )
        kube_api.put(GROUP, PLURAL, widget("w1", operator_namespace))
        wait_until(
            lambda: (
                kube_api.get(GROUP, PLURAL, operator_namespace, "w1").get("status", {}).get("phase")
                == "Seen"
            ),
            15,
            what="kopf to patch the status",
            process=process,
        )
    finally:
        stop_process(process)
    status_patches = [
        r for r in kube_api.requests if r.method == "PATCH" and r.path.endswith("/w1/status")
    ]
    assert status_patches, read_text_or_empty(log)
    assert status_patches[0].content_type == "application/merge-patch+json"
    assert kube_api.get(GROUP, PLURAL, operator_namespace, "w1")["status"]["node"] == "node-7"
