"""The chart's ValidatingAdmissionPolicies, evaluated on requests that must pass and requests
that must be refused.

The policies are taken from the chart as Helm renders it and run the way the API server runs a
ValidatingAdmissionPolicy: every matchCondition must be true for the policy to apply, then the
variables are computed in order, then each validation must return true (an evaluation error
refuses the request too: failurePolicy is Fail); a refusal carries the validation's
messageExpression, else its message. CEL is evaluated by the `common-expression-language`
package the CRD tests use (see tests/support/crd.py).

Differences from the API server: the expressions are not type-checked against the CRD's schema
(objects reach CEL as plain maps), and matchConstraints (resources and operations) are checked
by these tests' requests, not evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import cel
import pytest
from tests.support.chart import NAMESPACE, RELEASE, render

Json = dict[str, Any]
NODE_KEY = "authentication.kubernetes.io/node-name"
AGENT = f"system:serviceaccount:{NAMESPACE}:imagestream-agent"
CONTROLLER = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"


def policies(values: Mapping[str, Any] | None = None) -> dict[str, Json]:
    """The rendered ValidatingAdmissionPolicies by name, each checked to be bound (Deny)."""
    rendered = render(values)
    found = {doc["metadata"]["name"]: doc for doc in rendered.of_kind("ValidatingAdmissionPolicy")}
    bindings = {
        doc["spec"]["policyName"]: doc["spec"]
        for doc in rendered.of_kind("ValidatingAdmissionPolicyBinding")
    }
    assert set(bindings) == set(found)
    for name, binding in bindings.items():
        assert binding["validationActions"] == ["Deny"], name
        assert found[name]["spec"]["failurePolicy"] == "Fail"
    return found


def evaluate(policy: Json, request: Json, obj: Json | None, old: Json | None) -> list[str] | None:
    """None when the policy does not apply; else the messages of the refusals (empty: passes)."""
    spec = policy["spec"]
    context: dict[str, Any] = {"request": request, "object": obj, "oldObject": old}
    for condition in spec.get("matchConditions", []):
        if cel.evaluate(condition["expression"], context) is not True:
            return None
    computed: dict[str, Any] = {}
    context["variables"] = computed
    for variable in spec.get("variables", []):
        computed[variable["name"]] = cel.evaluate(variable["expression"], context)
    refusals = []
    for validation in spec["validations"]:
        try:
            passed = cel.evaluate(validation["expression"], context)
        except Exception as exc:  # failurePolicy Fail: an error refuses
            refusals.append(f"error: {exc}")
            continue
        if passed is True:
            continue
        message = validation.get("message", "")
        if "messageExpression" in validation:
            message = str(cel.evaluate(validation["messageExpression"], context))
        refusals.append(message)
    return refusals


def request(
    user: str,
    operation: str = "UPDATE",
    *,
    namespace: str = NAMESPACE,
    sub_resource: str = "status",
    node: str | None = None,
) -> Json:
    """An AdmissionRequest as the policies see it."""
    user_info: Json = {"username": user, "groups": ["system:serviceaccounts"]}
    if node is not None:
        user_info["extra"] = {NODE_KEY: [node], "authentication.kubernetes.io/pod-name": ["p"]}
    found: Json = {
        "operation": operation,
        "namespace": namespace,
        "userInfo": user_info,
        "resource": {"group": "imagestream.dev", "version": "v1alpha1", "resource": "imagestreams"},
        # The API server's typed request: "" for the main resource.
        "subResource": sub_resource,
    }
    return found


def stream(namespace: str = NAMESPACE, node: str = "node-7", **status: Any) -> Json:
    """An ImageStream for `node` with a Running status (and `status` overrides)."""
    return {
        "apiVersion": "imagestream.dev/v1alpha1",
        "kind": "ImageStream",
        "metadata": {"name": "root-b", "namespace": namespace, "uid": "u-1", "generation": 1},
        "spec": {
            "nodeName": node,
            "source": {"url": "https://images.example/root.zst", "sha384": "a" * 96},
            "target": {"device": "/dev/disk/by-partlabel/root-b"},
        },
        "status": {
            "phase": "Running",
            "reason": "Streaming",
            "observedGeneration": 1,
            "jobName": "root-b-0a1b2c3d-g1",
            "conditions": [{"type": "Ready", "status": "False", "reason": "Streaming"}],
            "progress": {"bytesFetched": 10, "bytesTotal": 100, "bytesWritten": 30},
            **status,
        },
    }


def with_progress(obj: Json, fetched: int) -> Json:
    """`obj` after an agent's progress report."""
    changed = copy.deepcopy(obj)
    changed["status"]["progress"] = {"bytesFetched": fetched, "bytesTotal": 100, "percent": 50}
    return changed


# -- 1. ImageStreams only where they are served ---------------------------------------------------


def test_an_image_stream_in_a_watched_namespace_is_admitted() -> None:
    policy = policies()[f"{RELEASE}-namespaces"]
    create = request("alice", "CREATE", sub_resource="")
    assert evaluate(policy, create, stream(), None) == []


@pytest.mark.parametrize("user", ["alice", CONTROLLER, "system:admin"])
def test_an_image_stream_elsewhere_is_refused_naming_the_served_namespaces(user: str) -> None:
    policy = policies()[f"{RELEASE}-namespaces"]
    create = request(user, "CREATE", namespace="default", sub_resource="")
    (message,) = evaluate(policy, create, stream("default"), None) or ["not applied"]
    assert "only in the namespaces imagestream-system" in message


def test_several_namespaces_are_served_and_named() -> None:
    values = {"watchNamespaces": ["fleet-a", "fleet-b"]}
    policy = policies(values)[f"{RELEASE}-namespaces"]
    ok = request("alice", "CREATE", namespace="fleet-b", sub_resource="")
    assert evaluate(policy, ok, stream("fleet-b"), None) == []
    refused = request("alice", "UPDATE", namespace=NAMESPACE, sub_resource="")
    (message,) = evaluate(policy, refused, stream(), stream()) or ["not applied"]
    assert "fleet-a, fleet-b" in message


def test_all_namespaces_have_no_namespace_policy() -> None:
    assert set(policies({"watchNamespaces": []})) == {f"{RELEASE}-agent"}


def test_admission_can_be_turned_off() -> None:
    assert policies({"admission": {"enabled": False}}) == {}


# -- 2. the agent: status.progress of its own node's streams, nothing else -----------------------


@pytest.fixture
def agent_policy() -> Json:
    """The agent policy as the default values render it."""
    return policies()[f"{RELEASE}-agent"]


@pytest.mark.parametrize("node", [None, "node-7"])
def test_the_agent_may_report_progress(agent_policy: Json, node: str | None) -> None:
    old = stream()
    assert evaluate(agent_policy, request(AGENT, node=node), with_progress(old, 60), old) == []


def test_the_agent_may_report_before_any_other_status(agent_policy: Json) -> None:
    old = stream()
    del old["status"]
    new = copy.deepcopy(old)
    new["status"] = {"progress": {"bytesFetched": 1}}
    assert evaluate(agent_policy, request(AGENT), new, old) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phase", "Succeeded"),
        ("reason", "Succeeded"),
        ("sha384", "a" * 96),  # absent before
        ("conditions", [{"type": "Ready", "status": "True", "reason": "Succeeded"}]),
        ("observedGeneration", 2),
        ("completionTime", "2026-01-01T00:00:00Z"),
    ],
)
def test_the_agent_may_not_forge_the_outcome(agent_policy: Json, field: str, value: Any) -> None:
    old = stream()
    new = with_progress(old, 100)
    new["status"][field] = value
    refusals = evaluate(agent_policy, request(AGENT, node="node-7"), new, old)
    assert refusals == [
        "the imagestream agent may change only status.progress (phase, conditions, sha384 and "
        "the rest are the controller's)"
    ]


def test_the_agent_may_not_drop_a_field(agent_policy: Json) -> None:
    old = stream(message="streaming")
    new = with_progress(old, 70)
    del new["status"]["message"]
    assert evaluate(agent_policy, request(AGENT), new, old)


def test_an_agent_of_another_node_is_refused(agent_policy: Json) -> None:
    old = stream()
    refusals = evaluate(agent_policy, request(AGENT, node="node-8"), with_progress(old, 60), old)
    assert refusals == [
        "the imagestream agent of node node-8 may not write the status of an ImageStream for "
        "node node-7"
    ]


@pytest.mark.parametrize(
    ("operation", "sub_resource"), [("UPDATE", ""), ("CREATE", ""), ("DELETE", "")]
)
def test_the_agent_may_only_update_status(
    agent_policy: Json, operation: str, sub_resource: str
) -> None:
    old = None if operation == "CREATE" else stream()
    new = None if operation == "DELETE" else stream(node="node-8")
    refusals = evaluate(
        agent_policy, request(AGENT, operation, sub_resource=sub_resource), new, old
    )
    assert refusals
    assert refusals[0] == "the imagestream agent may only update the status of an ImageStream"


@pytest.mark.parametrize(
    "user", [CONTROLLER, "alice", "system:serviceaccount:other:imagestream-agent-x"]
)
def test_other_users_are_not_the_agent(agent_policy: Json, user: str) -> None:
    old = stream()
    new = copy.deepcopy(old)
    new["status"]["phase"] = "Succeeded"
    assert evaluate(agent_policy, request(user), new, old) is None


def test_the_agent_policy_follows_the_service_account_name() -> None:
    policy = policies({"agent": {"serviceAccountName": "disk-writer"}})[f"{RELEASE}-agent"]
    old = stream()
    new = copy.deepcopy(old)
    new["status"]["phase"] = "Succeeded"
    writer = f"system:serviceaccount:{NAMESPACE}:disk-writer"
    assert evaluate(policy, request(writer), new, old)
    assert evaluate(policy, request(AGENT), new, old) is None


def test_the_agent_policy_lists_every_status_field_but_progress(agent_policy: Json) -> None:
    """The field list comes from the CRD's status schema, rendered by the chart."""
    from tests.support.crd import load_crd  # noqa: PLC0415

    fields = set(load_crd().schema["properties"]["status"]["properties"])
    (rule,) = [
        item["expression"]
        for item in agent_policy["spec"]["validations"]
        if "oldObject.spec" in item["expression"]
    ]
    for field in fields - {"progress"}:
        assert f"object.status.{field} == oldObject.status.{field}" in rule, field
    assert "status.progress" not in rule
