"""Which of the server's `--disk`s a StreamDisk writes: the smallest that can take the image.

`choose_disk` decides from facts (pure); `disk_facts` and `probe_output_size` gather them.
A disk that is mounted, held, read-only or too small is skipped, and why is said in words the
Log records carry; the pipeline's own checks still run on the disk that was opened.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import zstandard

from imagestream.errors import ImageStreamError, TargetError
from imagestream.pipeline.decompress import Compression, resolve_compression
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.safety import HostView, check_block_device, device_number
from imagestream.pipeline.sources import SourceOptions, open_source
from imagestream.reasons import Reason

#: Enough for a COSI archive's marker and metadata.json, and any compressed image's header.
_PROBE_BYTES = 256 << 10
#: Where a POSIX tar header says "ustar".
_TAR_MAGIC_AT = 257


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


@dataclass(frozen=True)
class ImageFacts:
    """What an image's first bytes tell: a COSI archive or not, and the bytes it needs on the
    disk (COSI: `disk.size`; raw: its length; zstd: the first frame's declared size, a lower
    bound of a multi-frame image's) when they say."""

    cosi: bool
    needed: int | None
    #: What the source resolved to, for the Log ("" when the probe could not open it).
    resolved: str = ""


def probe_image(url: str, options: SourceOptions, interrupt: Interrupt) -> ImageFacts:
    """Read the first bytes of `url` (one request, closed at once) for its `ImageFacts`.

    A probe that fails tells nothing (`needed` None): the stream itself reports the failure.
    """
    try:
        source = open_source(url, options, interrupt)
    except ImageStreamError:
        return ImageFacts(cosi=False, needed=None)
    try:
        head = b""
        for chunk in source.chunks():
            head += chunk
            if len(head) >= _PROBE_BYTES:
                break
        facts = image_facts(head, source.total)
    except ImageStreamError:
        return ImageFacts(cosi=False, needed=None)
    finally:
        source.close()
    blob = f", blob {source.digest}" if source.digest else ""
    size = f", {source.total} bytes" if source.total is not None else ""
    compression = resolve_compression(Compression.AUTO, head)
    kind = "COSI" if facts.cosi else "raw" if compression is Compression.NONE else compression.value
    return replace(facts, resolved=f"{source.name}{blob}{size}, {kind}")


def image_facts(head: bytes, total: int | None) -> ImageFacts:
    """`ImageFacts` from the first bytes of an image and its fetched size."""
    if head[_TAR_MAGIC_AT : _TAR_MAGIC_AT + 5] == b"ustar":
        cosi = _cosi_head(head)
        if cosi is not None:
            return cosi
    compression = resolve_compression(Compression.AUTO, head)
    if compression is Compression.NONE:
        return ImageFacts(cosi=False, needed=total)
    if compression is Compression.ZSTD:
        try:
            size = zstandard.frame_content_size(head)
        except zstandard.ZstdError:
            return ImageFacts(cosi=False, needed=None)
        return ImageFacts(cosi=False, needed=size if size >= 0 else None)
    return ImageFacts(cosi=False, needed=None)


def _cosi_head(head: bytes) -> ImageFacts | None:
    """A tar whose first entry is `cosi-marker` is COSI; it needs the `disk.size` of the
    `metadata.json` that follows (None when the head does not hold it)."""
    needed: int | None = None
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r|") as archive:
            first = archive.next()
            if first is None or first.name.removeprefix("./") != "cosi-marker":
                return None
            second = archive.next()
            if second is not None and second.name.removeprefix("./") == "metadata.json":
                extracted = archive.extractfile(second)
                metadata = json.loads(extracted.read()) if extracted is not None else None
                disk = metadata.get("disk") if isinstance(metadata, dict) else None
                size = disk.get("size") if isinstance(disk, dict) else None
                needed = size if isinstance(size, int) and size > 0 else None
    except (tarfile.TarError, ValueError, EOFError):
        pass  # a head cut inside an entry: what was read so far still counts
    return ImageFacts(cosi=True, needed=needed)
