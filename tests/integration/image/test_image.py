"""Smoke tests of the container image, built once for the module by ``scripts/build-image``.

The build is the real Dockerfile on a local Debian base (no registry is reachable from CI; see
the script), run with podman through ``scripts/podman`` (the machine's podman fixes). Then the
image is run as a user would run it: ``--help`` as its default user; the controller on a
read-only root filesystem against the Kubernetes API stand-in, serving metrics and its health
endpoint; and ``imagestream stream`` of an nginx-served image onto a loop device from a
privileged root container, as the agent Job runs it. Under CI=true a missing podman fails.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from tests.support.blockdev import LoopDeviceFactory
from tests.support.crd import CRD_PATH
from tests.support.kube_api import KubeApi
from tests.support.nginx import NginxFactory
from tests.support.targets import MIB, fill_pattern, read_device
from tests.support.tools import free_port, require_tool, wait_until

from imagestream.demo.image import iter_raw_data, write_sample_image

ROOT = Path(__file__).resolve().parents[3]
PODMAN = ROOT / "scripts" / "podman"
LOCK = ROOT / "constraints.txt"
#: A cold build (debootstrap included) takes 80-110 s on the CI machine; a warm one seconds.
BUILD_TIMEOUT = 900
IMAGE_SIZE = 4 * MIB
NAMESPACE = "imagestream-system"
#: The image's default user (Dockerfile `USER`): numeric, for runAsNonRoot.
IMAGE_USER = "65532:65532"

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 120)


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``podman ARGS`` with the machine's configuration; output captured, never raising."""
    return subprocess.run(
        [str(PODMAN), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def image(require_root: None) -> str:
    """The image built from the working tree's Dockerfile (its tag)."""
    for tool in ("podman", "runc", "debootstrap"):
        require_tool(tool)
    tag = "localhost/imagestream-operator:smoke-test"
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-image"), tag],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-6000:]
    assert build.stdout.strip().splitlines()[-1] == tag
    return tag


@pytest.fixture(scope="module")
def inspected(image: str) -> dict[str, object]:
    """``podman image inspect`` of the image."""
    result = podman("image", "inspect", image)
    assert result.returncode == 0, result.stderr
    data: list[dict[str, object]] = json.loads(result.stdout)
    return data[0]


def test_image_metadata(inspected: dict[str, object]) -> None:
    config = inspected["Config"]
    assert isinstance(config, dict)
    assert config["User"] == IMAGE_USER
    assert config["Entrypoint"] == ["imagestream"]
    assert "Healthcheck" not in config  # Kubernetes probes do that
    labels = config["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    with (ROOT / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.source"].startswith("https://")


def test_help_as_the_default_user(image: str) -> None:
    result = podman("run", "--rm", "--read-only", image, "--help")
    assert result.returncode == 0, result.stderr
    assert "stream" in result.stdout
    assert "controller" in result.stdout
    whoami = podman("run", "--rm", "--entrypoint", "id", image)
    assert whoami.stdout.startswith("uid=65532(imagestream) gid=65532(imagestream)"), whoami


def test_the_agent_has_the_host_tools_it_runs(image: str) -> None:
    """A COSI disk target relocates its backup GPT with sfdisk, and an extension refresh runs
    through nsenter: both must be in the image the agent Job runs."""
    for tool in ("sfdisk", "nsenter"):
        found = podman("run", "--rm", "--entrypoint", tool, image, "--version")
        assert found.returncode == 0, (tool, found.stderr)


def test_installed_versions_are_the_locked_ones(image: str) -> None:
    listing = podman(
        "run", "--rm", "--entrypoint", "python3", image, "-c",
        "import importlib.metadata as m, json;"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    installed = {
        name.lower().replace("_", "-"): v for name, v in json.loads(listing.stdout).items()
    }
    locked = dict(
        line.split("==")
        for line in LOCK.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert "kopf" in installed
    assert "pytest" not in installed  # the dev extras stay out of the image
    not_locked = {"imagestream-operator", "pip", "setuptools", "wheel"}
    mismatched = {
        name: (version, locked.get(name))
        for name, version in installed.items()
        if name not in not_locked and locked.get(name) != version
    }
    assert mismatched == {}


@pytest.fixture
def kube_api() -> Iterator[KubeApi]:
    """The API stand-in with the ImageStream CRD and the operator's namespace."""
    with KubeApi() as api:
        api.ensure_namespace(NAMESPACE)
        api.put(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            yaml.safe_load(CRD_PATH.read_text(encoding="utf-8")),
        )
        yield api


def test_controller_serves_metrics_and_health(
    image: str, kube_api: KubeApi, tmp_path: Path
) -> None:
    # The host network: the API stand-in listens on the host's loopback.
    kubeconfig = kube_api.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    kubeconfig.chmod(0o644)  # the controller runs as uid 65532
    metrics_port, health_port = free_port(), free_port()
    name = f"imagestream-controller-{metrics_port}"
    started = podman(
        "run", "--detach", "--name", name, "--network", "host", "--read-only",
        "--volume", f"{kubeconfig}:/etc/imagestream/kubeconfig:ro",
        "--env", "KUBECONFIG=/etc/imagestream/kubeconfig",
        image, "controller", "--standalone", "-n", NAMESPACE,
        "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
        "--health-port", str(health_port),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:

        def answers(port: int, path: str) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: answers(health_port, "/healthz"), 60, what="the health endpoint")
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert metrics.status_code == 200
        assert "imagestream_" in metrics.text
        # It is watching: kopf listed the ImageStreams of its namespace.
        wait_until(
            lambda: any("imagestreams" in r.path and r.method == "GET" for r in kube_api.requests),
            30,
            what="the controller to list ImageStreams",
        )
        stopped = podman("stop", "--time", "20", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name)
        assert exit_code.stdout.strip() == "0", podman("logs", name).stderr[-4000:]
    finally:
        podman("rm", "--force", name)


def test_stream_onto_a_loop_device_as_the_agent(
    image: str, loop_device_factory: LoopDeviceFactory, nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:  # fmt: skip
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    sample = write_sample_image(docroot / "os.img.zst", IMAGE_SIZE, seed=9)
    url = nginx_factory(docroot).url_for("os.img.zst")
    device = loop_device_factory(8 * MIB)
    fill_pattern(device, 8 * MIB)
    run = podman(
        "run", "--rm", "--privileged", "--user", "0", "--network", "host",
        "--volume", "/dev:/dev",
        image, "stream", url, str(device), "--sha384", sample.sha384, "--progress", "plain",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"Wrote {device}: verified" in run.stdout
    assert read_device(device, IMAGE_SIZE) == b"".join(iter_raw_data(IMAGE_SIZE, seed=9))
