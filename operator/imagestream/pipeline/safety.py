"""Checks before the first write: the target is what it claims and nobody else is using it.

The host's view is a parameter (`HostView`), so the agent inside its Pod checks the node's
mount table rather than the container's.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from imagestream.errors import TargetError
from imagestream.reasons import Reason

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class HostView:
    """Where the host's mount table, swap list and sysfs are seen from this process."""

    mountinfo: Path = Path("/proc/self/mountinfo")
    swaps: Path = Path("/proc/swaps")
    sysfs: Path = Path("/sys")

    @classmethod
    def from_host_root(cls, host_root: Path) -> HostView:
        """The view through a host filesystem mounted at `host_root` (PID 1's mounts)."""
        return cls(
            mountinfo=host_root / "proc/1/mountinfo",
            swaps=host_root / "proc/swaps",
            # Block devices in sysfs are not namespaced: the container's /sys shows the host's.
            sysfs=Path("/sys"),
        )


def device_number(path: Path) -> tuple[int, int]:
    """The (major, minor) of a block device."""
    rdev = os.stat(path).st_rdev
    return os.major(rdev), os.minor(rdev)


def check_block_device(device: tuple[int, int], name: str, host: HostView) -> None:
    """Refuse the block device `device` (major, minor) if it is mounted, used as swap, or
    held by dm/md/LVM; `name` is how messages call it.

    The caller passes the device number of the descriptor it opened, so what is checked is
    what gets written, whatever a link pointed to a moment earlier. A whole disk counts as
    busy when any of its partitions is.
    """
    devices = [device, *partitions(device, host)]
    names = {f"{major}:{minor}" for major, minor in devices}
    for mount_point, source, number in _mounts(host):
        if number in names or _same_device(source, devices):
            raise TargetError(
                f"target {name} is mounted at {mount_point} (as {source}); unmount it first",
                reason=Reason.TARGET_MOUNTED,
            )
    for swap in _swaps(host):
        if _same_device(swap, devices):
            raise TargetError(
                f"target {name} is in use as swap ({swap}); swapoff it first",
                reason=Reason.TARGET_IN_USE,
            )
    for major, minor in devices:
        holders_dir = host.sysfs / f"dev/block/{major}:{minor}/holders"
        holders = sorted(p.name for p in holders_dir.iterdir()) if holders_dir.is_dir() else []
        if holders:
            raise TargetError(
                f"target {name} is held by {', '.join(holders)} (device-mapper, md RAID or LVM); "
                "release it first",
                reason=Reason.TARGET_IN_USE,
            )


def is_whole_disk(device: tuple[int, int], host: HostView) -> bool:
    """True for a disk, False for a partition of one (sysfs gives partitions a `partition`)."""
    return not (host.sysfs / f"dev/block/{device[0]}:{device[1]}/partition").exists()


def logical_block_size(device: tuple[int, int], host: HostView) -> int:
    """The disk's logical sector size (the unit GPT counts in); 512 when sysfs does not say."""
    size_file = host.sysfs / f"dev/block/{device[0]}:{device[1]}/queue/logical_block_size"
    try:
        return int(size_file.read_text().strip())
    except (OSError, ValueError):
        return 512


def partitions(number: tuple[int, int], host: HostView) -> list[tuple[int, int]]:
    """The (major, minor) of each partition of the disk `number` (none for a partition)."""
    base = host.sysfs / f"dev/block/{number[0]}:{number[1]}"
    found = []
    if base.is_dir():
        for child in base.iterdir():
            dev_file = child / "dev"
            if (child / "partition").is_file() and dev_file.is_file():
                major, minor = dev_file.read_text().strip().split(":")
                found.append((int(major), int(minor)))
    return found


def _mounts(host: HostView) -> list[tuple[str, str, str]]:
    """(mount point, source, major:minor) of every mount in the host's table."""
    try:
        table = host.mountinfo.read_text()
    except OSError as exc:
        raise TargetError(
            f"cannot read the mount table {host.mountinfo}: {exc.strerror}; without it the "
            "target cannot be checked (--force skips this check)",
            reason=Reason.TARGET_CHECK_FAILED,
        ) from exc
    return mount_entries(table)


def mount_entries(table: str) -> list[tuple[str, str, str]]:
    """(mount point, source, major:minor) of every mount in the text of a mountinfo file."""
    entries = []
    for line in table.splitlines():
        fields = line.split()
        try:
            separator = fields.index("-")
        except ValueError:
            continue
        source = fields[separator + 2] if len(fields) > separator + 2 else ""
        entries.append((_unescape(fields[4]), _unescape(source), fields[2]))
    return entries


def _swaps(host: HostView) -> list[str]:
    try:
        table = host.swaps.read_text()
    except OSError as exc:
        raise TargetError(
            f"cannot read the swap list {host.swaps}: {exc.strerror}; without it the target "
            "cannot be checked (--force skips this check)",
            reason=Reason.TARGET_CHECK_FAILED,
        ) from exc
    return [line.split()[0] for line in table.splitlines()[1:] if line.strip()]


def _same_device(source: str, devices: list[tuple[int, int]]) -> bool:
    if not source.startswith("/"):
        return False
    try:
        st = os.stat(source)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) in devices


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as three octal digits; nothing else.
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)
