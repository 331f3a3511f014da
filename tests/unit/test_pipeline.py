"""run_stream's orchestration: cancellation, a failing progress consumer, pipes as sources."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from tests.support.targets import file_plan

from imagestream.demo.image import SampleImage, write_sample_image
from imagestream.errors import Cancelled
from imagestream.pipeline.pipeline import StreamRequest, run_stream
from imagestream.pipeline.progress import Progress

MIB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> SampleImage:
    return write_sample_image(tmp_path / "image.zst", 16 * MIB, seed=3)


def _feed_fifo(fifo: Path, data: bytes, stop: threading.Event) -> threading.Thread:
    """Write `data` into the FIFO, then hold it open (no EOF) until `stop`."""

    def writer() -> None:
        with fifo.open("wb") as pipe:
            pipe.write(data)
            pipe.flush()
            stop.wait(30)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


def test_pipe_source_streams_without_a_known_size(image: SampleImage, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()
    stop.set()  # close the pipe right after writing: a normal end of stream
    writer = _feed_fifo(fifo, image.path.read_bytes(), stop)
    seen: list[Progress] = []
    target = tmp_path / "out.img"
    result = run_stream(StreamRequest(str(fifo), file_plan(target), image.sha384), seen.append)
    writer.join()
    assert result.verified
    assert result.bytes_written == image.raw_size
    assert all(p.bytes_total is None for p in seen)
    assert seen[-1].phase == "Succeeded"


def test_cancel_mid_stream_leaves_no_target(image: SampleImage, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()
    data = image.path.read_bytes()
    writer = _feed_fifo(fifo, data[: len(data) // 2], stop)
    cancel = threading.Event()
    target = tmp_path / "out.img"

    def cancel_once_writing(progress: Progress) -> None:
        if progress.bytes_written:
            cancel.set()

    request = StreamRequest(str(fifo), file_plan(target), image.sha384, cancel=cancel)
    with pytest.raises(Cancelled) as excinfo:
        run_stream(request, cancel_once_writing)
    stop.set()
    writer.join()
    assert excinfo.value.exit_code == 130
    assert not target.exists()
    assert not (tmp_path / ".out.img.partial").exists()


def test_failing_progress_consumer_stops_the_stream(image: SampleImage, tmp_path: Path) -> None:
    class ConsumerBroke(Exception):
        pass

    def broken(_progress: Progress) -> None:
        raise ConsumerBroke

    target = tmp_path / "out.img"
    with pytest.raises(ConsumerBroke):
        run_stream(StreamRequest(str(image.path), file_plan(target), image.sha384), broken)
    assert not target.exists()
    assert not (tmp_path / ".out.img.partial").exists()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("imagestream-")]
    assert alive == []
