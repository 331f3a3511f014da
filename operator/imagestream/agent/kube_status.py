"""The agent's only Kubernetes I/O: merge-patching `status.progress` of its own ImageStream.

The agent's ServiceAccount may only get and patch `imagestreams/status`, so this is all it does
with the API. Every request has a timeout and no client-side retries: the reporter's next tick
is the retry, with fresher numbers.
"""

from __future__ import annotations

from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from imagestream.agent.reporter import StatusWriteError
from imagestream.errors import UsageError
from imagestream.kube_config import GROUP, PLURAL, VERSION, load_configuration

#: RFC 7386 JSON merge patch: custom resources take no strategic merge patch.
MERGE_PATCH = "application/merge-patch+json"
#: (connect, read) seconds: a hanging API server holds the reporter thread this long at most.
REQUEST_TIMEOUT = (3.0, 5.0)


class StatusUnavailable(Exception):
    """No usable API configuration: neither in-cluster nor a kubeconfig file."""


class StatusWriter:
    """Patches `status.progress` of one ImageStream through the status subresource."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.name = name

    def patch_progress(self, body: dict[str, Any]) -> None:
        """Send one merge patch; StatusWriteError (with a log-safe message) when it fails."""
        try:
            self._api.patch_namespaced_custom_object_status(
                group=GROUP,
                version=VERSION,
                namespace=self.namespace,
                plural=PLURAL,
                name=self.name,
                body=body,
                # The client's default would be the first JSON type it lists; say it outright.
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            # The status line only: the response body may echo request details.
            raise StatusWriteError(
                f"the API server answered {exc.status} {exc.reason} for "
                f"imagestreams/{self.name}/status in namespace {self.namespace}"
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            raise StatusWriteError(
                f"no answer from the API server ({type(exc).__name__})"
            ) from None

    def close(self) -> None:
        """Release the connection pool."""
        self._api.api_client.close()


def connect(namespace: str, name: str) -> StatusWriter:
    """A writer for one ImageStream: in-cluster config in a Pod, else KUBECONFIG/~/.kube/config.

    Raises StatusUnavailable when neither is usable.
    """
    try:
        configuration = load_configuration()
    except UsageError as exc:
        raise StatusUnavailable(exc.message) from None
    # No urllib3 retries: each would wait out another timeout while newer numbers pile up.
    configuration.retries = 0
    return StatusWriter(client.ApiClient(configuration), namespace, name)
