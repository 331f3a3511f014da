"""What a stream left on its target: bytes as the disk holds them, SHA-384s, the staging file.

Reads go past the page cache (``POSIX_FADV_DONTNEED`` first, then ``pread``), so a test sees
what the file or device really holds now, not what this process's cache remembers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from imagestream.pipeline.target_plan import TargetPlan
from imagestream.targets import TargetRequest, plan_target

MIB = 1 << 20
_CHUNK = 8 * MIB


def file_plan(path: Path, **options: object) -> TargetPlan:
    """The plan of a file target at `path`, as the CLI would make it for a non-device path."""
    return plan_target(TargetRequest(kind="file", path=path, **options))  # type: ignore[arg-type]


def device_plan(path: Path, **options: object) -> TargetPlan:
    """The plan of a device target at `path`, as the agent makes it for `spec.target.device`."""
    return plan_target(TargetRequest(kind="device", path=path, **options))  # type: ignore[arg-type]


def staging_path(target: Path) -> Path:
    """The ``.NAME.partial`` file a file target is written to, renamed into place when verified."""
    return target.with_name(f".{target.name}.partial")


def assert_file_target_invalid(target: Path) -> None:
    """After a failure neither the file target nor its staging file exists."""
    assert not target.exists(), f"{target} exists after a failure"
    assert not staging_path(target).exists(), f"{staging_path(target)} left behind"


def _uncached_chunks(path: Path, length: int | None, offset: int) -> Iterator[bytes]:
    """The bytes of ``path`` from ``offset``: ``length`` of them, or up to the end; fewer at EOF."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        done = 0
        while length is None or done < length:
            size = _CHUNK if length is None else min(_CHUNK, length - done)
            chunk = os.pread(fd, size, offset + done)
            if not chunk:
                return
            yield chunk
            done += len(chunk)
    finally:
        os.close(fd)


def read_device(path: Path, length: int, offset: int = 0) -> bytes:
    """Read ``length`` bytes at ``offset`` of a device (or file) as it holds them now.

    Returns fewer bytes only when the device ends first.
    """
    return b"".join(_uncached_chunks(path, length, offset))


def sha384_of(path: Path, length: int | None = None) -> str:
    """SHA-384 of the first ``length`` bytes of a file or device, or of all of it.

    Fails when the file or device is shorter than ``length``.
    """
    digest = hashlib.sha384()
    seen = 0
    for chunk in _uncached_chunks(path, length, 0):
        digest.update(chunk)
        seen += len(chunk)
    if length is not None and seen < length:
        raise AssertionError(f"{path} ended {length - seen} bytes short of {length}")
    return digest.hexdigest()


#: Neither zeros nor anything a sample image holds: what a device is filled with before a test.
PATTERN = bytes(range(256)) * (MIB // 256)


def fill_pattern(dev: Path, size: int) -> bytes:
    """Fill the first ``size`` bytes of ``dev`` with :data:`PATTERN` (synced); return them."""
    content = (PATTERN * (size // MIB + 1))[:size]
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, content, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return content
