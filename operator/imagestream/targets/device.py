"""A block device (partition or whole disk) that must exist: opened, never created."""

from __future__ import annotations

from imagestream.errors import UsageError
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.targets.request import TargetRequest


def plan(request: TargetRequest) -> TargetPlan:
    """The plan for a device target: exclusive open, then the usage checks on what was opened.

    A device has no allowed directory: it is named by an absolute path, whatever links lead
    to it (by-label, by-partlabel), and the checks run on the device number of the open
    descriptor, so a link that moves after planning cannot redirect the write unchecked.
    """
    if not request.path.is_absolute():
        raise UsageError(f"device target {request.name or request.path} must be an absolute path")
    return TargetPlan(
        kind="device",
        path=request.path,
        name=request.name or str(request.path),
        usage_checks=not request.force,
        direct_io=request.direct_io,
        host=request.host,
    )
