"""A Kubernetes API server stand-in on 127.0.0.1, for the operator's integration tests.

There is no kube-apiserver to install on these machines, so the controller (a real process),
``kubectl`` (a real client) and the kubernetes Python client talk HTTP to this server. It serves
the discovery documents, built-in resources (namespaces, nodes, pods, events, secrets,
configmaps, serviceaccounts, jobs, CRDs) and every resource a stored CRD defines, with the verbs
get, list, watch, create, update (PUT), patch, delete and the ``status`` subresource, plus
``meta.k8s.io/v1`` Tables for ``kubectl get``. The semantics live in
:mod:`tests.support.kube_store`; this module is the HTTP face, the server thread and the test
hooks (request log, outage, kubeconfig).

Why not KMock (``kmock.KubernetesEmulator``, by kopf's author)? It was evaluated first (0.8):
its emulator merges every write into a plain dict and lacks, besides what the issue lists
(resourceVersion, uid, 201, list kinds), ``metadata.generation``, PUT (it has no update verb),
status-subresource rules, optimistic concurrency (409 Conflict), label and field selectors,
watch resumption from a resourceVersion (every watch replays all objects as ADDED),
``timeoutSeconds``, JSON patch, Tables for ``kubectl get``, CRDs that register resources, and
proper Status reasons (``AlreadyExists``/``NotFound``; it sends tracebacks instead). The
"thin adapter" would have replaced every one of its request handlers and its discovery, leaving
only its routing DSL and a version-0 API its README says will change. An equivalent written for
these tests on aiohttp (which kopf already depends on) is smaller than that adapter, has one
place where each rule lives, and can close its listening socket to model an outage.

Strict where a real server is strict (``tests/integration/operator/test_kube_api_transcripts.py``
replays a real v1.28 server's answers against it): integer query parameters (``timeoutSeconds``,
``limit``, ``gracePeriodSeconds``: ``60.0`` is 400), ``resourceVersion`` semantics (lists
``Exact`` at a revision, ``limit``/``continue`` paging, 410 ``Expired`` for a watch older than
the resource's watch cache), the field labels each resource supports, the CRD's schema and CEL
rules on every write with its defaults and pruning (:mod:`tests.support.kube_admission`), 415 for
a strategic-merge patch of a custom resource, ``metadata.generation`` bumped when
``deletionTimestamp`` is set, Pod Security admission. Unknown query parameters are ignored, as a
real server ignores them.

Differences from a real API server that tests may depend on (each such test names its own):

- Admission is limited to the rules above: built-ins are validated only where this project
  meets a rule (a Pod's containers, a Job's backoffLimit and immutable template, Events'
  namespace and eventTime), no ServiceAccount admission (no projected token volume), no quotas.
- No garbage collector: deleting an owner leaves its dependents (``propagationPolicy`` is
  accepted and ignored). The kubelet stand-in deletes a Job's Pods when the Job goes away,
  which models the collector for Pods only. No Job controller: see the kubelet stand-in.
- No authentication or authorization: any bearer token is accepted, RBAC is not evaluated.
- A CRD is established in the same write that stores it (the real server takes a moment).
- Strategic merge patch of a built-in is applied as a JSON merge patch (lists are replaced, not
  merged by key); server-side apply (``application/apply-patch+yaml``) is refused with 415.
- No aggregated discovery (``apidiscovery.k8s.io/v2``): kubectl falls back to the legacy
  per-group documents. No OpenAPI documents (404): use ``kubectl --validate=false``.
- Watches expire only by ``timeoutSeconds`` or :meth:`KubeApi.compact`; no bookmarks;
  ``sendInitialEvents`` is refused (422), as by a 1.28 server without the WatchList gate.
- ``events.k8s.io/v1`` and core ``v1`` Events are stored apart (one store, converted, on a real
  server).
- ``pods/log`` is not served. Protobuf request bodies are refused with 415 (kubectl's typed
  commands such as ``kubectl create secret`` send protobuf; use ``kubectl apply -f``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl

import yaml
from aiohttp import web

from .kube_store import (
    JSON,
    ApiError,
    ResourceType,
    Store,
    WatchEvent,
    decode_json,
    field_matcher,
    label_matcher,
    now_rfc3339,
)

LOOPBACK = "127.0.0.1"
#: What ``/version`` reports: the kubectl in the test image is 1.32.
SERVER_VERSION: JSON = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-standin",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23",
    "compiler": "gc",
    "platform": "linux/amd64",
}
RESOURCE_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
SUBRESOURCE_VERBS = {"status": ["get", "patch", "update"], "log": ["get"]}
#: Path segments after ``namespaces/NAME`` that are subresources of the namespace itself.
NAMESPACE_SUBRESOURCES = {"status", "finalize"}


@dataclass(frozen=True)
class RequestRecord:
    """One request the stand-in received (recorded when it arrived, before it was served)."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    content_type: str
    user_agent: str
    accept: str
    body: Any
    #: The bearer token the client sent (tests give each client its own to tell them apart).
    token: str = ""

    @property
    def params(self) -> dict[str, str]:
        """The query parameters as a dict (the last value wins)."""
        return dict(self.query)

    @property
    def is_watch(self) -> bool:
        """Whether this was a watch request."""
        return self.method == "GET" and self.params.get("watch") in ("true", "1")


@dataclass(frozen=True)
class _Target:
    """What a resource URL addresses."""

    resource: ResourceType
    version: str
    namespace: str | None
    name: str | None
    subresource: str | None


def _parse_resource_path(path: str) -> tuple[str, str, list[str]] | None:
    """Split ``/api/v1/...`` or ``/apis/G/V/...`` into (group, version, remaining parts)."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        return "", parts[1], parts[2:]
    if len(parts) >= 3 and parts[0] == "apis":
        return parts[1], parts[2], parts[3:]
    return None


def _resolve(store: Store, group: str, version: str, parts: list[str]) -> _Target:
    """Resolve the parts after the group version the way the API server's request info does."""
    namespace: str | None = None
    if len(parts) >= 2 and parts[0] == "namespaces":
        if len(parts) == 2 or parts[2] in NAMESPACE_SUBRESOURCES:
            pass  # the namespace object itself (or its status)
        else:
            namespace, parts = parts[1], parts[2:]
    if not parts or len(parts) > 3:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    resource = store.find_resource(group, version, parts[0])
    name = parts[1] if len(parts) > 1 else None
    subresource = parts[2] if len(parts) > 2 else None
    if subresource is not None and subresource not in resource.subresources:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    if resource.namespaced and name is not None and namespace is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    if not resource.namespaced and namespace is not None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return _Target(resource, version, namespace, name, subresource)


_GO_INT = re.compile(r"[+-]?[0-9]+")


def int_param(request: web.Request, name: str) -> int | None:
    """An integer query parameter as the server's strconv.ParseInt reads it (None if absent).

    ``60.0`` or ``abc`` is 400 BadRequest, as every Kubernetes version answers it.
    """
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not _GO_INT.fullmatch(raw):
        raise ApiError(400, "BadRequest", f'strconv.ParseInt: parsing "{raw}": invalid syntax')
    return int(raw)


def resource_version_param(request: web.Request) -> int | None:
    """``resourceVersion`` as a number; None for "" and "0" (any version: the latest)."""
    raw = request.query.get("resourceVersion", "")
    if raw in ("", "0"):
        return None
    if not raw.isdigit():
        raise ApiError(400, "BadRequest", f'resource version is not well formed: "{raw}"')
    return int(raw)


def _warning_headers(warnings: list[str]) -> list[tuple[str, str]]:
    return [("Warning", f"299 - {json.dumps(text)}") for text in warnings]


def _deleted_status(resource: ResourceType, obj: JSON) -> JSON:
    """The Status a completed DELETE answers with for most built-in resources."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": obj["metadata"]["name"],
            "group": resource.group,
            "kind": resource.plural,
            "uid": obj["metadata"]["uid"],
        },
    }


# -- tables -------------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """Age as ``kubectl get`` shows it (the API server's HumanDuration, simplified)."""
    total = max(int(seconds), 0)
    minutes, hours, days = total // 60, total // 3600, total // 86400
    if total < 120:
        return f"{total}s"
    if minutes < 10:
        return f"{minutes}m{total % 60}s" if total % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d"


def _age(timestamp: Any) -> str | None:
    if not isinstance(timestamp, str):
        return None
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return human_duration((datetime.datetime.now(datetime.UTC) - then).total_seconds())


def evaluate_jsonpath(obj: Any, path: str) -> Any:
    """Evaluate the simple JSONPaths printer columns use: ``.a.b``, ``.a[0]``,
    ``.a[?(@.type=="Ready")].status``. Returns None when nothing matches."""
    tokens: list[str] = []
    for segment in path.strip().lstrip("{").rstrip("}").lstrip(".").replace("[", ".[").split("."):
        if segment:
            tokens.append(segment)
    value = obj
    for token in tokens:
        if value is None:
            return None
        if token.startswith("[?(@.") and token.endswith(")]"):
            key, _, wanted = token[5:-2].partition("==")
            wanted = wanted.strip().strip("\"'")
            candidates = value if isinstance(value, list) else []
            value = next(
                (item for item in candidates if str(evaluate_jsonpath(item, key)) == wanted), None
            )
        elif token.startswith("[") and token.endswith("]"):
            index = int(token[1:-1])
            value = (
                value[index]
                if isinstance(value, list) and -len(value) <= index < len(value)
                else None
            )
        else:
            value = value.get(token) if isinstance(value, dict) else None
    return value


def _cell(value: Any, column_type: str) -> Any:
    if value is None:
        return None
    if column_type == "date":
        return _age(value)
    if column_type == "integer" and isinstance(value, int | float):
        return int(value)
    if column_type == "number" and isinstance(value, int | float):
        return value
    if column_type == "boolean" and isinstance(value, bool):
        return value
    return value if isinstance(value, str) else json.dumps(value)


def _table_columns(resource: ResourceType) -> list[JSON]:
    columns: list[JSON] = [
        {
            "name": "Name",
            "type": "string",
            "format": "name",
            "priority": 0,
            "description": "Name must be unique within a namespace.",
        }
    ]
    for column in resource.printer_columns:
        columns.append(
            {
                "name": column.name,
                "type": column.type,
                "format": column.format,
                "priority": column.priority,
                "description": column.description,
            }
        )
    # A CRD that lists its columns gets exactly those (it lists Age itself if it wants one).
    if not (resource.custom and resource.printer_columns):
        columns.append(
            {
                "name": "Age",
                "type": "string",
                "format": "",
                "priority": 0,
                "description": "CreationTimestamp of the object.",
            }
        )
    return columns


def _table_row(resource: ResourceType, obj: JSON, include_object: str) -> JSON:
    cells: list[Any] = [obj["metadata"]["name"]]
    cells.extend(
        _cell(evaluate_jsonpath(obj, column.json_path), column.type)
        for column in resource.printer_columns
    )
    if not (resource.custom and resource.printer_columns):
        cells.append(_age(obj["metadata"].get("creationTimestamp")))
    row: JSON = {"cells": cells}
    if include_object == "Object":
        row["object"] = obj
    elif include_object != "None":
        row["object"] = {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        }
    return row


def table(
    resource: ResourceType,
    objects: list[JSON],
    *,
    resource_version: str,
    include_object: str,
    with_columns: bool = True,
) -> JSON:
    """A ``meta.k8s.io/v1`` Table of ``objects`` as the server renders one for kubectl."""
    result: JSON = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "rows": [_table_row(resource, obj, include_object) for obj in objects],
    }
    if with_columns:
        result["columnDefinitions"] = _table_columns(resource)
    return result


def _strict(request: web.Request) -> bool:
    """``fieldValidation=Strict``: an unknown field is an error, not a warning."""
    return request.query.get("fieldValidation") == "Strict"


def wants_table(accept: str) -> bool:
    """Whether the client (kubectl get) asked for a Table rendering."""
    return "as=Table" in accept


# -- the HTTP application -------------------------------------------------------------------------


class _Watch:
    """One open watch stream: events arrive from any thread, the handler drains them."""

    CLOSE = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

    def push(self, event: WatchEvent | None) -> None:
        """Hand ``event`` (or CLOSE) to the stream; safe from any thread."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class KubeApi:
    """The API stand-in: ``with KubeApi() as api:`` serves on ``api.url`` from a thread.

    Test hooks: :attr:`store` (direct state), :meth:`get`, :meth:`find`, :meth:`objects`,
    :meth:`wait_for`, :meth:`put` (seed an object as a client would create it),
    :meth:`ensure_namespace`, :attr:`requests`, :meth:`down` / :meth:`set_down`,
    :meth:`compact`, :meth:`kubeconfig`.
    """

    def __init__(self, *, token: str = "test-token") -> None:
        self.store = Store()
        self.token = token
        self.host = LOOPBACK
        self.port = 0
        self._requests: list[RequestRecord] = []
        self._requests_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._watches: set[_Watch] = set()
        self._down = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server URL, ``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Start serving on a free loopback port (in a background thread with its own loop)."""
        if self._thread is not None:
            raise RuntimeError("the API stand-in is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="kube-api-standin", daemon=True
        )
        self._thread.start()
        self._call(self._start_async())
        return self

    def stop(self) -> None:
        """Stop serving, close every stream and end the thread."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._stop_async())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        if self._loop is None:
            raise RuntimeError("the API stand-in is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start_async(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()

    async def _stop_async(self) -> None:
        await self._go_down()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _go_down(self) -> None:
        """Close the listening socket, every open connection and every watch stream."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for watch in list(self._watches):
            watch.push(_Watch.CLOSE)
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()

    # -- outage -------------------------------------------------------------------------------

    def set_down(self, down: bool) -> None:
        """Make the API unreachable (connections refused, open streams cut) or reachable again
        on the same port. The objects are kept, as etcd keeps them across an API outage."""
        if down == self._down:
            return
        self._down = down
        self._call(self._go_down() if down else self._listen())

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """``with api.down(): ...`` — the API is unreachable inside the block."""
        self.set_down(True)
        try:
            yield
        finally:
            self.set_down(False)

    # -- test hooks ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far, oldest first (a copy)."""
        with self._requests_lock:
            return list(self._requests)

    def resource(self, group: str, plural: str) -> ResourceType:
        """The served resource ``plural`` of ``group`` (``""`` for core)."""
        return self.store.resource(group, plural)

    def get(self, group: str, plural: str, namespace: str | None, name: str) -> JSON:
        """Read one object directly from the store (ApiError 404 when absent)."""
        return self.store.get(self.store.resource(group, plural), namespace or "", name)

    def find(self, group: str, plural: str, namespace: str | None, name: str) -> JSON | None:
        """Like :meth:`get`, but None when the object does not exist."""
        try:
            return self.get(group, plural, namespace, name)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def objects(
        self,
        group: str,
        plural: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> list[JSON]:
        """All objects of a resource (in ``namespace`` if given), straight from the store."""
        items, _ = self.store.list_objects(
            self.store.resource(group, plural), namespace, label_selector=label_selector
        )
        return items

    def wait_for(
        self,
        group: str,
        plural: str,
        namespace: str | None,
        name: str,
        predicate: Callable[[JSON | None], bool],
        *,
        timeout: float = 15,
        what: str = "",
    ) -> JSON | None:
        """Wait until ``predicate(object or None)`` holds; return the object (None if absent).

        Raises TimeoutError naming ``what`` and showing the object's last state.
        """
        deadline = time.monotonic() + timeout
        while True:
            obj = self.find(group, plural, namespace, name)
            if predicate(obj):
                return obj
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what or 'a condition'} on "
                    f"{plural} {namespace}/{name}; last state: {json.dumps(obj, indent=1)}"
                )
            time.sleep(0.02)

    def put(self, group: str, plural: str, body: JSON) -> JSON:
        """Create an object as a client's POST would (uid, resourceVersion, watch event)."""
        resource = self.store.resource(group, plural)
        namespace = (body.get("metadata") or {}).get("namespace", "")
        return self.store.create(resource, namespace, body)

    def ensure_namespace(self, name: str) -> None:
        """Create namespace ``name`` unless it exists."""
        if self.find("", "namespaces", None, name) is None:
            self.put("", "namespaces", {"metadata": {"name": name}})

    def compact(self) -> int:
        """Drop the change history: watches resuming from before now get 410 Gone."""
        return self.store.compact()

    def kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig for this server (plain http, a bearer-token user) to ``path``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": "standin", "namespace": namespace},
                }
            ],
            "current-context": "standin",
            "preferences": {},
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    # -- HTTP ---------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", errors="replace")
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=tuple(parse_qsl(request.query_string, keep_blank_values=True)),
            content_type=request.headers.get("Content-Type", ""),
            user_agent=request.headers.get("User-Agent", ""),
            accept=request.headers.get("Accept", ""),
            body=body,
            token=request.headers.get("Authorization", "").removeprefix("Bearer "),
        )
        with self._requests_lock:
            self._requests.append(record)
        try:
            response: web.StreamResponse = await handler(request)
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if request.method == "GET":
            discovery = self._discovery(path)
            if discovery is not None:
                return web.json_response(discovery)
        parsed = _parse_resource_path(path)
        if parsed is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        target = _resolve(self.store, *parsed)
        if request.method == "GET":
            if target.name is None:
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, target)
                return self._list(request, target)
            return self._read(request, target)
        if request.method == "POST" and target.name is None:
            body = decode_json(await request.read(), request.content_type)
            warnings: list[str] = []
            created = self.store.create(
                target.resource,
                target.namespace or "",
                body,
                strict=_strict(request),
                warnings=warnings,
            )
            return self._respond(request, target, created, status=201, warnings=warnings)
        if target.name is None:
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")
        return await self._write(request, target)

    def _respond(
        self,
        request: web.Request,
        target: _Target,
        obj: JSON,
        *,
        status: int = 200,
        warnings: list[str] | None = None,
    ) -> web.Response:
        obj = self._at_version(target, obj)
        if wants_table(request.headers.get("Accept", "")):
            obj = table(
                target.resource,
                [obj],
                resource_version=obj["metadata"].get("resourceVersion", ""),
                include_object=request.query.get("includeObject", "Metadata"),
            )
        response = web.json_response(obj, status=status)
        for name, value in _warning_headers(warnings or []):
            response.headers.add(name, value)
        return response

    @staticmethod
    def _at_version(target: _Target, obj: JSON) -> JSON:
        """The object as the requested version serves it (no conversion: same content)."""
        obj["apiVersion"] = target.resource.api_version(target.version)
        return obj

    def _read(self, request: web.Request, target: _Target) -> web.Response:
        assert target.name is not None
        obj = self.store.get(target.resource, target.namespace or "", target.name)
        return self._respond(request, target, obj)

    def _list(self, request: web.Request, target: _Target) -> web.Response:
        limit = int_param(request, "limit")
        page = self.store.list_page(
            target.resource,
            target.namespace,
            label_selector=request.query.get("labelSelector"),
            field_selector=request.query.get("fieldSelector"),
            resource_version=resource_version_param(request),
            exact=request.query.get("resourceVersionMatch") == "Exact",
            limit=limit if limit is not None and limit > 0 else None,
            continue_token=request.query.get("continue") or None,
        )
        items = [self._at_version(target, item) for item in page.items]
        revision = page.revision
        if wants_table(request.headers.get("Accept", "")):
            rendered = table(
                target.resource,
                items,
                resource_version=str(revision),
                include_object=request.query.get("includeObject", "Metadata"),
            )
            return web.json_response(rendered)
        metadata: JSON = {"resourceVersion": str(revision), "continue": page.continue_token}
        if page.remaining is not None:
            metadata["remainingItemCount"] = page.remaining
        return web.json_response(
            {
                "kind": f"{target.resource.kind}List",
                "apiVersion": target.resource.api_version(target.version),
                "metadata": metadata,
                "items": items,
            }
        )

    async def _write(self, request: web.Request, target: _Target) -> web.Response:
        assert target.name is not None
        namespace = target.namespace or ""
        raw = await request.read()
        if request.method == "DELETE":
            options = decode_json(raw, request.content_type) if raw else {}
            grace = int_param(request, "gracePeriodSeconds")
            if grace is None:
                grace = options.get("gracePeriodSeconds")
            deleted, gone = self.store.delete(
                target.resource,
                namespace,
                target.name,
                grace_period_seconds=None if grace is None else int(grace),
                preconditions=options.get("preconditions"),
            )
            if gone and not target.resource.returns_deleted_object:
                return web.json_response(_deleted_status(target.resource, deleted))
            return self._respond(request, target, deleted)
        body = decode_json(raw, request.content_type)
        warnings: list[str] = []
        if request.method == "PUT":
            updated = self.store.update(
                target.resource,
                namespace,
                target.name,
                body,
                subresource=target.subresource,
                strict=_strict(request),
                warnings=warnings,
            )
        elif request.method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            updated = self.store.patch(
                target.resource,
                namespace,
                target.name,
                body,
                content_type,
                subresource=target.subresource,
                strict=_strict(request),
                warnings=warnings,
            )
        else:
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")
        return self._respond(request, target, updated, warnings=warnings)

    # -- watch --------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, target: _Target) -> web.StreamResponse:
        since = resource_version_param(request)
        labels = label_matcher(request.query.get("labelSelector"))
        fields = field_matcher(request.query.get("fieldSelector"), target.resource.key)
        timeout = int_param(request, "timeoutSeconds")
        if request.query.get("sendInitialEvents") is not None:
            # WatchList streaming is alpha and off in Kubernetes 1.28 (the reference server).
            raise ApiError(
                422,
                "Invalid",
                'ListOptions.meta.k8s.io "" is invalid: sendInitialEvents: Forbidden: '
                "sendInitialEvents is forbidden for watch unless the WatchList feature gate "
                "is enabled",
                {
                    "group": "meta.k8s.io",
                    "kind": "ListOptions",
                    "causes": [
                        {
                            "reason": "FieldValueForbidden",
                            "message": "Forbidden: sendInitialEvents is forbidden for watch "
                            "unless the WatchList feature gate is enabled",
                            "field": "sendInitialEvents",
                        }
                    ],
                },
            )
        as_table = wants_table(request.headers.get("Accept", ""))
        include_object = request.query.get("includeObject", "Metadata")

        def visible(obj: JSON | None) -> bool:
            if obj is None:
                return False
            namespace = obj["metadata"].get("namespace")
            in_namespace = target.namespace is None or namespace == target.namespace
            return in_namespace and labels(obj) and fields(obj)

        assert self._loop is not None
        watch = _Watch(self._loop)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if timeout is not None and timeout < 0:
            return response  # the server's deadline has passed before the first event
        try:
            backlog, unsubscribe = self.store.subscribe(target.resource, since, watch.push)
        except ApiError as exc:  # 410 Gone arrives as an ERROR event on a 200 stream
            await self._send(response, {"type": "ERROR", "object": exc.status()})
            return response
        self._watches.add(watch)
        first_table = True

        async def send(event_type: str, obj: JSON) -> None:
            nonlocal first_table
            obj = self._at_version(target, obj)
            if as_table and event_type != "BOOKMARK":
                obj = table(
                    target.resource,
                    [obj],
                    resource_version=obj["metadata"]["resourceVersion"],
                    include_object=include_object,
                    with_columns=first_table,
                )
                first_table = False
            await self._send(response, {"type": event_type, "object": obj})

        try:
            for past in backlog:
                translated = self._translate(past, visible)
                if translated is not None:
                    await send(*translated)
            async with asyncio.timeout(timeout or None):
                while True:
                    live = await watch.queue.get()
                    if live is None:
                        break
                    translated = self._translate(live, visible)
                    if translated is not None:
                        await send(*translated)
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            unsubscribe()
            self._watches.discard(watch)
        return response

    @staticmethod
    def _translate(event: WatchEvent, visible: Any) -> tuple[str, JSON] | None:
        """What a filtered watch shows: an object entering the selection is ADDED, one
        leaving it DELETED, as on the real server."""
        now, before = visible(event.object), visible(event.previous)
        if event.type == "DELETED":
            return ("DELETED", event.object) if (before or now) else None
        if event.type == "ADDED":
            return ("ADDED", event.object) if now else None
        if now and before:
            return ("MODIFIED", event.object)
        if now:
            return ("ADDED", event.object)
        if before:
            return ("DELETED", event.object)
        return None

    @staticmethod
    async def _send(response: web.StreamResponse, event: JSON) -> None:
        await response.write(json.dumps(event).encode() + b"\n")

    # -- discovery ----------------------------------------------------------------------------

    def _discovery(self, path: str) -> JSON | None:
        """The discovery document at ``path``, or None when ``path`` is not a discovery URL."""
        resources = self.store.served()
        groups: dict[str, list[str]] = {}
        for resource in resources:
            versions = groups.setdefault(resource.group, [])
            versions.extend(version for version in resource.versions if version not in versions)
        if path == "/version":
            return SERVER_VERSION
        if path == "/":
            return {"paths": ["/api", "/api/v1", "/apis", "/version"]}
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    self._group(name, versions) for name, versions in sorted(groups.items()) if name
                ],
            }
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2:
            if parts[1] not in groups:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {
                "kind": "APIGroup",
                "apiVersion": "v1",
                **self._group(parts[1], groups[parts[1]]),
            }
        if (parts[0] == "api" and len(parts) == 2) or (parts[0] == "apis" and len(parts) == 3):
            group = "" if parts[0] == "api" else parts[1]
            version = parts[-1]
            if version not in groups.get(group, []):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._resource_list(group, version, resources)
        return None

    @staticmethod
    def _group(name: str, versions: list[str]) -> JSON:
        entries = [
            {"groupVersion": f"{name}/{version}", "version": version} for version in versions
        ]
        return {"name": name, "versions": entries, "preferredVersion": entries[0]}

    @staticmethod
    def _resource_list(group: str, version: str, resources: list[ResourceType]) -> JSON:
        entries: list[JSON] = []
        for resource in resources:
            if resource.group != group or version not in resource.versions:
                continue
            entry: JSON = {
                "name": resource.plural,
                "singularName": resource.singular,
                "namespaced": resource.namespaced,
                "kind": resource.kind,
                "verbs": RESOURCE_VERBS,
            }
            if resource.short_names:
                entry["shortNames"] = list(resource.short_names)
            if resource.categories:
                entry["categories"] = list(resource.categories)
            entries.append(entry)
            for subresource in resource.subresources:
                entries.append(
                    {
                        "name": f"{resource.plural}/{subresource}",
                        "singularName": "",
                        "namespaced": resource.namespaced,
                        "kind": resource.kind,
                        "verbs": SUBRESOURCE_VERBS.get(subresource, ["get"]),
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": entries,
        }


__all__ = [
    "ApiError",
    "KubeApi",
    "RequestRecord",
    "evaluate_jsonpath",
    "human_duration",
    "now_rfc3339",
    "table",
]
