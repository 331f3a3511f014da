"""A cancel is honoured at every step until the commit, promptly, and leaves no thread behind.

In-process runs of `run_stream` check the joins (no stage thread alive after it returns or
raises) and the Verifying phase deterministically; the real CLI, interrupted with SIGINT as a
user's Ctrl-C, checks each wait a user can hit: a stalled read, a `Retry-After: 300`, the
read-back of `--verify-after-write`, and a source that blocks before the stream starts (where a
second Ctrl-C stops at once). Each must end with exit 130 within about two seconds, without a
traceback, and with the target invalid or, when nothing was written, unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.cli import imagestream_command, imagestream_env, imagestream_process
from tests.support.interrupts import assert_cancelled, interrupted
from tests.support.range_server import Fault, FaultPlan, RangeServer
from tests.support.targets import (
    MIB,
    assert_file_target_invalid,
    device_plan,
    file_plan,
    fill_pattern,
    read_device,
)

from imagestream.demo.image import SampleImage, write_sample_image
from imagestream.errors import Cancelled, SourceError
from imagestream.pipeline.pipeline import StreamRequest, run_stream
from imagestream.pipeline.progress import Progress
from imagestream.pipeline.range_reader import RetryPolicy
from imagestream.pipeline.sources import SourceOptions

pytestmark = pytest.mark.timeout(90)

#: Longer than any test waits: only a cancel can end these waits in time.
STALL_TIMEOUT = 30.0
#: Where the stalling server stops sending: past the first output buffer written.
STALL_AT = 5 * MIB + 4321


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    path = tmp_path_factory.mktemp("image") / "image.raw.zst"
    return write_sample_image(path, 16 * MIB, seed=21, frames=2)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out / "disk.raw"


def stage_threads() -> list[threading.Thread]:
    """The pipeline's own threads (stages and the cancel watcher) still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("imagestream-")]


def stalling_server(image: SampleImage) -> RangeServer:
    """Serves `image`, but stops sending for a minute after its first STALL_AT bytes."""
    assert image.compressed_size > STALL_AT + MIB
    return RangeServer(image.path, faults=FaultPlan([Fault.stall(STALL_AT, seconds=60)]))


def slow_policy() -> SourceOptions:
    return SourceOptions(policy=RetryPolicy(stall_timeout=STALL_TIMEOUT, backoff_base=0.05))


# -- in-process: joins, and the Verifying phase ------------------------------------------------


def test_a_cancel_during_a_stalled_read_joins_every_stage(image: SampleImage, target: Path) -> None:
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def cancel_once_stalled(progress: Progress) -> None:
        # What came before the stall arrived (less what the reader holds back), then nothing:
        # the fetch stage sits in a read the server never answers.
        if progress.bytes_fetched >= STALL_AT - MIB and not cancelled_at:
            cancelled_at.append(time.monotonic() + 0.5)
            threading.Timer(0.5, cancel.set).start()

    with stalling_server(image) as server:
        request = StreamRequest(
            server.url, file_plan(target), image.sha384, source_options=slow_policy(), cancel=cancel
        )
        with pytest.raises(Cancelled) as caught:
            run_stream(request, cancel_once_stalled)
        ended = time.monotonic()
        alive = stage_threads()

    assert cancelled_at, "the stream never reached the stall"
    assert ended - cancelled_at[0] < 1.0
    assert alive == [], f"threads outlived run_stream: {alive}"
    # A file target keeps its previous file (here: none): nothing of it was left invalid.
    assert f"; no file was created at {target}" in caught.value.message
    assert_file_target_invalid(target)


def test_no_stage_thread_outlives_a_stream_that_succeeded(image: SampleImage, target: Path) -> None:
    with RangeServer(image.path) as server:
        result = run_stream(
            StreamRequest(server.url, file_plan(target), image.sha384, cancel=threading.Event())
        )
        alive = stage_threads()

    assert result.verified
    assert alive == []


def test_no_stage_thread_outlives_a_stream_that_failed(image: SampleImage, target: Path) -> None:
    with RangeServer(image.path, faults=FaultPlan([Fault.status(404)])) as server:
        with pytest.raises(SourceError):
            run_stream(
                StreamRequest(server.url, file_plan(target), image.sha384, cancel=threading.Event())
            )
        alive = stage_threads()

    assert alive == []
    assert_file_target_invalid(target)


def test_a_cancel_while_verifying_leaves_the_device_invalid(
    image: SampleImage, loop_device_factory: LoopDeviceFactory
) -> None:
    # Before, a cancel in this phase was ignored: the run restored the header and succeeded.
    device = loop_device_factory(16 * MIB)
    fill_pattern(device, 16 * MIB)
    cancel = threading.Event()

    def cancel_when_verifying(progress: Progress) -> None:
        if progress.phase == "Verifying":
            cancel.set()

    request = StreamRequest(
        str(image.path), device_plan(device), image.sha384, verify_after_write=True, cancel=cancel
    )
    with pytest.raises(Cancelled) as caught:
        run_stream(request, cancel_when_verifying)

    assert "while verifying" in caught.value.message
    assert "the target was left invalid" in caught.value.message
    assert read_device(device, MIB) == bytes(MIB)
    assert stage_threads() == []


# -- the real CLI and a real Ctrl-C ---------------------------------------------------------------


def progress_records(process: subprocess.Popen[str]) -> Iterator[dict[str, object]]:
    """The JSON progress lines as they come (`--progress json`); fails on the final result."""
    assert process.stdout is not None
    for line in process.stdout:
        record = json.loads(line)
        if record["event"] != "progress":
            pytest.fail(f"the stream ended before it was interrupted: {record}")
        yield record
    pytest.fail("the stream ended before it was interrupted")


def stream_args(source: str, target: Path, image: SampleImage, *extra: str) -> list[str]:
    return [
        "stream",
        source,
        str(target),
        "--sha384",
        image.sha384,
        "--progress",
        "json",
        "--stall-timeout",
        str(STALL_TIMEOUT),
        "--retry-backoff",
        "0.05",
        *extra,
    ]


def test_ctrl_c_during_a_stalled_read(image: SampleImage, target: Path) -> None:
    with (
        stalling_server(image) as server,
        imagestream_process(*stream_args(server.url, target, image)) as process,
    ):
        for record in progress_records(process):
            if int(str(record["bytesFetched"])) >= STALL_AT - MIB:
                break
        time.sleep(0.5)  # well inside the stall
        seconds, stdout, stderr = interrupted(process)

    assert_cancelled(process, seconds, stdout, stderr, f"no file was created at {target}")
    assert_file_target_invalid(target)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_a_retry_after_wait(
    image: SampleImage, target: Path, sig: signal.Signals
) -> None:
    # SIGTERM: what the kubelet sends a superseded agent, whose grace period is far below 300 s.
    plan = FaultPlan([Fault.status(503, retry_after="300")])
    with (
        RangeServer(image.path, faults=plan) as server,
        imagestream_process(*stream_args(server.url, target, image)) as process,
    ):
        deadline = time.monotonic() + 20
        while not server.requests:
            assert time.monotonic() < deadline, "no request reached the server"
            time.sleep(0.02)
        time.sleep(0.5)  # the CLI now waits out the 300 s it was asked to
        seconds, stdout, stderr = interrupted(process, sig=sig)
        requests = len(server.requests)

    assert_cancelled(process, seconds, stdout, stderr, "nothing was written")
    assert requests == 1
    assert_file_target_invalid(target)


def test_ctrl_c_while_verifying_a_device(
    tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    # Large enough that reading back and hashing it lasts about a second on a busy machine.
    size = 384 * MIB
    big = write_sample_image(tmp_path / "big.raw.zst", size, seed=22)
    device = loop_device_factory(size + 16 * MIB)
    fill_pattern(device, 2 * MIB)
    with imagestream_process(
        *stream_args(str(big.path), device, big, "--verify-after-write")
    ) as process:
        for record in progress_records(process):
            if record["phase"] == "Verifying":
                break
        seconds, stdout, stderr = interrupted(process)

    assert_cancelled(process, seconds, stdout, stderr, "while verifying", "left invalid")
    assert read_device(device, MIB) == bytes(MIB)


def test_a_second_ctrl_c_stops_at_once(image: SampleImage, tmp_path: Path, target: Path) -> None:
    # Opening a FIFO waits for a writer; nothing but a signal that raises ends that wait.
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    with imagestream_process(*stream_args(str(fifo), target, image)) as process:
        time.sleep(1.0)
        seconds, stdout, stderr = interrupted(process, times=2)

    assert_cancelled(
        process,
        seconds,
        stdout,
        stderr,
        "stopped at once",
        "nothing was written, the target is unchanged",
    )
    assert_file_target_invalid(target)


def test_ctrl_c_on_a_shell_pipeline_is_a_cancel_not_a_truncated_image(
    image: SampleImage, target: Path, tmp_path: Path
) -> None:
    """`slow-writer | imagestream stream /dev/stdin ...` and Ctrl-C: the terminal sends SIGINT
    to the whole pipeline, so the writer dies too and the pipe ends early. That EOF is the
    cancel's doing: the result is Cancelled (exit 130), never TruncatedStream (exit 4)."""
    writer = tmp_path / "writer.py"
    writer.write_text(
        "import sys, time\n"
        f"data = open({str(image.path)!r}, 'rb').read()\n"
        "sys.stdout.buffer.write(data[: len(data) // 2]); sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    stream = imagestream_command(
        "stream", "/dev/stdin", target, "--sha384", image.sha384, "--progress", "json"
    )
    command = f"exec 2>'{tmp_path / 'stderr'}'; python3 '{writer}' 2>/dev/null | " + " ".join(
        f"'{part}'" for part in stream
    )
    with subprocess.Popen(
        ["bash", "-c", command],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=imagestream_env(),
    ) as shell:
        assert shell.stdout is not None
        for line in shell.stdout:  # the first progress line: half the image is in the pipe
            assert json.loads(line)["event"] == "progress", line
            break
        time.sleep(0.5)
        os.killpg(shell.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        rest = shell.stdout.read()
        shell.wait(timeout=30)
    result = json.loads(rest.strip().splitlines()[-1])
    stderr = (tmp_path / "stderr").read_text()
    assert (result["outcome"], result["reason"], result["exitCode"]) == (
        "Cancelled",
        "Cancelled",
        130,
    ), stderr
    assert "Traceback" not in stderr
    assert_file_target_invalid(target)
