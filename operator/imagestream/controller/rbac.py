"""The RBAC the controller and the agent need, as one table: (API group, resource, verb, why).

The Helm chart renders exactly these rules (tests/unit/test_chart.py compares them), and the
tests check the table against what the code calls: the kubernetes client methods `kube.py`
calls, and the requests each ServiceAccount made to the API stand-in during the operator's
success scenario (tests/integration/chart/). A new API call without a row here fails a test;
the rows of `kube.py` must equal its calls, and the watch rows the resources kopf watches for
the handlers (plus Events).

Who makes which calls:

- `kube.py` (the controller's own I/O): agent Jobs and their Pods.
- kopf, for the handlers in `handlers.py`: list/watch of ImageStreams, agent Jobs and Pods (its
  watches and indexes), patches of ImageStreams (finalizer, its progress annotations) and of
  their status, Events it posts (`kopf.event` and its own warnings).
- kopf's scanning (`settings.scanning`, left enabled): list/watch of namespaces, to follow the
  watched ones, and of CRDs, to notice the ImageStream CRD appear or change. Disabling it
  would drop these two cluster-wide read rules, but a controller started before its CRD
  would then never serve ImageStreams until restarted (kopf scans resources once), which a
  GitOps tool applying both in one sync can cause; read-only access to namespace and CRD
  objects is the cheaper risk. They are the only cluster-wide rules unless every namespace is
  watched.
- `imagestreams/finalizers` `update`: the agent Job's ownerReference sets blockOwnerDeletion,
  which the OwnerReferencesPermissionEnforcement admission plugin allows only to a user who
  may update the owner's finalizers.
- Events `get`/`list`/`watch`: the controller reads the Job controller's `FailedCreate` Events
  to report a Pod Security (or quota) refusal of the agent Pod.
- The agent: `get` and `patch` of `imagestreams/status`, its progress reports; nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from imagestream.kube_config import GROUP

Scope = Literal["namespace", "cluster"]

BATCH = "batch"
CORE = ""
APIEXTENSIONS = "apiextensions.k8s.io"


@dataclass(frozen=True)
class Permission:
    """One verb on one resource of one API group, and who needs it."""

    group: str
    resource: str
    verb: str
    #: `namespace`: granted in every watched namespace; `cluster`: cluster-wide.
    scope: Scope
    #: The caller: `kube.py`, `kopf` (watching and patching for the handlers), `kopf scanning`,
    #: `builders` (the Job's ownerReference),
    #: `handlers` (what the handlers read through kopf), or `agent`.
    caller: str

    @property
    def rule(self) -> tuple[str, str, str]:
        """(group, resource, verb), the form RBAC rules and API requests are compared in."""
        return (self.group, self.resource, self.verb)


def _rows(scope: Scope, caller: str, group: str, resource: str, verbs: str) -> list[Permission]:
    return [Permission(group, resource, verb, scope, caller) for verb in verbs.split()]


#: What the controller's ServiceAccount gets.
CONTROLLER: tuple[Permission, ...] = (
    *_rows("namespace", "kopf", GROUP, "imagestreams", "list watch patch"),
    *_rows("namespace", "kopf", GROUP, "imagestreams/status", "patch"),
    *_rows("namespace", "builders", GROUP, "imagestreams/finalizers", "update"),
    *_rows("namespace", "kube.py", BATCH, "jobs", "create get list delete"),
    *_rows("namespace", "kopf", BATCH, "jobs", "watch"),
    *_rows("namespace", "kube.py", CORE, "pods", "list delete"),
    *_rows("namespace", "kopf", CORE, "pods", "watch"),
    *_rows("namespace", "kopf", CORE, "events", "create"),
    *_rows("namespace", "handlers", CORE, "events", "get list watch"),
    *_rows("cluster", "kopf scanning", CORE, "namespaces", "list watch"),
    *_rows("cluster", "kopf scanning", APIEXTENSIONS, "customresourcedefinitions", "list watch"),
)

#: What the agent's ServiceAccount gets, in every watched namespace.
AGENT: tuple[Permission, ...] = tuple(
    _rows("namespace", "agent", GROUP, "imagestreams/status", "get patch")
)


def rules(permissions: tuple[Permission, ...], scope: Scope) -> set[tuple[str, str, str]]:
    """The (group, resource, verb) set of one scope of a ServiceAccount's table."""
    return {permission.rule for permission in permissions if permission.scope == scope}
