"""The entry of the targets layer: a request (or a CLI argument) to a plan."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from imagestream.errors import UsageError
from imagestream.pipeline.safety import HostView
from imagestream.pipeline.target_plan import TargetKind, TargetPlan
from imagestream.targets import ab, cosi, device, extension, file
from imagestream.targets.request import TargetRequest

#: The forms of TARGET, for messages: a `KIND:` prefix names the kind, anything else is a path.
TARGET_FORMS = (
    "a path (a partition, a whole device or a file), ab:DEV_A,DEV_B, sysext:NAME, "
    "confext:NAME or disk:DEV"
)
_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9_-]*):", re.ASCII)

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
    argument: str | os.PathLike[str],
    *,
    host_root: Path = Path("/"),
    force: bool = False,
    direct_io: bool = True,
    allowed_dirs: tuple[Path, ...] = (),
    refresh: bool = False,
) -> TargetPlan:
    """The plan for the CLI's TARGET, whose `KIND:` prefix names the kind: `sysext:NAME` and
    `confext:NAME` are extension images under `host_root`, `ab:DEV_A,DEV_B` an A/B pair,
    `disk:DEV` a whole disk written from a COSI image;
    without a prefix, a path under /dev/ or to a block device is a device (it must exist),
    anything else a file path.

    An unknown prefix is a UsageError, never a file name (`./x:y` names such a file).
    """
    text = os.fspath(argument)
    host = HostView.from_host_root(host_root)
    prefix = _PREFIX.match(text)
    if prefix is not None:
        kind, value = prefix.group(1), text[prefix.end() :]
        if kind in ("sysext", "confext"):
            if allowed_dirs:
                raise UsageError(
                    "--allowed-dir confines file paths; an extension image always goes into "
                    "its extension directory"
                )
            extension_kind = extension.extension_type(kind, "TARGET")
            return extension.plan(
                extension_kind,
                value,
                directory=extension.directory_under(host_root, extension_kind),
                where="TARGET",
                refresh=refresh,
                mount_namespace=extension.mount_namespace_of(host_root),
                host=host,
                direct_io=direct_io,
            )
        if kind == "ab":
            volumes = ab_volumes(value)
            return ab.plan(volumes, force=force, direct_io=direct_io, host=host)
        if kind == "disk":
            if not value:
                raise UsageError("TARGET disk: needs a whole disk after it, e.g. disk:/dev/sdb")
            return plan_target(
                TargetRequest(
                    kind="disk",
                    path=Path(os.path.abspath(value)),
                    name=value,
                    allowed_dirs=allowed_dirs,
                    force=force,
                    direct_io=direct_io,
                    host=host,
                )
            )
        raise UsageError(
            f"TARGET {text!r} starts with {kind}:, which is no kind of target; TARGET is "
            f"{TARGET_FORMS} (write ./{text} for a file of that name)"
        )
    if refresh:
        raise UsageError("--refresh applies only to sysext:NAME and confext:NAME targets")
    return plan_target(
        TargetRequest(
            kind=argument_kind(Path(text)),
            path=Path(os.path.abspath(text)),
            name=text,
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
