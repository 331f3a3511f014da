"""The Helm chart, rendered by the real Helm engine (`helm-python-sdk`): it lints, every rendered
manifest validates against Kubernetes 1.30's and the newest known schemas (strict), values are
schema-checked, the CRD is crds/'s, and the RBAC is exactly the table in
`imagestream.controller.rbac`, which is itself checked against the calls `kube.py` makes.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from tests.support.chart import (
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    Rendered,
    granted,
    lint,
    render,
    request_rule,
    rules_of,
)
from tests.support.crd import CRD_PATH
from tests.support.streams import stream_body

import imagestream
from imagestream.cli import build_parser
from imagestream.controller import kube, rbac
from imagestream.controller.builders import build_job
from imagestream.controller.main import configure_logging, job_settings
from imagestream.controller.metrics import Metrics
from imagestream.controller.spec import parse_stream

#: The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate has.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
#: Kinds kubernetes-validate has no schema for (prometheus-operator's CRDs); checked by hand.
NO_SCHEMA_KINDS = {"ServiceMonitor", "PrometheusRule"}
DIGEST = "sha256:" + "ab" * 32
AGENT_SA = "imagestream-agent"

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "several-namespaces": {"watchNamespaces": ["fleet-a", "fleet-b", NAMESPACE]},
    "all-namespaces": {"watchNamespaces": []},
    "crds-off": {"crds": {"install": False}},
    "metrics-on": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    },
    "images-by-digest": {
        "images": {
            "controller": {"repository": "registry.example/imagestream", "digest": DIGEST},
            "pullSecrets": ["registry-creds"],
        },
        "controller": {"logLevel": "debug", "priorityClassName": "system-cluster-critical"},
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    """Every scenario rendered once (each render loads the chart through Helm's Go SDK)."""
    return {scenario: render(values) for scenario, values in SCENARIOS.items()}


def watched(rendered: Rendered) -> list[str]:
    """The namespaces the rendered controller is told to watch (none: -A)."""
    return [
        arg.split("=", 1)[1] for arg in rendered.deployment_args() if arg.startswith("--namespace=")
    ]


# -- Helm: lint, render, validate -------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kube_version", ["v1.30.0", "v1.33.0"])
def test_chart_lints_strict(scenario: str, kube_version: str) -> None:
    report = lint(SCENARIOS[scenario], kube_version=kube_version)
    problems = [item for item in report["messages"] if item["severity"] >= 2]
    assert report["errors"] == [], report
    assert problems == [], report


def test_chart_states_kubernetes_1_30_as_its_minimum() -> None:
    """ValidatingAdmissionPolicy v1 and node names in service-account tokens need 1.30 (Helm
    refuses an install on an older cluster; `helm lint` does not check it)."""
    with helm.Chart.load(CHART_DIR) as chart:
        assert chart.metadata["kubeVersion"] == ">=1.30.0-0"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_validates_strictly(
    rendered: dict[str, Rendered], scenario: str, version: str
) -> None:
    manifests = rendered[scenario].manifests
    assert manifests
    for doc in manifests:
        if doc["kind"] in NO_SCHEMA_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_release_names_are_checked() -> None:
    with pytest.raises(helm.HelmError):
        render(name="Not_A_Release")


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"watchNamespace": ["a"]}, "watchNamespace"),
        ({"images": {"controller": {"digst": DIGEST}}}, "digst"),
        ({"metrics": {"serviceMonitor": {"enabeld": True}}}, "enabeld"),
        ({"controller": {"metricsPort": "8080"}}, "/controller/metricsPort"),
        ({"watchNamespaces": "fleet-a"}, "/watchNamespaces"),
        ({"images": {"controller": {"digest": "sha256:short"}}}, "/images/controller/digest"),
    ],
)
def test_bad_values_fail_naming_the_key(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(named)):
        render(values)


def _schema_objects(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)] if node.get("type") == "object" and "properties" in node else []
    for name, child in node.get("properties", {}).items():
        found.extend(_schema_objects(child, f"{path}.{name}"))
    return found


def test_schema_closes_every_level_and_covers_every_value() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    objects = _schema_objects(schema, "")
    assert objects
    for path, node in objects:
        assert node.get("additionalProperties") is False, path
        for name, child in node["properties"].items():
            assert child.get("description"), f"{path}.{name} has no description"
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    helm.Chart.load(CHART_DIR).validate_schema(defaults)


def test_every_value_is_commented() -> None:
    """Each value the schema knows has a comment line right above it in values.yaml (the
    contents of free-form values such as `resources` are Kubernetes' own fields)."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, dict[str, Any] | None]] = [(-1, schema)]
    checked = 0
    for number, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z]\w*):\s*(\S.*)?$", line)
        if key is None:
            continue
        indent = len(key.group(1))
        while parents[-1][0] >= indent:
            parents.pop()
        parent = parents[-1][1]
        node = (parent or {}).get("properties", {}).get(key.group(2))
        parents.append((indent, node if node and "properties" in node else None))
        if node is None or key.group(3) is None:
            continue  # free-form content, or a section whose values carry the comments
        checked += 1
        above = lines[number - 1].strip()
        assert above.startswith("#"), f"values.yaml line {number + 1}: {line.strip()}"
    assert checked >= 20


# -- the controller Deployment ----------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deployment_runs_one_standalone_controller_the_cli_accepts(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    deployment = rendered[scenario].one("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    command = rendered[scenario].deployment_args()
    assert command[0] == "imagestream"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.standalone) == ("controller", True)
    assert args.agent_service_account == AGENT_SA
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": args.metrics_port, "health": args.health_port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_app_version_is_the_package_version() -> None:
    """The default image tag is the chart's appVersion: it must be the version it packages."""
    with helm.Chart.load(CHART_DIR) as chart:
        assert chart.metadata["appVersion"] == imagestream.__version__


def test_images_default_to_app_version_and_pin_by_digest(rendered: dict[str, Rendered]) -> None:
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    default = rendered["defaults"]
    (container,) = default.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f":{app_version}")
    assert f"--agent-image={container['image']}" in default.deployment_args()

    pinned = rendered["images-by-digest"]
    spec = pinned.one("Deployment")["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == f"registry.example/imagestream@{DIGEST}"
    assert f"--agent-image=registry.example/imagestream@{DIGEST}" in pinned.deployment_args()
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert pinned.deployment_args()[1] == "--verbose"
    for account in pinned.of_kind("ServiceAccount"):
        assert account["imagePullSecrets"] == [{"name": "registry-creds"}]


def test_agent_values_reach_the_agent_job() -> None:
    """Proxies, extra env and the pull policy go through the controller's flags into every
    agent Job it builds."""
    values = {
        "images": {"agent": {"pullPolicy": "Always"}},
        "agent": {
            "proxy": {"httpsProxy": "http://proxy.corp:3128", "noProxy": "10.0.0.0/8,.svc"},
            "extraEnv": {"TZ": "UTC: +0"},
        },
    }
    args = build_parser().parse_args(render(values).deployment_args()[1:])
    job = build_job(parse_stream(stream_body()), job_settings(args))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy.corp:3128"
    assert env["NO_PROXY"] == "10.0.0.0/8,.svc"
    assert env["TZ"] == "UTC: +0"
    assert "HTTP_PROXY" not in env
    assert env["IMAGESTREAM_TARGET"]
    assert container["imagePullPolicy"] == "Always"


def test_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """`controller.logFormat: json` makes the controller log one JSON object a line."""
    args = build_parser().parse_args(
        render({"controller": {"logFormat": "json"}}).deployment_args()[1:]
    )
    assert args.log_format == "json"
    configure_logging(verbose=False, log_format=args.log_format)
    try:
        logging.getLogger("imagestream.test").warning("watching %s", "ns-a")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("imagestream.test").exception("failed")
    finally:
        configure_logging(verbose=False)
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first | {"time": ""} == {
        "time": "",
        "level": "WARNING",
        "logger": "imagestream.test",
        "message": "watching ns-a",
    }
    assert "ValueError: boom" in second["exception"]
    assert render().deployment_args().count("--log-format=text") == 1


def test_agent_env_may_not_override_the_contract() -> None:
    with pytest.raises(helm.HelmValuesError, match="IMAGESTREAM_TARGET"):
        render({"agent": {"extraEnv": {"IMAGESTREAM_TARGET": "/dev/sda"}}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["controller", "-n", "x", "--agent-env", "IMAGESTREAM_TARGET=/dev/sda"]
        )


# -- namespaces, Pod Security --------------------------------------------------------------------


def test_watched_namespaces(rendered: dict[str, Rendered]) -> None:
    assert watched(rendered["defaults"]) == [NAMESPACE]
    assert watched(rendered["several-namespaces"]) == ["fleet-a", "fleet-b", NAMESPACE]
    assert watched(rendered["all-namespaces"]) == []
    assert "--all-namespaces" in rendered["all-namespaces"].deployment_args()


def test_watched_namespaces_are_labelled_privileged(rendered: dict[str, Rendered]) -> None:
    # The release namespace exists before a Helm install: the chart cannot own it.
    assert rendered["defaults"].of_kind("Namespace") == []
    namespaces = rendered["several-namespaces"].of_kind("Namespace")
    assert sorted(doc["metadata"]["name"] for doc in namespaces) == ["fleet-a", "fleet-b"]
    for doc in namespaces:
        assert doc["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    plain = render({"namespaces": {"createReleaseNamespace": True}})
    assert [doc["metadata"]["name"] for doc in plain.of_kind("Namespace")] == [NAMESPACE]
    assert "kubectl label namespace" in rendered["defaults"].notes


def test_all_namespaces_says_loudly_what_it_grants(rendered: dict[str, Rendered]) -> None:
    notes = rendered["all-namespaces"].notes
    assert "EVERY namespace" in notes
    assert "cluster-wide" in notes
    assert "privileged agent Pod" in notes
    assert "EVERY" not in rendered["defaults"].notes
    assert "kubectl get ims" in rendered["defaults"].notes
    assert "/metrics" in rendered["defaults"].notes


# -- RBAC: exactly the table, the table exactly the code's calls ---------------------------------


@pytest.mark.parametrize("scenario", ["defaults", "several-namespaces", "crds-off"])
def test_rbac_is_exactly_the_table_in_each_watched_namespace(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    chart = rendered[scenario]
    namespaces = watched(chart)
    controller = granted(chart, NAMESPACE, RELEASE)
    expected: dict[str | None, set[tuple[str, str, str]]] = {
        namespace: rbac.rules(rbac.CONTROLLER, "namespace") for namespace in namespaces
    }
    expected[None] = rbac.rules(rbac.CONTROLLER, "cluster")
    assert controller == expected
    for namespace in namespaces:
        assert granted(chart, namespace, AGENT_SA) == {
            namespace: rbac.rules(rbac.AGENT, "namespace")
        }
        assert any(
            doc["metadata"] == doc["metadata"] | {"name": AGENT_SA, "namespace": namespace}
            for doc in chart.of_kind("ServiceAccount")
        ), f"no agent ServiceAccount in {namespace}"
    assert rbac.rules(rbac.AGENT, "namespace") == {
        ("imagestream.dev", "imagestreams/status", "get"),
        ("imagestream.dev", "imagestreams/status", "patch"),
    }


def test_rbac_of_all_namespaces_is_cluster_wide(rendered: dict[str, Rendered]) -> None:
    chart = rendered["all-namespaces"]
    namespaced = rbac.rules(rbac.CONTROLLER, "namespace")
    assert granted(chart, NAMESPACE, RELEASE) == {
        None: namespaced | rbac.rules(rbac.CONTROLLER, "cluster")
    }
    assert granted(chart, NAMESPACE, AGENT_SA) == {NAMESPACE: rbac.rules(rbac.AGENT, "namespace")}
    agent_role = chart.one("ClusterRole", f"{RELEASE}-agent")
    assert rules_of(agent_role) == rbac.rules(rbac.AGENT, "namespace")


def _kube_client_calls() -> set[tuple[str, str]]:
    """(API class, method) of every kubernetes client method kube.py calls or passes on."""
    tree = ast.parse(Path(inspect.getfile(kube)).read_text())
    classes: dict[str, str] = {}
    for node in ast.walk(tree):
        # self._batch = client.BatchV1Api(api_client)
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr.endswith("Api")
        ):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    classes[target.attr] = node.value.func.attr
    assert classes, "kube.py creates no kubernetes API objects"
    return {
        (classes[node.value.attr], node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr in classes
    }


def _rule_of_client_method(api_class: str, method: str) -> tuple[str, str, str]:
    """What a client method asks the API server for, read from the client's own request
    builder (`_<method>_serialize` names the HTTP method and the resource path)."""
    source = inspect.getsource(getattr(getattr(client, api_class), f"_{method}_serialize"))
    http = re.search(r"method='(\w+)'", source)
    path = re.search(r"resource_path='([^']+)'", source)
    assert http, f"{api_class}.{method}: no HTTP method in the client"
    assert path, f"{api_class}.{method}: no resource path in the client"
    concrete = path.group(1).replace("{namespace}", "ns").replace("{name}", "name")
    found = request_rule(http.group(1), concrete, {})
    assert found is not None
    return found[1]


def test_rbac_table_has_exactly_the_calls_kube_py_makes() -> None:
    calls = {_rule_of_client_method(*call) for call in _kube_client_calls()}
    assert calls, "no kubernetes client call found in kube.py"
    table = {row.rule for row in rbac.CONTROLLER if row.caller == "kube.py"}
    assert calls == table
    assert calls <= rbac.rules(rbac.CONTROLLER, "namespace")


def _kopf_resources() -> set[tuple[str, str]]:
    """(group, plural) of every resource a kopf handler of handlers.py is registered for."""
    from imagestream.controller import handlers  # noqa: PLC0415 (registers the handlers)

    tree = ast.parse(Path(inspect.getfile(handlers)).read_text())
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and "kopf." in ast.unparse(decorator.func)):
                continue
            args = [
                getattr(handlers, arg.id) if isinstance(arg, ast.Name) else ast.literal_eval(arg)
                for arg in decorator.args
            ]
            group, plural = ("", args[1]) if len(args) == 2 else (args[0], args[2])
            found.add((group, plural))
    return found


def test_rbac_table_lets_kopf_watch_exactly_the_handlers_resources() -> None:
    """Every resource a handler is registered for (an index, a timer, an event handler) may be
    listed and watched in each namespace, and only those (and the Events the controller reads)."""
    resources = _kopf_resources()
    assert ("imagestream.dev", "imagestreams") in resources
    namespaced = rbac.rules(rbac.CONTROLLER, "namespace")
    watchable = {(group, resource) for group, resource, verb in namespaced if verb == "watch"}
    assert resources <= watchable
    assert watchable - resources <= {("", "events")}
    for group, resource in resources:
        assert (group, resource, "list") in namespaced


# -- the CRD ---------------------------------------------------------------------------------


def canonical(doc: Any) -> str:
    """`doc` as sorted JSON, types included."""
    return json.dumps(doc, sort_keys=True)


def test_chart_crd_is_crds_directory_s(rendered: dict[str, Rendered]) -> None:
    (source,) = [doc for doc in yaml.safe_load_all(CRD_PATH.read_text()) if doc]
    installed = copy.deepcopy(rendered["defaults"].one("CustomResourceDefinition"))
    annotations = installed["metadata"].pop("annotations")
    assert annotations == {"helm.sh/resource-policy": "keep"}
    # As JSON: 7200 and 7200.0 compare equal in Python, not in a schema's `default`.
    assert canonical(installed) == canonical(source)
    unkept = render({"crds": {"keep": False}}).one("CustomResourceDefinition")
    assert canonical(unkept) == canonical(source)
    assert rendered["crds-off"].of_kind("CustomResourceDefinition") == []
    # The chart reads crds/ through a link: no copy to drift.
    link = CHART_DIR / "files" / CRD_PATH.name
    assert link.is_symlink()
    assert link.resolve() == CRD_PATH.resolve()


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_service_monitor_and_alerts(rendered: dict[str, Rendered]) -> None:
    assert rendered["defaults"].of_kind("ServiceMonitor") == []
    assert rendered["defaults"].of_kind("PrometheusRule") == []
    chart = rendered["metrics-on"]
    service = chart.one("Service")
    monitor = chart.one("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert service["metadata"]["labels"] | selector == service["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    rules = chart.one("PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "ImageStreamFailed",
        "ImageStreamStalled",
        "ImageStreamControllerDown",
    }
    names = _metric_names()
    for rule in rules:
        for used in re.findall(r"\b(imagestream_\w+)", rule["expr"]):
            assert used in names, f"{rule['alert']}: {used} is not a metric the controller serves"
        assert "{{" not in json.dumps(rule["annotations"]).replace("{{ $value }}", "")
    job = service["metadata"]["name"]
    for rule in rules:
        assert f'job="{job}"' in rule["expr"], "alerts are scoped to this release's metrics"


def _metric_names() -> set[str]:
    """Sample names the controller's metrics registry exports."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    registry = CollectorRegistry()
    Metrics(registry)
    return {sample.name for family in registry.collect() for sample in family.samples} | {
        family.name for family in registry.collect()
    }
