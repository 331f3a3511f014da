"""The ImageStream CRD: a valid apiextensions.k8s.io/v1 object whose schema and CEL rules accept
the examples and reject bad input at apply time.

There is no kube-apiserver here, and the API stand-in the integration tests use does not enforce
CRD schemas, so objects are checked by :mod:`tests.support.crd`, which reproduces the API
server's pruning, defaulting, OpenAPI validation and CEL evaluation (see its docstring for the
few differences). The CRD manifest itself is checked against the real Kubernetes JSON schemas
(``kubernetes-validate``) and parsed by the real ``kubectl``.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests.support.crd import (
    CRD_PATH,
    EXAMPLES_DIR,
    Crd,
    ObjectRejected,
    ValidationResult,
    load_crd,
    load_yaml_documents,
)
from tests.support.tools import require_tool

#: The Kubernetes minor release the schemas are checked against (the kubectl installed here).
KUBERNETES_VERSION = "1.32"
DEVICE_PATH_NODES = ("spec.target.device", "spec.target.disk", "spec.target.abUpdate.volumes[*]")
CRD_DATA = Path(__file__).resolve().parents[1] / "data" / "crd"

EXAMPLE_FILES = sorted(EXAMPLES_DIR.glob("*.yaml"))
EXAMPLE_DOCS = [(path, doc) for path in EXAMPLE_FILES for doc in load_yaml_documents(path)]
IMAGE_STREAMS = [(path, doc) for path, doc in EXAMPLE_DOCS if doc["kind"] == "ImageStream"]
OTHER_DOCS = [(path, doc) for path, doc in EXAMPLE_DOCS if doc["kind"] != "ImageStream"]


@pytest.fixture(scope="module")
def crd() -> Crd:
    """The ImageStream CRD from crds/."""
    return load_crd()


def base_object() -> dict[str, Any]:
    """A fresh copy of the device-over-HTTPS example, the starting point of every bad case."""
    (doc,) = load_yaml_documents(EXAMPLES_DIR / "device-https.yaml")
    return doc


def apply_case(obj: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with the case's ``set`` (dotted path: value) and ``unset`` applied."""
    result = copy.deepcopy(obj)
    for dotted, value in case.get("set", {}).items():
        parent, name = parent_of(result, dotted)
        parent[name] = value
    for dotted in case.get("unset", []):
        parent, name = parent_of(result, dotted)
        del parent[name]
    return result


def parent_of(obj: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The mapping holding the last name of ``dotted`` (created as needed), and that name."""
    *parents, last = dotted.split(".")
    for name in parents:
        obj = obj.setdefault(name, {})
    return obj, last


def changed(obj: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with dotted paths set."""
    return apply_case(obj, {"set": changes})


# -- the CRD manifest --------------------------------------------------------------------------


def test_crd_validates_against_the_kubernetes_schema(crd: Crd) -> None:
    """The manifest is a valid CustomResourceDefinition (strict: no unknown fields anywhere)."""
    version = kubernetes_validate.validate(crd.manifest, KUBERNETES_VERSION, strict=True)
    assert version == KUBERNETES_VERSION


def test_kubernetes_schema_check_can_fail(crd: Crd) -> None:
    """The check above is not vacuous: a misspelt field in the CRD is an error."""
    broken = copy.deepcopy(crd.manifest)
    broken["spec"]["versions"][0]["subresource"] = {"status": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_names_scope_and_subresources(crd: Crd) -> None:
    """The names DESIGN §2 promises, namespaced, one served storage version, status only."""
    spec = crd.manifest["spec"]
    assert crd.manifest["metadata"]["name"] == "imagestreams.imagestream.dev"
    assert spec["group"] == "imagestream.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "ImageStream",
        "listKind": "ImageStreamList",
        "plural": "imagestreams",
        "singular": "imagestream",
        "shortNames": ["ims"],
        "categories": ["imagestream"],
    }
    ((version),) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns(crd: Crd) -> None:
    """Node, Target, Phase, Progress (an integer percent), Age; Reason only with -o wide."""
    columns = [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in crd.version["additionalPrinterColumns"]
    ]
    assert columns == [
        ("Node", "string", ".spec.nodeName", 0),
        ("Target", "string", ".status.target", 0),
        ("Phase", "string", ".status.phase", 0),
        ("Progress", "integer", ".status.progress.percent", 0),
        ("Age", "date", ".metadata.creationTimestamp", 0),
        ("Reason", "string", ".status.reason", 1),
    ]


def test_schema_is_structural(crd: Crd) -> None:
    """Every node has a type, no forbidden keywords, defaults valid and already pruned."""
    assert crd.structural_problems() == []


def test_structural_check_can_fail(crd: Crd) -> None:
    """The structural check finds a node without a type and an invalid default."""
    broken = copy.deepcopy(crd.manifest)
    spec = broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    del spec["properties"]["nodeName"]["type"]
    spec["properties"]["maxRetries"]["default"] = 1000
    problems = Crd(broken).structural_problems()
    assert any(p.startswith("spec.nodeName: no type") for p in problems), problems
    assert any(p.startswith("spec.maxRetries: default is invalid") for p in problems), problems


def test_every_cel_rule_compiles_and_reads_known_fields(crd: Crd) -> None:
    """Each rule parses (a syntax error raises) and reads only fields its node declares."""
    rules = crd.rules()
    assert {rule.path for rule in rules} >= {"spec.source", "spec.source.url", "spec.target"}
    assert crd.rule_problems() == []


def test_rule_check_catches_unknown_fields(crd: Crd) -> None:
    """A rule that misspells a field (the API server's type check rejects it) is reported."""
    broken = copy.deepcopy(crd.manifest)
    target = broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["target"]
    target["x-kubernetes-validations"].append({"rule": "has(self.devices)", "reason": "Nope"})
    problems = Crd(broken).rule_problems()
    assert any("unknown field 'devices'" in p for p in problems), problems
    assert any("unknown reason 'Nope'" in p for p in problems), problems


def test_device_paths_share_one_set_of_rules(crd: Crd) -> None:
    """device, disk and the abUpdate volumes are checked alike (the YAML repeats the rules)."""
    nodes: dict[str, list[tuple[str, str | None]]] = {rule.path: [] for rule in crd.rules()}
    for rule in crd.rules():
        nodes[rule.path].append((rule.rule, rule.message))
    assert nodes[DEVICE_PATH_NODES[0]]
    for path in DEVICE_PATH_NODES[1:]:
        assert nodes[path] == nodes[DEVICE_PATH_NODES[0]], path


def test_kubectl_parses_crd_and_examples(tmp_path: Path) -> None:
    """The real kubectl reads every manifest to the same objects PyYAML does.

    ``kubectl apply --dry-run=client`` still asks the API server for discovery (to map kinds to
    resources), so with no server it fails before reading the files; ``kubectl patch --local``
    with an empty patch goes through the same file reader and unstructured decoding offline
    (so YAML 1.1 surprises such as ``on``/``yes`` or octal numbers would show up here).
    A real cluster would additionally validate ImageStreams against the installed CRD.
    """
    kubectl = require_tool("kubectl")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    for path in [CRD_PATH, *EXAMPLE_FILES]:
        done = subprocess.run(
            [kubectl, "patch", "--local", "-f", str(path), "--type=merge", "-p={}", "-o=json"],
            capture_output=True,
            text=True,
            check=False,
            env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"},
            timeout=60,
        )
        assert done.returncode == 0, f"{path}: {done.stderr}"
        assert json_stream(done.stdout) == load_yaml_documents(path), path


def json_stream(text: str) -> list[Any]:
    """The JSON values printed one after another (``kubectl patch -o json`` with several
    objects; its ``-o yaml`` omits the ``---`` separators)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while text[position:].strip():
        value, position = decoder.raw_decode(text, len(text) - len(text[position:].lstrip()))
        values.append(value)
    return values


# -- examples ---------------------------------------------------------------------------------


def test_examples_cover_every_target_and_source_kind() -> None:
    """Between them the examples show each target, both URL kinds and the optional refs."""
    specs = [doc["spec"] for _, doc in IMAGE_STREAMS]
    assert {key for spec in specs for key in spec["target"]} == {
        "device",
        "abUpdate",
        "extension",
        "disk",
    }
    sources = [spec["source"] for spec in specs]
    assert any(s["url"].startswith("https://") for s in sources)
    assert any(s["url"].startswith("http://") for s in sources)
    assert any(
        s["url"].startswith("oci://") and {"authSecretRef", "platform", "layer"} <= s.keys()
        for s in sources
    )
    assert any("maxWindowLog" in s for s in sources)


@pytest.mark.parametrize(
    ("path", "doc"),
    IMAGE_STREAMS,
    ids=[f"{p.name}:{d['metadata']['name']}" for p, d in IMAGE_STREAMS],
)
def test_example_image_streams_are_accepted(crd: Crd, path: Path, doc: dict[str, Any]) -> None:
    """Every ImageStream example passes schema and CEL, with nothing pruned."""
    result = crd.validate(doc)
    assert result.ok, result.describe()
    assert result.pruned == ()


@pytest.mark.parametrize(
    ("path", "doc"), OTHER_DOCS, ids=[f"{p.name}:{d['kind']}" for p, d in OTHER_DOCS]
)
def test_other_example_objects_are_valid_kubernetes(path: Path, doc: dict[str, Any]) -> None:
    """Secrets and ConfigMaps in the examples validate against the Kubernetes schemas."""
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.name for p in EXAMPLE_FILES])
def test_example_references_resolve(path: Path) -> None:
    """A Secret or ConfigMap an example names is in the same file and namespace (with the key)."""
    docs = load_yaml_documents(path)
    present = {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs}
    for doc in docs:
        if doc["kind"] != "ImageStream":
            continue
        namespace, source = doc["metadata"]["namespace"], doc["spec"]["source"]
        if "authSecretRef" in source:
            assert ("Secret", namespace, source["authSecretRef"]["name"]) in present
        if "caConfigMapRef" in source:
            ref = source["caConfigMapRef"]
            config_map = present[("ConfigMap", namespace, ref["name"])]
            assert ref.get("key", "ca.crt") in config_map["data"]


# -- defaulting and pruning -------------------------------------------------------------------


def test_defaults_fill_the_knobs(crd: Crd) -> None:
    """A minimal spec is stored with every knob's default; nested defaults need their parent."""
    minimal = {
        "apiVersion": "imagestream.dev/v1alpha1",
        "kind": "ImageStream",
        "metadata": {"name": "m"},
        "spec": {
            "nodeName": "node-1",
            "source": {"url": "https://h/i.raw", "sha384": "0" * 96},
            "target": {"device": "/dev/sda"},
        },
    }
    result = crd.validate(minimal)
    assert result.ok, result.describe()
    assert result.obj["spec"] == {
        "nodeName": "node-1",
        "source": {
            "url": "https://h/i.raw",
            "sha384": "0" * 96,
            "compression": "auto",
            "maxWindowLog": 27,
        },
        "target": {"device": "/dev/sda"},
        "stallTimeoutSeconds": 30,
        "maxRetries": 8,
        "activeDeadlineSeconds": 7200,
        "verifyAfterWrite": False,
        "force": False,
    }
    with_ca = crd.validate(changed(minimal, {"spec.source.caConfigMapRef": {"name": "ca"}}))
    assert with_ca.obj["spec"]["source"]["caConfigMapRef"] == {"name": "ca", "key": "ca.crt"}


def test_admit_returns_the_stored_object_or_raises(crd: Crd) -> None:
    """``admit`` is validate-or-raise, for tests that need what the API server would store."""
    stored = crd.admit(changed(base_object(), {"spec.bogus": True}))
    assert "bogus" not in stored["spec"]
    assert stored["spec"]["maxRetries"] == 8
    with pytest.raises(ObjectRejected, match=r"spec\.target\.device: must be an absolute path"):
        crd.admit(changed(base_object(), {"spec.target.device": "sda"}))


def test_unknown_fields_are_pruned_not_rejected(crd: Crd) -> None:
    """Unknown fields are dropped, as a structural schema makes the API server do.

    A real API server prunes them silently and stores the rest; ``kubectl apply
    --validate=strict`` (server-side field validation) would instead reject the object with
    'unknown field "spec.bogus"'. The validator reports the pruned paths so callers can choose.
    A pruned field also cannot count as a target for the exactly-one rule.
    """
    obj = changed(
        base_object(),
        {"spec.bogus": 1, "spec.target.bogus": "/dev/sdb", "status.bogus": {"a": 1}},
    )
    result = crd.validate(obj)
    assert result.ok, result.describe()
    assert set(result.pruned) == {"spec.bogus", "spec.target.bogus", "status.bogus"}
    assert "bogus" not in result.obj["spec"]
    assert result.obj["spec"]["target"] == {"device": "/dev/disk/by-partlabel/root-b"}


def test_null_is_pruned_then_defaulted(crd: Crd) -> None:
    """``compression: null`` (not nullable) is dropped and then defaulted, as since Kubernetes
    1.20; a null required field is therefore missing."""
    result = crd.validate(changed(base_object(), {"spec.source.compression": None}))
    assert result.ok, result.describe()
    assert result.obj["spec"]["source"]["compression"] == "auto"
    missing = crd.validate(changed(base_object(), {"spec.source.sha384": None}))
    assert missing.paths() == {"spec.source"}
    assert "'sha384' is a required property" in missing.describe()


# -- rejections and edge cases (tests/data/crd) --------------------------------------------

#: Cases too long to write out in YAML: values one past a maxLength.
COMPUTED_BAD_SPECS: list[dict[str, Any]] = [
    {
        "id": "url-too-long",
        "set": {"spec.source.url": "https://h/" + "a" * (2049 - len("https://h/"))},
        "error": {"path": "spec.source.url", "message": "is too long"},
    },
    {
        "id": "node-name-too-long",
        "set": {"spec.nodeName": "a" * 254},
        "error": {"path": "spec.nodeName", "message": "is too long"},
    },
    {
        "id": "extension-name-too-long",
        "set": {"spec.target": {"extension": {"type": "sysext", "name": "a" * 129}}},
        "error": {"path": "spec.target.extension.name", "message": "is too long"},
    },
]


def cases(name: str, extra: list[dict[str, Any]] | None = None) -> list[Any]:
    """The cases of tests/data/crd/NAME.yaml (plus ``extra``) as pytest params named by id."""
    loaded = yaml.safe_load((CRD_DATA / f"{name}.yaml").read_text(encoding="utf-8"))
    return [pytest.param(case, id=case["id"]) for case in [*loaded, *(extra or [])]]


def assert_rejected_as(result: ValidationResult, error: dict[str, str]) -> None:
    """Rejected at ``error["path"]`` and nowhere else, with the message fragment."""
    assert result.paths() == {error["path"]}, result.describe()
    assert any(error["message"] in v.message for v in result.violations), result.describe()


@pytest.mark.parametrize("case", cases("bad/spec", COMPUTED_BAD_SPECS))
def test_bad_spec_is_rejected(crd: Crd, case: dict[str, Any]) -> None:
    """Each bad value is rejected at its own field, with a message that says what is wrong."""
    result = crd.validate(apply_case(base_object(), case))
    assert_rejected_as(result, case["error"])


@pytest.mark.parametrize("case", cases("good/spec"))
def test_edge_values_are_accepted(crd: Crd, case: dict[str, Any]) -> None:
    """Values at the edges of each rule pass: the rules are no stricter than they say."""
    result = crd.validate(apply_case(base_object(), case))
    assert result.ok, result.describe()


def full_status() -> dict[str, Any]:
    """The complete status of tests/data/crd/good/status.yaml."""
    (doc,) = load_yaml_documents(CRD_DATA / "good" / "status.yaml")
    status: dict[str, Any] = doc["status"]
    return status


def test_full_status_is_accepted(crd: Crd) -> None:
    """A status with every field the controller and agent write is stored unchanged."""
    result = crd.validate({**base_object(), "status": full_status()})
    assert result.ok, result.describe()
    assert result.obj["status"] == full_status()


@pytest.mark.parametrize("case", cases("bad/status"))
def test_bad_status_is_rejected(crd: Crd, case: dict[str, Any]) -> None:
    """A status write the schema forbids is rejected at its field (an update through the status
    subresource validates the whole object, as here)."""
    result = crd.validate(apply_case({**base_object(), "status": full_status()}, case))
    assert_rejected_as(result, case["error"])


# -- the validator's own semantics (a small synthetic CRD) ------------------------------------


def synthetic_crd(spec_schema: dict[str, Any]) -> Crd:
    """A one-version CRD whose ``spec`` has ``spec_schema``."""
    manifest = {
        "spec": {
            "versions": [
                {
                    "name": "v1",
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": spec_schema},
                        }
                    },
                }
            ]
        }
    }
    return Crd(manifest)


def test_transition_rules_see_old_self() -> None:
    """A rule using oldSelf runs on update only, with oldSelf bound to the old value."""
    validator = synthetic_crd(
        {
            "type": "object",
            "properties": {
                "node": {
                    "type": "string",
                    "x-kubernetes-validations": [
                        {"rule": "self == oldSelf", "message": "node is immutable"}
                    ],
                }
            },
        }
    )
    assert validator.validate({"spec": {"node": "a"}}).ok  # create: not evaluated
    assert validator.validate({"spec": {"node": "a"}}, old={"spec": {"node": "a"}}).ok
    assert validator.validate({"spec": {"node": "a"}}, old={"spec": {}}).ok  # new field
    changed_node = validator.validate({"spec": {"node": "b"}}, old={"spec": {"node": "a"}})
    assert [(v.path, v.message) for v in changed_node.violations] == [
        ("spec.node", "node is immutable")
    ]


def test_transition_rules_correlate_map_list_items_by_key() -> None:
    """Items of a map list meet their old selves by key, whatever their order."""
    validator = synthetic_crd(
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
                        "x-kubernetes-validations": [
                            {"rule": "self.size >= oldSelf.size", "message": "cannot shrink"}
                        ],
                    },
                }
            },
        }
    )
    old = {"spec": {"items": [{"name": "a", "size": 1}, {"name": "b", "size": 5}]}}
    grown = {"spec": {"items": [{"name": "b", "size": 6}, {"name": "a", "size": 1}]}}
    shrunk = {"spec": {"items": [{"name": "b", "size": 4}, {"name": "a", "size": 1}]}}
    assert validator.validate(grown, old=old).ok
    assert validator.validate(shrunk, old=old).paths() == {"spec.items[0]"}


def test_nullable_and_int_or_string() -> None:
    """nullable keeps null; int-or-string takes both and nothing else."""
    validator = synthetic_crd(
        {
            "type": "object",
            "properties": {
                "maybe": {"type": "string", "nullable": True},
                "port": {"x-kubernetes-int-or-string": True},
            },
        }
    )
    kept = validator.validate({"spec": {"maybe": None, "port": 80}})
    assert kept.ok
    assert kept.obj["spec"] == {"maybe": None, "port": 80}
    assert validator.validate({"spec": {"port": "http"}}).ok
    assert validator.validate({"spec": {"port": 1.5}}).paths() == {"spec.port"}
    assert validator.structural_problems() == []


def test_rule_that_fails_to_evaluate_rejects() -> None:
    """A runtime error in a rule (here: an absent field read without has()) is a rejection,
    as on the API server; it is how this validator catches rules that forget has()."""
    validator = synthetic_crd(
        {
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
            "x-kubernetes-validations": [{"rule": "self.a == self.b"}],
        }
    )
    assert validator.validate({"spec": {"a": "x", "b": "x"}}).ok
    failed = validator.validate({"spec": {"a": "x"}})
    assert [v.kind for v in failed.violations] == ["cel-error"]
    message = validator.validate({"spec": {"a": "x", "b": "y"}}).violations[0].message
    assert message == "failed rule: self.a == self.b"
