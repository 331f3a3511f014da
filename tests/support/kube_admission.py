"""What the API stand-in's store checks before it keeps a write: the rules of a real
kube-apiserver's validation and admission that the product's calls run into.

- **Custom resources**: the CRD's structural schema (pruning with a ``Warning`` per unknown
  field, or 400 under ``fieldValidation=Strict``), its defaults, OpenAPI validation and CEL
  rules, through :mod:`tests.support.crd`. Failures are 422 ``Invalid`` with one cause per
  field, as the real server words them (the transcripts in ``shared/reference/kube-api`` show
  them); a write of the status subresource names its fields relative to ``.status``.
- **Names**: ``metadata.name`` is a DNS-1123 subdomain.
- **Built-ins**, only the rules this project meets: a Pod needs containers; a Job's
  ``backoffLimit`` is not negative and its pod template is immutable; a core Event's
  ``involvedObject.namespace`` is its own namespace; an ``events.k8s.io`` Event has an
  ``eventTime``.
- **Pod Security admission**: a namespace labelled ``pod-security.kubernetes.io/enforce`` with
  ``baseline`` or ``restricted`` refuses a Pod using hostPath volumes, privileged containers or
  the host's namespaces (403 ``Forbidden``); a Job (or another Pod template) there is admitted
  with a ``Warning``, as the real admission does for workload resources.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .crd import Crd, Violation

JSON = dict[str, Any]

ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
#: The levels that refuse privileged Pods (``privileged`` allows everything).
REFUSING_LEVELS = ("baseline", "restricted")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_REQUIRED = re.compile(r"^'(?P<name>[^']+)' is a required property$")
#: OpenAPI keywords whose failure the API server reports with its own cause reason.
_CAUSE_REASONS = {"type": "FieldValueTypeInvalid", "enum": "FieldValueNotSupported"}
_BLOCKING = ("FieldValueTypeInvalid", "FieldValueRequired")


class Rejected(Exception):
    """An admission failure: the HTTP layer answers ``code``/``reason`` with these causes."""

    def __init__(self, code: int, reason: str, message: str, causes: Sequence[JSON] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.causes = list(causes)


def cause(reason: str, field: str, message: str) -> JSON:
    """One ``details.causes`` entry."""
    return {"reason": reason, "message": message, "field": field}


def invalid(kind_label: str, name: str, causes: Sequence[JSON]) -> Rejected:
    """The 422 of a failed validation, its message listing the causes as the server does."""
    parts = [f"{item['field']}: {item['message']}" for item in causes]
    listed = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return Rejected(422, "Invalid", f'{kind_label} "{name}" is invalid: {listed}', causes)


def check_name(name: str) -> JSON | None:
    """The cause when ``name`` is not a DNS-1123 subdomain, else None."""
    if len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name):
        return None
    return cause(
        "FieldValueInvalid",
        "metadata.name",
        f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
        "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
        "character",
    )


# -- custom resources ---------------------------------------------------------------------------


def _schema_cause(violation: Violation, value: Any) -> JSON:
    if violation.kind == "schema" and violation.rule == "required":
        match = _REQUIRED.match(violation.message)
        missing = match["name"] if match else ""
        where = f"{violation.path}.{missing}" if violation.path else missing
        return cause("FieldValueRequired", where, "Required value")
    if violation.kind in ("cel", "cel-error"):
        return cause("FieldValueInvalid", violation.path, f"Invalid value: {violation.message}")
    reason = _CAUSE_REASONS.get(violation.rule or "", "FieldValueInvalid")
    if violation.kind == "duplicate":
        reason = "FieldValueDuplicate"
    return cause(reason, violation.path, f"Invalid value: {value!r}: {violation.message}")


def _value_at(obj: Any, path: str) -> Any:
    value = obj
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def admit_custom(
    crd: Crd,
    kind_label: str,
    obj: JSON,
    old: JSON | None,
    *,
    status_only: bool,
    strict: bool,
    warnings: list[str],
) -> JSON:
    """The custom resource as it is stored (pruned, defaulted), or :class:`Rejected`."""
    result = crd.validate(obj, old)
    pruned = [path for path in result.pruned if not (status_only and not path.startswith("status"))]
    if pruned and strict:
        listed = ", ".join(f'unknown field "{path}"' for path in pruned)
        raise Rejected(
            400,
            "BadRequest",
            f'{obj.get("kind", "")} in version "{crd.version["name"]}" cannot be handled as a '
            f"{obj.get('kind', '')}: strict decoding error: {listed}",
        )
    warnings.extend(f'unknown field "{path}"' for path in pruned)
    causes = [_schema_cause(item, _value_at(result.obj, item.path)) for item in result.violations]
    if status_only:
        # The status strategy validates the status on its own: its paths start below .status.
        for item in causes:
            item["field"] = item["field"].removeprefix("status.")
        causes = [item for item in causes if item["field"] != "status"]
    if causes:
        if any(item["reason"] in _BLOCKING for item in causes) and crd.rules():
            causes.insert(
                0,
                cause(
                    "FieldValueInvalid",
                    "<nil>",
                    'Invalid value: "null": some validation rules were not checked because the '
                    "object was invalid; correct the existing errors to complete validation",
                ),
            )
        raise invalid(kind_label, str(obj.get("metadata", {}).get("name", "")), causes)
    return result.obj


# -- built-ins ----------------------------------------------------------------------------------


def validate_builtin(key: tuple[str, str], obj: JSON, old: JSON | None) -> None:
    """The few built-in validation rules this project's objects meet (see the module doc)."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    causes: list[JSON] = []
    if key == ("", "pods") and old is None and not (obj.get("spec") or {}).get("containers"):
        causes.append(cause("FieldValueRequired", "spec.containers", "Required value"))
        raise invalid("Pod", name, causes)
    if key == ("batch", "jobs"):
        limit = (obj.get("spec") or {}).get("backoffLimit")
        if isinstance(limit, int) and limit < 0:
            causes.append(
                cause(
                    "FieldValueInvalid",
                    "spec.backoffLimit",
                    f"Invalid value: {limit}: must be greater than or equal to 0",
                )
            )
        if old is not None and (obj.get("spec") or {}).get("template") != (
            old.get("spec") or {}
        ).get("template"):
            causes.append(
                cause(
                    "FieldValueInvalid", "spec.template", "Invalid value: ...: field is immutable"
                )
            )
        if causes:
            raise invalid("Job.batch", name, causes)
    if key == ("", "events"):
        involved = (obj.get("involvedObject") or {}).get("namespace")
        if involved and involved != meta.get("namespace"):
            causes.append(
                cause(
                    "FieldValueInvalid",
                    "involvedObject.namespace",
                    f'Invalid value: "{involved}": does not match event.namespace',
                )
            )
            raise invalid("Event", name, causes)
    if key == ("events.k8s.io", "events") and not obj.get("eventTime"):
        raise invalid("Event", name, [cause("FieldValueRequired", "eventTime", "Required value")])


# -- Pod Security -------------------------------------------------------------------------------


def pod_security_violations(pod_spec: Mapping[str, Any]) -> list[str]:
    """What the ``baseline`` level refuses in a Pod spec, worded as the admission plugin does."""
    found: list[str] = []
    host = [
        name
        for name, field in (
            ("hostNetwork", "hostNetwork"),
            ("hostPID", "hostPID"),
            ("hostIPC", "hostIPC"),
        )
        if pod_spec.get(field)
    ]
    if host:
        found.append(f"host namespaces ({'='.join(host)}=true)")
    volumes = [
        str(volume.get("name")) for volume in pod_spec.get("volumes") or [] if "hostPath" in volume
    ]
    if volumes:
        listed = ", ".join(f'"{name}"' for name in volumes)
        noun = "volume" if len(volumes) == 1 else "volumes"
        found.append(f"hostPath volumes ({noun} {listed})")
    privileged = [
        str(container.get("name"))
        for container in [
            *(pod_spec.get("initContainers") or []),
            *(pod_spec.get("containers") or []),
        ]
        if (container.get("securityContext") or {}).get("privileged")
    ]
    if privileged:
        listed = ", ".join(f'"{name}"' for name in privileged)
        noun = "container" if len(privileged) == 1 else "containers"
        found.append(f"privileged ({noun} {listed} must not set securityContext.privileged=true)")
    return found


def pod_security(
    key: tuple[str, str], namespace_labels: Mapping[str, str], obj: JSON, warnings: list[str]
) -> None:
    """Enforce the namespace's Pod Security level on a Pod (403); warn for a Job's template."""
    level = namespace_labels.get(ENFORCE_LABEL, "privileged")
    if level not in REFUSING_LEVELS:
        return
    if key == ("", "pods"):
        spec = obj.get("spec") or {}
    elif key == ("batch", "jobs"):
        spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    else:
        return
    violations = pod_security_violations(spec)
    if not violations:
        return
    text = f'PodSecurity "{level}:latest": ' + ", ".join(violations)
    if key == ("batch", "jobs"):
        warnings.append(f"would violate {text}")
        return
    name = obj.get("metadata", {}).get("name", "")
    raise Rejected(403, "Forbidden", f'pods "{name}" is forbidden: violates {text}')
