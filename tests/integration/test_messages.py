"""Messages that are true: each failure's words match what really happened, through the CLI.

The target's state ends every failure's message by one rule (what the sink says it did): a
device written to was "left invalid", a file target keeps its previous file ("TARGET is
unchanged"), and a target nothing reached is "unchanged". The rest are the causes a user must
be told apart: a device whose backing store ran out of space is no "too small" target, a second
writer on a device is a lock, not "in use by the system".
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import zstandard
from tests.support.blockdev import LoopDeviceFactory, loop_device, small_tmpfs
from tests.support.cli import assert_exited, run_imagestream
from tests.support.targets import MIB, fill_pattern, read_device, sha384_of

from imagestream.demo.image import SampleImage, write_sample_image

pytestmark = pytest.mark.usefixtures("require_root")

WRONG_HASH = "ab" * 48

#: `imagestream stream ARGS...`.
stream = functools.partial(run_imagestream, "stream")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    return write_sample_image(tmp_path_factory.mktemp("img") / "image.zst", 8 * MIB, seed=41)


# -- what a failure left on the target ---------------------------------------------------------


def test_a_device_written_to_is_left_invalid(
    image: SampleImage, loop_device_factory: LoopDeviceFactory
) -> None:
    dev = loop_device_factory(16 * MIB)
    fill_pattern(dev, 16 * MIB)
    run = stream(image.path, dev, "--sha384", WRONG_HASH)
    assert_exited(run, 4, "HashMismatch", "; the target was left invalid")
    assert read_device(dev, MIB) == bytes(MIB)


def test_a_file_target_keeps_its_previous_file_and_says_so(
    image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "root.img"
    target.write_bytes(b"the previous image")
    run = stream(image.path, target, "--sha384", WRONG_HASH)
    assert_exited(run, 4, "HashMismatch", f"; {target} is unchanged")
    assert "invalid" not in run.stderr
    assert target.read_bytes() == b"the previous image"


def test_a_new_file_target_is_not_created(image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "root.img"
    run = stream(image.path, target, "--sha384", WRONG_HASH)
    assert_exited(run, 4, "HashMismatch", f"; no file was created at {target}")
    assert "invalid" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failure_before_any_write_leaves_the_target_unchanged(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    dev = loop_device_factory(4 * MIB)
    fill_pattern(dev, 4 * MIB)
    run = stream(tmp_path / "missing.zst", dev, "--sha384", WRONG_HASH)
    assert run.code == 3, run.text
    assert "nothing was written, the target is unchanged" in run.text
    assert "invalid" not in run.stderr
    assert read_device(dev, MIB) != bytes(MIB)


# -- devices: out of space behind the device, a second writer ----------------------------------


def test_enospc_on_a_device_with_room_is_a_write_failure_naming_it(
    image: SampleImage, tmp_path: Path
) -> None:
    """A 32 MiB loop device backed by a sparse file on a 2 MiB tmpfs: the device is large
    enough, its backing store is not."""
    with (
        small_tmpfs(tmp_path / "small", "2m") as store,
        loop_device(32 * MIB, store) as dev,
    ):
        run = stream(image.path, dev, "--sha384", image.sha384)
    assert_exited(run, 5, "WriteFailed", f"writing {dev} failed", "backing store")
    assert "TargetTooSmall" not in run.stderr
    assert "larger than the target" not in run.stderr


def test_a_second_writer_on_a_device_is_told_it_is_locked(
    image: SampleImage, loop_device_factory: LoopDeviceFactory
) -> None:
    dev = loop_device_factory(16 * MIB)
    # Another imagestream holds the device as a writer does: opened with O_EXCL.
    holder = os.open(dev, os.O_RDWR | os.O_EXCL)
    try:
        run = stream(image.path, dev, "--sha384", image.sha384)
    finally:
        os.close(holder)
    assert_exited(run, 5, "TargetLocked", "locked: another imagestream is writing it")


# -- what the input is ---------------------------------------------------------------------------


def test_a_96_character_hash_that_is_not_hex_names_the_wrong_character(
    image: SampleImage, tmp_path: Path
) -> None:
    bad = image.sha384[:40] + "g" + image.sha384[41:]
    run = stream(image.path, tmp_path / "o.img", "--sha384", bad)
    assert_exited(run, 2, "InvalidRequest", "character 41 is 'g'")


def test_raw_data_under_compression_zstd_is_not_a_zstd_stream(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x7fELF" + bytes(MIB))
    run = stream(raw, tmp_path / "o.img", "--sha384", sha384_of(raw), "--compression", "zstd")
    assert_exited(run, 4, "CorruptStream", "not a zstd stream (starts with 7f 45 4c 46 '.ELF')")
    assert "Unknown frame descriptor" not in run.stderr


def test_frames_are_numbered_from_one(image: SampleImage, tmp_path: Path) -> None:
    """The data after the first frame is "after zstd frame 1", as a truncation in the first
    frame is "inside frame 1"."""
    spliced = tmp_path / "spliced.zst"
    spliced.write_bytes(zstandard.ZstdCompressor().compress(b"x" * 1000) + b"garbage!")
    run = stream(spliced, tmp_path / "o.img", "--sha384", sha384_of(spliced))
    assert_exited(run, 4, "CorruptStream", "data after zstd frame 1 is not a zstd frame")
    truncated = tmp_path / "truncated.zst"
    truncated.write_bytes(image.path.read_bytes()[:1000])
    run = stream(truncated, tmp_path / "o2.img", "--sha384", sha384_of(truncated))
    assert_exited(run, 4, "TruncatedStream", "inside frame 1")


# -- symbolic links (as the README documents them) ----------------------------------------------


def test_a_target_that_is_a_link_is_replaced_and_what_it_pointed_to_is_kept(
    image: SampleImage, tmp_path: Path
) -> None:
    pointed = tmp_path / "pointed.img"
    pointed.write_bytes(b"not to be touched")
    link = tmp_path / "root.img"
    link.symlink_to(pointed)
    run = stream(image.path, link, "--sha384", image.sha384)
    assert run.code == 0, run.text
    assert not link.is_symlink()
    assert sha384_of(link) == image.raw_sha384
    assert pointed.read_bytes() == b"not to be touched"


def test_a_linked_directory_is_followed_once(image: SampleImage, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    run = stream(image.path, tmp_path / "via" / "root.img", "--sha384", image.sha384)
    assert run.code == 0, run.text
    assert (real / "root.img").is_file()
