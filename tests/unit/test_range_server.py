"""The tests' fault injector (tests.support.range_server): its file origin, its plan, and the
same faults through its proxy origin (tests.support.fault_proxy)."""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.support.fault_proxy import FaultProxy
from tests.support.range_server import (
    Fault,
    FaultKind,
    FaultPlan,
    RangeServer,
    Requests,
)

MIB = 1 << 20
SIZE = 3 * MIB + 777


@pytest.fixture(scope="module")
def content() -> bytes:
    return random.Random(42).randbytes(SIZE)


@pytest.fixture
def image(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "disk image.raw"  # a space, to check the URL is quoted
    path.write_bytes(content)
    return path


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as c:
        yield c


@dataclass
class Fetched:
    """A streamed response: what arrived before the body ended or failed."""

    status: int
    headers: httpx.Headers
    body: bytes
    error: Exception | None


def fetch(
    client: httpx.Client,
    url: str,
    headers: dict[str, str] | None = None,
    timeout: httpx.Timeout | None = None,
) -> Fetched:
    """GET `url`, collecting the body bytes that arrive until the end or an error."""
    received = bytearray()
    with client.stream(
        "GET",
        url,
        headers=headers or {},
        timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
    ) as response:
        try:
            for chunk in response.iter_raw():
                received += chunk
        except httpx.TransportError as exc:
            return Fetched(response.status_code, response.headers, bytes(received), exc)
    return Fetched(response.status_code, response.headers, bytes(received), None)


# -- normal behaviour -------------------------------------------------------------------------


def test_head_advertises_ranges_and_validators(image: Path, client: httpx.Client) -> None:
    with RangeServer(image) as server:
        response = client.head(server.url)

        assert server.url.endswith("/disk%20image.raw")
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(SIZE)
        assert response.headers["Accept-Ranges"] == "bytes"
        etag = response.headers["ETag"]
        assert etag.startswith('"')  # strong: no W/ prefix
        assert etag.endswith('"')
        assert etag == server.etag
        assert response.headers["Last-Modified"] == server.last_modified
        assert response.content == b""


def test_full_get(image: Path, content: bytes, client: httpx.Client) -> None:
    with RangeServer(image) as server:
        got = fetch(client, server.url)

    assert got.status == 200
    assert got.error is None
    assert got.body == content
    assert "Content-Range" not in got.headers


@pytest.mark.parametrize(
    ("range_header", "first_last"),
    [
        ("bytes=0-99", (0, 99)),
        ("bytes=1000-", (1000, SIZE - 1)),
        ("bytes=123456-2345678", (123456, 2345678)),
        ("bytes=-500", (SIZE - 500, SIZE - 1)),
        ("bytes=5-999999999", (5, SIZE - 1)),
        (f"bytes={SIZE - 1}-", (SIZE - 1, SIZE - 1)),
        ("Bytes = 7 - 8", (7, 8)),
    ],
)
def test_single_range_gives_206(
    image: Path,
    content: bytes,
    client: httpx.Client,
    range_header: str,
    first_last: tuple[int, int],
) -> None:
    start, end = first_last
    with RangeServer(image) as server:
        got = fetch(client, server.url, {"Range": range_header})
        records = server.requests

    assert got.status == 206
    assert got.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert got.headers["Content-Length"] == str(end - start + 1)
    assert got.body == content[start : end + 1]
    assert records[0].range == range_header
    assert records[0].status == 206
    assert records[0].body_bytes == end - start + 1


def test_range_beyond_the_end_gives_416(image: Path, client: httpx.Client) -> None:
    with RangeServer(image) as server:
        got = fetch(client, server.url, {"Range": f"bytes={SIZE}-"})
        again = fetch(client, server.url, {"Range": f"bytes={SIZE + 10}-{SIZE + 20}"})

    for response in (got, again):
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{SIZE}"
        assert response.body == b""


@pytest.mark.parametrize("range_header", ["bytes=0-9,20-29", "bytes=50-10", "items=0-9"])
def test_unsupported_or_invalid_range_is_ignored(
    image: Path, content: bytes, client: httpx.Client, range_header: str
) -> None:
    with RangeServer(image) as server:
        got = fetch(client, server.url, {"Range": range_header})

    assert got.status == 200
    assert got.body == content


def test_if_range_with_current_validators_gives_206(image: Path, client: httpx.Client) -> None:
    with RangeServer(image) as server:
        assert server.etag is not None
        by_etag = fetch(client, server.url, {"Range": "bytes=10-19", "If-Range": server.etag})
        by_date = fetch(
            client, server.url, {"Range": "bytes=10-19", "If-Range": server.last_modified}
        )
        records = server.requests

    assert by_etag.status == 206
    assert by_date.status == 206
    assert [r.if_range for r in records] == [server.etag, server.last_modified]


@pytest.mark.parametrize(
    "if_range",
    ['"some-other-etag"', "Thu, 01 Jan 1998 00:00:00 GMT", "W/{etag}", "not a date"],
)
def test_if_range_mismatch_gives_the_full_object(
    image: Path, content: bytes, client: httpx.Client, if_range: str
) -> None:
    with RangeServer(image) as server:
        value = if_range.format(etag=server.etag)
        got = fetch(client, server.url, {"Range": "bytes=10-19", "If-Range": value})

    assert got.status == 200
    assert got.body == content


def test_server_without_ranges(image: Path, content: bytes, client: httpx.Client) -> None:
    with RangeServer(image, advertise_ranges=False) as server:
        head = client.head(server.url)
        got = fetch(client, server.url, {"Range": "bytes=100-199"})

    assert "Accept-Ranges" not in head.headers
    assert got.status == 200
    assert "Accept-Ranges" not in got.headers
    assert "Content-Range" not in got.headers
    assert got.body == content


def test_given_or_no_validators(image: Path, client: httpx.Client) -> None:
    with RangeServer(image, etag='"v1"') as server:
        given = client.head(server.url)
    with RangeServer(image, etag=None, last_modified=False) as server:
        bare = client.head(server.url)
        # Without validators an If-Range can never match.
        got = fetch(client, server.url, {"Range": "bytes=0-9", "If-Range": '"v1"'})

    assert given.headers["ETag"] == '"v1"'
    assert "ETag" not in bare.headers
    assert "Last-Modified" not in bare.headers
    assert got.status == 200


def test_other_paths_are_not_found(image: Path, client: httpx.Client) -> None:
    with RangeServer(image) as server:
        response = client.get(server.url + "x")
        with_query = client.get(server.url + "?token=secret")
        records = server.requests

    assert response.status_code == 404
    assert with_query.status_code == 200
    assert records[1].path.endswith("?token=secret")


def test_keep_alive_serves_several_requests_on_one_connection(
    image: Path, content: bytes, client: httpx.Client
) -> None:
    with RangeServer(image) as server:
        bodies = [client.get(server.url, headers={"Range": f"bytes={i}-{i}"}) for i in range(5)]

    assert [b.content for b in bodies] == [content[i : i + 1] for i in range(5)]


# -- faults -----------------------------------------------------------------------------------


def test_reset_after_n_bytes(image: Path, content: bytes, client: httpx.Client) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.reset(after=100_000)])) as server:
        got = fetch(client, server.url, {"Range": "bytes=1000-"})
        then = fetch(client, server.url, {"Range": "bytes=101000-"})
        records = server.requests

    assert got.status == 206
    assert isinstance(got.error, httpx.ReadError)  # a reset, not a clean close
    assert got.body == content[1000:101_000]
    assert records[0].fault is FaultKind.RESET
    # The plan is used up: the resume gets the rest.
    assert then.error is None
    assert then.body == content[101_000:]


def test_reset_at_an_absolute_offset(image: Path, content: bytes, client: httpx.Client) -> None:
    plan = FaultPlan([Fault.reset_at(2 * MIB), Fault.reset_at(2 * MIB + 10)])
    with RangeServer(image, faults=plan) as server:
        first = fetch(client, server.url)
        resumed = fetch(client, server.url, {"Range": f"bytes={2 * MIB}-"})
        last = fetch(client, server.url, {"Range": f"bytes={2 * MIB + 10}-"})

    assert isinstance(first.error, httpx.ReadError)
    assert first.body == content[: 2 * MIB]
    assert isinstance(resumed.error, httpx.ReadError)
    assert resumed.body == content[2 * MIB : 2 * MIB + 10]
    assert last.error is None
    assert last.body == content[2 * MIB + 10 :]
    assert len(plan) == 0


def test_reset_at_waits_for_a_request_that_reaches_it(
    image: Path, content: bytes, client: httpx.Client
) -> None:
    plan = FaultPlan([Fault.reset_at(MIB), Fault.status(503)])
    with RangeServer(image, faults=plan) as server:
        beyond = fetch(client, server.url, {"Range": f"bytes={MIB + 1}-"})
        before = fetch(client, server.url, {"Range": "bytes=0-99"})
        assert len(plan) == 2  # neither request covered the offset: nothing consumed
        covering = fetch(client, server.url, {"Range": "bytes=100-"})

    assert beyond.error is None
    assert beyond.body == content[MIB + 1 :]
    assert before.error is None
    assert before.body == content[:100]
    assert isinstance(covering.error, httpx.ReadError)
    assert covering.body == content[100:MIB]
    assert [f.kind for f in plan.pending] == [FaultKind.STATUS]


def test_short_body_then_clean_close(image: Path, content: bytes, client: httpx.Client) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.short(after=5000)])) as server:
        got = fetch(client, server.url, {"Range": "bytes=10-"})

    assert got.status == 206
    assert got.headers["Content-Length"] == str(SIZE - 10)  # the promise
    # A FIN before the promised length: an incomplete message, not a reset.
    assert isinstance(got.error, httpx.RemoteProtocolError)
    assert got.body == content[10:5010]


def test_ignore_range(image: Path, content: bytes, client: httpx.Client) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.ignore_range()])) as server:
        got = fetch(client, server.url, {"Range": "bytes=1000-"})

    assert got.status == 200
    assert "Content-Range" not in got.headers
    assert got.body == content


def test_stall_then_close(image: Path, content: bytes, client: httpx.Client) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.stall(after=300, seconds=0.4)])) as server:
        started = time.monotonic()
        got = fetch(client, server.url)
        elapsed = time.monotonic() - started

    assert elapsed >= 0.4
    assert isinstance(got.error, httpx.RemoteProtocolError)
    assert got.body == content[:300]


def test_stall_trips_a_client_read_timeout(
    image: Path, content: bytes, client: httpx.Client
) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.stall(after=300, seconds=30)])) as server:
        started = time.monotonic()
        got = fetch(client, server.url, timeout=httpx.Timeout(5.0, read=0.3))
        elapsed = time.monotonic() - started

    assert isinstance(got.error, httpx.ReadTimeout)
    assert got.body == content[:300]
    assert elapsed < 5


@pytest.mark.parametrize(("code", "retry_after"), [(503, "2"), (429, None), (404, None)])
def test_status_fault(
    image: Path, content: bytes, client: httpx.Client, code: int, retry_after: str | None
) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.status(code, retry_after)])) as server:
        failed = fetch(client, server.url, {"Range": "bytes=0-"})
        after = fetch(client, server.url, {"Range": "bytes=0-"})

    assert failed.status == code
    assert failed.headers.get("Retry-After") == retry_after
    assert failed.body  # a small explanatory body
    assert after.status == 206
    assert after.body == content


def test_408_closes_the_connection(image: Path, client: httpx.Client) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.status(408)])) as server:
        got = fetch(client, server.url)

    assert got.status == 408
    assert got.headers["Connection"] == "close"


def test_change_makes_if_range_mismatch_and_alters_content(
    image: Path, content: bytes, client: httpx.Client
) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.change()])) as server:
        old_etag, old_date = server.etag, server.last_modified
        assert old_etag is not None
        got = fetch(client, server.url, {"Range": "bytes=10-", "If-Range": old_etag})
        by_date = fetch(client, server.url, {"Range": "bytes=10-", "If-Range": old_date})
        new_etag = server.etag
        assert new_etag is not None
        new_range = fetch(client, server.url, {"Range": "bytes=10-", "If-Range": new_etag})

    assert got.status == 200
    assert got.headers["ETag"] == new_etag != old_etag
    assert got.headers["Last-Modified"] != old_date
    assert by_date.status == 200
    assert len(got.body) == SIZE
    assert got.body[MIB:] == content[MIB:]
    assert all(a != b for a, b in zip(got.body[:MIB:4096], content[:MIB:4096], strict=True))
    assert new_range.status == 206
    assert new_range.body == got.body[10:]


def test_change_of_validators_only(image: Path, content: bytes, client: httpx.Client) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.change(content=False)])) as server:
        old_etag = server.etag
        got = fetch(client, server.url)

    assert got.headers["ETag"] != old_etag
    assert got.body == content


@pytest.mark.parametrize("delta", [-100, 4096])
def test_wrong_range_start(image: Path, content: bytes, client: httpx.Client, delta: int) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.wrong_range_start(delta)])) as server:
        got = fetch(client, server.url, {"Range": "bytes=10000-19999"})

    start = 10000 + delta
    assert got.status == 206
    assert got.headers["Content-Range"] == f"bytes {start}-{start + 9999}/{SIZE}"
    assert got.body == content[start : start + 10000]


def test_empty_206(image: Path, client: httpx.Client) -> None:
    with RangeServer(image, faults=FaultPlan([Fault.empty()])) as server:
        got = fetch(client, server.url, {"Range": "bytes=1000-1999"})

    assert got.status == 206
    assert got.headers["Content-Range"] == f"bytes 1000-1999/{SIZE}"
    assert got.headers["Content-Length"] == "0"
    assert got.body == b""
    assert got.error is None


def test_faults_are_consumed_in_order_by_gets_only(image: Path, client: httpx.Client) -> None:
    plan = FaultPlan([Fault.status(503)])
    plan.add(Fault.status(429), Fault.ignore_range())
    with RangeServer(image, faults=plan) as server:
        head = client.head(server.url)
        statuses = [fetch(client, server.url, {"Range": "bytes=0-9"}).status for _ in range(4)]
        records = server.requests

    assert head.status_code == 200
    assert statuses == [503, 429, 200, 206]
    assert [r.fault for r in records] == [
        None,
        FaultKind.STATUS,
        FaultKind.STATUS,
        FaultKind.IGNORE_RANGE,
        None,
    ]
    assert [r.method for r in records] == ["HEAD", "GET", "GET", "GET", "GET"]


# -- one injector, two origins: a file, and a proxy in front of any HTTP server ----------------


def test_a_header_modifier_combines_with_the_fault_that_answers(
    image: Path, content: bytes, client: httpx.Client
) -> None:
    plan = FaultPlan([Fault.strip_accept_ranges(times=2), Fault.cut_before_end()])
    with RangeServer(image, faults=plan) as server:
        cut = fetch(client, server.url)
        whole = fetch(client, server.url)
        records = server.requests

    assert cut.body == content  # every byte, but not the chunk that ends the message
    assert isinstance(cut.error, httpx.RemoteProtocolError)
    assert "Accept-Ranges" not in cut.headers
    assert "Accept-Ranges" not in whole.headers
    assert (whole.body, whole.error) == (content, None)
    assert [r.faults for r in records] == [
        [FaultKind.CUT_BEFORE_END, FaultKind.STRIP_ACCEPT_RANGES],
        [FaultKind.STRIP_ACCEPT_RANGES],
    ]
    assert len(plan) == 0


def test_a_fault_waits_for_the_requests_it_is_for(image: Path, client: httpx.Client) -> None:
    elsewhere = Requests(frozenset({"GET"}), re.compile(r"/elsewhere"))
    plan = FaultPlan([Fault.reset(after=0, on=elsewhere), Fault.tamper()])
    with RangeServer(image, faults=plan) as server:
        tampered = fetch(client, server.url, {"Range": "bytes=0-9"})

    assert tampered.body[-1:] == b"\n"
    assert len(tampered.body) == 11
    assert [f.kind for f in plan.pending] == [FaultKind.RESET]


def test_the_proxy_applies_the_same_faults_to_its_upstream(
    image: Path, content: bytes, client: httpx.Client
) -> None:
    with (
        RangeServer(image) as origin,
        FaultProxy(origin.url.rsplit("/", 1)[0], [Fault.short(after=5000)]) as proxy,
    ):
        url = origin.url.replace(origin.address, proxy.address)
        short = fetch(client, url, {"Range": "bytes=100-"})
        proxy.add(Fault.status(503, retry_after="2"), Fault.wrong_range_start(7))
        refused = fetch(client, url)
        moved = fetch(client, url, {"Range": "bytes=100-199"})
        records = proxy.requests

    assert short.status == 206
    assert short.body == content[100:5100]
    assert isinstance(short.error, httpx.RemoteProtocolError)
    assert (refused.status, refused.headers["Retry-After"]) == (503, "2")
    assert moved.headers["Content-Range"] == f"bytes 107-206/{SIZE}"
    assert moved.body == content[107:207]
    assert [r.fault for r in records] == [
        FaultKind.SHORT,
        FaultKind.STATUS,
        FaultKind.WRONG_RANGE_START,
    ]


def test_a_proxy_cannot_change_its_upstreams_object() -> None:
    with pytest.raises(ValueError, match="cannot change"):
        FaultProxy("http://127.0.0.1:1", [Fault.change()])


def test_fault_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="after"):
        Fault.reset(-1)
    with pytest.raises(ValueError, match="seconds"):
        Fault.stall(0, -1.0)
    with pytest.raises(ValueError, match="status"):
        Fault.status(42)


# -- lifecycle --------------------------------------------------------------------------------


def test_stop_is_prompt_with_a_stalled_handler(image: Path) -> None:
    errors: list[BaseException] = []
    body_started = threading.Event()

    def download(url: str) -> None:
        try:
            with (
                httpx.Client(timeout=30.0) as c,
                c.stream("GET", url) as response,
            ):
                for _ in response.iter_raw():
                    body_started.set()
        except httpx.HTTPError as exc:
            errors.append(exc)

    server = RangeServer(image, faults=FaultPlan([Fault.stall(after=1000, seconds=60)]))
    with server:
        thread = threading.Thread(target=download, args=(server.url,), daemon=True)
        thread.start()
        assert body_started.wait(5)
        started = time.monotonic()
    stopped_in = time.monotonic() - started
    thread.join(5)

    assert stopped_in < 2.0
    assert not thread.is_alive()
    assert errors  # the client saw its download cut, not a clean end


def test_stop_is_prompt_with_a_client_that_does_not_read(image: Path) -> None:
    with httpx.Client(timeout=30.0) as c:
        with RangeServer(image) as server:
            response = c.send(c.build_request("GET", server.url), stream=True)
            started = time.monotonic()
        stopped_in = time.monotonic() - started
        response.close()

    assert stopped_in < 2.0


def test_url_needs_a_running_server(image: Path) -> None:
    server = RangeServer(image)
    with pytest.raises(RuntimeError):
        _ = server.url
