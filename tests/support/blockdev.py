"""Real block devices and mounts for tests: loop devices, ext4 file systems, small tmpfs.

All of these need root. Every context manager undoes what it did in ``finally`` (detach, umount),
also when the test body fails. Commands run with ``check=True`` and captured output, and a
failure raises :class:`CommandError` carrying the command, exit status, stdout and stderr.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .tools import require_tool, wait_until

SECTOR_SIZE = 512

#: Type of the ``loop_device_factory`` fixture: ``factory(size_in_bytes)`` -> ``/dev/loopN``.
LoopDeviceFactory = Callable[[int], Path]


class CommandError(RuntimeError):
    """A system command failed; the message includes its stdout and stderr."""

    def __init__(self, error: subprocess.CalledProcessError) -> None:
        self.returncode = error.returncode
        self.cmd = error.cmd
        self.stdout = error.stdout or ""
        self.stderr = error.stderr or ""
        command = " ".join(str(part) for part in error.cmd)
        super().__init__(
            f"`{command}` failed with exit status {error.returncode}\n"
            f"stdout: {self.stdout.strip()}\nstderr: {self.stderr.strip()}"
        )


def run(command: Sequence[str | os.PathLike[str]]) -> str:
    """Run ``command`` (check=True, output captured); return stdout or raise CommandError."""
    try:
        result = subprocess.run(
            [os.fspath(part) for part in command],
            check=True,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.CalledProcessError as exc:
        raise CommandError(exc) from None
    return result.stdout


def loop_backing_file(dev: Path) -> Path | None:
    """Return the backing file of loop device ``dev``, or None if it is not attached."""
    sysfs = Path("/sys/block") / Path(dev).name / "loop" / "backing_file"
    try:
        return Path(sysfs.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        return None


def device_size(dev: Path) -> int:
    """Return the size in bytes of block device ``dev`` (from sysfs, in 512-byte sectors)."""
    sectors = (Path("/sys/block") / Path(dev).name / "size").read_text(encoding="ascii")
    return int(sectors) * SECTOR_SIZE


@contextmanager
def loop_device(size: int, directory: Path, *, sector_size: int | None = None) -> Iterator[Path]:
    """Attach a loop device backed by a new sparse file of ``size`` bytes in ``directory``.

    ``sector_size`` sets its logical sector size (``losetup --sector-size``; default 512).

    Yields the device path (``/dev/loopN``, chosen by ``losetup -f --show``). On exit the device
    is always detached (``losetup -d``, then waiting until the kernel has really let go of the
    file, which is deferred while something still holds the device open) and the backing file
    removed.
    """
    if size <= 0 or size % SECTOR_SIZE:
        raise ValueError(f"loop device size must be a positive multiple of {SECTOR_SIZE}: {size}")
    losetup = require_tool("losetup")
    fd, name = tempfile.mkstemp(prefix="loop-", suffix=".img", dir=directory)
    backing = Path(name).resolve()  # as sysfs reports it
    try:
        os.ftruncate(fd, size)  # sparse: no blocks are allocated until written
    finally:
        os.close(fd)
    try:
        sector = ["--sector-size", str(sector_size)] if sector_size else []
        dev = Path(run([losetup, "-f", "--show", *sector, backing]).strip())
        body_failed = True
        try:
            yield dev
            body_failed = False
        finally:
            run([losetup, "-d", dev])
            _wait_detached(dev, backing, report=not body_failed)
    finally:
        backing.unlink(missing_ok=True)


def _wait_detached(dev: Path, backing: Path, *, report: bool, timeout: float = 10.0) -> None:
    # `losetup -d` only marks a device for detach (autoclear) while something still has it
    # open -- udev's blkid probe on a host, or a file the test forgot to close; wait for the
    # kernel to finish. (The device may be re-attached by another process at once: compare
    # the backing file, not mere attachment.)
    try:
        wait_until(
            lambda: loop_backing_file(dev) != backing,
            timeout,
            what=f"{dev} to be detached from {backing}",
        )
    except TimeoutError:
        if report:
            raise


def mount_points() -> list[str]:
    """Return all mount points listed in /proc/self/mountinfo (octal escapes decoded)."""
    points: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) > 4:
                points.append(_unescape_mountinfo(fields[4]))
    return points


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _umount(mountpoint: Path, body_failed: bool) -> None:
    umount = require_tool("umount")
    try:
        run([umount, mountpoint])
    except CommandError:
        # Busy (a test left a file open?): detach lazily so nothing stays mounted, but only
        # report it when the body itself succeeded, to not mask the original failure.
        run([umount, "-l", mountpoint])
        if not body_failed:
            raise


@contextmanager
def _mounted(mountpoint: Path, *mount_args: str | os.PathLike[str]) -> Iterator[Path]:
    """``mount MOUNT_ARGS... MOUNTPOINT`` (creating it if needed); yield it, always unmount."""
    mount = require_tool("mount")
    mountpoint.mkdir(parents=True, exist_ok=True)
    run([mount, *mount_args, mountpoint])
    body_failed = True
    try:
        yield mountpoint
        body_failed = False
    finally:
        _umount(mountpoint, body_failed)


@contextmanager
def mounted_ext4(dev: Path, mountpoint: Path, *, read_only: bool = False) -> Iterator[Path]:
    """Make an ext4 file system on ``dev`` (``mkfs.ext4 -q -F``) and mount it on ``mountpoint``.

    Creates ``mountpoint`` if needed, yields it, and always unmounts on exit. ``read_only``
    mounts it ``ro``: the kernel then writes nothing to ``dev`` (a read-write ext4 updates its
    superblock and initialises inode tables in the background), so its bytes can be compared.
    """
    run([require_tool("mkfs.ext4"), "-q", "-F", dev])
    options = ("-o", "ro") if read_only else ()
    with _mounted(mountpoint, "-t", "ext4", *options, dev) as mounted:
        yield mounted


@contextmanager
def small_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``mount -o size=``, e.g. ``"1m"``) on ``mountpoint``.

    Writing past the size fails with ENOSPC, which makes it the honest way to test "disk full".
    Creates ``mountpoint`` if needed, yields it, and always unmounts on exit.
    """
    with _mounted(mountpoint, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs") as mounted:
        yield mounted
