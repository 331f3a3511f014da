"""The operator tests' fixtures (API stand-in, kubectl, kubelet stand-in, controller), shared
with the chart's installation test."""

from tests.integration.operator.conftest import (
    controller_factory,
    kube_api,
    kubeconfig,
    kubectl,
    kubelet_factory,
    operator_namespace,
)

__all__ = [
    "controller_factory",
    "kube_api",
    "kubeconfig",
    "kubectl",
    "kubelet_factory",
    "operator_namespace",
]
