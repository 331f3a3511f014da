"""Where the output goes: the planned block device or regular file, never left looking valid early.

The first MiB is held back and written as zeros until the image verified (the coreos-installer
approach), so an interrupted or failed write leaves a target no bootloader or blkid mistakes for
a good one; on a whole disk the backup GPT area at its end is held back the same way. A file
target is written under a staging name and renamed into place only at the end.

Opening executes a `TargetPlan` and verifies, on the descriptor it opened, that the target is
of the planned kind: a planned device is never created and a planned file never opens a device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imagestream.errors import TargetError
from imagestream.pipeline.safety import check_block_device, is_whole_disk, logical_block_size
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason

log = logging.getLogger(__name__)

#: The clauses of `Aftermath.clause` that tests and callers look for.
LEFT_INVALID = "the target was left invalid"
UNCHANGED = "nothing was written, the target is unchanged"

HEADER_SIZE = 1 << 20
#: A GPT's backup copy: its header in the disk's last sector, its 128 entries in the 32 before.
BACKUP_GPT_SECTORS = 33
_ALIGN = 4096
_READ_BACK = 4 << 20
#: Attempts at replacing a stale staging file before giving up (each race means a live writer).
_STAGING_ATTEMPTS = 3


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
        """Write the held-back bytes (first MiB, backup GPT area) for real and make them durable."""
        ...

    def sha384_on_disk(self, length: int, checkpoint: Callable[[int], None]) -> str:
        """Hash what the target will hold once the held bytes are written: those from memory,
        the rest read back from the target, bypassing the page cache.

        `checkpoint(done)` runs before each chunk with the bytes hashed so far (progress); it
        raises to stop the read (a cancel).
        """
        ...

    def publish(self) -> None:
        """Make a verified target visible (rename for files)."""
        ...

    def invalidate(self) -> Aftermath:
        """Leave the target unmistakably invalid, or as it was; never raises. Says which."""
        ...


@dataclass(frozen=True)
class Aftermath:
    """What a stream that did not commit left on its target, as the sink reports it.

    The one rule every failure's message follows: its last clause is `clause()`, so a message
    says "left invalid" exactly when bytes reached the target and were zeroed again.
    """

    name: str
    #: Bytes reached the target itself (a device; a file target only ever writes its staging).
    written: bool
    #: A file target: its staging file was written (and removed), the previous file kept.
    staged: bool = False
    #: A file target: a file (or link) was there before, and still is.
    existed: bool = True
    #: Why the target could not be made invalid (or the staging file not removed).
    failure: str | None = None

    def clause(self) -> str:
        """The words that end a failure's message."""
        if self.written:
            if self.failure is None:
                return LEFT_INVALID
            return (
                f"the target {self.name} could NOT be invalidated ({self.failure}): it may "
                "still look valid, do not boot from it"
            )
        if not self.staged:
            said = UNCHANGED
        elif self.existed:
            said = f"{self.name} is unchanged"
        else:
            said = f"no file was created at {self.name}"
        return f"{said}; {self.failure}" if self.failure else said


@dataclass
class _Held:
    """Output bytes of [start, start + size) kept in memory, and on the target as zeros, until
    the image verified."""

    start: int
    size: int
    data: mmap.mmap
    #: Bytes of the range the output has reached so far.
    filled: int = 0

    @property
    def end(self) -> int:
        return self.start + self.size


class DescriptorSink:
    """What every sink does with its one open descriptor: fsync it and close it."""

    def __init__(self, plan: TargetPlan, path: Path, fd: int) -> None:
        self.plan = plan
        self.path = path
        self._fd = fd

    def flush(self) -> None:
        """fsync the descriptor."""
        with target_io(f"fsync of {self.plan.name}"):
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the descriptor (which drops the lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _FdSink(DescriptorSink):
    """Sequential writes to one descriptor, with O_DIRECT where it is accepted."""

    def __init__(
        self, plan: TargetPlan, path: Path, fd: int, capacity: int | None, held: list[_Held]
    ) -> None:
        super().__init__(plan, path, fd)
        self.capacity = capacity
        self.written = 0
        #: Set before the first byte goes to the target, whichever range it lands in.
        self.touched = False
        self._direct = plan.direct_io and try_direct(fd, plan.name)
        self._held = held
        self._zeros = mmap.mmap(-1, max(r.size for r in held))

    def write(self, data: memoryview) -> None:
        """Write at the current end; bytes inside a held range go to memory, zeros to the target."""
        if not self.touched and len(data):
            self.touched = True
            self._begin()
        while len(data):
            held = self._held_at(self.written)
            if held is not None:
                n = min(len(data), held.end - self.written)
                offset = self.written - held.start
                held.data[offset : offset + n] = data[:n]
                held.filled = offset + n
                self._write_all(memoryview(self._zeros)[:n])
            else:
                n = min(len(data), self._next_held(self.written) - self.written)
                self._write_all(data[:n])
            data = data[n:]

    def _begin(self) -> None:
        """Before the first byte: invalidate whatever lies in the held ranges beyond the first
        write (the backup GPT area of a whole disk)."""
        later = [r for r in self._held if r.start > 0]
        if not later:
            return
        direct = self._direct
        with target_io(f"zeroing the backup GPT area of {self.plan.name}"):
            self._set_direct(False)
            for held in later:
                pwrite_all(self._fd, memoryview(self._zeros)[: held.size], held.start)
            # Durable before any image byte lands: the old backup table must not outlive it.
            os.fsync(self._fd)
            self._set_direct(direct)

    def _held_at(self, offset: int) -> _Held | None:
        return next((r for r in self._held if r.start <= offset < r.end), None)

    def _next_held(self, offset: int) -> int:
        starts = [r.start for r in self._held if r.start > offset]
        return min(starts, default=1 << 62)

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
        full = exc.errno in (errno.ENOSPC, errno.EFBIG)
        if full and self.plan.kind == "device" and self.written < (self.capacity or 0):
            # The device has room on paper: what ran out is behind it.
            return TargetError(
                f"writing {self.plan.name} failed at byte {self.written} of its "
                f"{self.capacity}: no space left on the device's backing store (a "
                "thin-provisioned, loop-backed or network device out of space)",
                reason=Reason.WRITE_FAILED,
            )
        if full:
            return TargetError(
                f"target {self.plan.name} is full after {self.written} bytes: the image is "
                "larger than the target",
                reason=Reason.TARGET_TOO_SMALL,
            )
        return TargetError(
            f"writing {self.plan.name} failed at byte {self.written}: {exc.strerror}",
            reason=Reason.WRITE_FAILED,
        )

    def _set_direct(self, on: bool) -> None:
        set_direct(self._fd, on)
        self._direct = on

    def restore_header(self) -> None:
        """Write the held bytes where they belong, then fsync."""
        with target_io(f"writing the held-back bytes (first MiB) of {self.plan.name}"):
            self._set_direct(False)
            for held in self._held:
                pwrite_all(self._fd, memoryview(held.data)[: held.filled], held.start)
        self.flush()

    def sha384_on_disk(self, length: int, checkpoint: Callable[[int], None]) -> str:
        """Hash the first `length` bytes as they will be: held ones from memory, the rest as
        the target returns them (not as the page cache holds them).

        The held bytes stay zeros on the target meanwhile, so a kill during a long read-back
        leaves it invalid. `checkpoint(done)` runs before each chunk with the bytes hashed so
        far (a cancel raises there).
        """
        self.flush()
        digest = hashlib.sha384()
        with target_io(f"reading back {self.plan.name}"):
            self._set_direct(False)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            offset = 0
            while offset < length:
                checkpoint(offset)
                held = self._held_at(offset)
                if held is not None:
                    n = min(length, held.end) - offset
                    digest.update(memoryview(held.data)[offset - held.start :][:n])
                else:
                    n = min(length, self._next_held(offset), offset + _READ_BACK) - offset
                    chunk = os.pread(self._fd, n, offset)
                    if not chunk:
                        break  # shorter than written: the digest will not match
                    n = len(chunk)
                    digest.update(chunk)
                offset += n
        return digest.hexdigest()

    def _zero_held(self) -> str | None:
        """Zero what of the held ranges the output reached; why not, when that fails."""
        if not self.touched:
            return None
        try:
            self._set_direct(False)
            for held in self._held:
                size = held.size if held.start else held.filled
                pwrite_all(self._fd, memoryview(self._zeros)[:size], held.start)
            os.fsync(self._fd)
        except OSError as exc:
            log.error("could not zero the first MiB of %s: %s", self.plan.name, exc.strerror)
            return f"zeroing its first MiB failed: {exc.strerror}"
        return None


class BlockDeviceSink(_FdSink):
    """A whole disk or a partition, opened exclusively and flock'ed."""

    def publish(self) -> None:
        """The held bytes were restored in place: release the device (and its lock)."""
        self.close()

    def invalidate(self) -> Aftermath:
        """Zero the held ranges again (they may have been restored before a later step failed)."""
        failure = self._zero_held()
        self.close()
        return Aftermath(self.plan.name, written=self.touched, failure=failure)


class FileSink(_FdSink):
    """A regular file written as `.NAME.partial` beside it and renamed into place.

    Every name is looked up relative to the directory descriptor opened at the start, so a
    directory swapped for a link meanwhile does not move the write.
    """

    def __init__(
        self,
        plan: TargetPlan,
        location: tuple[int, Path, str, str],
        fd: int,
        capacity: int | None,
        *,
        existed: bool,
    ) -> None:
        dir_fd, directory, name, staging = location
        self._existed = existed
        super().__init__(plan, directory / name, fd, capacity, [_held_header()])
        self._dir_fd = dir_fd
        self._name = name
        self._staging = staging

    def publish(self) -> None:
        """Rename the staging file over the target and make the rename durable."""
        with target_io(f"renaming {self._staging} to {self.plan.name}"):
            os.rename(self._staging, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            os.fsync(self._dir_fd)
        self._close_all()

    def invalidate(self) -> Aftermath:
        """Remove the staging file, still holding its lock; a previous target is untouched."""
        failure = None
        try:
            if _same_file(self._fd, self._dir_fd, self._staging):
                os.unlink(self._staging, dir_fd=self._dir_fd)
        except OSError as exc:
            failure = f"its partial copy {self._staging} could not be removed: {exc.strerror}"
        self._close_all()
        return Aftermath(
            self.plan.name,
            written=False,
            staged=self.touched,
            existed=self._existed,
            failure=failure,
        )

    def _close_all(self) -> None:
        self.close()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def open_sink(plan: TargetPlan) -> BlockDeviceSink | FileSink:
    """Open the planned device or file for writing, locked against other writers, and check it.

    A `disk` plan is opened by `disk_sink.open_disk_sink`, which writes regions, not a stream.
    """
    if plan.kind == "disk":
        raise ValueError("a disk plan is opened by disk_sink.open_disk_sink")
    if plan.kind == "device":
        return _open_device(plan)
    return _open_file(plan)


# -- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedDevice:
    """A block device opened for writing: exclusive, checked, locked, at its start."""

    fd: int
    device: tuple[int, int]
    path: Path
    capacity: int


def _open_device(plan: TargetPlan) -> BlockDeviceSink:
    opened = open_block_device(plan)
    try:
        held = [_held_header()]
        if is_whole_disk(opened.device, plan.host) and opened.capacity > HEADER_SIZE:
            sector = logical_block_size(opened.device, plan.host)
            held.append(_held_backup_gpt(opened.capacity, sector))
    except BaseException:
        os.close(opened.fd)
        raise
    return BlockDeviceSink(plan, opened.path, opened.fd, opened.capacity, held)


def open_block_device(plan: TargetPlan) -> OpenedDevice:
    """Open the planned block device exclusively, check it on the descriptor and lock it."""
    # A look before the open, only so that nothing but a block device is ever opened (opening
    # some character devices has effects); the descriptor's own fstat below is what counts.
    looked = _expect_block_device(_stat_target(plan), plan)
    try:
        # O_EXCL on a block device makes the kernel refuse it while mounted or claimed.
        fd = os.open(plan.path, os.O_RDWR | os.O_EXCL | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY and plan.usage_checks:
            # Refused either way; the checks only say by whom (mounted where, held by what).
            rdev = looked.st_rdev
            check_block_device((os.major(rdev), os.minor(rdev)), plan.name, plan.host)
        if exc.errno == errno.EBUSY and plan.usage_checks:
            # Not mounted, not swap, no holder: what remains is another exclusive opener.
            raise TargetError(
                f"target {plan.name} is locked: another imagestream is writing it (or another "
                "process holds it open exclusively); wait for it to finish",
                reason=Reason.TARGET_LOCKED,
            ) from exc
        raise _open_error(exc, plan) from exc
    try:
        rdev = _expect_block_device(os.fstat(fd), plan).st_rdev
        device = (os.major(rdev), os.minor(rdev))
        if plan.usage_checks:
            check_block_device(device, plan.name, plan.host)
        _lock(fd, plan.name)
        capacity = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except BaseException:
        os.close(fd)
        raise
    return OpenedDevice(fd, device, opened, capacity)


def _held_backup_gpt(capacity: int, sector: int) -> _Held:
    # The disk's own backup GPT sits in its last sectors, where an image smaller than the disk
    # never writes: zeroed at the start, those sectors stay zeros after the commit (the
    # image's backup table lies at the image's end, where its primary header points to). Only
    # an image reaching the disk's end gets its own bytes there, and only once it verified.
    start = max(capacity - BACKUP_GPT_SECTORS * sector, HEADER_SIZE)
    return _Held(start=start, size=capacity - start, data=mmap.mmap(-1, capacity - start))


def _stat_target(plan: TargetPlan) -> os.stat_result:
    try:
        return os.stat(plan.path)
    except FileNotFoundError:
        raise TargetError(
            f"target device {plan.name} does not exist", reason=Reason.TARGET_NOT_FOUND
        ) from None
    except OSError as exc:
        raise TargetError(
            f"cannot look at target {plan.name}: {exc.strerror}", reason=Reason.TARGET_INVALID
        ) from exc


def _expect_block_device(st: os.stat_result, plan: TargetPlan) -> os.stat_result:
    if not stat.S_ISBLK(st.st_mode):
        raise TargetError(
            f"target {plan.name} is {_kind_of(st.st_mode)}, not a block device",
            reason=Reason.TARGET_INVALID,
        )
    return st


def _open_error(exc: OSError, plan: TargetPlan) -> TargetError:
    if exc.errno == errno.EBUSY:
        return TargetError(
            f"target {plan.name} is in use: mounted, claimed by another device, or held open "
            "exclusively by another process (another imagestream); the checks were skipped "
            "(--force), so which is not known",
            reason=Reason.TARGET_IN_USE,
        )
    if exc.errno == errno.ENOENT:
        return TargetError(f"target {plan.name} does not exist", reason=Reason.TARGET_NOT_FOUND)
    return TargetError(f"cannot open target {plan.name}: {exc.strerror}")


# -- files ------------------------------------------------------------------------------------


def _open_file(plan: TargetPlan) -> FileSink:
    name = plan.path.name
    directory = Path(os.path.realpath(plan.path.parent))  # resolved once, then by descriptor
    dir_fd = _open_directory(directory, plan)
    try:
        existed = _check_existing(dir_fd, name, plan)
        staging = f".{name}.partial"
        fd = _create_staging(dir_fd, staging, plan)
        try:
            vfs = os.fstatvfs(fd)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    location = (dir_fd, directory, name, staging)
    return FileSink(plan, location, fd, capacity=vfs.f_bavail * vfs.f_frsize, existed=existed)


def _open_directory(directory: Path, plan: TargetPlan) -> int:
    """A descriptor of the file's directory, reached inside an allowed directory without
    following a link (a component swapped for one since it was resolved is refused)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if not plan.allowed_dirs:
        return _open_dir_path(directory, plan)
    for allowed in plan.allowed_dirs:
        root = Path(os.path.realpath(allowed))
        if directory.is_relative_to(root):
            break
    else:
        allowed_list = ", ".join(str(d) for d in plan.allowed_dirs)
        raise TargetError(
            f"file target {plan.name} is outside the allowed directories ({allowed_list})",
            reason=Reason.TARGET_NOT_ALLOWED,
        )
    fd = _open_dir_path(root, plan)
    try:
        for part in directory.relative_to(root).parts:
            inner = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError as exc:
        os.close(fd)
        raise TargetError(
            f"the directory of file target {plan.name} changed while it was opened "
            f"({exc.strerror}): refusing to follow it",
            reason=Reason.TARGET_NOT_ALLOWED,
        ) from exc
    return fd


def _open_dir_path(directory: Path, plan: TargetPlan) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TargetError(
            f"the directory of file target {plan.name} does not exist",
            reason=Reason.TARGET_NOT_FOUND,
        ) from None
    except OSError as exc:
        raise TargetError(
            f"cannot open the directory of file target {plan.name}: {exc.strerror}",
            reason=Reason.TARGET_INVALID,
        ) from exc


def _check_existing(dir_fd: int, name: str, plan: TargetPlan) -> bool:
    """A file target replaces a regular file (or a link, itself, not what it points to);
    whether there is one."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise TargetError(
            f"file target {plan.name} is {_kind_of(mode)}", reason=Reason.TARGET_INVALID
        )
    return True


def _create_staging(dir_fd: int, staging: str, plan: TargetPlan) -> int:
    """Create the staging file afresh (never through a link) and lock it."""
    create = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_STAGING_ATTEMPTS):
        try:
            fd = os.open(staging, create, 0o644, dir_fd=dir_fd)
        except FileExistsError:
            _remove_stale(dir_fd, staging, plan)
            continue
        except OSError as exc:
            raise TargetError(
                f"cannot create {staging} beside {plan.name}: {exc.strerror}"
            ) from exc
        try:
            _lock(fd, plan.name)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise _locked(plan.name)


def _remove_stale(dir_fd: int, staging: str, plan: TargetPlan) -> None:
    """Remove a staging file left by an earlier run, unless a live writer holds its lock."""
    try:
        fd = os.open(
            staging, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return  # gone meanwhile: try creating it again
    except OSError as exc:
        kind = "a symbolic link" if exc.errno == errno.ELOOP else f"unusable ({exc.strerror})"
        raise TargetError(
            f"the staging name {staging} beside {plan.name} is {kind}; remove it",
            reason=Reason.TARGET_INVALID,
        ) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise TargetError(
                f"the staging name {staging} beside {plan.name} is {_kind_of(mode)}; remove it",
                reason=Reason.TARGET_INVALID,
            )
        _lock(fd, plan.name)
        # Unlinked while its lock is held, and only if the name still is this very file.
        if _same_file(fd, dir_fd, staging):
            os.unlink(staging, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _same_file(fd: int, dir_fd: int, name: str) -> bool:
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


# -- shared -----------------------------------------------------------------------------------


def _held_header() -> _Held:
    return _Held(start=0, size=HEADER_SIZE, data=mmap.mmap(-1, HEADER_SIZE))


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "neither a block device nor a regular file"


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


@contextlib.contextmanager
def target_io(what: str) -> Iterator[None]:
    """Turn an OSError on the target into a TargetError that says what was being done."""
    try:
        yield
    except OSError as exc:
        raise TargetError(f"{what} failed: {exc.strerror}", reason=Reason.WRITE_FAILED) from exc


def _lock(fd: int, name: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise _locked(name) from exc


def _locked(name: str) -> TargetError:
    return TargetError(
        f"target {name} is locked by another imagestream writing it; wait for it to finish",
        reason=Reason.TARGET_LOCKED,
    )


def set_direct(fd: int, on: bool) -> None:
    """Turn O_DIRECT on or off on `fd` (a no-op when it already is so)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if wanted != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)


def try_direct(fd: int, name: str) -> bool:
    """Turn O_DIRECT on; some filesystems (tmpfs) refuse it, then plain writes it is."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        log.info("O_DIRECT refused for %s; writing through the page cache", name)
        return False
    return True
