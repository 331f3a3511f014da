"""Small real COSI files for tests: real file systems, a real GPT, zstd, tar, in COSI order.

:func:`build_cosi` makes an ext4 (populated with ``mkfs.ext4 -d``) and a FAT file system
(``mkfs.vfat``) on loop devices, partitions a loop-backed disk with ``sfdisk`` (GPT) and takes
its primary GPT, compresses every image with ``zstd``, writes a ``metadata.json`` that the COSI
1.2 schema accepts and tars it all, in order, with GNU tar. The result knows every byte it
should put on a disk, so tests compare what a stream wrote with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import tarfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .blockdev import loop_device, run
from .tools import fail_or_skip, require_tool

MIB = 1 << 20
#: Where the reference COSI schema and samples are: ../shared beside the checkout, as in CI.
REFERENCE = Path(__file__).resolve().parents[2] / "../shared/reference/cosi"
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
LINUX_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"


def reference_dir() -> Path:
    """The COSI reference data (schema, samples); fails clearly when it is not there."""
    if not (REFERENCE / "cosi-metadata-v1.2.schema.json").is_file():
        fail_or_skip(f"the COSI reference data is missing: expected it at {REFERENCE.resolve()}")
    return REFERENCE


@dataclass(frozen=True)
class PartitionSpec:
    """A partition to build: its size, its file system and how much of it the image fills."""

    name: str
    fs: str  # "ext4" or "vfat"
    size: int
    fs_size: int
    mount_point: str
    part_type: str


@dataclass(frozen=True)
class BuiltPartition:
    """A partition of the built image: where it lies and the raw file-system image."""

    number: int
    spec: PartitionSpec
    offset: int
    size: int
    raw: Path
    compressed: Path
    tar_path: str


@dataclass
class CosiImage:
    """A built COSI file and everything a test checks a disk against."""

    path: Path
    metadata: dict[str, Any]
    metadata_sha384: str
    disk_size: int
    lba_size: int
    primary_gpt: bytes
    partitions: list[BuiltPartition]
    sfdisk: dict[str, Any] = field(default_factory=dict)

    def rewrite(
        self,
        path: Path,
        *,
        metadata: dict[str, Any] | None = None,
        entries: list[tuple[str, bytes | Path]] | None = None,
    ) -> Path:
        """Another COSI file from this one's parts (changed metadata or entries) at `path`."""
        meta = json.dumps(metadata if metadata is not None else self.metadata, indent=2).encode()
        if entries is None:
            entries = self.entries()
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for name, content in entries:
                data = meta if name == "metadata.json" else content
                if name.endswith("/"):  # a directory entry, as `tar -c images` makes one
                    info = tarfile.TarInfo(name.rstrip("/"))
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif isinstance(data, Path):
                    tar.add(data, arcname=name)
                else:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, _BytesReader(data))
        return path

    def entries(self) -> list[tuple[str, bytes | Path]]:
        """The tar entries in COSI order (metadata.json's content is taken from `metadata`)."""
        gpt = self.path.parent / "work" / "primary-gpt.rawzst"
        return [
            ("cosi-marker", b""),
            ("metadata.json", b""),
            ("images/primary-gpt.rawzst", gpt),
            *((part.tar_path, part.compressed) for part in self.partitions),
        ]


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        chunk = self._data[: None if size < 0 else size]
        self._data = self._data[len(chunk) :]
        return bytes(chunk)


#: Writes a payload file: (path, size, seed).
PayloadWriter = Callable[[Path, int, int], None]

DEFAULT_PARTITIONS = (
    PartitionSpec("esp", "vfat", 8 * MIB, 8 * MIB, "/boot/efi", ESP_TYPE),
    # Shrunk: the file system fills 10 of its partition's 16 MiB, as COSI allows.
    PartitionSpec("root", "ext4", 16 * MIB, 10 * MIB, "/", LINUX_TYPE),
)


def build_cosi(
    directory: Path,
    *,
    lba_size: int = 512,
    disk_size: int = 32 * MIB,
    partitions: tuple[PartitionSpec, ...] = DEFAULT_PARTITIONS,
    content_size: int = 2 * MIB,
    payload: PayloadWriter | None = None,
) -> CosiImage:
    """Build a COSI file `directory/image.cosi` (see the module docstring).

    Each ext4 holds a `payload.bin` of `content_size` bytes written by `payload` (default:
    random bytes, which zstd cannot shrink).
    """
    work = directory / "work"
    work.mkdir(parents=True)
    zstd = require_tool("zstd")
    with ExitStack() as stack:
        disk = stack.enter_context(loop_device(disk_size, work, sector_size=lba_size))
        script = "label: gpt\n" + "".join(
            f"size={p.size // lba_size}, type={p.part_type}, name={p.name}\n" for p in partitions
        )
        _sfdisk(disk, script)
        table = json.loads(run([require_tool("sfdisk"), "--json", disk]))
        primary_gpt = _read(disk, 2 * lba_size + 16384)
    built: list[BuiltPartition] = []
    for number, (spec, entry) in enumerate(
        zip(partitions, table["partitiontable"]["partitions"], strict=True), 1
    ):
        raw = work / f"{spec.name}.raw"
        _make_filesystem(
            raw,
            spec,
            lba_size=lba_size,
            work=work,
            content=(payload or _random_payload, content_size, number),
        )
        compressed = work / f"{spec.name}.rawzst"
        run([zstd, "-q", "-f", "-3", raw, "-o", compressed])
        built.append(
            BuiltPartition(
                number=number,
                spec=spec,
                offset=entry["start"] * lba_size,
                size=entry["size"] * lba_size,
                raw=raw,
                compressed=compressed,
                tar_path=f"images/{spec.name}.rawzst",
            )
        )
    gpt_raw = work / "primary-gpt.raw"
    gpt_raw.write_bytes(primary_gpt)
    gpt_zst = work / "primary-gpt.rawzst"
    run([zstd, "-q", "-f", gpt_raw, "-o", gpt_zst])
    metadata = _metadata(built, gpt_raw, gpt_zst, disk_size, lba_size)
    (work / "cosi-marker").write_bytes(b"")
    meta_bytes = json.dumps(metadata, indent=2).encode()
    (work / "metadata.json").write_bytes(meta_bytes)
    images = work / "images"
    images.mkdir()
    for source in (gpt_zst, *(part.compressed for part in built)):
        os.link(source, images / source.name)
    path = directory / "image.cosi"
    names = ["cosi-marker", "metadata.json", "images/primary-gpt.rawzst"]
    names += [part.tar_path for part in built]
    # Real tar, entries named one by one: exactly this order, no directory entries.
    run([require_tool("tar"), "--format=gnu", "-cf", path, "-C", work, *names])
    return CosiImage(
        path=path,
        metadata=metadata,
        metadata_sha384=hashlib.sha384(meta_bytes).hexdigest(),
        disk_size=disk_size,
        lba_size=lba_size,
        primary_gpt=primary_gpt,
        partitions=built,
        sfdisk=table["partitiontable"],
    )


def _sfdisk(disk: Path, script: str) -> None:
    # Its script on stdin (`run` has none); a failed partition re-read is only a warning.
    done = subprocess.run(
        [require_tool("sfdisk"), "-q", disk],
        input=script,
        text=True,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sfdisk failed: {done.stderr}")


def _read(path: Path, size: int, offset: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _make_filesystem(
    raw: Path,
    spec: PartitionSpec,
    *,
    lba_size: int,
    work: Path,
    content: tuple[PayloadWriter, int, int],
) -> None:
    """mkfs on a loop device over `raw` (ext4 populated from a directory of files)."""
    files = work / f"{spec.name}-content"
    files.mkdir()
    (files / "os-release").write_text(f"NAME=test {spec.name}\n")
    write, size, seed = content
    if spec.fs == "ext4":
        write(files / "payload.bin", size, seed)
    with loop_device(spec.fs_size, work, sector_size=lba_size) as dev:
        if spec.fs == "ext4":
            run([require_tool("mkfs.ext4"), "-q", "-F", "-d", files, "-L", spec.name, dev])
        else:
            run([require_tool("mkfs.vfat"), "-n", spec.name.upper(), dev])
        with open(dev, "rb") as device, open(raw, "wb") as out:
            while chunk := device.read(4 * MIB):
                out.write(chunk)


def _random_payload(path: Path, size: int, seed: int) -> None:
    """Deterministic bytes zstd cannot shrink: the compressed image is as large as its data."""
    path.write_bytes(random.Random(seed).randbytes(size))


def _image_entry(path: str, raw: Path, compressed: Path) -> dict[str, Any]:
    return {
        "path": path,
        "compressedSize": compressed.stat().st_size,
        "uncompressedSize": raw.stat().st_size,
        "sha384": hashlib.sha384(compressed.read_bytes()).hexdigest(),
    }


def _metadata(
    built: list[BuiltPartition], gpt_raw: Path, gpt_zst: Path, disk_size: int, lba_size: int
) -> dict[str, Any]:
    filesystems = [
        {
            "image": _image_entry(part.tar_path, part.raw, part.compressed),
            "mountPoint": part.spec.mount_point,
            "fsType": part.spec.fs,
            "fsUuid": f"0000000{part.number}-0000-4000-8000-000000000000",
            "partType": part.spec.part_type,
            "verity": None,
        }
        for part in built
    ]
    regions = [
        {
            "image": _image_entry("images/primary-gpt.rawzst", gpt_raw, gpt_zst),
            "type": "primary-gpt",
        },
        *(
            {
                "image": _image_entry(part.tar_path, part.raw, part.compressed),
                "type": "partition",
                "number": part.number,
            }
            for part in built
        ),
    ]
    return {
        "version": "1.2",
        "osArch": "x86_64",
        "osRelease": 'NAME="imagestream test"\nID=test\n',
        "images": filesystems,
        "osPackages": [{"name": "bash", "version": "5.2", "release": "1", "arch": "x86_64"}],
        "bootloader": {"type": "grub"},
        "disk": {"size": disk_size, "type": "gpt", "lbaSize": lba_size, "gptRegions": regions},
        "compression": {"maxWindowLog": 27},
        "futureField": "readers ignore unknown fields",
    }
