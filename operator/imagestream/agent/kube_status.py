"""The agent's only Kubernetes I/O: patching `status.progress` of its own ImageStream.

The agent's ServiceAccount may only get and patch `imagestreams/status`, so this is all it does
with the API. Every request has a timeout and no client-side retries: the reporter's next tick
is the retry, with fresher numbers.

Each patch is guarded by the uid from the agent's instructions, so a stale agent never writes
into an ImageStream that was deleted and re-created under the same name. The guard is a JSON
patch `test` of `/metadata/uid`: a `metadata.uid` in a merge patch would be no guard here,
because the status subresource of a custom resource keeps nothing of the patched object but
its `.status` (apiextensions-apiserver `statusStrategy.PrepareForUpdate` copies the stored
object over it before validation), so the stale uid would be dropped silently and the patch
would land. A failed `test` answers 422 Invalid with a generic message (the same as a missing
`/status`), so the writer reads the object's uid once to tell a replaced object apart.
"""

from __future__ import annotations

from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from imagestream.agent.reporter import ObjectReplaced, StatusWriteError
from imagestream.errors import UsageError
from imagestream.kube_config import GROUP, PLURAL, VERSION, load_configuration

#: RFC 6902 JSON patch: the only patch type with a precondition (`test`) the status
#: subresource of a custom resource honours.
JSON_PATCH = "application/json-patch+json"
#: (connect, read) seconds: a hanging API server holds the reporter thread this long at most.
REQUEST_TIMEOUT = (3.0, 5.0)


class StatusUnavailable(Exception):
    """No usable API configuration: neither in-cluster nor a kubeconfig file."""


def guarded_patch(uid: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch that sets `status.progress` to `report` only on the object with `uid`.

    `add` replaces an existing member (RFC 6902 4.1), so it also overwrites an older report.
    """
    return [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "add", "path": "/status/progress", "value": report},
    ]


class StatusWriter:
    """Patches `status.progress` of one ImageStream (the one with `uid`) via its status."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str, uid: str) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.name = name
        self.uid = uid

    def patch_progress(self, report: dict[str, Any]) -> None:
        """Send one guarded patch of `status.progress`.

        Raises ObjectReplaced when the object under our name has another uid, StatusWriteError
        (with a log-safe message) on any other failure.
        """
        try:
            self._api.patch_namespaced_custom_object_status(
                group=GROUP,
                version=VERSION,
                namespace=self.namespace,
                plural=PLURAL,
                name=self.name,
                body=guarded_patch(self.uid, report),
                # The client would guess the type from the body; say it outright.
                _content_type=JSON_PATCH,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 422 and self._replaced():
                raise ObjectReplaced(
                    f"ImageStream {self.namespace}/{self.name} was re-created (uid differs); "
                    "no more progress updates"
                ) from None
            raise self._answered(exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise StatusWriteError(
                f"no answer from the API server ({type(exc).__name__})"
            ) from None

    def _replaced(self) -> bool:
        """Whether the object now under our name has another uid (False when unknown)."""
        try:
            current = self._api.get_namespaced_custom_object_status(
                group=GROUP,
                version=VERSION,
                namespace=self.namespace,
                plural=PLURAL,
                name=self.name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except (ApiException, urllib3.exceptions.HTTPError):
            return False  # the patch's own error is the one worth logging
        uid = (current.get("metadata") or {}).get("uid") if isinstance(current, dict) else None
        return bool(uid) and uid != self.uid

    def _answered(self, exc: ApiException) -> StatusWriteError:
        # The status line only: the response body may echo request details.
        return StatusWriteError(
            f"the API server answered {exc.status} {exc.reason} for "
            f"imagestreams/{self.name}/status in namespace {self.namespace}"
        )

    def close(self) -> None:
        """Release the connection pool."""
        self._api.api_client.close()


def connect(namespace: str, name: str, uid: str) -> StatusWriter:
    """A writer for the ImageStream `namespace/name` with `uid`: in-cluster config in a Pod,
    else KUBECONFIG/~/.kube/config.

    Raises StatusUnavailable when neither is usable.
    """
    try:
        configuration = load_configuration()
    except UsageError as exc:
        raise StatusUnavailable(exc.message) from None
    # No urllib3 retries: each would wait out another timeout while newer numbers pile up.
    configuration.retries = 0
    return StatusWriter(client.ApiClient(configuration), namespace, name, uid)
