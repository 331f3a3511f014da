"""Streaming onto real block devices (loop devices): success, refusals, failures, cancellation.

Every test checks the bytes on the device: the image's raw data after a success; after a
failure either the untouched earlier content (refused before any write) or a zeroed first MiB
(the target must never look valid). Devices are filled with a pattern first so "zeros" and
"untouched" mean something. The CLI runs as a subprocess, so exit codes and messages are the
real ones a user sees.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zstandard
from tests.support.blockdev import LoopDeviceFactory, mounted_ext4
from tests.support.blockdev import run as run_command
from tests.support.cli import (
    assert_exited,
    imagestream_process,
    interrupt,
    one_line,
    result_record,
    run_imagestream,
)
from tests.support.nginx import NginxFactory
from tests.support.targets import MIB, PATTERN, device_plan, fill_pattern, read_device, sha384_of
from tests.support.throttle import read_throttle
from tests.support.tools import require_tool, wait_until

from imagestream.demo.image import SampleImage, iter_raw_data, write_raw_image, write_sample_image
from imagestream.pipeline.pipeline import StreamRequest, run_stream

IMAGE_SIZE = 4 * MIB

pytestmark = pytest.mark.usefixtures("require_root")


# -- helpers ----------------------------------------------------------------------------------


#: `imagestream stream ARGS...`.
stream = functools.partial(run_imagestream, "stream")

#: The backup GPT area of a whole loop disk (512-byte sectors), held back like the first MiB.
BACKUP_GPT_BYTES = 33 * 512


def raw_data(size: int, seed: int = 0) -> bytes:
    return b"".join(iter_raw_data(size, seed=seed))


def served_by_nginx(image: Path, name: str, nginx_factory: NginxFactory, tmp_path: Path) -> str:
    """Start an nginx serving (a hard link to) `image` as `name`; return its URL."""
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    os.link(image, docroot / name)
    return nginx_factory(docroot).url_for(name)


def assert_never_valid(dev: Path, before: bytes) -> None:
    """After a failure detected while decompressing: untouched, or first MiB zeros.

    The writer may or may not have taken a buffer before the failure stopped every stage; if it
    wrote anything the first MiB must be zeros, if not the device must be exactly as before.
    """
    now = read_device(dev, len(before))
    if now != before:
        assert now[:MIB] == bytes(MIB), "a partly written device must have its first MiB zeroed"


def assert_invalidated(dev: Path, written_from: bytes | None = None) -> None:
    """First MiB zero; optionally the bytes after it equal `written_from` (they were written)."""
    head = read_device(dev, MIB)
    assert head == bytes(MIB), "the first MiB must be zeros after a failed stream"
    if written_from is not None:
        rest = read_device(dev, len(written_from) - MIB, MIB)
        assert rest == written_from[MIB:]


@pytest.fixture
def image(tmp_path: Path) -> SampleImage:
    return write_sample_image(tmp_path / "image.zst", IMAGE_SIZE, seed=3)


@pytest.fixture
def dev(loop_device_factory: LoopDeviceFactory) -> Path:
    """An 8 MiB loop device filled with PATTERN."""
    device = loop_device_factory(8 * MIB)
    fill_pattern(device, 8 * MIB)
    return device


# -- success ----------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["file", "http"])
def test_stream_onto_loop_device(
    via: str, image: SampleImage, dev: Path, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    source = str(image.path)
    if via == "http":
        source = served_by_nginx(image.path, "image.zst", nginx_factory, tmp_path)

    run = stream(source, dev, "--sha384", image.sha384, "--progress", "plain")

    assert run.code == 0, run.stderr
    assert read_device(dev, IMAGE_SIZE) == raw_data(IMAGE_SIZE, seed=3)
    assert f"Wrote {dev}: verified" in one_line(run.stdout)
    assert image.sha384 in run.stdout
    # Independent check: the on-device bytes are what `zstd -d` makes of the image.
    zstd = require_tool("zstd")
    decoded = subprocess.run([zstd, "-dc", image.path], capture_output=True, check=True).stdout
    assert read_device(dev, len(decoded)) == decoded


@pytest.mark.parametrize(
    "size", [1000, 300_001, MIB, MIB + 1, 5 * MIB + 12345], ids=lambda size: f"{size}B"
)
def test_odd_sizes_onto_loop_device(size: int, dev: Path, tmp_path: Path) -> None:
    # Smaller than the held-back first MiB, exactly it, and tails O_DIRECT cannot write.
    img = write_sample_image(tmp_path / "image.zst", size, seed=size)
    run = stream(img.path, dev, "--sha384", img.sha384, "--verify-after-write")
    assert run.code == 0, run.stderr
    assert read_device(dev, size) == raw_data(size, seed=size)
    assert read_device(dev, 4096, size) == (PATTERN * 2)[size % MIB : size % MIB + 4096]


def test_verify_after_write_cli_json(image: SampleImage, dev: Path) -> None:
    run = stream(
        image.path, dev, "--sha384", image.sha384, "--verify-after-write", "--progress", "json"
    )
    assert run.code == 0, run.stderr
    records = run.records()
    final = run.result()  # the last record, which is the result
    assert final["ok"] is True
    assert final["verified"] is True
    assert final["readBackVerified"] is True
    assert final["sha384"] == image.sha384
    assert final["bytesWritten"] == IMAGE_SIZE
    assert final["bytesFetched"] == image.compressed_size
    assert final["compression"] == "zstd"
    phases = [r["phase"] for r in records if r["event"] == "progress"]
    assert phases[-2:] == ["Verifying", "Succeeded"]
    assert sha384_of(dev, IMAGE_SIZE) == image.raw_sha384

    plain = stream(
        image.path, dev, "--sha384", image.sha384, "--verify-after-write", "--progress", "plain"
    )
    assert plain.code == 0, plain.stderr
    assert "read-back verified" in plain.stdout


def test_verify_after_write_run_stream_over_http(
    image: SampleImage, dev: Path, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    url = served_by_nginx(image.path, "root.img.zst", nginx_factory, tmp_path)

    result = run_stream(
        StreamRequest(
            source=url, target=device_plan(dev), sha384=image.sha384, verify_after_write=True
        )
    )

    assert result.read_back_verified
    assert result.verified
    assert result.sha384 == image.sha384
    assert result.bytes_written == IMAGE_SIZE
    assert read_device(dev, IMAGE_SIZE) == raw_data(IMAGE_SIZE, seed=3)


def descriptors_open_on(dev: Path) -> list[int]:
    """This process's file descriptors that refer to `dev`."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(dev):
                found.append(int(name))
        except OSError:
            continue  # the descriptor listdir itself used, gone by now
    return found


def close_leaked_descriptors(dev: Path) -> None:
    """Close what a regressed run_stream leaked, so the loop device detaches at teardown."""
    for fd in descriptors_open_on(dev):
        os.close(fd)


def test_run_stream_releases_the_device(
    image: SampleImage, loop_device_factory: LoopDeviceFactory
) -> None:
    dev = loop_device_factory(8 * MIB)
    request = StreamRequest(source=str(image.path), target=device_plan(dev), sha384=image.sha384)
    try:
        run_stream(request)
        leaked = descriptors_open_on(dev)
        # A second stream onto the same device from the same process (an agent that retries,
        # a controller test, an A/B update) must not find the device still held by the first.
        second_error: Exception | None = None
        try:
            run_stream(request)
        except Exception as exc:
            second_error = exc
    finally:
        close_leaked_descriptors(dev)
    assert leaked == []
    assert second_error is None


# -- refusals before the first write ----------------------------------------------------------


def test_mounted_device_is_refused(
    image: SampleImage, loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    dev = loop_device_factory(32 * MIB)
    with mounted_ext4(dev, tmp_path / "mnt") as mount_point:
        (mount_point / "marker").write_text("still here")
        os.sync()

        run = stream(image.path, dev, "--sha384", image.sha384)
        assert_exited(run, 5, "TargetMounted", str(mount_point.resolve()))

        # --force skips the mount-table check, but the kernel's exclusive open still refuses.
        forced = stream(image.path, dev, "--sha384", image.sha384, "--force")
        assert_exited(forced, 5, "TargetInUse")

        assert (mount_point / "marker").read_text() == "still here"

    # Unmounted now: the file system must be intact, the marker file readable from disk.
    e2fsck = require_tool("e2fsck")
    fsck = subprocess.run([e2fsck, "-fn", dev], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    debugfs = require_tool("debugfs")
    assert run_command([debugfs, "-R", "cat /marker", dev]).strip() == "still here"


def _mbr(disk_size: int, start_sector: int = 2048) -> bytes:
    """A DOS partition table with one Linux partition from `start_sector` to the end."""
    sectors = disk_size // 512 - start_sector
    entry = (
        b"\x00"  # not bootable
        + b"\xfe\xff\xff"  # CHS start (unused: LBA)
        + b"\x83"  # Linux
        + b"\xfe\xff\xff"  # CHS end
        + start_sector.to_bytes(4, "little")
        + sectors.to_bytes(4, "little")
    )
    return bytes(440) + b"ISTR" + bytes(2) + entry + bytes(48) + b"\x55\xaa"


@contextmanager
def partitioned_loop_device(size: int, directory: Path) -> Iterator[tuple[Path, Path]]:
    """A loop device with a partition table scanned (`losetup -P`): yields (disk, partition 1).

    The `loop_device_factory` fixture attaches without -P, so this is local to these tests.
    """
    losetup = require_tool("losetup")
    backing = directory / "disk.img"
    with backing.open("wb") as fh:
        fh.truncate(size)
        fh.write(_mbr(size))
    disk = Path(run_command([losetup, "-f", "--show", "-P", backing]).strip())
    try:
        partition = Path(f"{disk}p1")
        if not partition.is_block_device():
            # Kernels built without the MS-DOS partition parser (CONFIG_MSDOS_PARTITION) scan
            # nothing; partx parses the table itself and adds the partition (BLKPG).
            run_command([require_tool("partx"), "-a", disk])
        wait_until(partition.is_block_device, 10, what=f"{partition} to appear")
        yield disk, partition
    finally:
        run_command([losetup, "-d", disk])
        backing.unlink(missing_ok=True)


def test_whole_disk_with_a_mounted_partition_is_refused(image: SampleImage, tmp_path: Path) -> None:
    with partitioned_loop_device(64 * MIB, tmp_path) as (disk, partition):
        table_before = read_device(disk, 512)
        with mounted_ext4(partition, tmp_path / "mnt") as mount_point:
            run = stream(image.path, disk, "--sha384", image.sha384)
            assert_exited(run, 5, "TargetMounted", str(mount_point.resolve()))
        assert read_device(disk, 512) == table_before  # the partition table was not touched
        e2fsck = require_tool("e2fsck")
        fsck = subprocess.run([e2fsck, "-fn", partition], capture_output=True, check=False)
        assert fsck.returncode == 0


@pytest.mark.parametrize("kind", ["zstd-with-content-size", "raw"])
def test_too_small_target_is_refused_before_any_write(
    kind: str, loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    if kind == "raw":
        img = write_raw_image(tmp_path / "image.raw", IMAGE_SIZE)
        extra = ["--compression", "none"]
    else:
        img = write_sample_image(tmp_path / "image.zst", IMAGE_SIZE)
        extra = []
    dev = loop_device_factory(2 * MIB)
    before = fill_pattern(dev, 2 * MIB)

    run = stream(img.path, dev, "--sha384", img.sha384, *extra)

    assert_exited(run, 5, "TargetTooSmall", str(IMAGE_SIZE))
    assert read_device(dev, 2 * MIB) == before  # not a single byte written


def test_image_without_content_size_runs_out_of_space(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    img = write_sample_image(tmp_path / "image.zst", IMAGE_SIZE, content_size=False)
    dev = loop_device_factory(2 * MIB)
    fill_pattern(dev, 2 * MIB)

    run = stream(img.path, dev, "--sha384", img.sha384, "--progress", "json")

    assert run.code == 5, run.stderr
    final = run.result()
    assert final["ok"] is False
    assert final["reason"] == "TargetTooSmall"
    assert "full" in final["message"]
    # The writes reached the end of the device (so it really was ENOSPC mid-write) ...
    raw = raw_data(IMAGE_SIZE)
    # (a loop device is a whole disk: its last 33 sectors, the backup GPT area, stay zeros) ...
    tail = 2 * MIB - BACKUP_GPT_BYTES
    assert read_device(dev, tail - MIB, MIB) == raw[MIB:tail]
    assert read_device(dev, BACKUP_GPT_BYTES, tail) == bytes(BACKUP_GPT_BYTES)
    # ... and the first MiB is zeros: the device does not look like a valid image.
    assert_invalidated(dev)


def test_locked_device_is_refused(
    image: SampleImage, loop_device_factory: LoopDeviceFactory
) -> None:
    dev = loop_device_factory(8 * MIB)
    before = fill_pattern(dev, 8 * MIB)
    fd = os.open(dev, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = stream(image.path, dev, "--sha384", image.sha384)
    finally:
        os.close(fd)
    assert_exited(run, 5, "TargetLocked", "locked")
    assert read_device(dev, 8 * MIB) == before

    # Once the lock is gone the same command succeeds (the refusal was the lock, nothing else).
    again = stream(image.path, dev, "--sha384", image.sha384)
    assert again.code == 0, again.stderr


# -- integrity failures -----------------------------------------------------------------------


def test_hash_mismatch_leaves_first_mib_zero(image: SampleImage, dev: Path) -> None:
    wrong = hashlib.sha384(b"some other image").hexdigest()

    run = stream(image.path, dev, "--sha384", wrong)

    assert_exited(run, 4, "HashMismatch", wrong, image.sha384)
    # Everything after the first MiB was written; the first MiB is zeros.
    assert_invalidated(dev, written_from=raw_data(IMAGE_SIZE, seed=3))


@pytest.mark.parametrize("cut", ["half", "last-byte", "inside-header"])
def test_truncated_image_fails_even_with_its_own_hash(
    cut: str, loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    # 12 MiB: several 4 MiB buffers, so the writer is usually busy when the cut is found.
    img = write_sample_image(tmp_path / "image.zst", 12 * MIB, seed=4)
    data = img.path.read_bytes()
    keep = {"half": len(data) // 2, "last-byte": len(data) - 1, "inside-header": 10}[cut]
    truncated = tmp_path / "truncated.zst"
    truncated.write_bytes(data[:keep])
    dev = loop_device_factory(16 * MIB)
    before = fill_pattern(dev, 16 * MIB)

    # The hash of the truncated file matches what is fetched: only the stream can tell.
    run = stream(truncated, dev, "--sha384", sha384_of(truncated))

    assert_exited(run, 4, "TruncatedStream")
    if cut == "inside-header":
        assert read_device(dev, 16 * MIB) == before  # nothing to write: nothing written
    else:
        assert_never_valid(dev, before)


def test_corrupt_bytes_in_the_middle_fail(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    # With a content checksum libzstd catches any corruption, even inside a raw block (without
    # one, flipped bytes in a stored block decode "fine": then only the SHA-384 can tell).
    raw = raw_data(12 * MIB, seed=5)
    data = bytearray(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw))
    middle = len(data) * 3 // 4
    data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
    corrupt = tmp_path / "corrupt.zst"
    corrupt.write_bytes(data)
    dev = loop_device_factory(16 * MIB)
    before = fill_pattern(dev, 16 * MIB)

    run = stream(corrupt, dev, "--sha384", sha384_of(corrupt))

    assert_exited(run, 4, "CorruptStream")
    assert_never_valid(dev, before)


# -- cancellation -----------------------------------------------------------------------------


def test_sigterm_stops_the_stream_and_invalidates(
    loop_device_factory: LoopDeviceFactory, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    size = 16 * MIB
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    img = write_sample_image(docroot / "slow.zst", size, seed=8)
    # About 1 MiB/s: the whole image would take ~8 s; SIGTERM arrives after the first buffer.
    server = nginx_factory(docroot, extra_server_config="limit_rate 1m;")
    dev = loop_device_factory(size)
    fill_pattern(dev, size)

    with imagestream_process(
        "stream", server.url_for("slow.zst"), dev, "--sha384", img.sha384, "--progress", "json"
    ) as process:
        assert process.stdout is not None
        written = 0
        for line in process.stdout:
            record = json.loads(line)
            if record["event"] != "progress":
                pytest.fail(f"the stream ended before it could be cancelled: {record}")
            written = record["bytesWritten"]
            if written >= 4 * MIB:
                break
        assert written >= 4 * MIB
        fetched = record["bytesFetched"]
        assert fetched < img.compressed_size  # still in the middle of the transfer
        stdout, stderr = interrupt(process)

    assert process.returncode == 130, stderr
    final = result_record(stdout, stderr)
    assert final["ok"] is False
    assert final["reason"] == "Cancelled"
    # The first 4 MiB buffer was written (past the first MiB), the first MiB is zeros.
    assert_invalidated(dev, written_from=raw_data(4 * MIB, seed=8))
    # The end of the device was never reached, but its backup GPT area was zeroed up front.
    end = read_device(dev, MIB, size - MIB)
    assert end[:-BACKUP_GPT_BYTES] == PATTERN[:-BACKUP_GPT_BYTES]
    assert end[-BACKUP_GPT_BYTES:] == bytes(BACKUP_GPT_BYTES)


# -- whole disks: the backup GPT ---------------------------------------------------------------

GPT_DISK_SIZE = 16 * MIB


def gpt_image(path: Path, size: int, label: str) -> Path:
    """A raw disk image of `size` bytes holding a GPT with one partition named `label`."""
    with path.open("wb") as file:
        file.truncate(size)
    run_command([require_tool("sgdisk"), "-o", "-n", "1:2048:+4M", "-c", f"1:{label}", path])
    return path


def gpt_disk(loop_device_factory: LoopDeviceFactory, tmp_path: Path) -> Path:
    """A whole loop disk with an old GPT (partition `old-root`) that sfdisk reads."""
    dev = loop_device_factory(GPT_DISK_SIZE)
    old = gpt_image(tmp_path / "old.img", GPT_DISK_SIZE, "old-root")
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, old.read_bytes(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert partition_names(dev) == ["old-root"]
    return dev


def partition_names(dev: Path) -> list[str] | None:
    """The partition names sfdisk finds on `dev`; None when it finds no table at all."""
    sfdisk = require_tool("sfdisk")
    found = subprocess.run([sfdisk, "--json", dev], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        assert "does not contain a recognized partition table" in found.stderr, found.stderr
        return None
    table = json.loads(found.stdout)["partitiontable"]
    return [part.get("name", "") for part in table.get("partitions", [])]


def sgdisk_verify(dev: Path) -> str:
    """`sgdisk -v` of `dev`: what a tool (or firmware) would find and restore."""
    checked = subprocess.run(
        [require_tool("sgdisk"), "-v", dev], capture_output=True, text=True, check=False
    )
    return checked.stdout + checked.stderr


def test_a_failed_stream_leaves_no_backup_gpt_to_restore(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    """Zeroing the first MiB alone leaves the old backup GPT at the disk's end, from which
    sgdisk (and firmware) would restore the old table over the half-written disk."""
    dev = gpt_disk(loop_device_factory, tmp_path)
    img = write_sample_image(tmp_path / "image.zst", 4 * MIB, seed=21)
    wrong = hashlib.sha384(b"another image").hexdigest()

    run = stream(img.path, dev, "--sha384", wrong)

    assert_exited(run, 4, "HashMismatch")
    assert partition_names(dev) is None
    report = sgdisk_verify(dev)
    assert "backup" not in report.lower(), report
    assert "Creating new GPT entries" in report, report  # sgdisk finds no table at all


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "read-back"])
def test_an_image_reaching_the_disk_end_gets_its_backup_gpt_after_verifying(
    verify: bool, loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    dev = gpt_disk(loop_device_factory, tmp_path)
    img = gpt_image(tmp_path / "new.img", GPT_DISK_SIZE, "new-root")
    sha384 = hashlib.sha384(img.read_bytes()).hexdigest()
    extra = ["--verify-after-write"] if verify else []

    run = stream(img, dev, "--sha384", sha384, "--compression", "none", *extra)

    assert run.code == 0, run.stderr
    assert sha384_of(dev, GPT_DISK_SIZE) == sha384
    assert partition_names(dev) == ["new-root"]
    assert "No problems found" in sgdisk_verify(dev)


def test_an_image_smaller_than_the_disk_leaves_the_disk_end_zeroed(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    """The image's own backup GPT lies at the image's end, where its primary header points:
    the disk's end keeps zeros, never the old table."""
    dev = gpt_disk(loop_device_factory, tmp_path)
    img = gpt_image(tmp_path / "new.img", GPT_DISK_SIZE // 2, "new-root")
    sha384 = hashlib.sha384(img.read_bytes()).hexdigest()

    run = stream(img, dev, "--sha384", sha384, "--compression", "none")

    assert run.code == 0, run.stderr
    assert partition_names(dev) == ["new-root"]
    assert read_device(dev, BACKUP_GPT_BYTES, GPT_DISK_SIZE - BACKUP_GPT_BYTES) == bytes(
        BACKUP_GPT_BYTES
    )


# -- read-back while the target is still invalid -------------------------------------------------

READ_BACK_SIZE = 32 * MIB
#: 32 MiB read back at 4 MiB/s: a read-back of about 8 s.
READ_BACK_RATE = 4 * MIB


def start_reading_back(process: subprocess.Popen[str]) -> None:
    """Wait for the JSON progress line of the Verifying phase, then a second into the read-back."""
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line).get("phase") == "Verifying":
            break
    else:
        pytest.fail(f"the stream ended before verifying: {process.communicate()}")
    time.sleep(1.0)
    assert process.poll() is None, "the read-back was not slow: the test proves nothing"


def test_a_kill_during_a_long_read_back_leaves_the_target_invalid(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    dev = loop_device_factory(READ_BACK_SIZE)
    fill_pattern(dev, 2 * MIB)
    img = write_sample_image(tmp_path / "image.zst", READ_BACK_SIZE, seed=31)
    args = ("stream", img.path, dev, "--sha384", img.sha384, "--verify-after-write")

    with (
        read_throttle(dev, READ_BACK_RATE) as admit,
        imagestream_process(*args, "--progress", "json") as process,
    ):
        admit(process.pid)
        start_reading_back(process)
        process.kill()
        process.wait()

    assert read_device(dev, MIB) == bytes(MIB)  # the hash matched, the read-back had not
    assert read_device(dev, MIB, MIB) == raw_data(2 * MIB, seed=31)[MIB:]


def test_a_failed_invalidation_is_not_reported_as_an_invalid_target(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    """The device changes under the read-back (a read-back mismatch), then turns read-only, so
    zeroing its first MiB fails: the message must say so, not claim an invalid target."""
    dev = loop_device_factory(READ_BACK_SIZE)
    img = write_sample_image(tmp_path / "image.zst", READ_BACK_SIZE, seed=32)
    args = ("stream", img.path, dev, "--sha384", img.sha384, "--verify-after-write")
    blockdev = require_tool("blockdev")

    with (
        read_throttle(dev, READ_BACK_RATE) as admit,
        imagestream_process(*args, "--progress", "json") as process,
    ):
        admit(process.pid)
        start_reading_back(process)
        # Altered data near the end (not read back yet), then the device refuses writes.
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, b"altered!" * 512, READ_BACK_SIZE - 2 * MIB)
            os.fsync(fd)
        finally:
            os.close(fd)
        run_command([blockdev, "--setro", dev])
        try:
            stdout, stderr = process.communicate(timeout=60)
        finally:
            run_command([blockdev, "--setrw", dev])

    assert process.returncode == 4, stderr
    final = result_record(stdout, stderr)
    assert final["reason"] == "ReadBackMismatch"
    assert "could NOT be invalidated" in final["message"]
    assert "left invalid" not in final["message"]
