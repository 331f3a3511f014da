"""Validate custom resources against a CRD the way the API server would, without one.

There is no kube-apiserver on these machines and the API stand-in the integration tests use does
not enforce CRD schemas, so this module reproduces the parts of the API server's create/update
path that decide whether an object is accepted:

1. **Pruning** of fields the structural schema does not know (unless
   ``x-kubernetes-preserve-unknown-fields``), and of ``null`` values of non-``nullable`` fields.
   The API server drops these silently; ``kubectl apply --validate=strict`` turns unknown fields
   into errors. :class:`ValidationResult` lists what was pruned so a test can assert either way.
2. **Defaulting** (``default``), top-down, only where the parent object exists.
3. **OpenAPI validation**: the schema converted to JSON Schema (draft 4, the dialect OpenAPI 3.0
   builds on) with ``nullable`` and ``x-kubernetes-int-or-string`` translated, ``date-time``
   checked as RFC 3339, and ``x-kubernetes-list-type`` ``set``/``map`` uniqueness.
4. **CEL rules** (``x-kubernetes-validations``), each evaluated at the node that declares it with
   ``self`` bound to that node's value (and ``oldSelf`` to the old value for transition rules,
   which run only on update when the old value exists), using the ``common-expression-language``
   package (``import cel``, a binding of cel-rust).

Known differences from a real API server, all irrelevant to the ImageStream CRD: CEL rules are
compiled without the API server's type checker (a static pass catches references to unknown
fields instead, see :meth:`Crd.rule_problems`); ``format: date-time`` strings reach CEL as
strings, not timestamps; ``optionalOldSelf`` and the Kubernetes CEL extension libraries (``url``,
``quantity``, ``ip``...) are not supported; no CEL cost estimation.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cel
import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The ImageStream CRD, the project's single source of truth for the API.
CRD_PATH = REPO_ROOT / "crds" / "imagestream.dev_imagestreams.yaml"
EXAMPLES_DIR = REPO_ROOT / "examples"

ViolationKind = Literal["schema", "cel", "cel-error", "duplicate"]

#: RFC 3339 date-time, the format the API server's ``date-time`` check accepts.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
)
#: ``self.a.b`` / ``oldSelf.a`` chains in a CEL rule; a segment followed by ``(`` is a method.
_FIELD_CHAIN = re.compile(r"\b(?:self|oldSelf)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)(\s*\()?")
#: Keywords a structural schema may not use (apiextensions.k8s.io/v1 rejects them).
_FORBIDDEN_KEYWORDS = (
    "$ref",
    "definitions",
    "dependencies",
    "patternProperties",
    "additionalItems",
)
_ALLOWED_REASONS = frozenset(
    {"FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}
)
_JSON_TYPES: Mapping[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


@dataclass(frozen=True)
class Violation:
    """One reason the API server would reject the object.

    ``path`` is the field path as the API server prints it (``spec.target.abUpdate.volumes[1]``);
    ``rule`` is the CEL rule or the failing OpenAPI keyword (``pattern``, ``maximum``...).
    """

    path: str
    message: str
    kind: ViolationKind
    rule: str | None = None


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of :meth:`Crd.validate`.

    ``obj`` is the object as it would be stored (pruned and defaulted); ``pruned`` lists the
    paths of unknown fields and non-nullable nulls that were dropped.
    """

    obj: dict[str, Any]
    violations: tuple[Violation, ...]
    pruned: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the API server would accept the object (pruning alone is not an error)."""
        return not self.violations

    def paths(self) -> set[str]:
        """The field paths of all violations."""
        return {v.path for v in self.violations}

    def describe(self) -> str:
        """The violations, one ``path: message [kind]`` per line (for assertion messages)."""
        return "\n".join(f"{v.path or '<root>'}: {v.message} [{v.kind}]" for v in self.violations)


class ObjectRejected(AssertionError):
    """The API server would reject the object; ``result`` says why."""

    def __init__(self, result: ValidationResult) -> None:
        """Keep the result; the message lists the violations."""
        super().__init__(f"the API server would reject the object:\n{result.describe()}")
        self.result = result


@dataclass(frozen=True)
class CelRule:
    """One ``x-kubernetes-validations`` entry and the schema node that declares it."""

    path: str
    rule: str
    message: str | None
    message_expression: str | None
    reason: str | None
    field_path: str | None
    program: cel.Program

    @property
    def is_transition(self) -> bool:
        """Whether the rule reads ``oldSelf`` (evaluated on update only)."""
        return "oldSelf" in self.program.variables()


def field_path(parts: tuple[str | int, ...]) -> str:
    """Join path parts the API server's way: ``spec.a.list[2].b``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of ``path``."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a structural OpenAPI v3 schema node to JSON Schema (draft 4).

    ``x-kubernetes-*`` keys are dropped (their semantics are applied separately), ``nullable``
    becomes a ``null`` alternative and ``x-kubernetes-int-or-string`` an integer-or-string type.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in {"nullable", "description", "example"}:
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in {"items", "additionalProperties", "not"} and isinstance(value, Mapping):
            out[key] = to_json_schema(value)
        elif key in {"allOf", "anyOf", "oneOf"}:
            out[key] = [to_json_schema(child) for child in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()

    @checker.checks("date-time")
    def _is_datetime(value: object) -> bool:
        return not isinstance(value, str) or _RFC3339.match(value) is not None

    return checker


def _type_matches(schema: Mapping[str, Any], value: object) -> bool:
    """Whether ``value`` has the node's declared type (bool is not an integer, as in JSON)."""
    declared = schema.get("type")
    if declared is None:
        return True
    if isinstance(value, bool) and declared in {"integer", "number"}:
        return False
    return isinstance(value, _JSON_TYPES[declared])


def _preserves_unknown(schema: Mapping[str, Any]) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields"))


class Crd:
    """One version of a CustomResourceDefinition, ready to validate objects."""

    def __init__(self, manifest: dict[str, Any], version: str | None = None) -> None:
        """Take a parsed CRD manifest; ``version`` defaults to the storage version."""
        self.manifest = manifest
        versions = manifest["spec"]["versions"]
        chosen = next(
            (v for v in versions if v["name"] == version or (version is None and v["storage"])),
            None,
        )
        if chosen is None:
            raise ValueError(f"CRD has no version {version!r}")
        self.version: dict[str, Any] = chosen
        self.schema: dict[str, Any] = chosen["schema"]["openAPIV3Schema"]
        self._validator = jsonschema.Draft4Validator(
            to_json_schema(self.schema), format_checker=_format_checker()
        )

    @classmethod
    def load(cls, path: Path = CRD_PATH, version: str | None = None) -> Crd:
        """Load the single CRD document in ``path``."""
        (manifest,) = load_yaml_documents(path)
        return cls(manifest, version)

    # -- accepting objects ------------------------------------------------------------------

    def validate(
        self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None
    ) -> ValidationResult:
        """Prune, default and validate ``obj`` (a create, or an update of ``old``)."""
        stored = copy.deepcopy(dict(obj))
        pruned: list[str] = []
        _normalise(self.schema, stored, (), pruned, at_root=True)
        old_stored = None
        if old is not None:
            old_stored = copy.deepcopy(dict(old))
            _normalise(self.schema, old_stored, (), [], at_root=True)
        violations = [
            *self._schema_violations(stored),
            *_list_type_violations(self.schema, stored, ()),
            *self._cel_violations(self.schema, stored, old_stored, ()),
        ]
        return ValidationResult(stored, tuple(violations), tuple(pruned))

    def admit(self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The object as the API server would store it (pruned, defaulted); raise
        :class:`ObjectRejected` (an ``AssertionError``) listing the violations if it would not.

        For tests and stand-ins that create ImageStreams and want what a real API server would
        hand to the controller.
        """
        result = self.validate(obj, old)
        if not result.ok:
            raise ObjectRejected(result)
        return result.obj

    def _schema_violations(self, obj: dict[str, Any]) -> Iterator[Violation]:
        for error in self._validator.iter_errors(obj):
            yield Violation(
                field_path(tuple(error.absolute_path)),
                error.message,
                "schema",
                str(error.validator),
            )

    def _cel_violations(
        self,
        schema: Mapping[str, Any],
        value: Any,
        old: Any,
        parts: tuple[str | int, ...],
    ) -> Iterator[Violation]:
        if not _type_matches(schema, value):
            return  # already a schema violation; the API server does not run CEL on it
        for rule in self._rules_at(parts, schema):
            if rule.is_transition and old is None:
                continue
            yield from _evaluate(rule, value, old, parts)
        for child_key, child_schema, child, old_child in _children(schema, value, old):
            yield from self._cel_violations(child_schema, child, old_child, (*parts, child_key))

    def _rules_at(self, parts: tuple[str | int, ...], schema: Mapping[str, Any]) -> list[CelRule]:
        path = re.sub(r"\[\d+\]", "[*]", field_path(parts))  # the schema node's path
        return [_compile_rule(path, entry) for entry in schema.get("x-kubernetes-validations", [])]

    # -- checking the CRD itself ---------------------------------------------------------------

    def rules(self) -> list[CelRule]:
        """Every CEL rule of the schema, compiled (a syntax error raises ``ValueError``)."""
        return [
            _compile_rule(path, entry)
            for path, node in _schema_nodes(self.schema, "")
            for entry in node.get("x-kubernetes-validations", [])
        ]

    def rule_problems(self) -> list[str]:
        """Rules that would not compile on the API server: bad reasons, unknown fields.

        The API server type-checks each rule against the schema; this static pass catches the
        common mistake that check exists for: ``self.x`` where the node has no field ``x``.
        """
        problems: list[str] = []
        for path, node in _schema_nodes(self.schema, ""):
            for entry in node.get("x-kubernetes-validations", []):
                reason = entry.get("reason")
                if reason is not None and reason not in _ALLOWED_REASONS:
                    problems.append(f"{path}: rule {entry['rule']!r}: unknown reason {reason!r}")
                for chain, is_call in _field_chains(entry["rule"]):
                    missing = _missing_field(node, chain[:-1] if is_call else chain)
                    if missing is not None:
                        problems.append(
                            f"{path}: rule {entry['rule']!r} reads unknown field {missing!r}"
                        )
        return problems

    def structural_problems(self) -> list[str]:
        """Ways the schema breaks apiextensions.k8s.io/v1's structural schema rules."""
        problems: list[str] = []
        for path, node in _schema_nodes(self.schema, ""):
            problems.extend(_node_problems(path or "<root>", node))
        metadata = self.schema.get("properties", {}).get("metadata", {})
        extra = set(metadata.get("properties", {})) - {"name", "generateName"}
        if extra:
            problems.append(f"metadata: only name and generateName may be specified, not {extra}")
        return problems


@functools.cache
def load_crd(path: Path = CRD_PATH) -> Crd:
    """The parsed CRD at ``path``, cached (it never changes during a test run)."""
    return Crd.load(path)


def _compile_rule(path: str, entry: Mapping[str, Any]) -> CelRule:
    if entry.get("optionalOldSelf"):
        raise NotImplementedError(f"{path}: optionalOldSelf is not supported by this validator")
    return CelRule(
        path=path,
        rule=entry["rule"],
        message=entry.get("message"),
        message_expression=entry.get("messageExpression"),
        reason=entry.get("reason"),
        field_path=entry.get("fieldPath"),
        program=_compiled(entry["rule"]),
    )


@functools.cache
def _compiled(expression: str) -> cel.Program:
    return cel.compile(expression)


def _evaluate(rule: CelRule, value: Any, old: Any, parts: tuple[str | int, ...]) -> list[Violation]:
    """Run one rule; a false result or an evaluation error is a violation, as on the server."""
    variables: dict[str, Any] = {"self": value}
    if rule.is_transition:
        variables["oldSelf"] = old
    where = field_path(parts) + (rule.field_path or "")
    try:
        result = rule.program.execute(variables)
    except Exception as exc:  # any runtime failure (no such key, bad overload) rejects the object
        return [
            Violation(
                where, f"rule {rule.rule!r} failed to evaluate: {exc}", "cel-error", rule.rule
            )
        ]
    if result is True:
        return []
    if result is not False:
        return [
            Violation(
                where, f"rule {rule.rule!r} returned {result!r}, not a bool", "cel-error", rule.rule
            )
        ]
    return [Violation(where, _rule_message(rule, variables), "cel", rule.rule)]


def _rule_message(rule: CelRule, variables: dict[str, Any]) -> str:
    """``messageExpression`` if it evaluates to a string, else ``message``, else the default."""
    if rule.message_expression:
        try:
            text = cel.evaluate(rule.message_expression, variables)
        except Exception:  # the API server falls back to message when the expression fails
            text = None
        if isinstance(text, str) and text:
            return text
    return rule.message or f"failed rule: {rule.rule}"


def _children(
    schema: Mapping[str, Any], value: Any, old: Any
) -> Iterator[tuple[str | int, Mapping[str, Any], Any, Any]]:
    """(key, schema, value, correlated old value) for each child present in ``value``.

    Old values are correlated the way the API server does it: object fields and map values by
    key, ``x-kubernetes-list-type: map`` items by their keys; other list items never correlate.
    """
    if isinstance(value, dict):
        old_map = old if isinstance(old, dict) else {}
        for key, child in value.items():
            child_schema = _child_schema(schema, key)
            if child_schema is not None:
                yield key, child_schema, child, old_map.get(key)
    elif isinstance(value, list) and "items" in schema:
        keys = schema.get("x-kubernetes-list-map-keys", [])
        old_by_key: dict[tuple[Any, ...], Any] = {}
        if schema.get("x-kubernetes-list-type") == "map" and isinstance(old, list):
            old_by_key = {_map_key(item, keys): item for item in old if isinstance(item, dict)}
        for index, child in enumerate(value):
            old_child = old_by_key.get(_map_key(child, keys)) if isinstance(child, dict) else None
            yield index, schema["items"], child, old_child


def _child_schema(schema: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """The schema of field ``key`` of an object node: a property, else additionalProperties."""
    extra = schema.get("additionalProperties")
    child: Mapping[str, Any] | None = schema.get("properties", {}).get(key)
    return child if child is not None else (extra if isinstance(extra, Mapping) else None)


def _map_key(item: Mapping[str, Any], keys: list[str]) -> tuple[Any, ...]:
    return tuple(item.get(key) for key in keys)


def _normalise(
    schema: Mapping[str, Any],
    value: Any,
    parts: tuple[str | int, ...],
    pruned: list[str],
    *,
    at_root: bool = False,
) -> None:
    """Prune unknown fields and non-nullable nulls, then apply defaults, top-down, in place."""
    if isinstance(value, dict) and schema.get("type") == "object":
        properties = schema.get("properties", {})
        keeps_unknown = _preserves_unknown(schema) or "additionalProperties" in schema
        for key in list(value):
            if at_root and key in {"apiVersion", "kind", "metadata"}:
                continue  # ObjectMeta is validated by the API server itself, not the CRD
            child_schema = _child_schema(schema, key)
            if (child_schema is None and not keeps_unknown) or (
                value[key] is None and not (child_schema or {}).get("nullable")
            ):
                pruned.append(field_path((*parts, key)))
                del value[key]
        for key, property_schema in properties.items():
            if key not in value and "default" in property_schema:
                value[key] = copy.deepcopy(property_schema["default"])
        for key, child in value.items():
            child_schema = _child_schema(schema, key)
            if child_schema is not None and not (at_root and key == "metadata"):
                _normalise(child_schema, child, (*parts, key), pruned)
    elif isinstance(value, list) and "items" in schema:
        for index, child in enumerate(value):
            _normalise(schema["items"], child, (*parts, index), pruned)


def _list_type_violations(
    schema: Mapping[str, Any], value: Any, parts: tuple[str | int, ...]
) -> Iterator[Violation]:
    """Duplicate items of ``set`` lists and duplicate keys of ``map`` lists, then recurse."""
    list_type = schema.get("x-kubernetes-list-type")
    if isinstance(value, list) and list_type in {"set", "map"}:
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for index, item in enumerate(value):
            identity = repr(
                _map_key(item, keys) if list_type == "map" and isinstance(item, dict) else item
            )
            if identity in seen:
                yield Violation(
                    field_path((*parts, index)),
                    f"Duplicate value: {identity}",
                    "duplicate",
                    "x-kubernetes-list-type",
                )
            seen.add(identity)
    for key, child_schema, child, _ in _children(schema, value, None):
        yield from _list_type_violations(child_schema, child, (*parts, key))


def _schema_nodes(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema node with a readable path (``spec.target.abUpdate.volumes[*]``)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _schema_nodes(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), Mapping):
        yield from _schema_nodes(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _schema_nodes(schema["additionalProperties"], f"{path}[*]")


def _field_chains(rule: str) -> Iterator[tuple[list[str], bool]]:
    """Field chains read from ``self``/``oldSelf``; the bool says the last name is a method."""
    for match in _FIELD_CHAIN.finditer(rule):
        yield match.group(1).lstrip(".").split("."), match.group(2) is not None


def _missing_field(node: Mapping[str, Any], chain: list[str]) -> str | None:
    """The first name in ``chain`` that ``node``'s properties lack, or None."""
    for name in chain:
        properties = node.get("properties")
        if properties is None:
            return None  # a list, map or scalar: the rule indexes or calls, nothing to check
        if name not in properties:
            return name
        node = properties[name]
    return None


def _node_problems(path: str, node: Mapping[str, Any]) -> list[str]:
    problems = [f"{path}: {key} is not allowed" for key in _FORBIDDEN_KEYWORDS if key in node]
    # Only these two may leave the type open: everything else must say what it holds.
    if "type" not in node and not (
        _preserves_unknown(node) or node.get("x-kubernetes-int-or-string")
    ):
        problems.append(f"{path}: no type")
    if node.get("uniqueItems"):
        problems.append(f"{path}: uniqueItems is not allowed (use x-kubernetes-list-type: set)")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false is not allowed")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: an array needs items")
    problems.extend(_list_map_problems(path, node))
    if "default" in node:
        problems.extend(_default_problems(path, node))
    return problems


def _list_map_problems(path: str, node: Mapping[str, Any]) -> list[str]:
    if node.get("x-kubernetes-list-type") != "map":
        return []
    items = node.get("items", {})
    keys = node.get("x-kubernetes-list-map-keys") or []
    if items.get("type") != "object" or not keys:
        return [f"{path}: a map list needs object items and x-kubernetes-list-map-keys"]
    properties = items.get("properties", {})
    return [
        f"{path}: map key {key!r} must be required or defaulted"
        for key in keys
        if key not in items.get("required", []) and "default" not in properties.get(key, {})
    ]


def _default_problems(path: str, node: Mapping[str, Any]) -> list[str]:
    """A default must validate against its own node and survive pruning unchanged."""
    default = copy.deepcopy(node["default"])
    pruned: list[str] = []
    _normalise(node, default, (), pruned)
    validator = jsonschema.Draft4Validator(to_json_schema(node), format_checker=_format_checker())
    problems = [
        f"{path}: default is invalid: {error.message}" for error in validator.iter_errors(default)
    ]
    problems.extend(f"{path}: default has unknown field {name!r}" for name in pruned)
    return problems
