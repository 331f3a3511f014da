"""The state and semantics behind the Kubernetes API stand-in (:mod:`tests.support.kube_api`).

This module knows nothing about HTTP: it is an in-memory object store with the rules of a real
kube-apiserver that the operator, ``kubectl`` and the kubernetes client rely on —
resourceVersion, uid, generation, status subresource, optimistic concurrency, finalizers, label
and field selectors, a watch history to resume from, and CRDs that register new resources.
Every operation raises :class:`ApiError` (a Kubernetes ``Status``) the way the real server
answers. The HTTP layer maps requests onto :class:`Store` methods.

It is thread-safe: the HTTP server runs on its own event loop thread while tests inspect and
seed state from the test thread. Watchers are plain callables (the HTTP layer hands events to
its event loop with ``call_soon_threadsafe``).

Writes pass :mod:`tests.support.kube_admission` (CRD schemas and CEL rules, defaults and
pruning, names, a few built-in rules, Pod Security). What the real API server does that this
store does not (each test relying on one of these says so): no garbage collector (owned objects
survive their owner; ``propagationPolicy`` is accepted and ignored), no RBAC or authentication
(any bearer token is accepted), no version conversion (every version of a CRD serves the same
stored object), strategic merge patch of a built-in is treated as a JSON merge patch (lists are
replaced, not merged by key), namespace deletion removes only the namespace (not its content).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import json
import random
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

from .crd import Crd
from .kube_admission import Rejected, admit_custom, check_name, pod_security, validate_builtin

JSON = dict[str, Any]

#: Characters Kubernetes uses for generated name suffixes (no vowels, no look-alike digits).
NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

CRD_GROUP = "apiextensions.k8s.io"


def now_rfc3339() -> str:
    """Return the current UTC time as Kubernetes writes timestamps (seconds, ``Z``)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(length: int = 5) -> str:
    """Return a random name suffix the way the API server builds ``generateName`` names."""
    return "".join(random.choice(NAME_SUFFIX_ALPHABET) for _ in range(length))


class ApiError(Exception):
    """An error the API server answers with a ``Status`` object (``code`` is the HTTP status)."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> JSON:
        """The ``meta.k8s.io/v1`` Status object for this error."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


@dataclass(frozen=True)
class PrinterColumn:
    """One ``additionalPrinterColumns`` entry of a CRD (or a built-in table column)."""

    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""


@dataclass(frozen=True)
class ResourceType:
    """What discovery says about a resource, plus the rules that depend on it."""

    group: str
    versions: tuple[str, ...]
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    #: Subresources served, e.g. ``("status",)`` or ``("status", "log")``.
    subresources: tuple[str, ...] = ()
    printer_columns: tuple[PrinterColumn, ...] = ()
    #: Whether ``metadata.generation`` is maintained (objects with a spec).
    has_generation: bool = True
    #: Custom resources refuse a PUT without ``metadata.resourceVersion``; most built-ins allow it.
    custom: bool = False
    #: A completed DELETE answers with the object (``ReturnDeletedObject`` in the real registry:
    #: pods, namespaces, service accounts, CRDs, custom resources) or else with a Status.
    returns_deleted_object: bool = True

    @property
    def key(self) -> tuple[str, str]:
        """The identity of the resource in the store: (group, plural)."""
        return (self.group, self.plural)

    @property
    def has_status(self) -> bool:
        """Whether the resource has a ``status`` subresource (status is written only there)."""
        return "status" in self.subresources

    @property
    def qualified(self) -> str:
        """``plural.group`` as error messages name the resource (``pods`` for core)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str) -> str:
        """``group/version`` (or just ``version`` for the core group)."""
        return f"{self.group}/{version}" if self.group else version


def _builtin(
    group: str,
    version: str,
    plural: str,
    kind: str,
    *,
    namespaced: bool = True,
    short_names: tuple[str, ...] = (),
    categories: tuple[str, ...] = (),
    subresources: tuple[str, ...] = (),
    has_generation: bool = False,
    columns: tuple[PrinterColumn, ...] = (),
    returns_deleted_object: bool = False,
) -> ResourceType:
    return ResourceType(
        group=group,
        versions=(version,),
        plural=plural,
        singular=kind.lower(),
        kind=kind,
        namespaced=namespaced,
        short_names=short_names,
        categories=categories,
        subresources=subresources,
        has_generation=has_generation,
        printer_columns=columns,
        returns_deleted_object=returns_deleted_object,
    )


#: The built-in resources the operator, kubectl and kopf touch.
BUILTIN_RESOURCES: tuple[ResourceType, ...] = (
    _builtin(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        short_names=("ns",),
        subresources=("status",),
        columns=(PrinterColumn("Status", "string", ".status.phase"),),
        returns_deleted_object=True,
    ),
    _builtin(
        "",
        "v1",
        "nodes",
        "Node",
        namespaced=False,
        short_names=("no",),
        subresources=("status",),
    ),
    _builtin(
        "",
        "v1",
        "pods",
        "Pod",
        short_names=("po",),
        categories=("all",),
        subresources=("status",),
        columns=(
            PrinterColumn("Status", "string", ".status.phase"),
            PrinterColumn("Node", "string", ".spec.nodeName"),
        ),
        returns_deleted_object=True,
    ),
    _builtin("", "v1", "events", "Event", short_names=("ev",)),
    _builtin("", "v1", "secrets", "Secret"),
    _builtin("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    _builtin(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        short_names=("sa",),
        returns_deleted_object=True,
    ),
    _builtin(
        "batch",
        "v1",
        "jobs",
        "Job",
        categories=("all",),
        subresources=("status",),
        has_generation=True,
        columns=(
            PrinterColumn("Active", "integer", ".status.active"),
            PrinterColumn("Succeeded", "integer", ".status.succeeded"),
            PrinterColumn("Failed", "integer", ".status.failed"),
        ),
    ),
    _builtin("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    _builtin(
        CRD_GROUP,
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        subresources=("status",),
        has_generation=True,
        returns_deleted_object=True,
    ),
)


# -- selectors ----------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split a selector on commas that are not inside ``in (a,b)`` parentheses."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


_SET_RE = re.compile(r"^(?P<key>[^\s!=]+)\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)$")
_EQ_RE = re.compile(r"^(?P<key>[^\s!=]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s]*)$")


def _label_requirement(text: str) -> Callable[[Mapping[str, str]], bool]:
    if match := _SET_RE.match(text):
        values = {value.strip() for value in match["values"].split(",")}
        key = match["key"]
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQ_RE.match(text):
        key, value = match["key"], match["value"]
        if match["op"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if text.startswith("!"):
        absent = text[1:].strip()
        return lambda labels: absent not in labels
    if re.fullmatch(r"[A-Za-z0-9._/-]+", text):
        return lambda labels: text in labels
    raise ApiError(400, "BadRequest", f"unable to parse requirement: {text!r}")


def label_matcher(selector: str | None) -> Callable[[JSON], bool]:
    """Compile a ``labelSelector`` (equality and set-based forms) into an object predicate."""
    requirements = [_label_requirement(part) for part in _split_top_level(selector or "")]

    def matches(obj: JSON) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(requirement(labels) for requirement in requirements)

    return matches


def field_value(obj: JSON, path: str) -> Any:
    """Return the value at a dotted field path (``metadata.name``), or None when absent."""
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


#: The field labels every resource supports in a field selector.
COMMON_FIELD_LABELS = frozenset({"metadata.name", "metadata.namespace"})
#: The further field labels of the built-ins this project uses (the real registries' lists);
#: a custom resource supports only the common ones.
FIELD_LABELS: Mapping[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
    ("", "events"): frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        }
    ),
    ("batch", "jobs"): frozenset({"status.successful"}),
    ("", "secrets"): frozenset({"type"}),
    ("", "namespaces"): frozenset({"status.phase"}),
    ("", "nodes"): frozenset({"spec.unschedulable"}),
}
#: Field labels whose value lives at another path.
_FIELD_LABEL_PATHS = {"source": "source.component"}


def field_matcher(
    selector: str | None, resource_key: tuple[str, str] | None = None
) -> Callable[[JSON], bool]:
    """Compile a ``fieldSelector`` (``path=value``, ``path==value``, ``path!=value``).

    With ``resource_key``, only the field labels that resource supports are accepted (400
    otherwise, as on the real server).
    """
    checks: list[Callable[[JSON], bool]] = []
    for part in _split_top_level(selector or ""):
        match = _EQ_RE.match(part)
        if match is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        label, value, negate = match["key"], match["value"], match["op"] == "!="
        if resource_key is not None and label not in (
            COMMON_FIELD_LABELS | FIELD_LABELS.get(resource_key, frozenset())
        ):
            raise ApiError(400, "BadRequest", f"field label not supported: {label}")
        path = _FIELD_LABEL_PATHS.get(label, label)

        def check(obj: JSON, path: str = path, value: str = value, negate: bool = negate) -> bool:
            actual = field_value(obj, path)
            equal = ("" if actual is None else str(actual)) == value
            return equal != negate

        checks.append(check)
    return lambda obj: all(check(obj) for check in checks)


# -- patches ------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch (``null`` deletes a key; lists are replaced)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: JSON = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_patch(current: JSON, patch: Any, content_type: str, *, custom: bool = False) -> JSON:
    """Return ``current`` with ``patch`` applied according to the patch ``content_type``.

    A custom resource has no strategic-merge metadata: such a patch is 415, as on the server.
    """
    accepted = [JSON_PATCH, MERGE_PATCH, APPLY_PATCH if custom else STRATEGIC_MERGE_PATCH]
    if content_type == STRATEGIC_MERGE_PATCH and custom:
        content_type = "unsupported"
    if content_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
        if not isinstance(patch, Mapping):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        patched = merge_patch(current, patch)
    elif content_type == JSON_PATCH:
        if not isinstance(patch, list):
            raise ApiError(400, "BadRequest", "a JSON patch must be a JSON array")
        try:
            patched = jsonpatch.apply_patch(current, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            # The real server wraps the patch library's error in NewGenericServerResponse(422),
            # which keeps only a generic message: a failed `test` and a missing path look alike.
            raise ApiError(
                422, "Invalid", "the server rejected our request due to an error in our request"
            ) from exc
    else:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: "
            + ", ".join(accepted),
        )
    if not isinstance(patched, dict):
        raise ApiError(422, "Invalid", "the patched object is not a JSON object")
    return patched


# -- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchEvent:
    """One change: ``type`` ADDED/MODIFIED/DELETED, the object after it and before it."""

    resource_version: int
    resource: tuple[str, str]
    type: str
    object: JSON
    previous: JSON | None


Watcher = Callable[[WatchEvent], None]


@dataclass
class _Subscription:
    resource: tuple[str, str]
    callback: Watcher


ObjectKey = tuple[tuple[str, str], str, str]  # (resource key, namespace or "", name)


@dataclass
class Store:
    """All objects, the resource registry, the change history and the watchers.

    Objects handed out are deep copies: callers may modify them freely.
    """

    resources: dict[tuple[str, str], ResourceType] = field(default_factory=dict)
    _objects: dict[ObjectKey, JSON] = field(default_factory=dict)
    _history: list[WatchEvent] = field(default_factory=list)
    _subscriptions: list[_Subscription] = field(default_factory=list)
    _revision: int = 1
    #: Watches from a resourceVersion older than this get 410 Gone (see :meth:`compact`).
    _compacted: int = 0
    #: Per resource, the revision its watch cache starts at (when it began to be served):
    #: a watch from an older resourceVersion gets 410 Expired, as from a real watch cache.
    _watch_start: dict[tuple[str, str], int] = field(default_factory=dict)
    #: The schema of each custom resource (from its CRD), enforced on every write.
    _schemas: dict[tuple[str, str], Crd] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        for resource in BUILTIN_RESOURCES:
            self.resources[resource.key] = resource
        for namespace in ("default", "kube-system", "kube-public"):
            self.create(self.resource("", "namespaces"), "", {"metadata": {"name": namespace}})

    # -- registry -----------------------------------------------------------------------------

    def resource(self, group: str, plural: str) -> ResourceType:
        """Return the registered resource ``plural`` of ``group``; 404 when unknown."""
        with self._lock:
            found = self.resources.get((group, plural))
        if found is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        return found

    def find_resource(self, group: str, version: str, plural: str) -> ResourceType:
        """Like :meth:`resource`, but the version must be served too."""
        found = self.resource(group, plural)
        if version not in found.versions:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return found

    def served(self) -> list[ResourceType]:
        """All resources currently served (built-ins and those of established CRDs)."""
        with self._lock:
            return list(self.resources.values())

    @property
    def revision(self) -> int:
        """The latest resourceVersion the store handed out."""
        with self._lock:
            return self._revision

    # -- reading ------------------------------------------------------------------------------

    def get(self, resource: ResourceType, namespace: str, name: str) -> JSON:
        """Return one object; 404 NotFound when it does not exist."""
        with self._lock:
            obj = self._objects.get((resource.key, namespace, name))
            if obj is None:
                raise self._not_found(resource, name)
            return copy.deepcopy(obj)

    def list_objects(
        self,
        resource: ResourceType,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[JSON], int]:
        """Return the matching objects (all namespaces when ``namespace`` is None) and the
        resourceVersion of the list."""
        page = self.list_page(
            resource, namespace, label_selector=label_selector, field_selector=field_selector
        )
        return page.items, page.revision

    def list_page(
        self,
        resource: ResourceType,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: int | None = None,
        exact: bool = False,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> ListPage:
        """One page of a list, as the real server pages it.

        ``exact`` serves the state at ``resource_version`` (from the history; 410 when it was
        compacted away, 504 when it is in the future); a ``continue_token`` serves the next
        page of the same snapshot. Without a limit, everything is one page.
        """
        matches = self._matcher(resource, label_selector, field_selector)
        after: tuple[str, str] = ("", "")
        if continue_token:
            resource_version, start = _decode_continue(continue_token)
            namespace_part, _, name_part = start.partition("/")
            after = (namespace_part, name_part)
            exact = True
        with self._lock:
            revision = self._revision
            if exact and resource_version is not None and resource_version != revision:
                revision = resource_version
                objects = self._snapshot(resource, resource_version)
            else:
                objects = {
                    (obj_namespace, name): obj
                    for (key, obj_namespace, name), obj in self._objects.items()
                    if key == resource.key
                }
            selected = [
                copy.deepcopy(obj)
                for (obj_namespace, name), obj in sorted(objects.items())
                if (namespace is None or obj_namespace == namespace)
                and (obj_namespace, name) > after
                and matches(obj)
            ]
        if not limit or len(selected) <= limit:
            return ListPage(selected, revision, "", None)
        last = selected[limit - 1]["metadata"]
        token = _encode_continue(revision, f"{last.get('namespace', '')}/{last['name']}")
        return ListPage(selected[:limit], revision, token, len(selected) - limit)

    def _snapshot(self, resource: ResourceType, revision: int) -> dict[tuple[str, str], JSON]:
        """The objects of ``resource`` as they were at ``revision`` (replayed from history)."""
        if revision > self._revision:
            raise ApiError(
                504, "Timeout", f"Too large resource version: {revision}, current: {self._revision}"
            )
        if revision < self._compacted:
            raise ApiError(410, "Expired", "The resourceVersion for the provided list is too old.")
        state: dict[tuple[str, str], JSON] = {}
        for event in self._history:
            if event.resource != resource.key or event.resource_version > revision:
                continue
            meta = event.object["metadata"]
            where = (meta.get("namespace", ""), meta["name"])
            if event.type == "DELETED":
                state.pop(where, None)
            else:
                state[where] = event.object
        return state

    @staticmethod
    def _matcher(
        resource: ResourceType, label_selector: str | None, field_selector: str | None
    ) -> Callable[[JSON], bool]:
        labels = label_matcher(label_selector)
        fields = field_matcher(field_selector, resource.key)
        return lambda obj: labels(obj) and fields(obj)

    # -- writing ------------------------------------------------------------------------------

    def create(
        self,
        resource: ResourceType,
        namespace: str,
        body: JSON,
        *,
        strict: bool = False,
        warnings: list[str] | None = None,
    ) -> JSON:
        """Create an object as POST does: name or generateName, uid, resourceVersion, ...

        The object passes admission first (see :mod:`tests.support.kube_admission`): its
        warnings are appended to ``warnings``; ``strict`` is ``fieldValidation=Strict``.
        """
        warnings = [] if warnings is None else warnings
        obj = copy.deepcopy(body)
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not a JSON object")
        meta = obj.setdefault("metadata", {})
        body_namespace = meta.get("namespace")
        if resource.namespaced:
            if body_namespace and namespace and body_namespace != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request",
                )
            namespace = namespace or body_namespace or ""
            if not namespace:
                raise ApiError(400, "BadRequest", "a namespace is required for this resource")
            meta["namespace"] = namespace
        else:
            namespace = ""
            meta.pop("namespace", None)
        with self._lock:
            if resource.namespaced:
                self._require_namespace(namespace)
            if not meta.get("name"):
                prefix = meta.get("generateName")
                if not prefix:
                    raise self._invalid(
                        resource, "", "metadata.name", "name or generateName is required"
                    )
                meta["name"] = f"{prefix}{random_suffix()}"
            bad_name = check_name(str(meta["name"]))
            if bad_name is not None:
                raise self._rejected(resource, meta["name"], [bad_name])
            key = (resource.key, namespace, meta["name"])
            if key in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{resource.qualified} "{meta["name"]}" already exists',
                    self._details(resource, meta["name"]),
                )
            self._validate_crd(resource, obj)
            for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(server_owned, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            if resource.has_generation:
                meta["generation"] = 1
            else:
                meta.pop("generation", None)
            if resource.has_status:
                obj.pop("status", None)
            if resource.key == ("", "namespaces"):
                obj["status"] = {"phase": "Active"}
            _fold_string_data(resource, obj)
            self._set_type(resource, obj, body)
            obj = self._admit(resource, obj, None, None, strict=strict, warnings=warnings)
            _apply_defaults(resource, obj)
            return self._commit(resource, key, "ADDED", obj, None)

    def update(
        self,
        resource: ResourceType,
        namespace: str,
        name: str,
        body: JSON,
        *,
        subresource: str | None = None,
        strict: bool = False,
        warnings: list[str] | None = None,
    ) -> JSON:
        """Replace an object as PUT does (``subresource="status"`` replaces only the status)."""
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not a JSON object")
        body_meta = body.get("metadata") or {}
        if body_meta.get("name") not in (None, name):
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({body_meta.get('name')}) does not match the name on "
                f"the URL ({name})",
            )
        with self._lock:
            current = self._current(resource, namespace, name)
            # A uid in a PUT body is a storage precondition, checked before anything else.
            wanted_uid = body_meta.get("uid")
            if wanted_uid and wanted_uid != current["metadata"]["uid"]:
                raise self._uid_precondition_failed(resource, current, wanted_uid)
            expected = body_meta.get("resourceVersion")
            if not expected and resource.custom and subresource is None:
                raise self._invalid(
                    resource,
                    name,
                    "metadata.resourceVersion",
                    "must be specified for an update",
                )
            return self._write(
                resource, current, body, expected, subresource, strict=strict, warnings=warnings
            )

    def patch(
        self,
        resource: ResourceType,
        namespace: str,
        name: str,
        patch: Any,
        content_type: str,
        *,
        subresource: str | None = None,
        strict: bool = False,
        warnings: list[str] | None = None,
    ) -> JSON:
        """Patch an object (merge, JSON or strategic-merge patch; the status subresource too)."""
        with self._lock:
            current = self._current(resource, namespace, name)
            patched = apply_patch(current, patch, content_type, custom=resource.custom)
            # A resourceVersion in the patch is a precondition, as on the real server.
            expected = (patched.get("metadata") or {}).get("resourceVersion")
            if expected == current["metadata"]["resourceVersion"]:
                expected = None
            return self._write(
                resource, current, patched, expected, subresource, strict=strict, warnings=warnings
            )

    def delete(
        self,
        resource: ResourceType,
        namespace: str,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        preconditions: Mapping[str, str] | None = None,
    ) -> tuple[JSON, bool]:
        """Delete an object; with finalizers (or a bound, running Pod) only mark it deleted.

        Returns the object's last state and whether it is gone now.
        """
        with self._lock:
            current = self._current(resource, namespace, name)
            meta = current["metadata"]
            for field_name in ("uid", "resourceVersion"):
                wanted = (preconditions or {}).get(field_name)
                if wanted and wanted != meta.get(field_name):
                    raise self._conflict(resource, name, f"Precondition failed: {field_name}")
            key = (resource.key, namespace, name)
            grace = self._graceful_pod_deletion(resource, current, grace_period_seconds)
            if not meta.get("finalizers") and grace is None:
                if resource.key == ("", "pods"):
                    # A Pod is deleted gracefully even with grace 0: its last state is marked.
                    meta.setdefault("deletionTimestamp", now_rfc3339())
                    meta["deletionGracePeriodSeconds"] = 0
                return self._remove(resource, key, current), True
            if meta.get("deletionTimestamp"):
                return current, False  # already being deleted: nothing changes
            updated = copy.deepcopy(current)
            updated["metadata"]["deletionTimestamp"] = now_rfc3339()
            updated["metadata"]["deletionGracePeriodSeconds"] = grace or 0
            # The registry's BeforeDelete: setting deletionTimestamp is a change of the object's
            # desired state, so an object with a generation gets a new one.
            if int(updated["metadata"].get("generation") or 0) > 0:
                updated["metadata"]["generation"] += 1
            return self._commit(resource, key, "MODIFIED", updated, current), False

    def compact(self) -> int:
        """Forget the change history (as etcd compaction does); return the current revision.

        Afterwards a watch from an older resourceVersion gets ``410 Gone``.
        """
        with self._lock:
            self._history.clear()
            self._compacted = self._revision
            return self._revision

    # -- watching -----------------------------------------------------------------------------

    def subscribe(
        self,
        resource: ResourceType,
        since: int | None,
        callback: Watcher,
    ) -> tuple[list[WatchEvent], Callable[[], None]]:
        """Register ``callback`` for future changes of ``resource``.

        Returns the events after ``since`` (all current objects as synthetic ADDED events when
        ``since`` is None) — collected atomically with the registration, so nothing is missed —
        and a function that unsubscribes.
        """
        subscription = _Subscription(resource.key, callback)
        with self._lock:
            if since is None:
                backlog = [
                    WatchEvent(int(obj["metadata"]["resourceVersion"]), key, "ADDED", obj, None)
                    for (key, _ns, _name), obj in sorted(self._objects.items())
                    if key == resource.key
                ]
            else:
                oldest = max(self._compacted, self._watch_start.get(resource.key, 0))
                if since < oldest:
                    raise ApiError(410, "Expired", f"too old resource version: {since} ({oldest})")
                backlog = [
                    event
                    for event in self._history
                    if event.resource == resource.key and event.resource_version > since
                ]
            self._subscriptions.append(subscription)

        def unsubscribe() -> None:
            with self._lock:
                if subscription in self._subscriptions:
                    self._subscriptions.remove(subscription)

        return [copy.deepcopy(event) for event in backlog], unsubscribe

    # -- internals ----------------------------------------------------------------------------

    def _current(self, resource: ResourceType, namespace: str, name: str) -> JSON:
        obj = self._objects.get((resource.key, namespace, name))
        if obj is None:
            raise self._not_found(resource, name)
        return copy.deepcopy(obj)

    def _write(
        self,
        resource: ResourceType,
        current: JSON,
        body: JSON,
        expected_version: str | None,
        subresource: str | None,
        *,
        strict: bool = False,
        warnings: list[str] | None = None,
    ) -> JSON:
        """The rules shared by PUT and PATCH, main resource or status."""
        meta = current["metadata"]
        name = meta["name"]
        if expected_version and expected_version != meta["resourceVersion"]:
            raise self._conflict(
                resource,
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        self._check_uid_unchanged(resource, current, body, subresource)
        if subresource == "status":
            updated = copy.deepcopy(current)
            if "status" in body:
                updated["status"] = copy.deepcopy(body["status"])
            else:
                updated.pop("status", None)
        elif subresource is None:
            updated = copy.deepcopy(body)
            if resource.has_status:
                if "status" in current:
                    updated["status"] = copy.deepcopy(current["status"])
                else:
                    updated.pop("status", None)
            updated["metadata"] = self._kept_metadata(meta, updated.get("metadata") or {})
            _fold_string_data(resource, updated)
            self._validate_crd(resource, updated)
        else:
            raise ApiError(404, "NotFound", f"subresource {subresource!r} cannot be written")
        self._set_type(resource, updated, current)
        self._check_no_new_finalizers(resource, current, updated)
        updated = self._admit(
            resource, updated, current, subresource, strict=strict, warnings=warnings
        )
        if self._spec_of(resource, updated) != self._spec_of(resource, current):
            updated["metadata"]["generation"] = int(meta.get("generation", 0)) + 1
        updated["metadata"]["resourceVersion"] = meta["resourceVersion"]
        if updated == current:
            return current  # a no-op write changes nothing and notifies nobody, as on the server
        key = (resource.key, meta.get("namespace", ""), name)
        if self._deletion_released(updated["metadata"]):
            return self._remove(resource, key, updated)
        return self._commit(resource, key, "MODIFIED", updated, current)

    def _check_uid_unchanged(
        self, resource: ResourceType, current: JSON, body: JSON, subresource: str | None
    ) -> None:
        """metadata.uid is immutable (422), except where the write keeps only the status.

        The status subresource of a custom resource copies the stored object over the written
        one before validation (apiextensions ``statusStrategy.PrepareForUpdate``), so a uid
        there is dropped silently; built-in status strategies keep the metadata and reject it.
        """
        uid = (body.get("metadata") or {}).get("uid")
        if not uid or uid == current["metadata"]["uid"]:
            return  # an empty uid is filled in from the stored object
        if subresource == "status" and resource.custom:
            return
        raise self._invalid(
            resource, current["metadata"]["name"], "metadata.uid", f'"{uid}": field is immutable'
        )

    def _admit(
        self,
        resource: ResourceType,
        obj: JSON,
        old: JSON | None,
        subresource: str | None,
        *,
        strict: bool,
        warnings: list[str] | None,
    ) -> JSON:
        """Validation and admission of a write (see :mod:`tests.support.kube_admission`)."""
        found: list[str] = [] if warnings is None else warnings
        name = str(obj.get("metadata", {}).get("name", ""))
        try:
            schema = self._schemas.get(resource.key)
            if schema is not None:
                obj = admit_custom(
                    schema,
                    _kind_label(resource),
                    obj,
                    old,
                    status_only=subresource == "status",
                    strict=strict,
                    warnings=found,
                )
            else:
                validate_builtin(resource.key, obj, old)
            if old is None and resource.namespaced:
                namespace = self._objects.get(
                    (("", "namespaces"), "", str(obj["metadata"].get("namespace", "")))
                )
                labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
                pod_security(resource.key, labels, obj, found)
        except Rejected as exc:
            if exc.code == 422:
                raise self._rejected(resource, name, exc.causes, exc.message) from None
            details = {"name": name, "kind": resource.plural} if exc.code == 403 else None
            raise ApiError(exc.code, exc.reason, exc.message, details) from None
        return obj

    def _check_no_new_finalizers(
        self, resource: ResourceType, current: JSON, updated: JSON
    ) -> None:
        meta = current["metadata"]
        if not meta.get("deletionTimestamp"):
            return
        new = [
            item
            for item in updated["metadata"].get("finalizers") or []
            if item not in (meta.get("finalizers") or [])
        ]
        if new:
            why = (
                "Forbidden: no new finalizers can be added if the object is being deleted, "
                f"found new finalizers {new}"
            )
            raise self._rejected(
                resource,
                meta["name"],
                [{"reason": "FieldValueForbidden", "message": why, "field": "metadata.finalizers"}],
            )

    def _rejected(
        self,
        resource: ResourceType,
        name: str,
        causes: list[JSON],
        message: str | None = None,
    ) -> ApiError:
        """A 422 Invalid with these causes."""
        details = {"name": name, "group": resource.group, "kind": resource.kind, "causes": causes}
        if message is None:
            listed = [f"{item['field']}: {item['message']}" for item in causes]
            text = listed[0] if len(listed) == 1 else "[" + ", ".join(listed) + "]"
            message = f'{_kind_label(resource)} "{name}" is invalid: {text}'
        return ApiError(422, "Invalid", message, details)

    @staticmethod
    def _deletion_released(meta: JSON) -> bool:
        """Whether a write ends a pending deletion: the last finalizer is gone and no grace
        period (of a Pod its kubelet is still stopping) is running."""
        return (
            bool(meta.get("deletionTimestamp"))
            and not meta.get("finalizers")
            and not meta.get("deletionGracePeriodSeconds")
        )

    @staticmethod
    def _kept_metadata(current: JSON, wanted: JSON) -> JSON:
        """Metadata after a write: clients may change labels, annotations, finalizers,
        ownerReferences; the server keeps the identity and its own fields."""
        result = copy.deepcopy(wanted)
        for server_owned in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "generateName",
        ):
            if server_owned in current:
                result[server_owned] = current[server_owned]
            else:
                result.pop(server_owned, None)
        return result

    @staticmethod
    def _spec_of(resource: ResourceType, obj: JSON) -> JSON:
        """What ``metadata.generation`` tracks: everything except metadata (and status, when
        it has its own subresource)."""
        ignored = {"metadata", "status"} if resource.has_status else {"metadata"}
        return {key: value for key, value in obj.items() if key not in ignored}

    @staticmethod
    def _graceful_pod_deletion(
        resource: ResourceType, obj: JSON, grace_period_seconds: int | None
    ) -> int | None:
        """A Pod bound to a node is only marked deleted: its kubelet stops the containers and
        then removes it (with grace period 0). Returns the grace period, or None."""
        if resource.key != ("", "pods") or not obj.get("spec", {}).get("nodeName"):
            return None
        if obj.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return None
        grace = grace_period_seconds
        if grace is None:
            grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30))
        return grace if grace > 0 else None

    def _require_namespace(self, namespace: str) -> None:
        if (("", "namespaces"), "", namespace) not in self._objects:
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )

    def _commit(
        self,
        resource: ResourceType,
        key: ObjectKey,
        event_type: str,
        obj: JSON,
        previous: JSON | None,
    ) -> JSON:
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        self._objects[key] = obj
        self._after_change(resource, obj, deleted=False)
        self._notify(WatchEvent(self._revision, resource.key, event_type, obj, previous))
        return copy.deepcopy(obj)

    def _remove(self, resource: ResourceType, key: ObjectKey, obj: JSON) -> JSON:
        self._revision += 1
        last = copy.deepcopy(obj)
        last["metadata"]["resourceVersion"] = str(self._revision)
        previous = self._objects.pop(key)
        self._after_change(resource, last, deleted=True)
        self._notify(WatchEvent(self._revision, resource.key, "DELETED", last, previous))
        return copy.deepcopy(last)

    def _notify(self, event: WatchEvent) -> None:
        frozen = copy.deepcopy(event)
        self._history.append(frozen)
        for subscription in list(self._subscriptions):
            if subscription.resource == event.resource:
                subscription.callback(copy.deepcopy(frozen))

    @staticmethod
    def _set_type(resource: ResourceType, obj: JSON, source: JSON) -> None:
        version = str(source.get("apiVersion", "")).rpartition("/")[2]
        if version not in resource.versions:
            version = resource.versions[0]
        obj["apiVersion"] = resource.api_version(version)
        obj["kind"] = resource.kind

    # -- CRDs ---------------------------------------------------------------------------------

    def _validate_crd(self, resource: ResourceType, obj: JSON) -> None:
        if resource.key != (CRD_GROUP, "customresourcedefinitions"):
            return
        try:
            crd_resource(obj)
        except (KeyError, TypeError, ValueError) as exc:
            raise self._invalid(
                resource, obj.get("metadata", {}).get("name", ""), "spec", f"invalid CRD: {exc}"
            ) from exc

    def _after_change(self, resource: ResourceType, obj: JSON, *, deleted: bool) -> None:
        """Keep the registry in step with CRDs: a stored CRD serves its resource at once.

        The real server establishes a CRD asynchronously (conditions NamesAccepted and
        Established appear a moment later); here they are set in the same write.
        """
        if resource.key != (CRD_GROUP, "customresourcedefinitions"):
            return
        served = crd_resource(obj)
        if deleted:
            self.resources.pop(served.key, None)
            self._schemas.pop(served.key, None)
            for key in [key for key in self._objects if key[0] == served.key]:
                del self._objects[key]
            return
        if served.key not in self.resources:
            self._watch_start[served.key] = self._revision
        self.resources[served.key] = served
        self._schemas[served.key] = Crd(obj, served.versions[0])
        now = now_rfc3339()
        obj["status"] = {
            "acceptedNames": {
                "kind": served.kind,
                "plural": served.plural,
                "singular": served.singular,
                "shortNames": list(served.short_names),
                "categories": list(served.categories),
            },
            "storedVersions": [served.versions[0]],
            "conditions": [
                {
                    "type": condition,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                }
                for condition, reason, message in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ],
        }

    # -- errors -------------------------------------------------------------------------------

    @staticmethod
    def _details(resource: ResourceType, name: str) -> JSON:
        return {"name": name, "group": resource.group, "kind": resource.plural}

    def _not_found(self, resource: ResourceType, name: str) -> ApiError:
        return ApiError(
            404,
            "NotFound",
            f'{resource.qualified} "{name}" not found',
            self._details(resource, name),
        )

    def _conflict(self, resource: ResourceType, name: str, why: str) -> ApiError:
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {resource.qualified} "{name}": {why}',
            self._details(resource, name),
        )

    def _uid_precondition_failed(
        self, resource: ResourceType, current: JSON, wanted_uid: str
    ) -> ApiError:
        """The 409 of a failed storage uid precondition, worded as etcd3 storage words it."""
        meta = current["metadata"]
        parts = [resource.group, resource.plural] if resource.custom else [resource.plural]
        key = "/".join(["/registry", *parts, *filter(None, [meta.get("namespace")]), meta["name"]])
        return self._conflict(
            resource,
            meta["name"],
            f"StorageError: invalid object, Code: 4, Key: {key}, ResourceVersion: 0, "
            f"AdditionalErrorMsg: Precondition failed: UID in precondition: {wanted_uid}, "
            f"UID in object meta: {meta['uid']}",
        )

    def _invalid(self, resource: ResourceType, name: str, field_path: str, why: str) -> ApiError:
        details = self._details(resource, name)
        details["causes"] = [{"reason": "FieldValueInvalid", "message": why, "field": field_path}]
        return ApiError(
            422,
            "Invalid",
            f'{resource.kind} "{name}" is invalid: {field_path}: Invalid value: {why}',
            details,
        )


def _default_pod_spec(spec: JSON) -> None:
    for container in spec.get("containers") or []:
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("imagePullPolicy", "IfNotPresent")
        container.setdefault("resources", {})
    for key, value in (
        ("restartPolicy", "Always"),
        ("terminationGracePeriodSeconds", 30),
        ("dnsPolicy", "ClusterFirst"),
        ("schedulerName", "default-scheduler"),
        ("securityContext", {}),
    ):
        spec.setdefault(key, value)


def _normalise_event(obj: JSON) -> None:
    """A core Event as the server stores it: its reporting fields present, its timestamps in
    the API's formats (``Time`` to the second, ``MicroTime`` to the microsecond, both in UTC)."""
    for key, value in (("reportingComponent", ""), ("reportingInstance", ""), ("eventTime", None)):
        obj.setdefault(key, value)
    for key, layout in (
        ("firstTimestamp", "%Y-%m-%dT%H:%M:%SZ"),
        ("lastTimestamp", "%Y-%m-%dT%H:%M:%SZ"),
        ("eventTime", "%Y-%m-%dT%H:%M:%S.%fZ"),
    ):
        value = obj.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
                obj[key] = parsed.astimezone(datetime.UTC).strftime(layout)


def _apply_defaults(resource: ResourceType, obj: JSON) -> None:
    """The defaults and generated fields the real server adds on create to the built-ins this
    project uses: Job counts and its selector and template labels, container termination
    message defaults. (Only these: other defaulting is not modelled.)"""
    if resource.key == ("", "pods"):
        spec = obj.setdefault("spec", {})
        _default_pod_spec(spec)
        for key, value in (
            ("serviceAccountName", "default"),
            ("enableServiceLinks", True),
            ("priority", 0),
        ):
            spec.setdefault(key, value)
        obj.setdefault("status", {"phase": "Pending"})
    if resource.key == ("", "events"):
        _normalise_event(obj)
    if resource.key != ("batch", "jobs"):
        return
    obj.setdefault("status", {})
    spec = obj.setdefault("spec", {})
    for key, value in (
        ("backoffLimit", 6),
        ("completions", 1),
        ("parallelism", 1),
        ("suspend", False),
        ("completionMode", "NonIndexed"),
    ):
        spec.setdefault(key, value)
    template = spec.setdefault("template", {})
    _default_pod_spec(template.setdefault("spec", {}))
    if spec.get("manualSelector"):
        return
    uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
    generated = {
        "batch.kubernetes.io/controller-uid": uid,
        "batch.kubernetes.io/job-name": name,
        "controller-uid": uid,
        "job-name": name,
    }
    labels = template.setdefault("metadata", {}).setdefault("labels", {})
    labels.update(generated)
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}


def _fold_string_data(resource: ResourceType, obj: JSON) -> None:
    """A Secret's write-only ``stringData`` is folded into ``data`` (base64), as the server does."""
    if resource.key != ("", "secrets") or "stringData" not in obj:
        return
    data = obj.setdefault("data", {})
    for key, value in (obj.pop("stringData") or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()


def crd_resource(crd: JSON) -> ResourceType:
    """The resource a CustomResourceDefinition object defines (names, versions, columns)."""
    spec = crd["spec"]
    names = spec["names"]
    versions = [version for version in spec["versions"] if version.get("served", True)]
    if not versions:
        raise ValueError("no served versions")
    # The storage version first: it is the preferred version in discovery.
    versions.sort(key=lambda version: not version.get("storage", False))
    first = versions[0]
    columns = tuple(
        PrinterColumn(
            name=column["name"],
            type=column.get("type", "string"),
            json_path=column["jsonPath"],
            description=column.get("description", ""),
            priority=int(column.get("priority", 0)),
            format=column.get("format", ""),
        )
        for column in first.get("additionalPrinterColumns", [])
    )
    subresources = tuple(sorted((first.get("subresources") or {}).keys()))
    return ResourceType(
        group=spec["group"],
        versions=tuple(str(version["name"]) for version in versions),
        plural=names["plural"],
        singular=names.get("singular", names["kind"].lower()),
        kind=names["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        short_names=tuple(names.get("shortNames", [])),
        categories=tuple(names.get("categories", [])),
        subresources=subresources,
        printer_columns=columns,
        has_generation=True,
        custom=True,
        returns_deleted_object=False,
    )


def decode_json(raw: bytes, content_type: str = "application/json") -> Any:
    """Parse a request body; malformed JSON is a 400 as on the real server.

    Protobuf bodies (what kubectl's typed clients send, e.g. ``kubectl create secret``) are
    refused with 415: the stand-in has no protobuf schemas. Use ``kubectl apply -f`` instead.
    """
    if "protobuf" in content_type:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the API stand-in does not decode {content_type} bodies; send JSON "
            "(e.g. kubectl apply -f instead of kubectl create secret/configmap)",
        )
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:
        raise ApiError(
            400, "BadRequest", f"the body of the request is not valid JSON: {exc}"
        ) from exc


@dataclass(frozen=True)
class ListPage:
    """One page of a list: the items, the list's resourceVersion, the continue token ("" on
    the last page) and how many items the next pages hold (None on the last page)."""

    items: list[JSON]
    revision: int
    continue_token: str
    remaining: int | None


def _encode_continue(revision: int, start: str) -> str:
    """A continue token as the real server builds one (base64 of a small JSON object)."""
    token = {"v": "meta.k8s.io/v1", "rv": revision, "start": start}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = json.loads(raw)
        return int(decoded["rv"]), str(decoded["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiError(
            400, "BadRequest", f"invalid continue token: continue key is not valid: {exc}"
        ) from exc


def _kind_label(resource: ResourceType) -> str:
    """How a 422 names the kind: ``ImageStream.imagestream.dev``, ``Job.batch``, ``Pod``."""
    return f"{resource.kind}.{resource.group}" if resource.group else resource.kind
