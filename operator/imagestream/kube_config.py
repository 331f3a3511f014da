"""How the controller and the agent find the API server and name the ImageStream resource."""

from __future__ import annotations

import os

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from imagestream.errors import UsageError
from imagestream.reasons import Reason

GROUP = "imagestream.dev"
VERSION = "v1alpha1"
PLURAL = "imagestreams"
#: The kubelet sets this in every Pod; outside a cluster it is absent.
_IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"


def load_configuration() -> client.Configuration:
    """In-cluster config inside a Pod, else `KUBECONFIG` or `~/.kube/config`, as every client.

    Raises UsageError (reason NoApiConfig) when neither is usable.
    """
    configuration = client.Configuration()
    in_cluster = bool(os.environ.get(_IN_CLUSTER_ENV))
    try:
        if in_cluster:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                # Read now, not at import time as the client's default is.
                config_file=os.environ.get("KUBECONFIG"),
                client_configuration=configuration,
                persist_config=False,
            )
    except (ConfigException, OSError, ValueError) as exc:
        where = "in-cluster" if in_cluster else "kubeconfig"
        raise UsageError(
            f"no {where} API configuration: {exc}", reason=Reason.NO_API_CONFIG
        ) from None
    return configuration
