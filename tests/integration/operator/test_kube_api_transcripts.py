"""The API stand-in answers as a real kube-apiserver did: every request recorded in
``kube-api-reference/transcripts.json`` (a real v1.28 server's answers to the calls the
product, kopf and kubectl make, copied from ``shared/reference/kube-api``) is replayed against
the stand-in, in order, and the answers are compared: the status code, the ``reason``, the
fields of a 422's causes (as a set), the fields the file kept of an object or a list, the
``Warning`` headers, and for a watch the event types and objects, how many came within 3 s and
whether the server closed the stream.

Where the recording did something between two requests that the file does not show (seeding
objects, the status patch that lands during a watch), :data:`SETUP` and :data:`DURING` do it
here. Entries the stand-in cannot reasonably answer the same way are in
:data:`KNOWN_DIFFERENCES`, each with why; a known difference that starts matching fails the
test, so the list stays true.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.support.crd import CRD_PATH
from tests.support.kube_api import KubeApi

Json = dict[str, Any]

#: A copy of ``shared/reference/kube-api`` (its README says how it was recorded and is read).
TRANSCRIPTS = Path(__file__).with_name("kube-api-reference") / "transcripts.json"
GROUP, VERSION, PLURAL = "imagestream.dev", "v1alpha1", "imagestreams"
STREAMS = f"/apis/{GROUP}/{VERSION}/namespaces/ns1/{PLURAL}"
BASELINE_LABELS = {"pod-security.kubernetes.io/enforce": "baseline"}
#: How long the recording read a watch.
WATCH_WINDOW = 3.0
#: After a watch delivered the events the recording saw (and was not closed), wait this long
#: to see that no more come and the server keeps it open.
WATCH_SETTLE = 0.7
NO_SUCH_UID = str(uuid.UUID(int=1))

#: Entries the stand-in answers differently on purpose, and why.
KNOWN_DIFFERENCES: dict[str, str] = {
    "discovery-apis-aggregated": (
        "no aggregated discovery (apidiscovery.k8s.io/v2): the stand-in answers the legacy "
        "APIGroupList, from which kubectl discovers the same resources"
    ),
    "pods-by-job-name": (
        "the API stand-in has no Job controller: no Pod exists for a Job until the kubelet "
        "stand-in (tests/support/kubelet.py) creates it, which the scenario tests run"
    ),
    "pods-by-uid-selector": "no Job controller in the API stand-in (see pods-by-job-name)",
    "pod-privileged-ns1": (
        "no ServiceAccount admission: the projected kube-api-access volume and its mount are "
        "not added (the kubelet stand-in gives a process KUBECONFIG instead), and no QoS class"
    ),
    "event-list-field-selector": (
        "events.k8s.io/v1 Events are stored apart from core v1 Events (a real server keeps one "
        "store and converts between the two); the product and kopf post core Events only"
    ),
}

_PLACEHOLDER = re.compile(r"<random>|<[a-zA-Z ]+>|\$\{uid:([^}]+)\}|\(0x<pointer>\)")


def transcripts() -> list[Json]:
    """The recorded entries (the test fails, never skips, without them)."""
    entries: list[Json] = json.loads(TRANSCRIPTS.read_text(encoding="utf-8"))
    return entries


# -- the replay ---------------------------------------------------------------------------------


@dataclass
class Replay:
    """The stand-in being replayed against, and what earlier entries left behind."""

    api: KubeApi
    client: httpx.Client
    continue_token: str = ""
    done: set[str] = field(default_factory=set)

    def uid(self, ref: str) -> str:
        """The uid a ``${uid:...}`` placeholder stands for."""
        if ref == "a uid no object has":
            return NO_SUCH_UID
        plural, namespace, name = ref.split("/")
        obj = self.api.find(GROUP if plural == PLURAL else "", plural, namespace, name)
        return "" if obj is None else str(obj["metadata"]["uid"])

    def stream(self, name: str) -> Json | None:
        """An ImageStream of ns1 as stored."""
        return self.api.find(GROUP, PLURAL, "ns1", name)

    def list_rv(self) -> str:
        """The resourceVersion of a list of ImageStreams made just now."""
        listed = self.client.get(STREAMS).raise_for_status().json()
        return str(listed["metadata"]["resourceVersion"])


def _valid_spec() -> Json:
    """The spec of ``create-valid`` (examples/device-https.yaml's)."""
    first = next(entry for entry in transcripts() if entry["id"] == "create-valid")
    spec: Json = first["request"]["body"]["spec"]
    return spec


def seed_stream(name: str) -> Callable[[Replay], None]:
    """Create ImageStream ``name`` in ns1 as the recording did before the entry."""

    def seed(replay: Replay) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ImageStream",
            "metadata": {"name": name, "namespace": "ns1"},
            "spec": _valid_spec(),
        }
        replay.client.post(STREAMS, json=body).raise_for_status()

    return seed


def delete_stream(name: str) -> Callable[[Replay], None]:
    """Delete ImageStream ``name`` of ns1 (no finalizers: it is gone at once)."""

    def delete(replay: Replay) -> None:
        replay.client.delete(f"{STREAMS}/{name}").raise_for_status()

    return delete


def patch_status(name: str, status: Json) -> Callable[[Replay], None]:
    """A merge patch of an ImageStream's status (what lands during a watch)."""

    def patch(replay: Replay) -> None:
        replay.client.patch(
            f"{STREAMS}/{name}/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()

    return patch


def in_order(*actions: Callable[[Replay], None]) -> Callable[[Replay], None]:
    """Several actions, one after the other."""

    def run(replay: Replay) -> None:
        for action in actions:
            action(replay)

    return run


def seed_bound_pod(replay: Replay) -> None:
    """A Pod bound to a node that has no kubelet (``pod-delete-bound`` deletes it)."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-bound", "namespace": "ns1"},
        "spec": {"nodeName": "node-7", "containers": [{"name": "agent", "image": "x"}]},
    }
    replay.client.post("/api/v1/namespaces/ns1/pods", json=body).raise_for_status()


#: What the recording did before an entry, which the file does not show.
SETUP: dict[str, Callable[[Replay], None]] = {
    # The list-watch entries see three streams: the one with a pruned field was deleted.
    "watch-timeout-float": delete_stream("ims-unknown"),
    "status-jsonpatch-no-status": seed_stream("ims-s"),
    "finalizer-add": seed_stream("ims-f"),
    "delete-no-finalizer": seed_stream("ims-d"),
    "delete-precondition-uid": seed_stream("ims-p"),
    "pod-delete-bound": seed_bound_pod,
}
#: What the recording did while an entry's watch was open.
DURING: dict[str, Callable[[Replay], None]] = {
    "watch-from-rv-modified": patch_status("ims-b", {"phase": "Running"}),
    "table-watch": in_order(
        patch_status("ims-b", {"message": "streaming"}),
        patch_status("ims-a", {"phase": "Running", "progress": {"percent": 5}}),
    ),
    "watch-deleted-event": delete_stream("ims-p"),
}


# -- substituting and comparing -------------------------------------------------------------------


def substitute(replay: Replay, entry: Json, text: str) -> str:
    """The request text with its placeholders replaced by this replay's values."""
    stale = "stale" in entry["id"]
    target = re.search(rf"{PLURAL}/([a-z0-9-]+)", entry["request"]["path"])
    obj = replay.stream(target.group(1)) if target else None
    meta = (obj or {}).get("metadata", {})
    current = str(meta.get("resourceVersion", ""))
    values = {
        "<continue token>": replay.continue_token,
        "<list rv>": replay.list_rv() if "<list rv>" in text else "",
        "<resourceVersion>": str(int(current) - 1) if stale and current else current,
        "<stale resourceVersion>": str(int(current) - 1) if current else "1",
        "<timestamp>": str(meta.get("creationTimestamp", "")),
    }
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return re.sub(r"\$\{uid:([^}]+)\}", lambda match: replay.uid(match.group(1)), text)


def _pattern(replay: Replay, expected: str) -> re.Pattern[str]:
    parts: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(expected):
        parts.append(re.escape(expected[position : match.start()]))
        if match.group(1):
            parts.append(re.escape(replay.uid(match.group(1))))
        elif match.group(0) == "<random>":
            parts.append("[a-z0-9]{5}")
        else:
            parts.append(".+?")
        position = match.end()
    parts.append(re.escape(expected[position:]))
    return re.compile("".join(parts), re.DOTALL)


def differences(replay: Replay, expected: Any, actual: Any, where: str = "") -> list[str]:
    """How ``actual`` fails to hold what ``expected`` shows (placeholders match their kind)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where or '.'}: expected an object, got {actual!r}"]
        found: list[str] = []
        for key, value in expected.items():
            if value is None and actual.get(key) is None:
                continue
            if key not in actual:
                found.append(f"{where}.{key}: missing (expected {value!r})")
            else:
                found.extend(differences(replay, value, actual[key], f"{where}.{key}"))
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: expected {expected!r}, got {actual!r}"]
        return [
            problem
            for index, (want, got) in enumerate(zip(expected, actual, strict=True))
            for problem in differences(replay, want, got, f"{where}[{index}]")
        ]
    if isinstance(expected, str) and isinstance(actual, str):
        if _pattern(replay, expected).fullmatch(actual):
            return []
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    if expected != actual or type(expected) is not type(actual):
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    return []


def compare_status(expected: Json, actual: Any) -> list[str]:
    """A Status: the same status, reason and (as a set) the same causes' fields."""
    if not isinstance(actual, dict) or actual.get("kind") != "Status":
        return [f"expected a Status, got {actual!r}"]
    found = [
        f"{key}: expected {expected.get(key)!r}, got {actual.get(key)!r}"
        for key in ("status", "reason", "code")
        if expected.get(key) != actual.get(key)
    ]
    fields = {item["field"] for item in (expected.get("details") or {}).get("causes") or []}
    got = {item.get("field") for item in (actual.get("details") or {}).get("causes") or []}
    if fields != got:
        found.append(f"causes' fields: expected {sorted(fields)}, got {sorted(got)}")
    return found


def _table_view(table: Json) -> Json:
    """What the file keeps of a Table: columns (name, type, format, priority) and cells."""
    columns = table.get("columnDefinitions")
    return {
        "kind": table.get("kind"),
        "apiVersion": table.get("apiVersion"),
        "columnDefinitions": None
        if columns is None
        else [
            {key: column.get(key) for key in ("name", "type", "format", "priority")}
            for column in columns
        ],
        "rows": [
            {"cells": row.get("cells"), "objectKind": (row.get("object") or {}).get("kind")}
            for row in table.get("rows") or []
        ],
    }


def compare_body(replay: Replay, entry: Json, expected: Any, actual: Any) -> list[str]:
    """The answer's body against what the file kept of it."""
    if not isinstance(expected, dict):
        return differences(replay, expected, actual)
    kind = expected.get("kind", "")
    if kind == "Status":
        return compare_status(expected, actual)
    if entry["group"] == "discovery" and kind != "Table":
        # Discovery documents are summarised in the file: the same kind of document.
        return differences(replay, kind or None, (actual or {}).get("kind") if kind else None)
    if kind == "Table":
        wanted = dict(expected)
        if wanted.get("columnDefinitions") is None:
            wanted.pop("columnDefinitions", None)
        return differences(replay, wanted, _table_view(actual))
    return differences(replay, expected, actual)


def watch_events(
    replay: Replay, entry: Json, path: str, headers: Json
) -> tuple[int, list[Json], bool]:
    """Open the watch, run what lands during it, read events as the recording did.

    Returns the status code, the events (all of them, up to the window) and whether the server
    closed the stream within the window.
    """
    expected = entry["response"]
    lines: queue.Queue[Json | None] = queue.Queue()
    opened: queue.Queue[int] = queue.Queue()

    def read() -> None:
        # Streams still open when the stand-in stops are cut: that ends them like a close.
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.Client(base_url=replay.api.url, timeout=None) as client,
            client.stream("GET", path, headers=headers) as response,
        ):
            opened.put(response.status_code)
            if response.status_code != 200:
                lines.put(None)
                return
            for line in response.iter_lines():
                if line.strip():
                    lines.put(json.loads(line))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    status = opened.get(timeout=10)
    if entry["id"] in DURING:
        DURING[entry["id"]](replay)
    events: list[Json] = []
    closed = False
    deadline = time.monotonic() + WATCH_WINDOW
    settle_at: float | None = None
    while (now := time.monotonic()) < min(deadline, settle_at or deadline):
        if (
            settle_at is None
            and not expected.get("closedByServer")
            and len(events) >= int(expected.get("eventsWithin3s", 0))
        ):
            settle_at = now + WATCH_SETTLE
        try:
            event = lines.get(timeout=0.05)
        except queue.Empty:
            continue
        if event is None:
            closed = True
            break
        events.append(event)
    return status, events, closed


def replay_entry(replay: Replay, entry: Json) -> list[str]:
    """Send one entry's request; how the answer differs from the recorded one."""
    request, expected = entry["request"], entry["response"]
    if entry["id"] in SETUP:
        SETUP[entry["id"]](replay)
    path = substitute(replay, entry, request["path"])
    headers = dict(request.get("headers") or {})
    if "events" in expected:
        status, events, closed = watch_events(replay, entry, path, headers)
        problems = [] if status == expected["status"] else [f"status {status}"]
        if entry["id"] == "table-watch":
            events = [{**event, "object": _table_view(event["object"])} for event in events]
        problems += differences(replay, expected["events"], events[:3], "events")
        if len(events) != expected["eventsWithin3s"]:
            problems.append(
                f"{len(events)} events within 3 s, expected {expected['eventsWithin3s']}"
            )
        if closed != expected["closedByServer"]:
            problems.append(
                f"closed by the server: {closed}, expected {expected['closedByServer']}"
            )
        return problems
    if "bodyText" in request:
        content: bytes | None = request["bodyText"].encode()
    elif "body" in request:
        content = substitute(replay, entry, json.dumps(request["body"])).encode()
    else:
        content = None
    response = replay.client.request(request["method"], path, content=content, headers=headers)
    problems = []
    if response.status_code != expected["status"]:
        problems.append(f"status {response.status_code}, expected {expected['status']}")
    try:
        body = response.json()
    except ValueError:
        body = {"text": response.text}
    problems += compare_body(replay, entry, expected.get("body"), body)
    warnings = [value.removeprefix("299 - ") for value in response.headers.get_list("Warning")]
    wanted = [value.removeprefix("299 - ") for value in expected.get("warnings") or []]
    if [json.loads(text) for text in warnings] != [json.loads(text) for text in wanted]:
        problems.append(f"warnings {warnings}, expected {wanted}")
    if entry["id"] == "list-limit-2" and isinstance(body, dict):
        replay.continue_token = str(body.get("metadata", {}).get("continue", ""))
    return problems


@pytest.fixture(scope="module")
def replay() -> Iterator[Replay]:
    """The stand-in with the recording's setup: the project's CRD, ns1 and ns-baseline."""
    with KubeApi() as api:
        api.put("", "namespaces", {"metadata": {"name": "ns1"}})
        api.put("", "namespaces", {"metadata": {"name": "ns-baseline", "labels": BASELINE_LABELS}})
        api.put(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            yaml.safe_load(CRD_PATH.read_text(encoding="utf-8")),
        )
        with httpx.Client(
            base_url=api.url, headers={"Authorization": f"Bearer {api.token}"}, timeout=10
        ) as client:
            yield Replay(api, client)


@pytest.mark.parametrize("entry", transcripts(), ids=lambda entry: str(entry["id"]))
def test_the_stand_in_answers_as_the_real_server_did(replay: Replay, entry: Json) -> None:
    """Each recorded request, in order, gets the recorded answer (or is a known difference)."""
    problems = replay_entry(replay, entry)
    if entry["id"] in KNOWN_DIFFERENCES:
        assert problems, f"{entry['id']} now matches: remove it from KNOWN_DIFFERENCES"
        return
    assert not problems, f"{entry['id']} ({entry['description']}):\n" + "\n".join(problems)


def test_every_known_difference_names_a_recorded_entry() -> None:
    """A known difference for an entry that no longer exists is stale."""
    ids = {entry["id"] for entry in transcripts()}
    assert set(KNOWN_DIFFERENCES) <= ids
