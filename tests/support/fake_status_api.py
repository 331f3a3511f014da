"""A recording stand-in for the API calls the agent makes: PATCH (and GET) of imagestreams/status.

It answers every request on 127.0.0.1 (a free port) and records method, path, headers, body and
arrival time. :attr:`FakeStatusApi.mode` says how it answers: ``"ok"`` (200 with the one object
it holds), ``"fail"`` (500 with a Kubernetes ``Status``) or ``"hang"`` (no answer until the
server stops). :meth:`FakeStatusApi.kubeconfig` writes a kubeconfig for it.

The object it holds is only ``metadata.uid`` and ``status``; a JSON patch is applied to it, and
a failing one (a ``test`` of a stale uid after :meth:`FakeStatusApi.reset`) answers 422
Invalid with the real server's generic message. A real API server would also authenticate the
token, check RBAC, validate the patch against the CRD schema, and serve only the one path.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal

import jsonpatch
import yaml

from .threaded_server import ThreadedHttpServer

Mode = Literal["ok", "fail", "hang"]


@dataclass(frozen=True)
class ApiRequest:
    """One request as the server saw it."""

    method: str
    path: str
    content_type: str
    authorization: str
    body: Any
    at: float  # time.monotonic() on arrival


class FakeStatusApi(ThreadedHttpServer):
    """Context manager: serve, record, and stop (waking any hanging request)."""

    def __init__(self, mode: Mode = "ok", uid: str = "uid-of-the-first-object") -> None:
        self.mode: Mode = mode
        self._object: dict[str, Any] = {"metadata": {"uid": uid}, "status": {}}
        self._requests: list[ApiRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # A short poll: the agent tests stop one of these per test.
        super().__init__(_Handler, name="fake-status-api", poll_interval=0.05)

    @property
    def requests(self) -> list[ApiRequest]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def object(self) -> dict[str, Any]:
        """A copy of the object as the accepted patches left it."""
        with self._lock:
            return copy.deepcopy(self._object)

    def reset(self, uid: str, *, with_status: bool = True) -> None:
        """Hold a fresh object: with another uid, the ImageStream deleted and re-created under
        the same name; ``with_status=False``, one whose status nobody has written yet."""
        fresh: dict[str, Any] = {"metadata": {"uid": uid}}
        if with_status:
            fresh["status"] = {}
        with self._lock:
            self._object = fresh

    def kubeconfig(self, path: Path, token: str) -> Path:
        """Write a kubeconfig for this server with a bearer-token user; return ``path``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def _before_shutdown(self) -> None:
        # Release the requests that "hang" mode holds.
        self._stopping.set()

    def _record(self, request: ApiRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _apply(self, method: str, body: Any) -> tuple[int, dict[str, Any]]:
        """Apply a JSON patch (other bodies are only echoed); the answer's code and body."""
        with self._lock:
            if method == "PATCH" and isinstance(body, list):
                try:
                    self._object = jsonpatch.apply_patch(self._object, body)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
                    message = "the server rejected our request due to an error in our request"
                    return 422, _failure(422, "Invalid", message)
            echoed = body if isinstance(body, dict) else {}
            return 200, {**_KIND, **echoed, **copy.deepcopy(self._object)}


_KIND = {"apiVersion": "imagestream.dev/v1alpha1", "kind": "ImageStream"}


def _failure(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PATCH(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the recorded requests instead."""

    def _answer(self) -> None:
        owner: FakeStatusApi = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode(errors="replace")
        owner._record(
            ApiRequest(
                method=self.command,
                path=self.path,
                content_type=self.headers.get("Content-Type", ""),
                authorization=self.headers.get("Authorization", ""),
                body=body,
                at=time.monotonic(),
            )
        )
        if owner.mode == "hang":
            owner._stopping.wait()
            self.close_connection = True
            return
        if owner.mode == "fail":
            self._send(500, {"kind": "Status", "status": "Failure", "code": 500})
            return
        self._send(*owner._apply(self.command, body))

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
