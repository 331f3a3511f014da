"""The controller's only direct API I/O (besides kopf's own watching and status patching).

It creates and deletes agent Jobs and their Pods with the official `kubernetes` client. Every
request has a timeout, so a hung API server stalls one reconcile, not the controller. Creating
a Job that already exists adopts it, provided it is labelled with the same ImageStream uid: a
restarted controller (or two racing reconciles) never makes a second Job for one generation.
"""

from __future__ import annotations

import json
import logging
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from imagestream import kube_config
from imagestream.controller.builders import LABEL_UID, selector

log = logging.getLogger(__name__)

#: (connect, read) seconds for every request.
REQUEST_TIMEOUT = (5.0, 30.0)


class JobConflict(Exception):
    """A Job of the wanted name exists but belongs to another ImageStream."""


class JobRejected(Exception):
    """The API server refused the Job for a reason a retry will not fix (a 4xx)."""


def load_configuration() -> client.Configuration:
    """The API configuration (see `imagestream.kube_config`), made the client's default too.

    kopf's own login goes through the same client library and finds it there.
    """
    configuration = kube_config.load_configuration()
    client.Configuration.set_default(configuration)
    return configuration


class KubeClient:
    """Jobs and Pods of ImageStreams, through the batch/v1 and core/v1 APIs."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    def create_job(self, body: dict[str, Any]) -> None:
        """Create the Job, or adopt an existing one of the same name and owner uid.

        Raises JobConflict when the name is taken by another owner, JobRejected on another
        4xx (an invalid Job, a quota, a forbidden volume), ApiException on anything else.
        """
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        try:
            # The client serializes a plain dict as it would a V1Job (its stubs want the model).
            job = cast(Any, body)
            self._batch.create_namespaced_job(namespace, job, _request_timeout=REQUEST_TIMEOUT)
            log.info("created Job %s/%s", namespace, name)
        except ApiException as exc:
            if exc.status == 409:
                self._adopt(namespace, name, metadata["labels"][LABEL_UID])
            elif exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                raise JobRejected(f"{exc.status} {exc.reason}: {_api_message(exc)}") from None
            else:
                raise

    def _adopt(self, namespace: str, name: str, uid: str) -> None:
        existing = self._batch.read_namespaced_job(
            name, namespace, _request_timeout=REQUEST_TIMEOUT
        )
        labels = existing.metadata.labels if existing.metadata else None
        owner = (labels or {}).get(LABEL_UID)
        if owner != uid:
            raise JobConflict(f"Job {namespace}/{name} exists and belongs to {owner or 'nobody'}")
        log.info("adopted the existing Job %s/%s", namespace, name)

    def delete_job(self, namespace: str, name: str, uid: str, generation: int) -> None:
        """Delete one generation's Job and its Pods; already gone is fine.

        The Pods are deleted too, by their labels: the garbage collector would do it after
        the Job is gone, but deleting them now stops the agent (SIGTERM) without waiting.
        """
        self._delete(self._batch.delete_namespaced_job, name, namespace)
        for pod in self._names(self._core.list_namespaced_pod, namespace, uid, generation):
            self._delete(self._core.delete_namespaced_pod, pod, namespace)

    def delete_all(self, namespace: str, uid: str) -> int:
        """Delete every Job and Pod of one ImageStream; how many were found (0: all gone).

        Found ones may be terminating for a while (the agent's grace period), so the caller
        asks again until none is found.
        """
        jobs = self._names(self._batch.list_namespaced_job, namespace, uid)
        pods = self._names(self._core.list_namespaced_pod, namespace, uid)
        for job in jobs:
            self._delete(self._batch.delete_namespaced_job, job, namespace)
        for pod in pods:
            self._delete(self._core.delete_namespaced_pod, pod, namespace)
        return len(jobs) + len(pods)

    @staticmethod
    def _names(
        list_call: Any, namespace: str, uid: str, generation: int | None = None
    ) -> list[str]:
        found = list_call(
            namespace,
            label_selector=selector(uid, generation),
            _request_timeout=REQUEST_TIMEOUT,
        )
        return [item.metadata.name for item in found.items]

    @staticmethod
    def _delete(delete_call: Any, name: str, namespace: str) -> None:
        options = client.V1DeleteOptions(propagation_policy="Background")
        try:
            delete_call(name, namespace, body=options, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _api_message(exc: ApiException) -> str:
    """The `message` of a Status response body, else the raw body, shortened."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.body)[:1024]
    except (ValueError, AttributeError):
        return str(exc.body)[:1024]
