"""The caller's words for a target, before planning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imagestream.pipeline.safety import HostView
from imagestream.pipeline.target_plan import TargetKind


@dataclass(frozen=True)
class TargetRequest:
    """A target as a caller names it: its kind, the path to open, and the caller's rules.

    `name` is how messages call it (the host's path, for the agent); it defaults to `path`.
    `force` skips the mount, swap and holder checks of a device.
    """

    kind: TargetKind
    path: Path
    name: str | None = None
    allowed_dirs: tuple[Path, ...] = ()
    force: bool = False
    direct_io: bool = True
    host: HostView = field(default_factory=HostView)
