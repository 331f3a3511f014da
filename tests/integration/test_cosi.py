"""Whole-disk COSI images streamed onto real loop disks, and every way such a stream must fail.

The images are real (tests/support/cosi.py): ext4 and FAT file systems made on loop devices, a
GPT made by sfdisk, zstd, GNU tar. After a success the target disk is checked by other tools:
`sfdisk --json` (the table), `sgdisk -v` (primary and backup GPT agree, the backup at the end of
this disk), `partx`, `fsck -n` on each partition, and byte comparisons with the images. After a
failure the disk is either untouched (refused before any write: it still holds its pattern) or
holds no GPT at all (both GPT areas zeroed).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from tests.support.blockdev import loop_device
from tests.support.blockdev import run as run_command
from tests.support.cli import CliRun, imagestream_process, interrupt, json_records, run_imagestream
from tests.support.cosi import MIB, CosiImage, build_cosi
from tests.support.nginx import NginxFactory
from tests.support.range_server import Fault, FaultPlan, RangeServer
from tests.support.targets import PATTERN, fill_pattern, read_device
from tests.support.tools import require_tool

pytestmark = pytest.mark.usefixtures("require_root")

stream = functools.partial(run_imagestream, "stream")

#: A disk factory: (size, sector size) -> /dev/loopN, filled with the test pattern.
DiskFactory = Callable[[int, int], Path]


@pytest.fixture(scope="module")
def images(require_root: None, tmp_path_factory: pytest.TempPathFactory) -> dict[int, CosiImage]:
    """One COSI image per sector size, built once for the module (loop devices: root)."""
    return {
        lba: build_cosi(tmp_path_factory.mktemp(f"cosi-{lba}"), lba_size=lba) for lba in (512, 4096)
    }


@pytest.fixture
def disk_factory(tmp_path: Path) -> Iterator[DiskFactory]:
    directory = tmp_path / "disks"
    directory.mkdir()
    with ExitStack() as stack:

        def create(size: int, sector_size: int = 512) -> Path:
            dev = stack.enter_context(loop_device(size, directory, sector_size=sector_size))
            stack.callback(_remove_partitions, dev)
            fill_pattern(dev, size)
            return dev

        yield create


def _remove_partitions(dev: Path) -> None:
    # partx -a made partition devices for fsck; they must go before the disk detaches.
    run_command([require_tool("partx"), "-d", dev]) if _partition_nodes(dev) else None


def _partition_nodes(dev: Path) -> list[Path]:
    return sorted(Path("/dev").glob(f"{dev.name}p*"))


def cosi_stream(image: str | Path, dev: Path, sha384: str, *args: str) -> CliRun:
    return stream(image, f"disk:{dev}", "--sha384", sha384, "--progress", "json", *args)


def assert_no_gpt(dev: Path, lba: int) -> None:
    """Both GPT areas zero: nothing can boot or restore a table from this disk."""
    size = int(run_command([require_tool("blockdev"), "--getsize64", dev]))
    assert read_device(dev, 34 * lba) == bytes(34 * lba), "the primary GPT area is not zeroed"
    assert read_device(dev, 33 * lba, size - 33 * lba) == bytes(33 * lba), "backup GPT left"


def assert_untouched(dev: Path, size: int) -> None:
    assert read_device(dev, size) == fill_pattern_bytes(size), "the disk was written"


def fill_pattern_bytes(size: int) -> bytes:
    return (PATTERN * (size // MIB + 1))[:size]


def assert_disk_holds(dev: Path, image: CosiImage) -> None:
    """The table, both GPTs, every partition's bytes and file system, by independent tools."""
    table = json.loads(run_command([require_tool("sfdisk"), "--json", dev]))["partitiontable"]
    keys = ("start", "size", "type", "uuid", "name")
    assert [{k: p[k] for k in keys} for p in table["partitions"]] == [
        {k: p[k] for k in keys} for p in image.sfdisk["partitions"]
    ]
    assert table["id"] == image.sfdisk["id"]
    assert table["sectorsize"] == image.lba_size
    size = int(run_command([require_tool("blockdev"), "--getsize64", dev]))
    # The backup GPT header is in the last sector of THIS disk, larger than the image's.
    lba = image.lba_size
    assert read_device(dev, 8, size - lba) == b"EFI PART"
    verified = run_command([require_tool("sgdisk"), "-v", dev])
    assert "No problems found" in verified, verified
    shown = run_command([require_tool("partx"), "--show", "-g", "-o", "NR,START,SECTORS", dev])
    assert len(shown.splitlines()) == len(image.partitions)
    for part in image.partitions:
        raw = part.raw.read_bytes()
        assert read_device(dev, len(raw), part.offset) == raw, f"partition {part.number} differs"
    run_command([require_tool("partx"), "-a", dev])
    for part, node in zip(image.partitions, _partition_nodes(dev), strict=True):
        fsck = require_tool(f"fsck.{part.spec.fs}")
        run_command([fsck, "-n", node])
    run_command([require_tool("partx"), "-d", dev])


# -- success ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("lba", "via"), [(512, "file"), (4096, "http")])
def test_stream_cosi_onto_a_larger_disk(
    lba: int, via: str, images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[lba]
    dev = disk_factory(image.disk_size + 8 * MIB, lba)
    if via == "http":
        with RangeServer(image.path) as server:
            run = cosi_stream(server.url, dev, image.metadata_sha384)
    else:
        run = cosi_stream(image.path, dev, image.metadata_sha384)

    assert run.code == 0, run.stderr
    result = run.result()
    assert result["ok"] is True
    assert result["sha384"] == image.metadata_sha384
    assert result["bytesFetched"] == image.path.stat().st_size
    assert result["bytesWritten"] == sum(p.raw.stat().st_size for p in image.partitions)
    progress = [r for r in run.records() if r["event"] == "progress"]
    assert {r.get("partitions") for r in progress if "partitions" in r} == {2}
    assert progress[-1]["partition"] == 2
    assert all(r["bytesTotal"] == image.path.stat().st_size for r in progress)
    assert_disk_holds(dev, image)


def test_stream_cosi_onto_a_disk_of_its_size_plain_output(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size, 512)
    run = stream(
        image.path, f"disk:{dev}", "--sha384", image.metadata_sha384, "--progress", "plain"
    )
    assert run.code == 0, run.stderr
    assert "partition 2 of 2" in run.stderr
    assert "partitions 2" in run.stdout
    assert_disk_holds(dev, image)


def test_reset_mid_partition_resumes(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size, 512)
    root = image.partitions[-1]
    # The tar data of the root image starts after its header: cut the connection inside it.
    offset = image.path.stat().st_size - root.compressed.stat().st_size // 2 - 1024
    with RangeServer(image.path, faults=FaultPlan([Fault.reset_at(offset)])) as server:
        run = cosi_stream(server.url, dev, image.metadata_sha384, "--retry-backoff", "0")
    assert run.code == 0, run.stderr
    assert run.result()["resumes"] >= 1
    assert_disk_holds(dev, image)


# -- failures ---------------------------------------------------------------------------------


def test_metadata_hash_mismatch_writes_nothing(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(image.path, dev, "ab" * 48)
    assert run.code == 4, run.stderr
    assert run.result()["reason"] == "HashMismatch"
    assert "metadata.json" in run.result()["message"]
    assert "nothing was written" in run.result()["message"]
    assert_untouched(dev, image.disk_size)


def test_corrupt_partition_image_fails_and_wipes_the_gpt(
    images: dict[int, CosiImage], disk_factory: DiskFactory, tmp_path: Path
) -> None:
    image = images[512]
    root = image.partitions[-1]
    bad = bytearray(root.compressed.read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    entries = [
        (name, bytes(bad) if name == root.tar_path else content)
        for name, content in image.entries()
    ]
    corrupt = image.rewrite(tmp_path / "corrupt.cosi", entries=entries)
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(corrupt, dev, image.metadata_sha384)
    assert run.code == 4, run.stderr
    assert run.result()["reason"] in ("HashMismatch", "CorruptStream")
    assert root.tar_path in run.result()["message"]
    assert_no_gpt(dev, 512)


def test_truncated_cosi_fails_and_wipes_the_gpt(
    images: dict[int, CosiImage], disk_factory: DiskFactory, tmp_path: Path
) -> None:
    image = images[512]
    data = image.path.read_bytes()
    root = image.partitions[-1]
    cut = tmp_path / "cut.cosi"
    cut.write_bytes(data[: len(data) - root.compressed.stat().st_size // 2 - 2048])
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(cut, dev, image.metadata_sha384)
    assert run.code == 4, run.stderr
    assert run.result()["reason"] == "TruncatedStream"
    assert_no_gpt(dev, 512)


def test_disk_too_small_is_refused_untouched(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size - MIB, 512)
    run = cosi_stream(image.path, dev, image.metadata_sha384)
    assert run.code == 5, run.stderr
    assert run.result()["reason"] == "TargetTooSmall"
    assert_untouched(dev, image.disk_size - MIB)


def test_wrong_sector_size_is_refused_untouched(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size, 4096)
    run = cosi_stream(image.path, dev, image.metadata_sha384)
    assert run.code == 5, run.stderr
    assert run.result()["reason"] == "SectorSizeMismatch"
    assert "4096-byte" in run.result()["message"]
    assert_untouched(dev, image.disk_size)


def _reordered(image: CosiImage, case: str) -> list[tuple[str, bytes | Path]]:
    entries = image.entries()
    if case == "marker-missing":
        return entries[1:]
    if case == "metadata-after-gpt":
        return [entries[0], entries[2], entries[1], *entries[3:]]
    if case == "duplicate":
        return [*entries, entries[-1]]
    if case == "outside-images":
        return [*entries[:3], ("extra/notes.txt", b"hello"), *entries[3:]]
    if case == "partitions-swapped":
        return [*entries[:3], entries[4], entries[3]]
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("marker-missing", "must be cosi-marker"),
        ("metadata-after-gpt", "must be metadata.json"),
        ("duplicate", "twice"),
        ("outside-images", "outside images/"),
        ("partitions-swapped", "order of disk.gptRegions"),
    ],
)
def test_malformed_archive_is_refused(
    case: str, words: str, images: dict[int, CosiImage], disk_factory: DiskFactory, tmp_path: Path
) -> None:
    image = images[512]
    bad = image.rewrite(tmp_path / f"{case}.cosi", entries=_reordered(image, case))
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(bad, dev, image.metadata_sha384)
    assert run.code == 4, run.stderr
    assert run.result()["reason"] == "CosiInvalid"
    assert words in run.result()["message"]
    if case == "duplicate":
        assert_no_gpt(dev, 512)  # every image was written: the tables are wiped
    else:
        assert_untouched(dev, image.disk_size)  # refused before any write


def test_old_cosi_version_is_refused_untouched(
    images: dict[int, CosiImage], disk_factory: DiskFactory, tmp_path: Path
) -> None:
    image = images[512]
    old = image.rewrite(tmp_path / "old.cosi", metadata={**image.metadata, "version": "1.1"})
    meta = json.dumps({**image.metadata, "version": "1.1"}, indent=2).encode()
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(old, dev, hashlib.sha384(meta).hexdigest())
    assert run.code == 4, run.stderr
    assert run.result()["reason"] == "CosiUnsupported"
    assert_untouched(dev, image.disk_size)


def test_partition_target_is_refused(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size + 8 * MIB, 512)
    assert cosi_stream(image.path, dev, image.metadata_sha384).code == 0
    run_command([require_tool("partx"), "-a", dev])
    partition = _partition_nodes(dev)[0]
    run = cosi_stream(image.path, partition, image.metadata_sha384)
    assert run.code == 5, run.stderr
    assert run.result()["reason"] == "TargetInvalid"
    assert "partition" in run.result()["message"]


def test_verify_after_write_reads_every_partition_back(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[4096]
    dev = disk_factory(image.disk_size, 4096)
    run = cosi_stream(image.path, dev, image.metadata_sha384, "--verify-after-write")
    assert run.code == 0, run.stderr
    assert run.result()["readBackVerified"] is True
    assert run.result()["partitions"] == 2
    assert_disk_holds(dev, image)


def test_a_mounted_partition_of_the_disk_refuses_it_untouched(
    images: dict[int, CosiImage], disk_factory: DiskFactory, tmp_path: Path
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size, 512)
    assert cosi_stream(image.path, dev, image.metadata_sha384).code == 0
    run_command([require_tool("partx"), "-a", dev])
    root = _partition_nodes(dev)[-1]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run_command([require_tool("mount"), "-o", "ro", root, mountpoint])
    try:
        before = read_device(dev, image.disk_size)
        run = cosi_stream(image.path, dev, image.metadata_sha384)
    finally:
        run_command([require_tool("umount"), mountpoint])
    assert run.code == 5, run.stderr
    assert run.result()["reason"] in ("TargetMounted", "TargetInUse")
    assert read_device(dev, image.disk_size) == before


def test_disk_prefix_without_a_device_is_a_usage_error(images: dict[int, CosiImage]) -> None:
    run = stream(images[512].path, "disk:", "--sha384", "ab" * 48)
    assert run.code == 2, run.stderr
    assert "disk:" in run.stderr


def test_a_compression_for_a_disk_target_is_a_usage_error(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(image.path, dev, image.metadata_sha384, "--compression", "zstd")
    assert run.code == 2, run.stderr
    assert "uncompressed tar" in run.result()["message"]
    assert_untouched(dev, image.disk_size)


def test_sigterm_mid_partition_leaves_no_gpt(
    images: dict[int, CosiImage],
    disk_factory: DiskFactory,
    nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:
    image = images[512]
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    os.link(image.path, docroot / "image.cosi")
    # About 4 s for the 2 MiB root image: the signal lands while it is being written.
    server = nginx_factory(docroot, extra_server_config="limit_rate 512k;")
    dev = disk_factory(image.disk_size, 512)
    args = ("stream", server.url_for("image.cosi"), f"disk:{dev}")
    with imagestream_process(*args, "--sha384", image.metadata_sha384, "--progress", "json") as cli:
        assert cli.stdout is not None
        for line in cli.stdout:
            record = json.loads(line)
            if record.get("partition") == 2 and record["bytesWritten"] > 0:
                break
        stdout, _ = interrupt(cli)
        assert cli.returncode == 130
    (result,) = [r for r in json_records(stdout) if r["event"] == "result"]
    assert result["reason"] == "Cancelled"
    assert "left invalid" in result["message"]
    assert_no_gpt(dev, 512)


def _with_root_image(image: CosiImage, field: str, value: object) -> dict[str, object]:
    metadata = copy.deepcopy(image.metadata)
    metadata["disk"]["gptRegions"][-1]["image"][field] = value
    return metadata


@pytest.mark.parametrize(
    ("field", "change", "reason"),
    [
        ("compressedSize", 1, "SizeMismatch"),
        ("uncompressedSize", -4096, "SizeMismatch"),
        ("uncompressedSize", 4096, "SizeMismatch"),
        ("sha384", None, "HashMismatch"),
    ],
)
def test_an_image_unlike_its_metadata_fails_and_wipes_the_gpt(
    *,
    field: str,
    change: int | None,
    reason: str,
    images: dict[int, CosiImage],
    disk_factory: DiskFactory,
    tmp_path: Path,
) -> None:
    image = images[512]
    described = image.metadata["disk"]["gptRegions"][-1]["image"]
    value = "0" * 96 if change is None else described[field] + change
    metadata = _with_root_image(image, field, value)
    lying = image.rewrite(tmp_path / "lying.cosi", metadata=metadata)
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(lying, dev, sha384_of_metadata(metadata))
    assert run.code == 4, run.stderr
    assert run.result()["reason"] == reason
    assert described["path"] in run.result()["message"]
    assert_no_gpt(dev, 512)


def sha384_of_metadata(metadata: dict[str, object]) -> str:
    """The hash `CosiImage.rewrite` gives the metadata it writes."""
    return hashlib.sha384(json.dumps(metadata, indent=2).encode()).hexdigest()


@pytest.mark.parametrize(
    ("window_log", "refused_at"), [(10, "images/primary-gpt.rawzst"), (16, "images/esp.rawzst")]
)
def test_a_window_beyond_the_metadata_s_is_refused(
    window_log: int,
    refused_at: str,
    images: dict[int, CosiImage],
    disk_factory: DiskFactory,
    tmp_path: Path,
) -> None:
    # zstd -3 gave the primary GPT a 17 KiB window (2^15) and the partitions 2 MiB ones.
    image = images[512]
    metadata = copy.deepcopy(image.metadata)
    metadata["compression"]["maxWindowLog"] = window_log
    small = image.rewrite(tmp_path / "small-window.cosi", metadata=metadata)
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(small, dev, sha384_of_metadata(metadata))
    assert run.code == 4, run.stderr
    assert run.result()["reason"] == "WindowTooLarge"
    assert "maxWindowLog" in run.result()["message"]
    assert refused_at in run.result()["message"]
    # Refused at the frame header, before a byte of that image is decoded: nothing was written.
    assert_untouched(dev, image.disk_size)


def test_a_metadata_window_beyond_max_window_log_is_refused_untouched(
    images: dict[int, CosiImage], disk_factory: DiskFactory
) -> None:
    image = images[512]
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(image.path, dev, image.metadata_sha384, "--max-window-log", "20")
    assert run.code == 4, run.stderr
    assert run.result()["reason"] == "WindowTooLarge"
    assert "--max-window-log" in run.result()["message"]
    assert_untouched(dev, image.disk_size)


def test_an_images_directory_entry_is_accepted(
    images: dict[int, CosiImage], disk_factory: DiskFactory, tmp_path: Path
) -> None:
    image = images[512]
    entries = image.entries()
    with_dir = image.rewrite(
        tmp_path / "with-dir.cosi", entries=[*entries[:2], ("images/", b""), *entries[2:]]
    )
    dev = disk_factory(image.disk_size, 512)
    run = cosi_stream(with_dir, dev, image.metadata_sha384)
    assert run.code == 0, run.stderr
    assert_disk_holds(dev, image)
