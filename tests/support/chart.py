"""The Helm chart, rendered by the real Helm engine (the `helm-python-sdk` package, Helm's Go SDK
through a C ABI: no `helm` binary, no cluster), and the RBAC vocabulary the tests compare in.

`render` is what `helm template` / `helm install --dry-run` produce: values checked against
values.schema.json, templates rendered, NOTES.txt rendered. `lookup` returns nothing (no
cluster), which the chart does not use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "imagestream-operator"
RELEASE = "imagestream-operator"
NAMESPACE = "imagestream-system"

Json = dict[str, Any]
Rule = tuple[str, str, str]


@dataclass(frozen=True)
class Rendered:
    """One rendering of the chart: the manifests (in template order) and NOTES.txt."""

    manifests: list[Json]
    notes: str

    def of_kind(self, kind: str) -> list[Json]:
        """The manifests of one kind."""
        return [doc for doc in self.manifests if doc["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Json:
        """The single manifest of `kind` (and `name`)."""
        found = [doc for doc in self.of_kind(kind) if name in (None, doc["metadata"]["name"])]
        assert len(found) == 1, f"{len(found)} {kind} {name or ''} rendered"
        return found[0]

    def deployment_args(self) -> list[str]:
        """The controller container's command and args."""
        (container,) = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
        return [*container["command"], *container["args"]]


def render(
    values: Mapping[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
    chart_dir: Path = CHART_DIR,
) -> Rendered:
    """Render the chart for a fresh install; raise helm's HelmValuesError for bad values."""
    helm.validate_release_name(name)
    with helm.Chart.load(chart_dir) as chart:
        files = chart.render(dict(values or {}), name=name, namespace=namespace, is_install=True)
    manifests: list[Json] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(manifests, notes)


def lint(values: Mapping[str, Any] | None = None, *, kube_version: str) -> dict[str, Any]:
    """`helm lint --strict` of the chart with `values` for a Kubernetes version."""
    return helm.lint(CHART_DIR, dict(values or {}), strict=True, kube_version=kube_version)


# -- RBAC ----------------------------------------------------------------------------------------


def rules_of(role: Mapping[str, Any]) -> set[Rule]:
    """The (group, resource, verb) triples a Role or ClusterRole grants."""
    return {
        (group, resource, verb)
        for rule in role.get("rules", [])
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def granted(
    rendered: Rendered, namespace: str, service_account: str
) -> dict[str | None, set[Rule]]:
    """What the ServiceAccount namespace/name may do, by the namespace it may do it in (None:
    cluster-wide), from the rendered (Cluster)Roles and (Cluster)RoleBindings."""
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    roles = {
        (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): rules_of(doc)
        for doc in rendered.manifests
        if doc["kind"] in ("Role", "ClusterRole")
    }
    result: dict[str | None, set[Rule]] = {}
    for binding in rendered.manifests:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if subject not in binding["subjects"]:
            continue
        where = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role_namespace = where if ref["kind"] == "Role" else None
        rules = roles[(ref["kind"], role_namespace, ref["name"])]
        result.setdefault(where, set()).update(rules)
    return result


#: Request paths: /api/v1/... (core) or /apis/GROUP/VERSION/..., optionally namespaced.
_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)"
    r"(?:/namespaces/(?P<namespace>[^/]+)(?=/))?"
    r"/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def request_rule(
    method: str, path: str, params: Mapping[str, str]
) -> tuple[str | None, Rule] | None:
    """(namespace, (group, resource, verb)) of an API request, as the authorizer sees it; None
    for requests that are not about a resource (discovery, /version, /openapi)."""
    match = _PATH.match(path)
    if match is None:
        return None
    resource = match["resource"]
    if match["sub"]:
        resource = f"{resource}/{match['sub']}"
    if method == "GET":
        if match["name"]:
            verb = "get"
        else:
            verb = "watch" if params.get("watch") in ("true", "1") else "list"
    else:
        verb = _VERBS[method]
    return match["namespace"], (match["group"] or "", resource, verb)
