"""The agent's progress reporter (throttling, coalescing, failure isolation) and its writer.

The reporter is driven with a recording patch function in place of the API; the writer
(`kube_status`) talks to the recording stand-in of `tests.support.fake_status_api` through the
real Kubernetes client (a real API server would also authenticate, authorise and validate).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.support.fake_status_api import FakeStatusApi

from imagestream.agent import kube_status
from imagestream.agent.kube_status import StatusUnavailable, connect, guarded_patch
from imagestream.agent.reporter import (
    ObjectReplaced,
    ProgressReporter,
    StatusWriteError,
    progress_report,
)
from imagestream.pipeline.progress import Progress
from imagestream.timefmt import rfc3339

MIB = 1 << 20
INTERVAL = 0.1
NOON = 1795701600.0  # 2026-11-26T14:00:00Z
UID = "0b6c7d1e-4f0a-4c55-9d7e-2a1f3b4c5d6e"


def snapshot(fetched: int, *, total: int | None = 10 * MIB, phase: str = "Running") -> Progress:
    return Progress(
        phase=phase,
        bytes_fetched=fetched,
        bytes_total=total,
        bytes_written=fetched // 2,
        bytes_per_second=1234.6,
        resumes=1,
        elapsed=1.0,
    )


class Recorder:
    """A patch function that records each report with its call time; can fail or block."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, Any]]] = []
        self.error: Exception | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, body: dict[str, Any]) -> None:
        self.calls.append((time.monotonic(), body))
        self.entered.set()
        self.release.wait(30)
        if self.error is not None:
            raise self.error

    @property
    def fetched(self) -> list[int]:
        return [report["bytesFetched"] for _, report in self.calls]


def feed(reporter: ProgressReporter, count: int, pause: float = 0.0) -> None:
    """Report `count` growing snapshots, as the pipeline does ten times a second."""
    for i in range(1, count + 1):
        reporter.update(snapshot(i * MIB))
        time.sleep(pause)


# -- the report and the patch body ------------------------------------------------------------


def test_report_holds_the_progress_fields() -> None:
    assert progress_report(snapshot(5 * MIB), NOON) == {
        "phase": "Running",
        "bytesFetched": 5 * MIB,
        "bytesTotal": 10 * MIB,
        "bytesWritten": 5 * MIB // 2,
        "bytesPerSecond": 1235,
        "resumes": 1,
        "percent": 50,
        "updatedAt": "2026-11-26T14:00:00Z",
    }


def test_report_of_a_cosi_disk_names_the_partition_being_written() -> None:
    cosi = dataclasses.replace(snapshot(5 * MIB), partition=2, partitions=3)
    report = progress_report(cosi, NOON)
    assert (report["partition"], report["partitions"]) == (2, 3)
    assert "partition" not in progress_report(snapshot(5 * MIB), NOON)


def test_patch_tests_the_uid_before_it_sets_only_status_progress() -> None:
    report = progress_report(snapshot(MIB), NOON)
    assert guarded_patch(UID, report) == [
        {"op": "test", "path": "/metadata/uid", "value": UID},
        {"op": "add", "path": "/status/progress", "value": report},
    ]


def test_unknown_total_leaves_out_total_and_percent() -> None:
    progress = progress_report(snapshot(MIB, total=None), NOON)
    assert "bytesTotal" not in progress
    assert "percent" not in progress


@pytest.mark.parametrize(
    ("phase", "shown"),
    [("Running", "Running"), ("Verifying", "Verifying"), ("Succeeded", "Verifying")],
)
def test_phase_never_claims_the_verdict(phase: str, shown: str) -> None:
    assert progress_report(snapshot(MIB, phase=phase), NOON)["phase"] == shown


def test_percent_is_an_int_within_0_and_100() -> None:
    almost = progress_report(snapshot(10 * MIB - 1), NOON)
    assert almost["percent"] == 99
    beyond = progress_report(snapshot(11 * MIB), NOON)
    assert beyond["percent"] == 100


def test_rfc3339_is_utc_whole_seconds() -> None:
    assert rfc3339(NOON + 0.9) == "2026-11-26T14:00:00Z"


# -- throttling and coalescing ----------------------------------------------------------------


def test_at_most_one_patch_per_interval_and_the_last_snapshot_at_the_end() -> None:
    patch = Recorder()
    with ProgressReporter(patch, INTERVAL) as reporter:
        feed(reporter, 60, pause=0.01)  # 10 ms apart: ten updates per interval
        last = snapshot(60 * MIB)

    times = [at for at, _ in patch.calls]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= INTERVAL for gap in gaps), gaps
    assert 2 <= len(patch.calls) < 60, "coalesced, yet sent during the stream"
    sent = patch.calls[-1][1]
    expected = progress_report(last, time.time())
    assert {**sent, "updatedAt": None} == {**expected, "updatedAt": None}
    assert patch.fetched == sorted(set(patch.fetched)), "never an older or repeated snapshot"


def test_final_snapshot_is_sent_even_right_after_a_patch() -> None:
    patch = Recorder()
    reporter = ProgressReporter(patch, INTERVAL)
    reporter.update(snapshot(MIB))
    patch.entered.wait(5)
    reporter.update(snapshot(2 * MIB))  # within the interval of the first patch
    reporter.close()

    assert patch.fetched == [MIB, 2 * MIB]
    assert patch.calls[1][0] - patch.calls[0][0] >= INTERVAL  # the limit holds for it too


def test_nothing_to_report_sends_nothing() -> None:
    patch = Recorder()
    ProgressReporter(patch, INTERVAL).close()
    assert patch.calls == []


# -- a failing or hanging API -----------------------------------------------------------------


def test_failing_patches_are_retried_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    patch = Recorder()
    patch.error = RuntimeError("https://admin:s3cret@10.0.0.1/apis?token=abc")
    caplog.set_level(logging.INFO, logger="imagestream.agent.reporter")

    with ProgressReporter(patch, INTERVAL) as reporter:
        feed(reporter, 40, pause=0.01)

    assert len(patch.calls) >= 3, "every tick tries again"
    assert patch.fetched[-1] == 40 * MIB
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "RuntimeError" in caplog.text
    assert "s3cret" not in caplog.text  # foreign messages are not logged


def test_our_error_messages_are_logged_and_recovery_noted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    patch = Recorder()
    patch.error = StatusWriteError("the API server answered 503 Service Unavailable")
    caplog.set_level(logging.INFO, logger="imagestream.agent.reporter")
    reporter = ProgressReporter(patch, INTERVAL)
    reporter.update(snapshot(MIB))
    patch.entered.wait(5)
    patch.error = None
    reporter.update(snapshot(2 * MIB))
    reporter.close()

    assert "503 Service Unavailable" in caplog.text
    assert "work again after 1 failures" in caplog.text


def test_a_hanging_patch_never_blocks_the_callback() -> None:
    patch = Recorder()
    patch.release.clear()  # the first patch hangs until released
    reporter = ProgressReporter(patch, INTERVAL, close_timeout=0.2)
    try:
        reporter.update(snapshot(MIB))
        assert patch.entered.wait(5)
        updates = threading.Thread(target=feed, args=(reporter, 200))
        updates.start()
        updates.join(10)
        assert not updates.is_alive(), "update() blocked behind the hanging patch"
        reporter.close()  # gives up after close_timeout instead of waiting for the API
        assert len(patch.calls) == 1
    finally:
        patch.release.set()
    # Released, the sender catches up with the newest snapshot only.
    deadline = time.monotonic() + 5
    while patch.fetched[-1] != 200 * MIB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert patch.fetched == [MIB, 200 * MIB]


def test_a_replaced_object_ends_the_patches_but_not_the_updates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    patch = Recorder()
    patch.error = ObjectReplaced("ImageStream ns/name was re-created (uid differs); no more")
    caplog.set_level(logging.INFO, logger="imagestream.agent.reporter")
    reporter = ProgressReporter(patch, INTERVAL)
    reporter.update(snapshot(MIB))
    assert patch.entered.wait(5)
    patch.error = None  # even an API that would accept them again gets no more patches
    feed(reporter, 30, pause=0.01)  # three intervals' worth
    reporter.close()

    assert patch.fetched == [MIB]
    assert [r.getMessage() for r in caplog.records] == [
        "ImageStream ns/name was re-created (uid differs); no more"
    ]


# -- the Kubernetes writer --------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStatusApi]:
    with FakeStatusApi() as server:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kc", "tok-123")))
        yield server


def test_writer_sends_a_guarded_json_patch_to_the_status_subresource(
    api: FakeStatusApi,
) -> None:
    writer = connect("imagestream-system", "node-7-root-b", api.object["metadata"]["uid"])
    report = progress_report(snapshot(MIB), NOON)
    try:
        writer.patch_progress(report)
    finally:
        writer.close()

    (request,) = api.requests
    assert request.method == "PATCH"
    assert request.path == (
        "/apis/imagestream.dev/v1alpha1/namespaces/imagestream-system/imagestreams/"
        "node-7-root-b/status"
    )
    assert request.content_type == "application/json-patch+json"
    assert request.authorization == "Bearer tok-123"
    assert request.body == guarded_patch(writer.uid, report)
    assert api.object["status"] == {"progress": report}


def test_writer_tells_a_replaced_object_from_other_rejections(api: FakeStatusApi) -> None:
    """Both rejections are the same generic 422 (as from a real server); a GET of the object
    tells them apart. A real cluster's controller writes the status before the agent starts, so
    the status-less object is a stand-in's corner case, not a scenario."""
    uid = api.object["metadata"]["uid"]
    writer = connect("ns", "name", uid)
    try:
        api.reset(uid, with_status=False)
        with pytest.raises(StatusWriteError, match="422") as ordinary:
            writer.patch_progress({"bytesFetched": 1})
        assert not isinstance(ordinary.value, ObjectReplaced)

        api.reset("uid-of-the-re-created-object")
        with pytest.raises(ObjectReplaced, match=r"ns/name was re-created \(uid differs\)"):
            writer.patch_progress({"bytesFetched": 2})
    finally:
        writer.close()
    assert api.object == {"metadata": {"uid": "uid-of-the-re-created-object"}, "status": {}}
    assert [r.method for r in api.requests] == ["PATCH", "GET", "PATCH", "GET"]


def test_writer_turns_an_error_status_into_a_safe_message(api: FakeStatusApi) -> None:
    api.mode = "fail"
    writer = connect("ns", "name", UID)
    with pytest.raises(StatusWriteError) as raised:
        writer.patch_progress({})
    writer.close()
    assert "500" in str(raised.value)
    assert "tok-123" not in str(raised.value)


def test_writer_times_out_on_a_hanging_api(
    api: FakeStatusApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.mode = "hang"
    monkeypatch.setattr(kube_status, "REQUEST_TIMEOUT", (1.0, 0.2))
    writer = connect("ns", "name", UID)
    with pytest.raises(StatusWriteError, match="no answer"):
        writer.patch_progress({})
    writer.close()


def test_no_kubeconfig_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(StatusUnavailable, match="kubeconfig"):
        connect("ns", "name", UID)


def test_in_cluster_config_is_used_in_a_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls_ca: trustme.CA
) -> None:
    """The kubelet's variables and service-account files (written here) select in-cluster."""
    from kubernetes.config import incluster_config  # noqa: PLC0415

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))  # must not matter

    with pytest.raises(StatusUnavailable, match="in-cluster"):
        connect("ns", "name", UID)  # no token file yet

    token.write_text("sa-token")
    tls_ca.cert_pem.write_to_path(str(ca))
    writer = connect("ns", "name", UID)
    configuration = writer._api.api_client.configuration
    writer.close()
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.ssl_ca_cert == str(ca)
