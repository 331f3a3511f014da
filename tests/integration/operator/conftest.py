"""Fixtures for the operator's integration tests: the Kubernetes API stand-in, kubectl, the
kubelet stand-in.

``kube_api`` serves on a free loopback port for one test; ``kubeconfig`` points at it;
``kubectl`` runs the real kubectl against it; ``kubelet`` runs Jobs' containers as local
processes in the operator's namespace (created up front); ``controller`` runs the real
``imagestream controller`` process against it. See :mod:`tests.support.kube_api` and
:mod:`tests.support.kubelet` for what differs from a real cluster.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from tests.support.controller import ControllerFactory, ControllerProcess
from tests.support.kube_api import KubeApi
from tests.support.kubectl import Kubectl
from tests.support.kubelet import Kubelet, KubeletFactory
from tests.support.tools import require_tool

#: The namespace the operator runs in and watches in these tests.
OPERATOR_NAMESPACE = "imagestream-system"
#: Grace periods are capped so a test never waits the default 30 s for a stubborn process.
TEST_MAX_GRACE_SECONDS = 5.0


@pytest.fixture
def operator_namespace() -> str:
    """The namespace the operator and its agent Jobs live in (created in ``kube_api``)."""
    return OPERATOR_NAMESPACE


@pytest.fixture
def kube_api(operator_namespace: str) -> Iterator[KubeApi]:
    """A started Kubernetes API stand-in with the operator's namespace; stopped at teardown."""
    with KubeApi() as api:
        api.ensure_namespace(operator_namespace)
        yield api


@pytest.fixture
def kubeconfig(kube_api: KubeApi, tmp_path: Path) -> Path:
    """A kubeconfig file for ``kube_api`` (plain http, bearer token, namespace preset)."""
    return kube_api.kubeconfig(tmp_path / "kubeconfig", namespace=OPERATOR_NAMESPACE)


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    """The real kubectl against ``kube_api``: ``kubectl("get", "ims")`` (fails under CI when
    kubectl is missing, skips otherwise)."""
    return Kubectl(require_tool("kubectl"), kubeconfig, tmp_path / "kubectl-cache")


def agent_path() -> str:
    """``PATH`` for processes the kubelet stand-in runs: this virtualenv's bin first, so
    ``imagestream`` and ``python`` are the project's."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


@pytest.fixture
def kubelet_factory(
    kube_api: KubeApi, kubeconfig: Path, tmp_path: Path, operator_namespace: str
) -> Iterator[KubeletFactory]:
    """Start kubelet stand-ins with other options: ``kubelet_factory(nodes=["node-7"])``.

    Defaults: the operator's namespace, ``kubeconfig`` as the processes' KUBECONFIG, the
    virtualenv first on PATH, grace periods capped at 5 s. All are stopped at teardown
    (every process they started is killed).
    """
    with ExitStack() as stack:
        counter = 0

        def start(**options: Any) -> Kubelet:
            nonlocal counter
            counter += 1
            options.setdefault("kubeconfig", kubeconfig)
            options.setdefault("path", agent_path())
            options.setdefault("max_grace_seconds", TEST_MAX_GRACE_SECONDS)
            namespaces = options.pop("namespaces", [operator_namespace])
            kubelet = Kubelet(kube_api.url, namespaces, tmp_path / f"kubelet-{counter}", **options)
            return stack.enter_context(kubelet)

        yield start


@pytest.fixture
def kubelet(kubelet_factory: KubeletFactory) -> Kubelet:
    """A kubelet + Job controller stand-in running every Job in the operator's namespace."""
    return kubelet_factory()


#: How much of the controller's log a failing test shows (the whole file stays in tmp_path).
CONTROLLER_LOG_TAIL_LINES = 300


@pytest.fixture
def controller_factory(
    kubeconfig: Path, operator_namespace: str, tmp_path: Path
) -> Iterator[ControllerFactory]:
    """Start the real ``imagestream controller`` when the test is ready for it (after the CRD
    is applied, say): ``controller_factory(**ControllerProcess options)``.

    Defaults: the operator's namespace, ``kubeconfig``, metrics on a free 127.0.0.1 port, ``-v``.
    Each is stopped (SIGTERM) at teardown and its log printed, which pytest shows only when
    the test failed.
    """
    started: list[ControllerProcess] = []

    def start(**options: Any) -> ControllerProcess:
        namespaces = options.pop("namespaces", [operator_namespace])
        workdir = tmp_path / f"controller-{len(started) + 1}"
        process = ControllerProcess(kubeconfig, namespaces, workdir, **options)
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()
            tail = process.log_text().splitlines()[-CONTROLLER_LOG_TAIL_LINES:]
            print(f"--- controller log ({process.workdir}), last {len(tail)} lines ---")
            print("\n".join(tail))


@pytest.fixture
def controller(controller_factory: ControllerFactory) -> ControllerProcess:
    """The real controller, started at once (see ``controller_factory``)."""
    return controller_factory()
