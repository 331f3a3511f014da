"""The plain manifest (the chart rendered with default values, deploy/imagestream-operator.yaml)
installed with `kubectl apply` into the Kubernetes API stand-in, and the operator's success
scenario run by a controller started from the installed Deployment's command, args and env,
each client with its own ServiceAccount's identity: every request the controller and the agent
made is then authorized against the installed RBAC, as a real API server would.

What a real cluster does differently, and where that is covered instead:

- The stand-in enforces no RBAC, admission or Pod Security: here the recorded requests are
  checked against the installed Roles and bindings after the scenario (a real server answers a
  missing permission with 403 at once); the admission policies' CEL is tested in
  tests/unit/test_admission.py; the Pod Security label is checked on the installed Namespace.
- No kubelet runs the Deployment: the controller is started here as a local process from the
  Deployment's command and args, with the metrics and health ports moved to free loopback
  ports, and finding the API through KUBECONFIG (with its ServiceAccount's name as the token)
  instead of the mounted service-account token; its container image, probes, securityContext
  and resources are not exercised (the image's own tests run it).
- The agent runs as a local process (see tests/integration/operator/), with the agent
  ServiceAccount's name as its token.
- Services, Deployments, RBAC objects and admission policies are stored, not acted on; the
  test registers those built-in kinds with the stand-in, which otherwise serves only what the
  operator itself touches.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.integration.operator.test_operator_scenarios import (
    NODE,
    THROTTLE,
    Stand,
    assert_succeeded,
)
from tests.support.blockdev import LoopDeviceFactory
from tests.support.chart import Rendered, granted, request_rule
from tests.support.controller import ControllerProcess
from tests.support.kube_api import KubeApi
from tests.support.kube_store import ResourceType
from tests.support.kubectl import Kubectl
from tests.support.kubelet import KubeletFactory
from tests.support.nginx import NginxFactory
from tests.support.tools import free_port, wait_until

from imagestream.controller import rbac

MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "imagestream-operator.yaml"
NAMESPACE = "imagestream-system"
CONTROLLER_SA = "imagestream-operator"
AGENT_SA = "imagestream-agent"

#: Built-in kinds the chart installs that the operator never reads (stored by the stand-in).
CHART_KINDS = (
    ResourceType("", ("v1",), "services", "service", "Service", namespaced=True),
    ResourceType("apps", ("v1",), "deployments", "deployment", "Deployment", namespaced=True),
    *(
        ResourceType(
            "rbac.authorization.k8s.io", ("v1",), plural, plural[:-1], kind, namespaced=namespaced
        )
        for plural, kind, namespaced in (
            ("roles", "Role", True),
            ("rolebindings", "RoleBinding", True),
            ("clusterroles", "ClusterRole", False),
            ("clusterrolebindings", "ClusterRoleBinding", False),
        )
    ),
    *(
        ResourceType(
            "admissionregistration.k8s.io", ("v1",), plural, plural[:-1], kind, namespaced=False
        )
        for plural, kind in (
            ("validatingadmissionpolicies", "ValidatingAdmissionPolicy"),
            ("validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding"),
        )
    ),
)


def service_account_token(namespace: str, name: str) -> str:
    """The token a client of this ServiceAccount sends here (the stand-in accepts any)."""
    return f"system:serviceaccount:{namespace}:{name}"


def kubeconfig_as(api: KubeApi, path: Path, token: str) -> Path:
    """A kubeconfig for the stand-in that authenticates with `token`."""
    config = yaml.safe_load(api.kubeconfig(path, namespace=NAMESPACE).read_text())
    config["users"][0]["user"]["token"] = token
    path.write_text(yaml.safe_dump(config))
    return path


class DeployedController(ControllerProcess):
    """The controller run from the installed Deployment's container: its command and args,
    with the ports moved to free loopback ones, and its env."""

    def __init__(self, container: dict[str, Any], kubeconfig: Path, workdir: Path) -> None:
        super().__init__(kubeconfig, [], workdir)
        self.container = container
        self.health_port = 0

    def _command(self) -> list[str]:
        self.health_port = free_port(self.host)
        moved = {
            "--metrics-port": str(self.port),
            "--metrics-address": self.host,
            "--health-port": str(self.health_port),
        }
        args = []
        for arg in self.container["args"]:
            flag, _, _value = arg.partition("=")
            args.append(f"{flag}={moved[flag]}" if flag in moved else arg)
        env = [f"{item['name']}={item['value']}" for item in self.container.get("env", [])]
        (command,) = self.container["command"]
        executable = shutil.which(command, path=str(Path(sys.executable).parent))
        assert executable, f"{command} is not installed in this virtualenv"
        return [
            "env",
            "-u",
            "KUBERNETES_SERVICE_HOST",
            *env,
            f"KUBECONFIG={self.kubeconfig}",
            executable,
            *args,
        ]


def installed(api: KubeApi) -> Rendered:
    """The manifest's objects as the stand-in stored them."""
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    stored = []
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        plural = next(
            resource.plural
            for resource in api.store.served()
            if resource.group == group and resource.kind == doc["kind"]
        )
        namespace = doc["metadata"].get("namespace")
        found = api.find(group, plural, namespace, doc["metadata"]["name"])
        assert found is not None, f"{doc['kind']} {doc['metadata']['name']} was not installed"
        stored.append(found)
    return Rendered(stored, "")


@pytest.fixture
def stand(
    *,
    kube_api: KubeApi,
    kubectl: Kubectl,
    kubelet_factory: KubeletFactory,
    nginx_factory: NginxFactory,
    nginx_docroot: Path,
    loop_device_factory: LoopDeviceFactory,
    tmp_path: Path,
) -> Iterator[tuple[Stand, Rendered]]:
    """The manifest applied, the controller started from its Deployment, a kubelet, nginx."""
    for resource in CHART_KINDS:
        kube_api.store.resources[resource.key] = resource
    # The stand-in serves no OpenAPI documents for kubectl's client-side validation.
    kubectl("apply", "--validate=false", "-f", str(MANIFEST))
    chart = installed(kube_api)
    (container,) = chart.one("Deployment")["spec"]["template"]["spec"]["containers"]
    controller_token = service_account_token(NAMESPACE, CONTROLLER_SA)
    controller = DeployedController(
        container,
        kubeconfig_as(kube_api, tmp_path / "controller.kubeconfig", controller_token),
        tmp_path / "controller",
    )
    agent_config = kubeconfig_as(
        kube_api, tmp_path / "agent.kubeconfig", service_account_token(NAMESPACE, AGENT_SA)
    )
    stand = Stand(
        api=kube_api,
        kubectl=kubectl,
        kubelet=kubelet_factory(nodes=[NODE], kubeconfig=agent_config),
        controller=controller.start(),
        nginx=nginx_factory(nginx_docroot, extra_server_config=THROTTLE),
        docroot=nginx_docroot,
        devices=loop_device_factory,
        namespace=NAMESPACE,
    )
    try:
        yield stand, chart
    finally:
        controller.stop()
        print(controller.log_text()[-20000:])
        print(stand.agent_logs())
    assert stand.kubelet.errors == [], "the kubelet stand-in could not do what a Pod asked"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def requests_of(api: KubeApi, token: str) -> set[tuple[str | None, tuple[str, str, str]]]:
    """(namespace, rule) of every resource request made with `token`."""
    found = set()
    for record in api.requests:
        if record.token != token:
            continue
        rule = request_rule(record.method, record.path, record.params)
        if rule is not None:
            found.add(rule)
    return found


def unauthorized(
    made: set[tuple[str | None, tuple[str, str, str]]],
    grants: dict[str | None, set[tuple[str, str, str]]],
) -> list[str]:
    """The requests the grants do not allow (a cluster-wide grant allows every namespace)."""
    cluster = grants.get(None, set())
    return sorted(
        f"{rule} in {namespace or 'the cluster'}"
        for namespace, rule in made
        if rule not in cluster and (namespace is None or rule not in grants.get(namespace, set()))
    )


def test_installed_manifest_runs_a_stream_within_its_rbac(
    stand: tuple[Stand, Rendered], require_root: None
) -> None:
    site, chart = stand
    namespace = site.api.get("", "namespaces", None, NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert site.api.find("", "serviceaccounts", NAMESPACE, AGENT_SA) is not None

    # The probes' endpoint, as the kubelet would ask it (on the moved port).
    assert isinstance(site.controller, DeployedController)
    (container,) = chart.one("Deployment")["spec"]["template"]["spec"]["containers"]
    probe = container["livenessProbe"]["httpGet"]
    health = f"http://{site.controller.host}:{site.controller.health_port}{probe['path']}"
    wait_until(lambda: _answers(health), 30, what=f"{health} to answer 200")

    image = site.image(seed=11)
    device = site.device()
    site.apply("root-b", image, device)
    status = assert_succeeded(site, "root-b", image, device)

    # The agent Job is the one the installed Deployment asks for.
    job = site.api.get("batch", "jobs", NAMESPACE, status["jobName"])
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == AGENT_SA
    args: Sequence[str] = chart.one("Deployment")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert f"--agent-image={pod_spec['containers'][0]['image']}" in args

    controller = requests_of(site.api, service_account_token(NAMESPACE, CONTROLLER_SA))
    agent = requests_of(site.api, service_account_token(NAMESPACE, AGENT_SA))
    controller_grants = granted(chart, NAMESPACE, CONTROLLER_SA)
    agent_grants = granted(chart, NAMESPACE, AGENT_SA)
    assert unauthorized(controller, controller_grants) == []
    assert unauthorized(agent, agent_grants) == []
    # The scenario exercised the table's core: what kopf, kube.py and the agent need to stream.
    made = {rule for _, rule in controller}
    assert {
        ("imagestream.dev", "imagestreams", "list"),
        ("imagestream.dev", "imagestreams", "watch"),
        ("imagestream.dev", "imagestreams", "patch"),
        ("imagestream.dev", "imagestreams/status", "patch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "watch"),
        ("", "pods", "watch"),
        ("", "events", "create"),
        ("", "namespaces", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    } <= made
    assert made <= {row.rule for row in rbac.CONTROLLER}
    assert {rule for _, rule in agent} == {("imagestream.dev", "imagestreams/status", "patch")}
