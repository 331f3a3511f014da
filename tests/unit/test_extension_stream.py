"""`stream_target` around the pipeline for an extension: the already-current check and the record.

The pipeline is stood in by a function that must not be called when the image is current (the
CLI and agent tests run the real one); the files, their xattrs and the hashing are real.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from imagestream.errors import Cancelled, TargetError
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamRequest, StreamResult
from imagestream.pipeline.progress import ProgressCallback
from imagestream.targets import target_from_argument
from imagestream.targets.extension import RECORD_XATTR, Record, record_commit
from imagestream.targets.stream import stream_target

CONTENT = b"an extension image " * 100_000
FETCHED = hashlib.sha384(b"the compressed bytes").hexdigest()


def never(request: StreamRequest, on_progress: ProgressCallback | None) -> StreamResult:
    raise AssertionError("the pipeline ran for an image already current")


def committed(host: Path) -> StreamRequest:
    """A request for sysext:tools whose image is in place with the record of its commit."""
    request = StreamRequest(
        source="unused", target=target_from_argument("sysext:tools", host_root=host), sha384=FETCHED
    )
    request.target.path.parent.mkdir(parents=True)
    request.target.path.write_bytes(CONTENT)
    record_commit(request.target, FETCHED, "zstd")
    return request


def test_the_record_names_both_hashes_and_an_identical_image_is_current(tmp_path: Path) -> None:
    request = committed(tmp_path)
    record = Record.decode(os.getxattr(request.target.path, RECORD_XATTR))
    assert record == Record(FETCHED, hashlib.sha384(CONTENT).hexdigest(), "zstd")

    outcome = stream_target(request, stream=never)

    assert outcome.already_current
    assert (outcome.result.sha384, outcome.result.compression) == (FETCHED, Compression.ZSTD)
    assert outcome.headline == f"{request.target.path} is already current, not rewritten"


def test_a_cancel_while_checking_writes_nothing(tmp_path: Path) -> None:
    request = committed(tmp_path)
    cancel = threading.Event()
    cancel.set()
    cancelled = StreamRequest(
        source=request.source, target=request.target, sha384=FETCHED, cancel=cancel
    )

    with pytest.raises(Cancelled) as excinfo:
        stream_target(cancelled, stream=never)

    assert "nothing was written, the target is unchanged" in excinfo.value.message
    assert request.target.path.read_bytes() == CONTENT


@pytest.mark.parametrize(
    "value",
    [
        Record(FETCHED, hashlib.sha384(CONTENT).hexdigest(), "lz4").encode(),  # not ours
        Record(FETCHED, hashlib.sha384(b"other").hexdigest(), "zstd").encode(),  # changed
        b"garbage",
    ],
)
def test_a_record_that_does_not_hold_means_streaming(value: bytes, tmp_path: Path) -> None:
    request = committed(tmp_path)
    os.setxattr(request.target.path, RECORD_XATTR, value)
    ran: list[StreamRequest] = []

    def pipeline(req: StreamRequest, on_progress: ProgressCallback | None) -> StreamResult:
        ran.append(req)
        raise Cancelled("stand-in: stop here")

    with pytest.raises(Cancelled):
        stream_target(request, stream=pipeline)
    assert ran == [request]


def test_a_mistyped_host_root_is_not_populated(tmp_path: Path) -> None:
    target = target_from_argument("sysext:tools", host_root=tmp_path / "hots")
    request = StreamRequest(source="unused", target=target, sha384=FETCHED)

    with pytest.raises(TargetError) as excinfo:
        stream_target(request, stream=never)

    assert excinfo.value.reason == "TargetNotFound"
    assert "is the host root right?" in excinfo.value.message
    assert list(tmp_path.iterdir()) == []
