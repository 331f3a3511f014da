"""An A/B pair: two volumes, one of which runs the system; the other one is written.

Which volume is active is read from the host, never guessed: a volume backs the running system
when `/` or `/usr` (usr-only A/B layouts) is mounted from it, from one of its partitions, or
from a device stacked on it (dm-verity, LVM, md: sysfs `holders/`, followed to the top). Exactly
one of the two must; neither or both is `ActiveVolumeUnknown` before anything is opened for
writing, whatever `--force` says: `--force` relaxes the checks of the volume written, never
this choice.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagestream.errors import TargetError
from imagestream.pipeline.safety import HostView, mount_entries, partitions
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason
from imagestream.targets import device
from imagestream.targets.request import TargetRequest

#: The mount points whose device is the running system: `/`, or `/usr` when only /usr is A/B.
SYSTEM_MOUNTS = ("/", "/usr")


@dataclass(frozen=True)
class Volume:
    """One volume of the pair: the path this process opens and the name messages use."""

    path: Path
    name: str


@dataclass(frozen=True)
class _Device:
    """A block device as sysfs shows it."""

    number: tuple[int, int]
    kernel_name: str
    #: The names a mount table may call it by: /dev/KERNEL_NAME and /dev/mapper/DM_NAME.
    sources: frozenset[str]

    @property
    def label(self) -> str:
        return f"{self.kernel_name} ({self.number[0]}:{self.number[1]})"


@dataclass(frozen=True)
class _Mount:
    point: str
    source: str
    number: str


@dataclass(frozen=True)
class _Seen:
    """What the host shows of one volume: the devices on top of it and where they are mounted."""

    volume: Volume
    base: _Device
    stacked: tuple[_Device, ...]
    #: (mount, the device of the volume's stack it comes from), every mount of the stack.
    mounts: tuple[tuple[_Mount, _Device], ...]

    @property
    def system_mounts(self) -> list[tuple[_Mount, _Device]]:
        return [(mount, dev) for mount, dev in self.mounts if mount.point in SYSTEM_MOUNTS]

    def describe(self) -> str:
        """One clause of the refusal: the volume, the devices on top of it, their mounts."""
        on_top = ", ".join(dev.label for dev in self.stacked)
        mounted = ", ".join(
            f"{mount.point} (as {mount.source or '?'}, {mount.number}"
            + ("" if dev is self.base else f", through {dev.kernel_name}")
            + ")"
            for mount, dev in self.mounts
        )
        return (
            f"{self.volume.name} is {self.base.label}, "
            f"{'with ' + on_top + ' on top' if on_top else 'with no partitions or holders'}, "
            f"{'mounted at ' + mounted if mounted else 'not mounted'}"
        )


def plan(
    volumes: Sequence[Volume],
    *,
    force: bool = False,
    direct_io: bool = True,
    host: HostView | None = None,
) -> TargetPlan:
    """The device plan for the volume of `volumes` that does not run the system.

    A TargetError (`ActiveVolumeUnknown`) when not exactly one of them is active; the volume
    written then gets the checks of any device target (not mounted, not held, unless `force`).
    """
    view = host or HostView()
    chosen = inactive_volume(volumes, view)
    return device.plan(
        TargetRequest(
            kind="device",
            path=chosen.path,
            name=chosen.name,
            force=force,
            direct_io=direct_io,
            host=view,
        )
    )


def inactive_volume(volumes: Sequence[Volume], host: HostView) -> Volume:
    """The one of two volumes that neither `/` nor `/usr` of the host comes from."""
    if len(volumes) != 2:
        raise TargetError(
            f"an A/B pair has two volumes, got {len(volumes)}", reason=Reason.TARGET_INVALID
        )
    mounts = _system_table(host)
    seen = [_look(volume, host, mounts) for volume in volumes]
    first, second = seen
    if first.base.number == second.base.number:
        raise TargetError(
            f"the A/B volumes {first.volume.name} and {second.volume.name} are the same device "
            f"({first.base.label})",
            reason=Reason.TARGET_INVALID,
        )
    active = [item for item in seen if item.system_mounts]
    if len(active) == 1:
        return next(item.volume for item in seen if item is not active[0])
    if active:
        problem = "both volumes back the running system"
    else:
        problem = "neither volume backs the running system"
    system = [
        f"{mount.point} is {mount.source or '?'} ({mount.number})"
        for mount in mounts
        if mount.point in SYSTEM_MOUNTS
    ]
    raise TargetError(
        f"cannot tell which A/B volume is active: {problem} (/ or /usr of {host.mountinfo}); "
        f"{'; '.join(item.describe() for item in seen)}; on the host "
        f"{', '.join(system) or 'neither / nor /usr is mounted'}. Nothing was written",
        reason=Reason.ACTIVE_VOLUME_UNKNOWN,
    )


def _system_table(host: HostView) -> list[_Mount]:
    try:
        table = host.mountinfo.read_text()
    except OSError as exc:
        raise TargetError(
            f"cannot read the host's mount table {host.mountinfo}: {exc.strerror}; without it "
            "the active A/B volume is unknown (check --host-root)",
            reason=Reason.ACTIVE_VOLUME_UNKNOWN,
        ) from exc
    return [_Mount(point, source, number) for point, source, number in mount_entries(table)]


def _look(volume: Volume, host: HostView, mounts: Sequence[_Mount]) -> _Seen:
    base = _device(_volume_number(volume), host)
    stack = [base]
    # Breadth first through partitions and holders: dm-verity on LVM on a partition is three
    # levels, and sysfs only links one level at a time.
    for current in stack:
        for number in [*partitions(current.number, host), *_holders(current, host)]:
            if all(number != known.number for known in stack):
                stack.append(_device(number, host))
    found = [
        (mount, dev)
        for mount in mounts
        for dev in stack
        if mount.number == f"{dev.number[0]}:{dev.number[1]}" or mount.source in dev.sources
    ]
    return _Seen(volume, base, tuple(stack[1:]), tuple(found))


def _volume_number(volume: Volume) -> tuple[int, int]:
    try:
        st = os.stat(volume.path)
    except FileNotFoundError:
        raise TargetError(
            f"A/B volume {volume.name} does not exist", reason=Reason.TARGET_NOT_FOUND
        ) from None
    except OSError as exc:
        raise TargetError(
            f"cannot look at A/B volume {volume.name}: {exc.strerror}",
            reason=Reason.TARGET_INVALID,
        ) from exc
    if not stat.S_ISBLK(st.st_mode):
        raise TargetError(
            f"A/B volume {volume.name} is not a block device", reason=Reason.TARGET_INVALID
        )
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _device(number: tuple[int, int], host: HostView) -> _Device:
    node = host.sysfs / f"dev/block/{number[0]}:{number[1]}"
    # dev/block/M:m links to the device's directory, named as the kernel names the device.
    kernel_name = Path(os.path.realpath(node)).name
    sources = {f"/dev/{kernel_name}"}
    with contextlib.suppress(OSError):  # only device-mapper devices have a dm/name
        sources.add(f"/dev/mapper/{(node / 'dm/name').read_text().strip()}")
    return _Device(number, kernel_name, frozenset(sources))


def _holders(dev: _Device, host: HostView) -> list[tuple[int, int]]:
    holders = host.sysfs / f"dev/block/{dev.number[0]}:{dev.number[1]}/holders"
    if not holders.is_dir():
        return []
    numbers = []
    for holder in sorted(holders.iterdir()):
        try:
            major, minor = (holder / "dev").read_text().strip().split(":")
            numbers.append((int(major), int(minor)))
        except (OSError, ValueError):
            continue  # gone while we looked
    return numbers
