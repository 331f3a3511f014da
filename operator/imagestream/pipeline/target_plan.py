"""A target as planned: what to open, as which kind, under which rules and checks.

`imagestream.targets` builds a plan from the caller's words (a CLI argument, an ImageStream's
`spec.target`); the sinks execute it and verify, on what they opened, that it is what was
planned. The type lives here, in the pipeline, so the pipeline never imports the layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imagestream.pipeline.disk_layout import DiskLayout
from imagestream.pipeline.safety import HostView

#: The two kinds of systemd extension image (systemd-sysext, systemd-confext).
ExtensionType = Literal["sysext", "confext"]

#: A device is opened as an existing block device and never created; a file is created under
#: a staging name in its directory and renamed into place; a disk is a whole block device
#: written region by region from a COSI image, its primary GPT last.
TargetKind = Literal["device", "file", "disk"]


@dataclass(frozen=True)
class ExtensionPlan:
    """A file target that is a systemd extension image; `imagestream.targets.extension` acts on
    it around the stream (already-current check, commit record, refresh). The pipeline writes
    it like any file target.

    `mount_namespace` is the host's mount namespace file the refresh runs in (through
    `nsenter`); None runs it in this process's own, which is the host's.
    """

    type: ExtensionType
    name: str
    refresh: bool = False
    mount_namespace: Path | None = None


@dataclass(frozen=True)
class TargetPlan:
    """One target, decided before anything is opened.

    `path` is what this process opens; `name` is the target as the user named it (the host's
    path for the agent), used in every message. `allowed_dirs` confines a file target (empty:
    anywhere). `usage_checks` runs the mount, swap and holder checks on a device (`--force`
    turns them off; the kernel's exclusive open and the writer lock apply regardless).
    `extension` is set for a file target that is a systemd extension image.
    `layout` reads a disk target's image (set for `disk` plans only).
    """

    kind: TargetKind
    path: Path
    name: str
    allowed_dirs: tuple[Path, ...] = ()
    usage_checks: bool = True
    direct_io: bool = True
    host: HostView = field(default_factory=HostView)
    extension: ExtensionPlan | None = None
    layout: DiskLayout | None = None
