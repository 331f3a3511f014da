"""What the pipeline needs to know of a whole-disk image: its files, where they go, how to finish.

A COSI file names its images in `metadata.json` and places its partitions through its primary
GPT; reading those is the targets layer's business (`imagestream.targets.cosi`). The pipeline
only sees the result through `DiskLayout`, a protocol the plan carries, so it never imports the
layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ImageFile:
    """One zstd image in the archive, as the metadata describes it."""

    path: str
    compressed_size: int
    uncompressed_size: int
    #: SHA-384 of the compressed bytes, lower case.
    sha384: str


@dataclass(frozen=True)
class DiskImage:
    """The disk a COSI file describes: its size, sector size and the images of its regions."""

    size: int
    lba_size: int
    #: zstd windows up to 2**max_window_log must be accepted.
    max_window_log: int
    primary_gpt: ImageFile
    #: (GPT entry number, image), in the order of the archive (increasing start LBA).
    partitions: tuple[tuple[int, ImageFile], ...]


@dataclass(frozen=True)
class Region:
    """A partition image placed on the disk: `size` bytes from byte `offset`."""

    number: int
    image: ImageFile
    offset: int
    size: int


class DiskLayout(Protocol):
    """The targets layer's reading of a whole-disk image, called by the pipeline as it streams."""

    def read_metadata(self, raw: bytes) -> DiskImage:
        """Validate `metadata.json`; IntegrityError when it cannot be streamed whole-disk."""
        ...

    def regions(self, disk: DiskImage, primary_gpt: bytes) -> tuple[Region, ...]:
        """Place every partition image of `disk` through its primary GPT's entries."""
        ...

    def finish(self, device: Path) -> None:
        """With the primary GPT written: write the backup GPT at the end of `device`."""
        ...
