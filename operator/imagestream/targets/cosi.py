"""A whole disk from a COSI image (`disk:DEV`, `spec.target.disk`): its checks and its layout.

The plan opens the disk like a device target (exclusive, not mounted or held, nor any of its
partitions) and adds what only a whole disk needs: not a partition, at least the image's
`disk.size`, the image's logical sector size. The layout reads what the stream carries:
`metadata.json`, validated against the COSI 1.2 schema (jsonschema; unknown fields ignored, newer
1.x minors read as 1.2), and the primary GPT, whose entries place each partition image. The
backup GPT at the end of the disk is written by `sfdisk --relocate gpt-bak-std` once the primary
is in place, so no GPT header or CRC is ever written by hand. (`sgdisk -e` does the same, but
syncs every file system of the host and then sleeps a second.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagestream.errors import IntegrityError, TargetError, UsageError
from imagestream.pipeline.disk_layout import DiskImage, ImageFile, Region
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason
from imagestream.targets.request import TargetRequest

if TYPE_CHECKING:
    import jsonschema

SCHEMA_FILE = "cosi-metadata-v1.2.schema.json"
#: The oldest revision with a disk layout (`disk`, `gptRegions`), and the one the schema is of.
SCHEMA_VERSION = (1, 2)
_VERSION = re.compile(r"(\d+)\.(\d+)", re.ASCII)
_GPT_SIGNATURE = b"EFI PART"
#: UEFI 2.10 §5.3.2: the header fields up to the partition entry array's CRC32.
_GPT_HEADER = struct.Struct("<8s4sII4xQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQ")
_SBIN = ("/usr/sbin", "/sbin")
#: Longer schema messages quote a whole subtree of the document.
_MESSAGE_LIMIT = 200


def plan(request: TargetRequest) -> TargetPlan:
    """The plan for a whole-disk target: a device target's open and checks, plus the layout."""
    if not request.path.is_absolute():
        raise UsageError(f"disk target {request.name or request.path} must be an absolute path")
    return TargetPlan(
        kind="disk",
        path=request.path,
        name=request.name or str(request.path),
        usage_checks=not request.force,
        direct_io=request.direct_io,
        host=request.host,
        layout=CosiLayout(_sfdisk()),
    )


class CosiLayout:
    """`DiskLayout` of a COSI image (revision 1.2 and newer 1.x)."""

    def __init__(self, sfdisk: str) -> None:
        self._sfdisk = sfdisk

    def read_metadata(self, raw: bytes) -> DiskImage:
        """See `read_metadata`."""
        return read_metadata(raw)

    def regions(self, disk: DiskImage, primary_gpt: bytes) -> tuple[Region, ...]:
        """See `place_partitions`."""
        return place_partitions(disk, primary_gpt)

    def finish(self, device: Path) -> None:
        """Write the backup GPT at the end of `device`, matching its primary.

        This process holds the disk's lock (and its exclusive open) meanwhile, so sfdisk must
        not take the lock; the kernel is told of the new table once the disk is released.
        """
        done = subprocess.run(
            [
                self._sfdisk,
                "--lock=no",
                "--no-reread",
                "--no-tell-kernel",
                "--quiet",
                "--relocate",
                "gpt-bak-std",
                os.fspath(device),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            said = " ".join((done.stderr or done.stdout).split())
            raise TargetError(
                f"writing the backup GPT of {device} failed (sfdisk --relocate exited "
                f"{done.returncode}: {said})",
                reason=Reason.WRITE_FAILED,
            )


def _sfdisk() -> str:
    found = shutil.which("sfdisk", path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))
    if found is None:
        raise TargetError(
            "a COSI image's backup GPT is written with sfdisk (util-linux), which is not "
            "installed (Debian: fdisk)",
            reason=Reason.TARGET_CHECK_FAILED,
        )
    return found


@cache
def _validator() -> jsonschema.protocols.Validator:
    # Imported here: every CLI start would pay its 40 ms, and only a disk target needs it.
    import jsonschema  # noqa: PLC0415

    text = resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema)


def read_metadata(raw: bytes) -> DiskImage:
    """The disk a COSI `metadata.json` describes; IntegrityError (CosiInvalid or
    CosiUnsupported) when it is malformed or cannot be written whole-disk."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(f"metadata.json is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise _invalid("metadata.json is not a JSON object")
    version = document.get("version")
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise _invalid(f"metadata.json has no MAJOR.MINOR version (got {version!r})")
    major, minor = int(match[1]), int(match[2])
    if major != SCHEMA_VERSION[0] or minor < SCHEMA_VERSION[1]:
        raise IntegrityError(
            f"COSI version {version} cannot be written to a whole disk: that needs the disk "
            "layout of version 1.2 or a newer 1.x",
            reason=Reason.COSI_UNSUPPORTED,
        )
    # A newer minor only adds fields, which readers ignore: it is read as 1.2.
    as_schema = {**document, "version": "{}.{}".format(*SCHEMA_VERSION)}
    validator = _validator()
    error = _best_match(validator.iter_errors(as_schema))
    if error is not None:
        raise _invalid(f"metadata.json is not valid COSI metadata: {_schema_error(error)}")
    return _disk_image(document["disk"], document["compression"])


def _best_match(errors: Iterable[jsonschema.ValidationError]) -> jsonschema.ValidationError | None:
    from jsonschema.exceptions import best_match  # noqa: PLC0415 - see _validator

    found: jsonschema.ValidationError | None = best_match(errors)
    return found


def _schema_error(error: jsonschema.ValidationError) -> str:
    """Where the document breaks the schema and how, short enough to read in a status."""
    where = error.json_path.removeprefix("$.") if error.json_path != "$" else "the document"
    if len(error.message) <= _MESSAGE_LIMIT:
        return f"{where}: {error.message}"
    # The message quotes the whole offending value; the rule and what it asks say more.
    description = error.schema.get("description", "") if isinstance(error.schema, dict) else ""
    return f"{where} fails the schema's {error.validator!r} rule: {description}".rstrip(": ")


def _disk_image(disk: Mapping[str, Any], compression: Mapping[str, Any]) -> DiskImage:
    size, lba = disk["size"], disk["lbaSize"]
    if size % lba:
        raise _invalid(f"disk.size {size} is not a multiple of disk.lbaSize {lba}")
    regions = disk["gptRegions"]
    paths = [region["image"]["path"] for region in regions]
    if len(set(paths)) != len(paths):
        raise _invalid("disk.gptRegions names an image path twice")
    partitions = [(region["number"], _image(region["image"])) for region in regions[1:]]
    numbers = [number for number, _ in partitions]
    if len(set(numbers)) != len(numbers):
        raise _invalid("disk.gptRegions names a partition number twice")
    return DiskImage(
        size=size,
        lba_size=lba,
        max_window_log=compression["maxWindowLog"],
        primary_gpt=_image(regions[0]["image"]),
        partitions=tuple(partitions),
    )


def _image(image: Mapping[str, Any]) -> ImageFile:
    return ImageFile(
        path=image["path"],
        compressed_size=image["compressedSize"],
        uncompressed_size=image["uncompressedSize"],
        sha384=image["sha384"].lower(),
    )


def place_partitions(disk: DiskImage, primary_gpt: bytes) -> tuple[Region, ...]:
    """Each partition image at its GPT entry's extent, checked to fit it and to lie past the
    primary GPT, inside the disk, in increasing order; IntegrityError (CosiInvalid) if not."""
    lba = disk.lba_size
    header = primary_gpt[lba : lba + _GPT_HEADER.size]
    if len(header) < _GPT_HEADER.size or not header.startswith(_GPT_SIGNATURE):
        raise _invalid("the primary-GPT image holds no GPT header at LBA 1")
    (
        _,
        _,
        header_size,
        header_crc,
        _,
        _,
        first_usable,
        last_usable,
        _,
        entries_lba,
        count,
        entry_size,
        entries_crc,
    ) = _GPT_HEADER.unpack(header)
    raw_header = bytearray(primary_gpt[lba : lba + header_size])
    raw_header[16:20] = bytes(4)
    if header_size < _GPT_HEADER.size or zlib.crc32(raw_header) != header_crc:
        raise _invalid("the GPT header of the primary-GPT image fails its CRC32")
    start = entries_lba * lba
    entries = primary_gpt[start : start + count * entry_size]
    if entry_size < _GPT_ENTRY.size or len(entries) != count * entry_size:
        raise _invalid("the primary-GPT image ends before its partition entries do")
    if zlib.crc32(entries) != entries_crc:
        raise _invalid("the partition entries of the primary-GPT image fail their CRC32")
    if (last_usable + 1) * lba > disk.size:
        raise _invalid(f"the GPT's last usable LBA {last_usable} lies beyond disk.size")
    placed: list[Region] = []
    for number, image in disk.partitions:
        if number > count:
            raise _invalid(f"partition {number} has no entry in the GPT ({count} entries)")
        kind, _, first, last = _GPT_ENTRY.unpack_from(entries, (number - 1) * entry_size)
        if kind == bytes(16):
            raise _invalid(f"partition {number}'s GPT entry is unused")
        if not first_usable <= first <= last <= last_usable or first * lba < len(primary_gpt):
            raise _invalid(f"partition {number} (LBA {first}-{last}) lies outside the usable area")
        region = Region(number, image, offset=first * lba, size=(last - first + 1) * lba)
        if image.uncompressed_size > region.size:
            raise _invalid(
                f"{image.path} is {image.uncompressed_size} bytes, larger than partition "
                f"{number} ({region.size} bytes)"
            )
        if placed and region.offset < placed[-1].offset + placed[-1].size:
            raise _invalid(f"partition {number} does not follow partition {placed[-1].number}")
        placed.append(region)
    return tuple(placed)


def _invalid(message: str) -> IntegrityError:
    return IntegrityError(message, reason=Reason.COSI_INVALID)
