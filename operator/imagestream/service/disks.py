"""Which of the server's `--disk`s a StreamDisk writes: the smallest that can take the image.

`choose_disk` decides from facts (pure); `disk_facts` and `probe_output_size` gather them.
A disk that is mounted, held, read-only or too small is skipped, and why is said in words the
Log records carry; the pipeline's own checks still run on the disk that was opened.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from imagestream.errors import ImageStreamError, TargetError
from imagestream.pipeline.decompress import Compression, resolve_compression
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.safety import HostView, check_block_device, device_number
from imagestream.pipeline.sources import SourceOptions, open_source
from imagestream.reasons import Reason

_HEAD = 18


@dataclass(frozen=True)
class DiskFacts:
    """What was seen of one `--disk`: its size, or why it cannot be written (`unusable`)."""

    path: Path
    size: int | None
    unusable: str | None = None


@dataclass(frozen=True)
class Choice:
    """The disk to write and, for each one passed over, why."""

    disk: Path
    why: str
    skipped: tuple[str, ...]


def choose_disk(disks: Sequence[DiskFacts], needed: int | None) -> Choice:
    """The smallest usable disk of at least `needed` bytes (the largest when the size is
    unknown); `NoDiskFits` naming every disk's cause when none can be written."""
    skipped: list[str] = []
    usable: list[tuple[int, DiskFacts]] = []
    for facts in disks:
        if facts.unusable is not None or facts.size is None:
            skipped.append(f"{facts.path}: {facts.unusable or 'its size is unknown'}")
        elif needed is not None and facts.size < needed:
            skipped.append(f"{facts.path}: too small ({facts.size} bytes for {needed})")
        else:
            usable.append((facts.size, facts))
    if not usable:
        raise TargetError(
            "no disk can take the image: " + "; ".join(skipped), reason=Reason.NO_DISK_FITS
        )
    if needed is None:
        size, chosen = max(usable, key=lambda pair: pair[0])
        why = f"the largest usable disk ({size} bytes); the image's size is not known in advance"
    else:
        size, chosen = min(usable, key=lambda pair: pair[0])
        why = f"the smallest disk that fits ({size} bytes for {needed})"
    skipped.extend(
        f"{facts.path}: larger ({facts.size} bytes)"
        if needed is not None
        else f"{facts.path}: smaller ({facts.size} bytes)"
        for _, facts in usable
        if facts is not chosen
    )
    return Choice(disk=chosen.path, why=why, skipped=tuple(skipped))


def disk_facts(path: Path, host: HostView) -> DiskFacts:
    """Look at one disk: its size, and whether it is read-only, mounted or held."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return DiskFacts(path, None, f"cannot be opened ({exc.strerror})")
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        number = os.major(os.fstat(fd).st_rdev), os.minor(os.fstat(fd).st_rdev)
    finally:
        os.close(fd)
    ro_file = host.sysfs / f"dev/block/{number[0]}:{number[1]}/ro"
    if ro_file.is_file() and ro_file.read_text().strip() == "1":
        return DiskFacts(path, size, "read-only")
    try:
        check_block_device(device_number(path), str(path), host)
    except TargetError as exc:
        return DiskFacts(path, size, exc.message.removeprefix(f"target {path} "))
    return DiskFacts(path, size)


def probe_output_size(url: str, options: SourceOptions, interrupt: Interrupt) -> int | None:
    """What the image writes, when its first bytes tell: a raw image's length, a zstd
    frame's declared content size; None otherwise (or when the probe fails: the stream
    itself then reports the failure)."""
    try:
        source = open_source(url, options, interrupt)
    except ImageStreamError:
        return None
    try:
        head = b""
        for chunk in source.chunks():
            head += chunk
            if len(head) >= _HEAD:
                break
        compression = resolve_compression(Compression.AUTO, head)
        if compression is Compression.NONE:
            return source.total
        if compression is Compression.ZSTD:
            size = zstandard.frame_content_size(head)
            return size if size >= 0 else None
        return None
    except (ImageStreamError, zstandard.ZstdError):
        return None
    finally:
        source.close()
