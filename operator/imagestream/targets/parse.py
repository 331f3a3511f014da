"""The entry of the targets layer: a request (or a CLI argument) to a plan."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from imagestream.errors import UsageError
from imagestream.pipeline.safety import HostView
from imagestream.pipeline.target_plan import TargetKind, TargetPlan
from imagestream.targets import ab, cosi, device, file
from imagestream.targets.request import TargetRequest

#: `ab:DEV_A,DEV_B`: the A/B pair whose inactive volume is written.
AB_PREFIX = "ab:"
#: `disk:DEV`: the whole disk DEV, written from a COSI image.
DISK_PREFIX = "disk:"


def plan_target(request: TargetRequest) -> TargetPlan:
    """Decide, without touching the system, how the target `request` names is opened and
    checked; a TargetError or UsageError when it cannot be a target of its kind."""
    if request.kind == "device":
        return device.plan(request)
    if request.kind == "disk":
        return cosi.plan(request)
    return file.plan(request)


def target_from_argument(
    argument: Path,
    *,
    host: HostView,
    force: bool = False,
    direct_io: bool = True,
    allowed_dirs: tuple[Path, ...] = (),
) -> TargetPlan:
    """The plan for the CLI's TARGET: `ab:DEV_A,DEV_B` an A/B pair, `disk:DEV` a whole disk
    written from a COSI image, a path under /dev/ or to a block device a device (it must
    exist), anything else a file path."""
    text = str(argument)
    if text.startswith(AB_PREFIX):
        volumes = ab_volumes(text.removeprefix(AB_PREFIX))
        return ab.plan(volumes, force=force, direct_io=direct_io, host=host)
    kind: TargetKind
    if text.startswith(DISK_PREFIX):
        if text == DISK_PREFIX:
            raise UsageError("TARGET disk: needs a whole disk after it, e.g. disk:/dev/sdb")
        kind, argument = "disk", Path(text.removeprefix(DISK_PREFIX))
    else:
        kind = argument_kind(argument)
    return plan_target(
        TargetRequest(
            kind=kind,
            path=Path(os.path.abspath(argument)),
            name=str(argument),
            allowed_dirs=allowed_dirs,
            force=force,
            direct_io=direct_io,
            host=host,
        )
    )


def ab_volumes(pair: str) -> list[ab.Volume]:
    """`DEV_A,DEV_B` as two volumes; a UsageError unless it names two different paths."""
    names = pair.split(",")
    if len(names) != 2 or not all(names):
        raise UsageError(f"TARGET {AB_PREFIX}{pair} must name two volumes: {AB_PREFIX}DEV_A,DEV_B")
    paths = [Path(os.path.abspath(name)) for name in names]
    if paths[0] == paths[1]:
        raise UsageError(f"TARGET {AB_PREFIX}{pair} names the same volume twice")
    return [ab.Volume(path, name) for path, name in zip(paths, names, strict=True)]


def argument_kind(argument: Path) -> TargetKind:
    """What the CLI's TARGET names by its form: /dev/... or an existing block device."""
    if os.path.abspath(argument).startswith("/dev/"):
        return "device"
    try:
        # A link to a device (a by-label link copied elsewhere) is still that device.
        is_block = stat.S_ISBLK(os.stat(argument).st_mode)
    except OSError:
        is_block = False
    return "device" if is_block else "file"
