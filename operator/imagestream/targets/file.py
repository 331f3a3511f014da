"""A regular file: written under a staging name in its directory, renamed into place."""

from __future__ import annotations

from imagestream.errors import TargetError
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason
from imagestream.targets.request import TargetRequest


def plan(request: TargetRequest) -> TargetPlan:
    """The plan for a file target, confined to `request.allowed_dirs` when there are any.

    Opening resolves the file's directory once, checks it against the allowed directories and
    then works only relative to a descriptor of it, never following a link at the file's or
    the staging file's name.
    """
    name = request.name or str(request.path)
    if request.path.name in ("", ".", ".."):
        raise TargetError(f"file target {name} does not name a file", reason=Reason.TARGET_INVALID)
    return TargetPlan(
        kind="file",
        path=request.path,
        name=name,
        allowed_dirs=request.allowed_dirs,
        direct_io=request.direct_io,
        host=request.host,
    )
