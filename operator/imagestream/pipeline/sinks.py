"""Where the output goes: a block device or a regular file, never left looking valid early.

The first MiB is held back and written as zeros until the image verified (the coreos-installer
approach), so an interrupted or failed write leaves a target no bootloader or blkid mistakes for
a good one. A file target is written under a staging name and renamed into place only at the end.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from imagestream.errors import TargetError
from imagestream.pipeline.safety import HostView, check_block_device, classify
from imagestream.reasons import Reason

log = logging.getLogger(__name__)

HEADER_SIZE = 1 << 20
_ALIGN = 4096
_READ_BACK = 4 << 20


class Sink(Protocol):
    """The writer stage's view of a target."""

    path: Path
    capacity: int | None

    def write(self, data: memoryview) -> None:
        """Append output bytes."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable."""
        ...

    def restore_header(self) -> None:
        """Write the held-back first MiB for real and make it durable."""
        ...

    def sha384_on_disk(self, length: int, checkpoint: Callable[[], None]) -> str:
        """Read the target back, bypassing the page cache where possible, and hash it.

        `checkpoint` runs before each chunk; it raises to stop the read (a cancel).
        """
        ...

    def publish(self) -> None:
        """Make a verified target visible (rename for files)."""
        ...

    def invalidate(self) -> None:
        """Leave the target unmistakably invalid; never raises."""
        ...


class _FdSink:
    """Sequential writes to one descriptor, with O_DIRECT where it is accepted."""

    def __init__(self, path: Path, fd: int, capacity: int | None, direct: bool) -> None:
        self.path = path
        self.capacity = capacity
        self.written = 0
        self._fd = fd
        self._direct = direct and _try_direct(fd, path)
        self._header = mmap.mmap(-1, HEADER_SIZE)
        self._header_length = 0
        self._zeros = mmap.mmap(-1, HEADER_SIZE)

    def write(self, data: memoryview) -> None:
        """Write at the current end; the part inside the first MiB goes to the held header."""
        if self.written < HEADER_SIZE:
            held = min(len(data), HEADER_SIZE - self.written)
            self._header[self.written : self.written + held] = data[:held]
            self._header_length = self.written + held
            data = data[held:]
            self._write_all(memoryview(self._zeros)[:held])
        if len(data):
            self._write_all(data)

    def _write_all(self, data: memoryview) -> None:
        if self._direct and (len(data) % _ALIGN or self.written % _ALIGN):
            # Only the tail is unaligned: finish it through the page cache.
            self._set_direct(False)
        while len(data):
            try:
                n = os.write(self._fd, data)
            except OSError as exc:
                raise self._write_error(exc) from exc
            if n == 0:
                raise self._write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            self.written += n
            data = data[n:]

    def _write_error(self, exc: OSError) -> TargetError:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            return TargetError(
                f"target {self.path} is full after {self.written} bytes: the image is larger "
                f"than the target",
                reason=Reason.TARGET_TOO_SMALL,
            )
        return TargetError(
            f"writing {self.path} failed at byte {self.written}: {exc.strerror}",
            reason=Reason.WRITE_FAILED,
        )

    def _set_direct(self, on: bool) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        self._direct = on

    def flush(self) -> None:
        """fsync the descriptor."""
        with _target_io(f"fsync of {self.path}"):
            os.fsync(self._fd)

    def restore_header(self) -> None:
        """Write the real first MiB at offset 0, then fsync."""
        with _target_io(f"writing the first MiB of {self.path}"):
            self._set_direct(False)
            header = memoryview(self._header)[: self._header_length]
            done = 0
            while done < len(header):
                done += os.pwrite(self._fd, header[done:], done)
        self.flush()

    def sha384_on_disk(self, length: int, checkpoint: Callable[[], None]) -> str:
        """Hash the first `length` bytes as the device returns them, not as the cache holds them."""
        self.flush()
        digest = hashlib.sha384()
        with _target_io(f"reading back {self.path}"):
            fd = os.open(self.path_on_disk, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                remaining = length
                while remaining:
                    checkpoint()
                    if not (chunk := os.read(fd, min(_READ_BACK, remaining))):
                        break
                    digest.update(chunk)
                    remaining -= len(chunk)
            finally:
                os.close(fd)
        return digest.hexdigest()

    @property
    def path_on_disk(self) -> Path:
        """The path the bytes are written under right now."""
        return self.path

    def _zero_header(self) -> None:
        try:
            self._set_direct(False)
            os.pwrite(self._fd, memoryview(self._zeros)[: self._header_length], 0)
            os.fsync(self._fd)
        except OSError as exc:
            log.error("could not zero the first MiB of %s: %s", self.path, exc.strerror)

    def close(self) -> None:
        """Close the descriptor (which drops the lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BlockDeviceSink(_FdSink):
    """A whole disk or a partition, opened exclusively and flock'ed."""

    def publish(self) -> None:
        """The header was restored in place: release the device (and its lock)."""
        self.close()

    def invalidate(self) -> None:
        """Zero the first MiB again (it may have been restored before a read-back failed)."""
        self._zero_header()
        self.close()


class FileSink(_FdSink):
    """A regular file written as `.NAME.partial` beside it and renamed into place."""

    def __init__(self, path: Path, staging: Path, fd: int, capacity: int | None) -> None:
        super().__init__(path, fd, capacity, direct=True)
        self._staging = staging

    @property
    def path_on_disk(self) -> Path:
        """The staging file until `publish`."""
        return self._staging

    def publish(self) -> None:
        """Rename the staging file over the target and make the rename durable."""
        with _target_io(f"renaming {self._staging} to {self.path}"):
            os.rename(self._staging, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.close()

    def invalidate(self) -> None:
        """Remove the staging file; the previous target, if any, is untouched."""
        self.close()
        try:
            self._staging.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("could not remove %s: %s", self._staging, exc.strerror)


def open_sink(
    path: Path,
    host: HostView | None,
    direct: bool = True,
    allowed_dirs: tuple[Path, ...] = (),
) -> BlockDeviceSink | FileSink:
    """Run the safety checks and open the target for writing, locked against other writers.

    `host=None` skips the mount-table, swap and holder checks (`--force`); the kernel's
    exclusive open and the writer lock apply regardless. A non-empty `allowed_dirs` confines
    file targets to those directories (symlinks resolved).
    """
    if classify(path) == "block":
        return _open_block(path, host, direct)
    if allowed_dirs:
        _check_allowed(path, allowed_dirs)
    return _open_file(path)


def _check_allowed(path: Path, allowed_dirs: tuple[Path, ...]) -> None:
    resolved = path.parent.resolve() / path.name
    if not any(resolved.is_relative_to(d.resolve()) for d in allowed_dirs):
        allowed = ", ".join(str(d) for d in allowed_dirs)
        raise TargetError(
            f"file target {path} is outside the allowed directories ({allowed})",
            reason=Reason.TARGET_NOT_ALLOWED,
        )


def _open_block(path: Path, host: HostView | None, direct: bool) -> BlockDeviceSink:
    if host is not None:
        check_block_device(path, host)
    real = Path(os.path.realpath(path))
    try:
        # O_EXCL on a block device makes the kernel refuse it while mounted or claimed.
        fd = os.open(real, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TargetError(
                f"target {path} is in use by the system (mounted or claimed by another device)",
                reason=Reason.TARGET_IN_USE,
            ) from exc
        raise TargetError(f"cannot open target {path}: {exc.strerror}") from exc
    try:
        _lock(fd, path)
        capacity = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return BlockDeviceSink(real, fd, capacity, direct=direct)


def _open_file(path: Path) -> FileSink:
    staging = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise TargetError(f"cannot create {staging}: {exc.strerror}") from exc
    try:
        # Lock before truncating, so a second writer cannot wipe the first one's data.
        _lock(fd, path)
        os.ftruncate(fd, 0)
        vfs = os.fstatvfs(fd)
    except BaseException:
        os.close(fd)
        raise
    return FileSink(path, staging, fd, capacity=vfs.f_bavail * vfs.f_frsize)


@contextlib.contextmanager
def _target_io(what: str) -> Iterator[None]:
    """Turn an OSError on the target into a TargetError that says what was being done."""
    try:
        yield
    except OSError as exc:
        raise TargetError(f"{what} failed: {exc.strerror}", reason=Reason.WRITE_FAILED) from exc


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise TargetError(
            f"target {path} is locked by another writer; wait for it to finish",
            reason=Reason.TARGET_LOCKED,
        ) from exc


def _try_direct(fd: int, path: Path) -> bool:
    """Turn O_DIRECT on; some filesystems (tmpfs) refuse it, then plain writes it is."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        log.info("O_DIRECT refused for %s; writing through the page cache", path)
        return False
    return True
