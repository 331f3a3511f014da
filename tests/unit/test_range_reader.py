"""`HttpRangeReader` and `RetryPolicy` logic, against `httpx.MockTransport`.

The real-server behaviour (nginx, the fault-injecting server) is covered by the integration
tests; these pin down the decisions themselves: how Retry-After is read, how long backoff waits,
which validator goes into If-Range, how Content-Range and 416 are interpreted, and that the
bytes come out in order, exactly once, whatever the server does.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from tests.support.http_fakes import Body, partial_response, range_start

from imagestream.errors import Cancelled, SourceError
from imagestream.pipeline import range_reader
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.range_reader import (
    HttpRangeReader,
    RetryPolicy,
    SourceChangedError,
    _retry_after,
    _Validators,
)

URL = "https://images.example.com/disk.zst"
DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable modulo 256
ETAG = '"5f1e-2800"'
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
PIECE = 1000  # bytes a fake body yields at a time

Handler = Callable[[httpx.Request], httpx.Response]


class FakeServer:
    """One object served with ranges; `script` overrides the answers to the next requests."""

    def __init__(
        self,
        data: bytes = DATA,
        etag: str | None = ETAG,
        last_modified: str | None = LAST_MODIFIED,
    ) -> None:
        self.data = data
        self.etag = etag
        self.last_modified = last_modified
        self.requests: list[httpx.Request] = []
        self.script: list[Handler] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            return self.script.pop(0)(request)
        return self.partial(request)

    def validators(self) -> dict[str, str]:
        headers = {}
        if self.etag:
            headers["ETag"] = self.etag
        if self.last_modified:
            headers["Last-Modified"] = self.last_modified
        return headers

    def partial(
        self, request: httpx.Request, cut: int | None = None, start_delta: int = 0
    ) -> httpx.Response:
        start = range_start(request) + start_delta
        return partial_response(self.data, start, self.validators(), cut=cut, piece=PIECE)

    def full(self, request: httpx.Request, cut: int | None = None) -> httpx.Response:
        headers = {**self.validators(), "Content-Length": str(len(self.data))}
        return httpx.Response(200, headers=headers, stream=Body(self.data, cut, PIECE))

    @property
    def ranges(self) -> list[str]:
        return [r.headers.get("range", "") for r in self.requests]

    @property
    def if_ranges(self) -> list[str | None]:
        return [r.headers.get("if-range") for r in self.requests]


def cut_partial(server: FakeServer, cut: int) -> Handler:
    return lambda request: server.partial(request, cut=cut)


def status(code: int, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(code, headers=headers or {})


REAL_CHUNK_SIZE: int | None = getattr(range_reader, "CHUNK_SIZE", None)
SMALL_CHUNK = 1


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read byte by byte, so every byte a mock body produced before a reset is delivered.

    `test_bytes_received_before_a_reset_are_not_fetched_again` checks the real chunk size.
    """
    monkeypatch.setattr(range_reader, "CHUNK_SIZE", SMALL_CHUNK, raising=False)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the reader's backoff sleeps instead of sleeping."""
    recorded: list[float] = []

    def record(_interrupt: Interrupt, seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(Interrupt, "sleep", record)
    return recorded


def reader_for(
    server: FakeServer, policy: RetryPolicy | None = None, headers: dict[str, str] | None = None
) -> HttpRangeReader:
    client = httpx.Client(transport=httpx.MockTransport(server))
    return HttpRangeReader(URL, client, policy or RetryPolicy(max_retries=3), headers)


def read_all(reader: HttpRangeReader) -> bytes:
    return b"".join(reader.chunks())


# -- Retry-After ------------------------------------------------------------------------------


def _response(retry_after: str | None) -> httpx.Response:
    # As bytes, as a server sends them: httpx decodes UTF-8 headers ("²") but encodes str as ASCII.
    headers = {} if retry_after is None else {b"Retry-After": retry_after.encode()}
    return httpx.Response(503, headers=headers)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("7", 7.0), (" 120 ", 120.0)])
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    assert _retry_after(_response(value)) == seconds


def test_retry_after_absent() -> None:
    assert _retry_after(_response(None)) is None


def test_retry_after_as_an_http_date_in_the_future() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)

    delay = _retry_after(_response(when))

    assert delay is not None
    assert 28.0 <= delay <= 31.0


def test_retry_after_as_an_http_date_in_the_past_means_now() -> None:
    assert _retry_after(_response("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0


@pytest.mark.parametrize("value", ["soon", "1.5", "-1", "Wed, 99 Foo 2015", "²", "١٢", "3²"])
def test_an_invalid_retry_after_is_ignored(value: str) -> None:
    assert _retry_after(_response(value)) is None


def test_a_503_with_an_invalid_retry_after_falls_back_to_backoff(sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [status(503, {"Retry-After": "soon"})]
    policy = RetryPolicy(backoff_base=0.5)

    assert read_all(reader_for(server, policy)) == DATA
    assert len(sleeps) == 1
    assert 0.25 <= sleeps[0] <= 0.5


def test_a_503_with_non_ascii_digits_in_retry_after_is_retried_with_backoff(
    sleeps: list[float],
) -> None:
    # "²".isdigit() is true, and float("²") raises: the error used to escape the retries.
    server = FakeServer()
    server.script = [lambda request: httpx.Response(503, headers={b"Retry-After": "²".encode()})]

    assert read_all(reader_for(server, RetryPolicy(backoff_base=0.5))) == DATA
    assert len(sleeps) == 1
    assert 0.25 <= sleeps[0] <= 0.5


def test_a_200_with_non_ascii_digits_in_content_length_has_an_unknown_size() -> None:
    server = FakeServer()
    headers = {b"Content-Length": "²".encode()}
    server.script = [lambda request: httpx.Response(200, headers=headers, stream=Body(DATA))]
    reader = reader_for(server)

    assert read_all(reader) == DATA
    assert reader.total is None


def test_retry_after_is_honoured_and_capped(sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [
        status(503, {"Retry-After": "7"}),
        status(429, {"Retry-After": "9999"}),
        cut_partial(server, 3000),
        status(503, {"Retry-After": "2"}),
    ]
    policy = RetryPolicy(max_retries=5, max_retry_after=60.0)

    reader = reader_for(server, policy)

    assert read_all(reader) == DATA
    assert sleeps[0] == 7.0
    assert sleeps[1] == 60.0  # capped at max_retry_after
    # After the reset at 3000 the backoff applies (jitter within the policy's bounds), then the
    # server's Retry-After again.
    assert 0 < sleeps[2] <= policy.backoff_max
    assert sleeps[3] == 2.0
    # The 503 and 429 came before the transfer started: retried requests, not resumes.
    assert reader.resumes == 2
    assert server.ranges == ["bytes=0-", "bytes=0-", "bytes=0-", "bytes=3000-", "bytes=3000-"]


@pytest.mark.timeout(30)
def test_a_cancel_ends_a_retry_after_wait_at_once() -> None:
    # A `Retry-After: 300` must not keep a cancelled agent alive past its Pod's grace period.
    server = FakeServer()
    server.script = [status(503, {"Retry-After": "300"})]
    interrupt = Interrupt()
    client = httpx.Client(transport=httpx.MockTransport(server))
    policy = RetryPolicy(max_retry_after=300)
    reader = HttpRangeReader(URL, client, policy, interrupt=interrupt)
    timer = threading.Timer(0.3, interrupt.set)
    timer.start()
    started = time.monotonic()

    with pytest.raises(Cancelled):
        read_all(reader)
    timer.join()
    assert time.monotonic() - started < 1.5
    assert len(server.requests) == 1  # and no request after the cancel


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(code: int, sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [status(code), status(code)]

    assert read_all(reader_for(server)) == DATA
    assert len(server.requests) == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 451])
def test_other_client_errors_fail_at_once_with_the_status(code: int, sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [status(code)]

    with pytest.raises(SourceError) as caught:
        read_all(reader_for(server))

    assert f"HTTP {code}" in caught.value.message
    assert caught.value.reason == "HTTPError"
    assert caught.value.exit_code == 3
    assert len(server.requests) == 1
    assert sleeps == []


# -- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5, 8, 12, 40])
def test_backoff_stays_within_half_and_full_ceiling(attempt: int) -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_max=30.0)
    ceiling = min(30.0, 0.5 * 2 ** max(0, attempt - 1))
    state = random.getstate()
    random.seed(attempt)
    try:
        delays = [policy.backoff(attempt) for _ in range(500)]
    finally:
        random.setstate(state)

    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    # Jitter: the delays spread over the range instead of repeating one value.
    assert max(delays) - min(delays) > 0.4 * ceiling
    assert len(set(delays)) > 400


def test_backoff_grows_then_stops_at_the_maximum() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_max=10.0)

    upper = [max(policy.backoff(a) for _ in range(50)) for a in range(1, 9)]
    lower = [min(policy.backoff(a) for _ in range(50)) for a in range(1, 9)]

    assert upper[0] <= 1.0
    assert lower[3] >= 4.0  # attempt 4: [4, 8]
    assert all(u <= 10.0 for u in upper)
    assert min(lower[5:]) >= 5.0  # capped: [5, 10]


def test_backoff_of_a_very_late_attempt_is_still_capped() -> None:
    assert RetryPolicy(backoff_max=30.0).backoff(1100) <= 30.0


# -- validators and If-Range ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("etag", "last_modified", "expected"),
    [
        (ETAG, LAST_MODIFIED, ETAG),
        (ETAG, None, ETAG),
        ('W/"weak-1"', LAST_MODIFIED, LAST_MODIFIED),
        ('W/"weak-1"', None, None),
        (None, LAST_MODIFIED, LAST_MODIFIED),
        (None, None, None),
    ],
)
def test_if_range_uses_a_strong_etag_else_last_modified(
    etag: str | None, last_modified: str | None, expected: str | None
) -> None:
    assert _Validators(etag, last_modified).if_range() == expected


def test_validators_compare_etags_first_then_last_modified() -> None:
    v1 = _Validators('"a"', LAST_MODIFIED)

    assert not v1.differs_from(_Validators('"a"', LAST_MODIFIED))
    assert v1.differs_from(_Validators('"b"', LAST_MODIFIED))
    assert v1.differs_from(_Validators(None, "Thu, 22 Oct 2015 07:28:00 GMT"))
    assert not v1.differs_from(_Validators(None, None))


def test_resumes_send_range_and_if_range_with_the_etag(sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [cut_partial(server, 2500), cut_partial(server, 4000)]
    reader = reader_for(server, headers={"Authorization": "Bearer x"})

    assert read_all(reader) == DATA

    assert server.ranges == ["bytes=0-", "bytes=2500-", "bytes=6500-"]
    assert server.if_ranges == [None, ETAG, ETAG]
    for request in server.requests:
        assert request.headers["accept-encoding"] == "identity"
        assert request.headers["authorization"] == "Bearer x"
    assert reader.resumes == 2
    assert reader.total == len(DATA)


def test_a_weak_etag_makes_resumes_use_last_modified(sleeps: list[float]) -> None:
    server = FakeServer(etag='W/"weak-1"')
    server.script = [cut_partial(server, 1234)]

    assert read_all(reader_for(server)) == DATA

    assert server.if_ranges == [None, LAST_MODIFIED]


def test_without_validators_resumes_carry_no_if_range(sleeps: list[float]) -> None:
    server = FakeServer(etag=None, last_modified=None)
    server.script = [cut_partial(server, 1234)]

    assert read_all(reader_for(server)) == DATA

    assert server.if_ranges == [None, None]


# -- Content-Range ----------------------------------------------------------------------------


def test_content_range_sets_the_total() -> None:
    server = FakeServer()
    reader = reader_for(server)

    assert read_all(reader) == DATA
    assert reader.total == len(DATA)


def test_content_range_with_an_unknown_total_reads_to_the_end() -> None:
    server = FakeServer()
    server.script = [
        lambda request: httpx.Response(
            206, headers={"Content-Range": f"BYTES 0-{len(DATA) - 1}/*"}, stream=Body(DATA)
        )
    ]
    reader = reader_for(server)

    assert read_all(reader) == DATA
    assert reader.total is None


@pytest.mark.parametrize(
    "header",
    [
        None,
        "bytes */10240",
        "items 0-9/10",
        "bytes=0-",
        "bytes 0-10239/10240 trailing",
        "xbytes 0-10239/10240",
        "bytes 0-10239/10240, bytes 0-1/10240",
        "bytes 0-10239/10240\u00b2",
        "bytes \u0660-10239/10240",
    ],
)
def test_a_206_without_a_valid_content_range_is_refused(header: str | None) -> None:
    server = FakeServer()
    headers = {} if header is None else {b"Content-Range": header.encode()}
    server.script = [lambda request: httpx.Response(206, headers=headers, stream=Body(DATA))]

    with pytest.raises(SourceError, match="Content-Range") as caught:
        read_all(reader_for(server))

    assert caught.value.reason == "BadRangeResponse"


@pytest.mark.parametrize(
    "header",
    [
        "bytes 0-99/10240",  # ends before the last byte
        "bytes 0-10239/20000",  # the end disagrees with the total
        "bytes 0-10240/10240",  # past the last byte
        "bytes 0-10239/10000",  # past the total
    ],
)
def test_a_206_whose_end_disagrees_with_the_total_is_refused(header: str) -> None:
    server = FakeServer()
    server.script = [
        lambda request: httpx.Response(206, headers={"Content-Range": header}, stream=Body(DATA))
    ]

    with pytest.raises(SourceError, match="Content-Range") as caught:
        read_all(reader_for(server))

    assert caught.value.reason == "BadRangeResponse"


@pytest.mark.parametrize("delta", [-1, 1, -2500])
def test_a_206_starting_elsewhere_is_refused(delta: int, sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [cut_partial(server, 2500), lambda r: server.partial(r, start_delta=delta)]
    reader = reader_for(server)
    got = bytearray()

    def collect() -> None:
        for chunk in reader.chunks():
            got.extend(chunk)

    with pytest.raises(SourceError, match="refusing") as caught:
        collect()

    assert caught.value.reason == "BadRangeResponse"
    assert f"byte {2500 + delta}" in caught.value.message
    assert bytes(got) == DATA[:2500]  # nothing of the wrong range was delivered


# -- 200 instead of 206, 416, changes ---------------------------------------------------------


def test_a_200_to_a_resume_skips_what_was_delivered(sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [cut_partial(server, 3333), server.full]
    reader = reader_for(server)

    assert read_all(reader) == DATA
    assert server.ranges == ["bytes=0-", "bytes=3333-"]
    assert reader.resumes == 1


def test_a_200_then_a_reset_then_a_200_still_delivers_each_byte_once(
    sleeps: list[float],
) -> None:
    server = FakeServer()
    server.script = [
        lambda r: server.full(r, cut=1500),
        lambda r: server.full(r, cut=4000),
        server.full,
    ]

    assert read_all(reader_for(server)) == DATA
    assert server.ranges == ["bytes=0-", "bytes=1500-", "bytes=4000-"]


def test_a_416_at_the_end_means_done(sleeps: list[float]) -> None:
    server = FakeServer()
    end = len(DATA)
    server.script = [
        cut_partial(server, end),  # every byte arrived, then the connection broke
        status(416, {"Content-Range": f"bytes */{end}"}),
    ]
    reader = reader_for(server)

    assert read_all(reader) == DATA
    assert server.ranges == ["bytes=0-", f"bytes={end}-"]
    assert reader.resumes == 1


def test_a_416_before_the_end_is_an_error(sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [
        cut_partial(server, 100),
        status(416, {"Content-Range": f"bytes */{len(DATA)}"}),
    ]

    with pytest.raises(SourceError, match="416") as caught:
        read_all(reader_for(server))

    assert caught.value.reason == "BadRangeResponse"


def test_a_changed_etag_on_resume_is_source_changed(sleeps: list[float]) -> None:
    server = FakeServer()

    def changed(request: httpx.Request) -> httpx.Response:
        server.etag = '"new-etag"'
        return server.full(request)

    server.script = [cut_partial(server, 5000), changed]

    with pytest.raises(SourceChangedError, match="source changed") as caught:
        read_all(reader_for(server))

    assert caught.value.reason == "SourceChanged"
    assert caught.value.exit_code == 3


def test_a_changed_size_on_resume_is_source_changed(sleeps: list[float]) -> None:
    server = FakeServer(etag=None, last_modified=None)

    def grown(request: httpx.Request) -> httpx.Response:
        server.data = DATA + b"more"
        return server.partial(request)

    server.script = [cut_partial(server, 5000), grown]

    with pytest.raises(SourceChangedError, match="source changed"):
        read_all(reader_for(server))


# -- bounded retries --------------------------------------------------------------------------


def test_gives_up_after_max_retries_without_progress(sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [cut_partial(server, 4096)] + [cut_partial(server, 0)] * 10

    with pytest.raises(SourceError, match="giving up") as caught:
        read_all(reader_for(server, RetryPolicy(max_retries=3)))

    assert caught.value.reason == "RetriesExhausted"
    assert "at byte 4096" in caught.value.message
    # The first request made progress before it broke; then 3 retries without any.
    assert len(server.requests) == 4
    assert len(sleeps) == 3


def test_progress_resets_the_retry_count(sleeps: list[float]) -> None:
    server = FakeServer()
    server.script = [cut_partial(server, 1000)] * 9

    reader = reader_for(server, RetryPolicy(max_retries=1))

    assert read_all(reader) == DATA
    assert reader.resumes == 9


def test_empty_bodies_count_as_attempts_without_progress(sleeps: list[float]) -> None:
    server = FakeServer()

    def empty(request: httpx.Request) -> httpx.Response:
        response = server.partial(request)
        return httpx.Response(206, headers=response.headers, stream=Body(b""))

    server.script = [empty] * 10

    with pytest.raises(SourceError, match="giving up"):
        read_all(reader_for(server, RetryPolicy(max_retries=2)))

    assert len(server.requests) == 3


def test_transport_errors_are_retried(sleeps: list[float]) -> None:
    server = FakeServer()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    server.script = [refuse, stall]
    reader = reader_for(server)

    assert read_all(reader) == DATA
    # Neither attempt got an answer: the connection and the request were retried, nothing
    # was resumed.
    assert reader.resumes == 0


def test_bytes_received_before_a_reset_are_not_fetched_again(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    monkeypatch.setattr(range_reader, "CHUNK_SIZE", REAL_CHUNK_SIZE, raising=False)
    data = bytes(range(251)) * (12 * 1024)  # ~2.9 MiB
    server = FakeServer(data=data)

    def piece(request: httpx.Request) -> httpx.Response:
        return server.partial(request, cut=700_000)  # breaks after 700 kB, every time

    server.script = [piece] * 4
    reader = reader_for(server, RetryPolicy(max_retries=2))

    assert read_all(reader) == data
    assert server.ranges[:3] == ["bytes=0-", "bytes=700000-", "bytes=1400000-"]
