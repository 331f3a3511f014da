"""COSI metadata and GPT placement: the reference samples, newer minors, the primary GPT's checks.

The samples are the reference data beside the checkout (../shared/reference/cosi, from
microsoft/trident): every valid one is read, every invalid one refused, each for its own cause.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from tests.support.cosi import REFERENCE, reference_dir

from imagestream.errors import IntegrityError
from imagestream.pipeline.disk_layout import DiskImage, ImageFile
from imagestream.reasons import Reason
from imagestream.targets import cosi

#: Each invalid sample and words its refusal must contain (the constraint it breaks).
INVALID = {
    "gpt-missing-primary-region.json": "primary-gpt",
    "invalid-lba-size.json": "1024",
    "invalid-part-type-uuid.json": "not-a-uuid",
    "missing-image-path-prefix.json": "esp.rawzst",
    "missing-os-arch.json": "osArch",
    "missing-os-packages.json": "osPackages",
    "os-package-missing-arch.json": "arch",
    "partition-region-missing-number.json": "number",
    "short-sha384.json": "deadbeef",
    "systemd-boot-missing-config.json": "systemdBoot",
    "unknown-bootloader-type.json": "lilo",
    "wrong-version.json": "1.1",
}


def samples(kind: str) -> list[Path]:
    """The samples of `kind`; none when the reference data is missing, which the first test
    reports (failing under CI)."""
    return sorted((REFERENCE / "samples-v1.2" / kind).glob("*.json"))


def test_every_invalid_sample_is_named_here() -> None:
    reference_dir()
    assert sorted(path.name for path in samples("invalid")) == sorted(INVALID)
    assert samples("valid")


def test_packaged_schema_is_the_reference() -> None:
    packaged = Path(cosi.__file__).with_name(cosi.SCHEMA_FILE)
    assert packaged.read_bytes() == (reference_dir() / cosi.SCHEMA_FILE).read_bytes()


@pytest.mark.parametrize("path", samples("valid"), ids=lambda p: p.name)
def test_valid_samples_are_read(path: Path) -> None:
    document = json.loads(path.read_text())
    disk = cosi.read_metadata(path.read_bytes())
    assert disk.size == document["disk"]["size"]
    assert disk.lba_size == document["disk"]["lbaSize"]
    assert disk.max_window_log == document["compression"]["maxWindowLog"]
    regions = document["disk"]["gptRegions"]
    assert disk.primary_gpt.path == regions[0]["image"]["path"]
    assert [number for number, _ in disk.partitions] == [r["number"] for r in regions[1:]]
    assert [image.path for _, image in disk.partitions] == [r["image"]["path"] for r in regions[1:]]


@pytest.mark.parametrize("path", samples("invalid"), ids=lambda p: p.name)
def test_invalid_samples_are_refused(path: Path) -> None:
    with pytest.raises(IntegrityError) as refused:
        cosi.read_metadata(path.read_bytes())
    expected = Reason.COSI_UNSUPPORTED if path.name == "wrong-version.json" else Reason.COSI_INVALID
    assert refused.value.reason is expected
    assert INVALID[path.name] in refused.value.message


def _valid() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((samples("valid")[0]).read_text())
    return document


@pytest.mark.parametrize("version", ["1.3", "1.10"])
def test_newer_minor_with_unknown_fields_is_read(version: str) -> None:
    document = {**_valid(), "version": version, "somethingNew": {"x": 1}}
    assert cosi.read_metadata(json.dumps(document).encode()).lba_size == 512


@pytest.mark.parametrize(("version", "words"), [("1.0", "1.0"), ("2.0", "2.0")])
def test_older_or_other_major_is_unsupported(version: str, words: str) -> None:
    with pytest.raises(IntegrityError) as refused:
        cosi.read_metadata(json.dumps({**_valid(), "version": version}).encode())
    assert refused.value.reason is Reason.COSI_UNSUPPORTED
    assert words in refused.value.message


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'{"version": 12}', b"\xff\xfe"])
def test_unreadable_metadata_is_invalid(raw: bytes) -> None:
    with pytest.raises(IntegrityError) as refused:
        cosi.read_metadata(raw)
    assert refused.value.reason is Reason.COSI_INVALID


def test_missing_disk_is_invalid() -> None:
    document = _valid()
    del document["disk"]
    with pytest.raises(IntegrityError, match="disk"):
        cosi.read_metadata(json.dumps(document).encode())


def test_size_not_a_multiple_of_the_sector_is_invalid() -> None:
    document = _valid()
    document["disk"]["size"] += 100
    with pytest.raises(IntegrityError, match="multiple"):
        cosi.read_metadata(json.dumps(document).encode())


# -- placing partitions through the primary GPT ------------------------------------------------


def _image(path: str, size: int) -> ImageFile:
    return ImageFile(path=path, compressed_size=1, uncompressed_size=size, sha384="0" * 96)


def _gpt(lba: int, extents: list[tuple[int, int]], last_usable: int) -> bytes:
    """A primary GPT (protective MBR, header, 128 entries) with partitions at `extents`."""
    entries = bytearray(128 * 128)
    for index, (first, last) in enumerate(extents):
        struct.pack_into("<16s16sQQ", entries, index * 128, b"\x01" * 16, b"\x02" * 16, first, last)
    header = bytearray(92)
    struct.pack_into(
        "<8s4sII4xQQQQ16sQIII",
        header,
        0,
        b"EFI PART",
        b"\x00\x00\x01\x00",
        92,
        0,
        1,
        0,
        34 if lba == 512 else 6,
        last_usable,
        b"\x03" * 16,
        2,
        128,
        128,
        zlib.crc32(entries),
    )
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    blob = bytearray(2 * lba + len(entries))
    blob[lba : lba + 92] = header
    blob[2 * lba :] = entries
    return bytes(blob)


def _disk(lba: int, sizes: list[int], disk_size: int = 64 << 20) -> DiskImage:
    return DiskImage(
        size=disk_size,
        lba_size=lba,
        max_window_log=27,
        primary_gpt=_image("images/gpt.rawzst", 2 * lba + 16384),
        partitions=tuple((n, _image(f"images/p{n}.rawzst", s)) for n, s in enumerate(sizes, 1)),
    )


@pytest.mark.parametrize("lba", [512, 4096])
def test_partitions_are_placed_at_their_entries(lba: int) -> None:
    first = (1 << 20) // lba
    extents = [(first, 2 * first - 1), (2 * first, 4 * first - 1)]
    regions = cosi.place_partitions(
        _disk(lba, [1 << 20, 1 << 20]), _gpt(lba, extents, (64 << 20) // lba - 40)
    )
    assert [(r.number, r.offset, r.size) for r in regions] == [
        (1, 1 << 20, 1 << 20),
        (2, 2 << 20, 2 << 20),
    ]


@pytest.mark.parametrize(
    ("sizes", "extents", "blob_change", "words"),
    [
        ([2 << 20], [(2048, 4095)], None, "larger than partition 1"),
        ([1 << 20, 1 << 20], [(4096, 6143), (2048, 4095)], None, "does not follow"),
        ([1 << 20], [(2048, 4095)], "header-crc", "CRC32"),
        ([1 << 20], [(2048, 4095)], "entries-crc", "CRC32"),
        ([1 << 20], [(2048, 4095)], "no-header", "no GPT header"),
        ([1 << 20], [(2048, 4095)], "short", "ends before its partition entries"),
        ([1 << 20], [(10, 4095)], None, "outside the usable area"),
        ([1 << 20, 1 << 20], [(2048, 4095)], None, "unused"),
    ],
)
def test_bad_placements_are_refused(
    sizes: list[int], extents: list[tuple[int, int]], blob_change: str | None, words: str
) -> None:
    blob = bytearray(_gpt(512, extents, (64 << 20) // 512 - 40))
    if blob_change == "header-crc":
        blob[512 + 40] ^= 1
    elif blob_change == "entries-crc":
        blob[1024 + 40] ^= 1
    elif blob_change == "no-header":
        blob[512:520] = bytes(8)
    elif blob_change == "short":
        blob = blob[:2048]
    with pytest.raises(IntegrityError, match=words) as refused:
        cosi.place_partitions(_disk(512, sizes), bytes(blob))
    assert refused.value.reason is Reason.COSI_INVALID


def test_usable_area_beyond_the_disk_is_refused() -> None:
    blob = _gpt(512, [(2048, 4095)], (128 << 20) // 512)
    with pytest.raises(IntegrityError, match=r"beyond disk\.size"):
        cosi.place_partitions(_disk(512, [1 << 20]), blob)
