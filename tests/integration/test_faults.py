"""`imagestream stream` against a server that misbehaves on purpose (`RangeServer` + `FaultPlan`).

Each test runs the real CLI as a subprocess against a `RangeServer` in this process, then checks
three things: the exit code, the output (the SHA-384 of the written bytes against the raw image,
or the target left invalid), and what the server was really asked (its request records: Range,
If-Range, status, body bytes sent).
"""

from __future__ import annotations

import threading
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.cli import CliRun, assert_failed, assert_succeeded, stream_fast_retries
from tests.support.range_server import (
    AUTO_ETAG,
    Fault,
    FaultKind,
    FaultPlan,
    RangeServer,
    RequestRecord,
)
from tests.support.targets import MIB, assert_file_target_invalid, sha384_of

from imagestream.demo.image import SampleImage, write_sample_image

pytestmark = pytest.mark.timeout(60)

RAW_SIZE = 6 * MIB  # three frames, ~3.2 MB compressed: room for resets inside a MiB and a frame
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# -- running the CLI --------------------------------------------------------------------------


def stream(
    url: str,
    target: Path,
    image: SampleImage,
    *extra: str,
    max_retries: int = 4,
    stall_timeout: float = 1.0,
) -> CliRun:
    """`imagestream stream` with fast backoff and a short stall timeout."""
    return stream_fast_retries(
        url,
        target,
        image,
        *extra,
        max_retries=max_retries,
        stall_timeout=stall_timeout,
        timeout=50,
    )


def stream_from(
    image: SampleImage,
    target: Path,
    *faults: Fault,
    max_retries: int = 4,
    stall_timeout: float = 1.0,
    advertise_ranges: bool = True,
    etag: str | None = AUTO_ETAG,
    last_modified: bool = True,
) -> tuple[CliRun, RangeServer]:
    """Serve `image` with `faults` planned and `stream` it to `target`: the run and the server.

    The server is stopped on return; its request records and validators stay readable.
    """
    plan = FaultPlan(faults)
    with RangeServer(
        image.path,
        faults=plan,
        advertise_ranges=advertise_ranges,
        etag=etag,
        last_modified=last_modified,
    ) as server:
        run = stream(
            server.url, target, image, max_retries=max_retries, stall_timeout=stall_timeout
        )
    return run, server


# -- checking what the server was asked -------------------------------------------------------


def range_start(record: RequestRecord) -> int:
    assert record.range is not None, record
    assert record.range.startswith("bytes="), record.range
    assert record.range.endswith("-"), record.range
    return int(record.range.removeprefix("bytes=").removesuffix("-"))


def gets(server: RangeServer) -> list[RequestRecord]:
    return [r for r in server.requests if r.method == "GET"]


def assert_resumes_are_pinned(server: RangeServer) -> None:
    """Every request asks an open range; each resume is pinned with If-Range to the ETag."""
    etag = server.etag
    records = gets(server)
    assert range_start(records[0]) == 0
    assert records[0].if_range is None
    for record in records[1:]:
        start = range_start(record)
        if start:
            assert record.if_range == etag, record


def delivered_before(records: list[RequestRecord]) -> list[int]:
    """How many object bytes the client had received before each request, by the server's count.

    After a 206 that started at S and sent B body bytes the client holds S + B bytes; after a
    200 it holds max(what it had, B) (it skips what it already had).
    """
    held = 0
    before = []
    for record in records:
        before.append(held)
        if record.status == 206:
            held = range_start(record) + record.body_bytes
        elif record.status == 200:
            held = max(held, record.body_bytes)
    return before


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """A three-frame zstd image (~3.2 MB), shared by the module (the tests only read it)."""
    path = tmp_path_factory.mktemp("image") / "image.raw.zst"
    return write_sample_image(path, RAW_SIZE, seed=11, frames=3)


@pytest.fixture(scope="module")
def frame_starts(image: SampleImage) -> list[int]:
    data = image.path.read_bytes()
    starts = []
    at = data.find(ZSTD_MAGIC)
    while at >= 0:
        starts.append(at)
        at = data.find(ZSTD_MAGIC, at + 1)
    assert len(starts) >= 3
    return starts


def mid_frame(frame_starts: list[int], near: int) -> int:
    """An offset close to `near` that is neither a frame start nor a MiB boundary."""
    offset = near
    while offset in frame_starts or offset % MIB == 0 or offset - 1 in frame_starts:
        offset += 7
    return offset


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out / "disk.raw"


# -- resets, short bodies, stalls: resumed, correct bytes -------------------------------------


def test_reset_before_the_first_byte(image: SampleImage, target: Path) -> None:
    run, server = stream_from(image, target, Fault.reset(after=0))
    records = gets(server)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] >= 1
    assert [(r.fault, r.status, r.body_bytes) for r in records[:1]] == [(FaultKind.RESET, 206, 0)]
    assert [range_start(r) for r in records] == [0, 0]
    assert_resumes_are_pinned(server)


def test_reset_mid_frame(image: SampleImage, frame_starts: list[int], target: Path) -> None:
    offset = mid_frame(frame_starts, image.compressed_size // 2 + 12345)
    run, server = stream_from(image, target, Fault.reset_at(offset))
    records = gets(server)
    etag = server.etag

    result = assert_succeeded(run, target, image)
    assert result["resumes"] >= 1
    assert records[0].fault is FaultKind.RESET_AT
    assert records[0].body_bytes == offset
    assert len(records) == 2
    # The resume asks for the rest, pinned to the same object, and gets it as a 206.
    assert 0 < range_start(records[1]) <= offset
    assert records[1].if_range == etag
    assert records[1].status == 206
    assert_resumes_are_pinned(server)


def test_reset_at_the_last_byte(image: SampleImage, target: Path) -> None:
    last = image.compressed_size - 1
    run, server = stream_from(image, target, Fault.reset_at(last))
    records = gets(server)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] >= 1
    assert records[0].body_bytes == last
    assert len(records) == 2
    assert records[1].content_range is not None
    assert records[1].content_range.endswith(f"-{last}/{image.compressed_size}")
    assert_resumes_are_pinned(server)


def test_several_resets_resume_each_time(
    image: SampleImage, frame_starts: list[int], target: Path
) -> None:
    offsets = [mid_frame(frame_starts, n) for n in (300_000, 1_700_000, 2_900_000)]
    run, server = stream_from(image, target, *[Fault.reset_at(o) for o in offsets])
    records = gets(server)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] == len(records) - 1 >= 3
    assert [r.fault for r in records if r.fault] == [FaultKind.RESET_AT] * 3
    assert_resumes_are_pinned(server)


def test_resumes_ask_for_exactly_the_next_byte_at_mib_boundaries(
    image: SampleImage, target: Path
) -> None:
    # Resets where the client holds whole MiBs: Range must start exactly there.
    run, server = stream_from(image, target, Fault.reset_at(MIB), Fault.reset_at(2 * MIB))
    records = gets(server)
    etag = server.etag

    assert_succeeded(run, target, image)
    assert [r.range for r in records] == ["bytes=0-", f"bytes={MIB}-", f"bytes={2 * MIB}-"]
    assert [r.if_range for r in records] == [None, etag, etag]
    assert [r.status for r in records] == [206, 206, 206]


def test_resumes_ask_for_exactly_the_next_byte(
    image: SampleImage, frame_starts: list[int], target: Path
) -> None:
    offsets = [mid_frame(frame_starts, n) for n in (300_000, 1_700_000, 2_900_000)]
    run, server = stream_from(image, target, *[Fault.reset_at(o) for o in offsets])
    records = gets(server)
    etag = server.etag

    assert_succeeded(run, target, image)
    assert [range_start(r) for r in records] == delivered_before(records)
    assert [range_start(r) for r in records] == [0, *offsets]
    assert [r.if_range for r in records] == [None, etag, etag, etag]


def test_a_link_that_breaks_every_700_kb_still_completes(image: SampleImage, target: Path) -> None:
    run, _server = stream_from(image, target, *[Fault.reset(after=700_000)] * 6, max_retries=2)

    assert_succeeded(run, target, image)


def test_short_body_is_resumed(image: SampleImage, frame_starts: list[int], target: Path) -> None:
    after = mid_frame(frame_starts, 1_234_567)
    run, server = stream_from(image, target, Fault.short(after))
    records = gets(server)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] >= 1
    assert records[0].fault is FaultKind.SHORT
    assert records[0].content_length == image.compressed_size
    assert records[0].body_bytes == after
    assert len(records) == 2
    assert_resumes_are_pinned(server)


def test_stall_longer_than_the_stall_timeout_is_resumed(
    image: SampleImage, frame_starts: list[int], target: Path
) -> None:
    after = mid_frame(frame_starts, 2 * MIB + 4321)
    run, server = stream_from(image, target, Fault.stall(after, seconds=20), stall_timeout=1.0)
    records = gets(server)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] >= 1
    assert records[0].fault is FaultKind.STALL
    assert len(records) == 2
    assert_resumes_are_pinned(server)
    # It gave up on the stalled connection after about the stall timeout, not the 20 s stall.
    assert run.seconds < 10


def test_resets_onto_a_loop_device(
    image: SampleImage, frame_starts: list[int], loop_device_factory: LoopDeviceFactory
) -> None:
    device = loop_device_factory(16 * MIB)
    with device.open("r+b") as fh:
        fh.write(b"\xaa" * (8 * MIB))
    faults = [Fault.reset(after=0), Fault.reset_at(mid_frame(frame_starts, 2_000_000))]
    run, _server = stream_from(image, device, *faults)

    assert run.code == 0, run.text
    assert run.result()["resumes"] >= 2
    assert sha384_of(device, image.raw_size) == image.raw_sha384


# -- servers that ignore ranges ---------------------------------------------------------------


def test_200_instead_of_206_on_a_resume_skips_what_was_received(
    image: SampleImage, frame_starts: list[int], target: Path
) -> None:
    offset = mid_frame(frame_starts, 1_600_000)
    run, server = stream_from(image, target, Fault.reset_at(offset), Fault.ignore_range())
    records = gets(server)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] >= 1
    assert [(r.status, r.fault) for r in records] == [
        (206, FaultKind.RESET_AT),
        (200, FaultKind.IGNORE_RANGE),
    ]
    assert range_start(records[1]) > 0
    assert records[1].if_range == server.etag
    assert records[1].body_bytes == image.compressed_size


def test_server_without_range_support_restarts_from_zero(
    image: SampleImage, frame_starts: list[int], target: Path
) -> None:
    offset = mid_frame(frame_starts, 2_500_000)
    run, server = stream_from(image, target, Fault.reset_at(offset), advertise_ranges=False)
    records = gets(server)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] >= 1
    assert [r.status for r in records] == [200, 200]
    # Both answers carried the object from byte 0; the output is still exactly the image.
    assert records[0].body_bytes == offset
    assert records[1].body_bytes == image.compressed_size


def test_if_range_falls_back_to_last_modified_without_an_etag(
    image: SampleImage, frame_starts: list[int], target: Path
) -> None:
    offset = mid_frame(frame_starts, 1_900_000)
    run, server = stream_from(image, target, Fault.reset_at(offset), etag=None)
    records = gets(server)

    assert_succeeded(run, target, image)
    assert [r.if_range for r in records] == [None, server.last_modified]
    assert [r.status for r in records] == [206, 206]


# -- throttling and errors --------------------------------------------------------------------


class RequestClock:
    """Stamps each request record of a server with the (monotonic) time it first appeared."""

    def __init__(self, server: RangeServer) -> None:
        self._server = server
        self.stamps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            seen = len(self._server.requests)
            now = time.monotonic()
            self.stamps.extend([now] * (seen - len(self.stamps)))
            time.sleep(0.005)

    def __enter__(self) -> RequestClock:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


@pytest.mark.parametrize("code", [429, 503])
def test_throttling_with_retry_after_is_honoured(
    image: SampleImage, target: Path, code: int
) -> None:
    plan = FaultPlan([Fault.status(code, retry_after="1")])
    with RangeServer(image.path, faults=plan) as server, RequestClock(server) as clock:
        run = stream(server.url, target, image)
        records = gets(server)

    result = assert_succeeded(run, target, image)
    # Throttled before the transfer started: a retried request, not a resume.
    assert result["resumes"] == 0
    assert "retrying the request" in run.stderr
    assert [r.status for r in records] == [code, 206]
    # The next request waited for Retry-After: 1, not for the 0.05 s backoff (loosely).
    assert len(clock.stamps) == 2
    assert clock.gaps()[0] >= 0.8


def test_without_retry_after_the_backoff_is_short(image: SampleImage, target: Path) -> None:
    # The control for the test above: the clock does tell a 1 s wait from the backoff.
    plan = FaultPlan([Fault.status(503)])
    with RangeServer(image.path, faults=plan) as server, RequestClock(server) as clock:
        run = stream(server.url, target, image)
        records = gets(server)

    assert_succeeded(run, target, image)
    assert [r.status for r in records] == [503, 206]
    assert clock.gaps()[0] < 0.8


def test_retry_after_http_date_is_honoured(image: SampleImage, target: Path) -> None:
    when = formatdate(time.time() + 2, usegmt=True)  # 1-2 s away, whole seconds
    plan = FaultPlan([Fault.status(503, retry_after=when)])
    with RangeServer(image.path, faults=plan) as server, RequestClock(server) as clock:
        run = stream(server.url, target, image)

    assert_succeeded(run, target, image)
    assert clock.gaps()[0] >= 0.5


def test_invalid_retry_after_falls_back_to_backoff(image: SampleImage, target: Path) -> None:
    faults = [Fault.status(503, retry_after="soon"), Fault.status(429, retry_after="1.5")]
    run, server = stream_from(image, target, *faults)
    records = gets(server)

    assert_succeeded(run, target, image)
    assert [r.status for r in records] == [503, 429, 206]


@pytest.mark.parametrize("code", [404, 403])
def test_client_errors_fail_at_once(image: SampleImage, target: Path, code: int) -> None:
    run, server = stream_from(image, target, *[Fault.status(code)] * 3)
    records = gets(server)

    result = assert_failed(run, 3, str(code))
    assert result["reason"] == "HTTPError"
    assert len(records) == 1
    assert_file_target_invalid(target)


def test_server_errors_beyond_max_retries_give_up(image: SampleImage, target: Path) -> None:
    run, server = stream_from(image, target, *[Fault.status(500)] * 10, max_retries=2)
    records = gets(server)

    assert_failed(run, 3, "giving up", "500")
    assert len(records) == 3
    assert_file_target_invalid(target)


def test_repeated_resets_beyond_max_retries_give_up(image: SampleImage, target: Path) -> None:
    run, server = stream_from(image, target, *[Fault.reset(after=0)] * 10, max_retries=3)
    records = gets(server)

    result = assert_failed(run, 3, "giving up")
    assert result["reason"] == "RetriesExhausted"
    assert len(records) == 4  # the first attempt and 3 retries
    assert_file_target_invalid(target)


def test_resets_after_progress_give_up_only_after_retries_without_progress(
    image: SampleImage, target: Path
) -> None:
    # First a reset after 1.5 MiB (progress), then nothing but resets before any byte.
    faults = [Fault.reset_at(MIB + MIB // 2), *[Fault.reset(after=0)] * 10]
    run, server = stream_from(image, target, *faults, max_retries=2)
    records = gets(server)

    assert_failed(run, 3, "giving up")
    assert len(records) == 1 + 2
    assert range_start(records[-1]) > 0  # it had resumed past byte 0 before giving up
    assert_file_target_invalid(target)


@pytest.mark.timeout(30)
def test_repeated_empty_206_bodies_are_bounded(image: SampleImage, target: Path) -> None:
    run, server = stream_from(image, target, *[Fault.empty()] * 50, max_retries=3)
    records = gets(server)

    assert_failed(run, 3, "giving up")
    assert len(records) == 4
    assert all(r.status == 206 and r.body_bytes == 0 for r in records)
    assert_file_target_invalid(target)


# -- the object changes or the server lies ----------------------------------------------------


@pytest.mark.parametrize("content", [True, False])
def test_a_changed_object_fails_with_source_changed(
    image: SampleImage, frame_starts: list[int], target: Path, content: bool
) -> None:
    offset = mid_frame(frame_starts, 1_800_000)
    plan = FaultPlan([Fault.reset_at(offset), Fault.change(content=content)])
    with RangeServer(image.path, faults=plan) as server:
        first_etag = server.etag
        run = stream(server.url, target, image)
        records = gets(server)

    result = assert_failed(run, 3, "source changed")
    assert result["reason"] == "SourceChanged"
    assert records[1].if_range == first_etag
    assert records[1].status == 200  # If-Range no longer matched: the new object, whole
    assert len(records) == 2  # no retry: a changed object does not change back
    assert_file_target_invalid(target)


def test_a_changed_object_invalidates_a_device_target(
    tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    big = write_sample_image(tmp_path / "big.raw.zst", 12 * MIB, seed=5, frames=2)
    device = loop_device_factory(16 * MIB)
    with device.open("r+b") as fh:
        fh.write(b"\xaa" * (16 * MIB))
    # Late in the stream, so several MiB of output were written before the change shows.
    run, _server = stream_from(
        big, device, Fault.reset_at(big.compressed_size - 200_000), Fault.change()
    )

    assert_failed(run, 3, "source changed")
    with device.open("rb") as fh:
        head = fh.read(2 * MIB)
    assert head[:MIB] == bytes(MIB), "the first MiB of a failed device target is not zeroed"
    # The stream had written past the first MiB before it failed (so zeroing was needed).
    assert head[MIB:] != b"\xaa" * MIB


def test_a_changed_object_without_validators_is_caught_by_the_hash(
    image: SampleImage, frame_starts: list[int], target: Path
) -> None:
    # No ETag, no Last-Modified: nothing pins the object, the SHA-384 is the last line.
    offset = mid_frame(frame_starts, 400_000)
    faults = [Fault.reset_at(offset), Fault.change(), Fault.ignore_range()]
    run, server = stream_from(image, target, *faults, etag=None, last_modified=False)
    records = gets(server)

    assert records[1].if_range is None
    # Either the decoder trips over the spliced bytes or the hash does not match.
    assert run.code == 4, run.text
    assert "Traceback" not in run.stderr
    assert run.result()["ok"] is False
    assert_file_target_invalid(target)


@pytest.mark.parametrize("delta", [-1, 1, -4096])
def test_a_range_starting_elsewhere_is_refused(
    image: SampleImage, frame_starts: list[int], target: Path, delta: int
) -> None:
    offset = mid_frame(frame_starts, 2_200_000)
    run, server = stream_from(image, target, Fault.reset_at(offset), Fault.wrong_range_start(delta))
    records = gets(server)

    result = assert_failed(run, 3, "refusing")
    assert result["reason"] == "BadRangeResponse"
    asked = range_start(records[1])
    assert f"byte {asked + delta}" in run.text
    assert len(records) == 2
    assert_file_target_invalid(target)


def test_a_wrong_range_on_the_first_request_is_refused(image: SampleImage, target: Path) -> None:
    run, _server = stream_from(image, target, Fault.wrong_range_start(100))

    assert_failed(run, 3, "refusing")
    assert_file_target_invalid(target)
