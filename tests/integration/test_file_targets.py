"""Streaming into regular files: atomic publication, clean failures, every image encoding.

A file target is written as `.NAME.partial` beside it and renamed into place only after the
hash matched, so after any failure there is no file at the target path (or the previous one,
untouched) and no staging file. The CLI runs as a subprocess: exit codes and output are real.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard
from tests.support.blockdev import small_tmpfs
from tests.support.cli import assert_exited, run_imagestream
from tests.support.nginx import Nginx
from tests.support.targets import assert_file_target_invalid, file_plan, sha384_of, staging_path
from tests.support.tools import fail_or_skip, require_tool

from imagestream.demo.image import SampleImage, write_raw_image, write_sample_image
from imagestream.pipeline.pipeline import StreamRequest, run_stream
from imagestream.pipeline.progress import Progress
from imagestream.pipeline.sinks import open_sink

MiB = 1 << 20
IMAGE_SIZE = 4 * MiB

#: `imagestream stream ARGS...` (`run_imagestream` itself for the usage errors).
stream = functools.partial(run_imagestream, "stream")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty directory for targets, so 'nothing else was left' is checkable."""
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


@pytest.fixture
def image(tmp_path: Path) -> SampleImage:
    return write_sample_image(tmp_path / "image.zst", IMAGE_SIZE, seed=1)


# -- success ----------------------------------------------------------------------------------


def test_file_target_success_is_atomic(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    run = stream(image.path, target, "--sha384", image.sha384, "--progress", "json")
    assert run.code == 0, run.stderr
    assert sha384_of(target) == image.raw_sha384
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]
    final = run.result()
    assert final["ok"] is True
    assert final["verified"] is True
    assert final["target"] == str(target)
    assert final["bytesWritten"] == IMAGE_SIZE
    # Independent check: what `zstd -d` makes of the image.
    zstd = require_tool("zstd")
    decoded = subprocess.run([zstd, "-dc", image.path], capture_output=True, check=True).stdout
    assert target.read_bytes() == decoded


def test_file_target_verify_after_write(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    run = stream(
        image.path,
        target,
        "--sha384",
        image.sha384,
        "--verify-after-write",
        "--progress",
        "json",
    )
    assert run.code == 0, run.stderr
    assert run.result()["readBackVerified"] is True
    assert sha384_of(target) == image.raw_sha384
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]


def test_file_target_replaces_an_existing_file(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    target.write_bytes(b"old image " * 1000000)  # larger than the new one: must be truncated
    run = stream(image.path, target, "--sha384", image.sha384)
    assert run.code == 0, run.stderr
    assert target.stat().st_size == IMAGE_SIZE
    assert sha384_of(target) == image.raw_sha384
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]


def test_stale_staging_file_is_overwritten(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    staging_path(target).write_bytes(b"left over by a crashed run " * 400000)  # > IMAGE_SIZE
    run = stream(image.path, target, "--sha384", image.sha384)
    assert run.code == 0, run.stderr
    assert sha384_of(target) == image.raw_sha384
    assert not staging_path(target).exists()


def test_file_target_over_http(
    image: SampleImage, nginx: Nginx, nginx_docroot: Path, out_dir: Path
) -> None:
    os.link(image.path, nginx_docroot / "image.zst")
    target = out_dir / "root.img"
    run = stream(nginx.url_for("image.zst"), target, "--sha384", image.sha384)
    assert run.code == 0, run.stderr
    assert sha384_of(target) == image.raw_sha384


# -- failures leave nothing behind ------------------------------------------------------------


def test_hash_mismatch_leaves_no_file(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    wrong = hashlib.sha384(b"another image").hexdigest()
    run = stream(image.path, target, "--sha384", wrong)
    assert_exited(run, 4, "HashMismatch")
    assert_file_target_invalid(target)
    assert list(out_dir.iterdir()) == []


def test_failure_leaves_an_existing_target_untouched(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    previous = b"the previous, good image\n" * 1000
    target.write_bytes(previous)
    os.utime(target, (1_700_000_000, 1_700_000_000))
    wrong = hashlib.sha384(b"another image").hexdigest()

    run = stream(image.path, target, "--sha384", wrong)

    assert run.code == 4, run.stderr
    assert target.read_bytes() == previous
    assert target.stat().st_mtime == 1_700_000_000
    assert not staging_path(target).exists()
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]


def test_truncated_image_leaves_no_file(image: SampleImage, out_dir: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.zst"
    truncated.write_bytes(image.path.read_bytes()[: image.compressed_size * 2 // 3])
    target = out_dir / "root.img"
    run = stream(truncated, target, "--sha384", sha384_of(truncated))
    assert_exited(run, 4, "TruncatedStream")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("content_size", [True, False], ids=["declared-size", "no-size"])
def test_full_file_system_fails_with_target_too_small(
    content_size: bool, tmp_path: Path, require_root: None
) -> None:
    img = write_sample_image(tmp_path / "image.zst", IMAGE_SIZE, content_size=content_size)
    with small_tmpfs(tmp_path / "small", "2m") as mount_point:
        target = mount_point / "root.img"
        run = stream(img.path, target, "--sha384", img.sha384, "--progress", "json")
        assert run.code == 5, run.stderr
        final = run.result()
        assert final["reason"] == "TargetTooSmall"
        # With a declared size the capacity check refuses up front; without one the writes
        # hit ENOSPC. Either way nothing is left to fill the file system.
        expected = "needs at least" if content_size else "is full after"
        assert expected in final["message"]
        assert_file_target_invalid(target)
        assert list(mount_point.iterdir()) == []


def test_second_writer_is_refused_and_does_not_disturb_the_first(
    image: SampleImage, out_dir: Path
) -> None:
    target = out_dir / "root.img"
    in_progress = b"a first writer's bytes " * 1000
    staging_path(target).write_bytes(in_progress)
    fd = os.open(staging_path(target), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the first writer holds the staging file's lock
        run = stream(image.path, target, "--sha384", image.sha384)
    finally:
        os.close(fd)
    assert_exited(run, 5, "TargetLocked", "locked")
    # Neither truncated nor removed: the first writer's file is as it was.
    assert staging_path(target).read_bytes() == in_progress
    assert not target.exists()


def test_directory_target_is_refused(image: SampleImage, out_dir: Path) -> None:
    run = stream(image.path, out_dir, "--sha384", image.sha384)
    assert_exited(run, 5, "TargetInvalid", "directory")
    assert list(out_dir.iterdir()) == []
    assert not staging_path(out_dir).exists()


def test_missing_parent_directory_is_refused(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "no-such-dir" / "root.img"
    run = stream(image.path, target, "--sha384", image.sha384)
    assert_exited(run, 5, "TargetNotFound")
    assert list(out_dir.iterdir()) == []


# -- image encodings --------------------------------------------------------------------------


ENCODINGS: dict[str, dict[str, Any]] = {
    "multi-frame": {"frames": 3},
    "no-content-size": {"content_size": False},
    "multi-frame-no-content-size": {"frames": 4, "content_size": False},
    "level-19": {"level": 19},
    "long-window-27": {"long_window_log": 27, "content_size": False},
}


@pytest.mark.parametrize("label", ENCODINGS)
def test_image_encodings(label: str, out_dir: Path, tmp_path: Path) -> None:
    img = write_sample_image(tmp_path / f"{label}.zst", IMAGE_SIZE, seed=2, **ENCODINGS[label])
    target = out_dir / "root.img"
    run = stream(img.path, target, "--sha384", img.sha384, "--progress", "json")
    assert run.code == 0, run.stderr
    assert sha384_of(target) == img.raw_sha384
    assert run.result()["compression"] == "zstd"


def test_long_window_needs_max_window_log(out_dir: Path, tmp_path: Path) -> None:
    img = write_sample_image(
        tmp_path / "long.zst", IMAGE_SIZE, long_window_log=27, content_size=False
    )
    assert zstandard.get_frame_parameters(img.path.read_bytes()[:18]).window_size == 1 << 27
    target = out_dir / "root.img"

    refused = stream(img.path, target, "--sha384", img.sha384, "--max-window-log", "26")

    assert_exited(refused, 4, "WindowTooLarge", "2^26", "--max-window-log")
    assert list(out_dir.iterdir()) == []

    accepted = stream(img.path, target, "--sha384", img.sha384, "--max-window-log", "27")
    assert accepted.code == 0, accepted.stderr
    assert sha384_of(target) == img.raw_sha384


@pytest.mark.parametrize("compression", ["none", "auto"])
def test_raw_image_passthrough(compression: str, out_dir: Path, tmp_path: Path) -> None:
    img = write_raw_image(tmp_path / "image.raw", IMAGE_SIZE + 12345, seed=6)
    target = out_dir / "root.img"
    run = stream(
        img.path,
        target,
        "--sha384",
        img.sha384,
        "--compression",
        compression,
        "--progress",
        "json",
    )
    assert run.code == 0, run.stderr
    assert target.read_bytes() == img.path.read_bytes()
    final = run.result()
    assert final["compression"] == "none"
    assert final["bytesWritten"] == final["bytesFetched"] == IMAGE_SIZE + 12345


def test_compression_none_writes_a_zstd_image_verbatim(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "copy.zst"
    run = stream(image.path, target, "--sha384", image.sha384, "--compression", "none")
    assert run.code == 0, run.stderr
    assert target.read_bytes() == image.path.read_bytes()


def test_compression_zstd_on_raw_data_fails(out_dir: Path, tmp_path: Path) -> None:
    img = write_raw_image(tmp_path / "image.raw", IMAGE_SIZE, seed=6)
    target = out_dir / "root.img"
    run = stream(img.path, target, "--sha384", img.sha384, "--compression", "zstd")
    assert_exited(run, 4, "CorruptStream")
    assert list(out_dir.iterdir()) == []


# -- usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["abc", "0" * 95, "0" * 97, "g" * 96, hashlib.sha256(b"x").hexdigest()],
    ids=["short", "95", "97", "not-hex", "sha256"],
)
def test_bad_sha384_is_a_usage_error(bad: str, image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    run = stream(image.path, target, "--sha384", bad)
    assert_exited(run, 2, "--sha384")
    assert list(out_dir.iterdir()) == []


def test_uppercase_sha384_is_accepted(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    run = stream(image.path, target, "--sha384", image.sha384.upper())
    assert run.code == 0, run.stderr
    assert sha384_of(target) == image.raw_sha384


def test_missing_sha384_is_a_usage_error(image: SampleImage, out_dir: Path) -> None:
    run = stream(image.path, out_dir / "root.img")
    assert run.code == 2, run.stderr
    assert "--sha384 is required" in run.text
    assert "--skip-verification-unsafe" in run.text
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["stream"],
        ["stream", "only-source"],
        ["stream", "a", "b", "--compression", "gzip"],
        ["nope"],
    ],
    ids=["no-args", "no-target", "bad-compression", "bad-command"],
)
def test_argument_errors_exit_2(args: list[str]) -> None:
    run = run_imagestream(*args)
    assert run.code == 2, run.stderr
    assert "usage:" in run.stderr


def test_skip_verification_without_sha384(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    run = stream(image.path, target, "--skip-verification-unsafe")
    assert run.code == 0, run.stderr
    assert "UNVERIFIED" in run.stdout
    assert image.sha384 in run.stdout  # the computed hash is still reported
    assert sha384_of(target) == image.raw_sha384

    as_json = stream(image.path, target, "--skip-verification-unsafe", "--progress", "json")
    assert as_json.code == 0, as_json.stderr
    final = as_json.result()
    assert final["verified"] is False
    assert final["sha384"] == image.sha384


def test_skip_verification_with_a_wrong_sha384_still_fails(
    image: SampleImage, out_dir: Path
) -> None:
    # The unsafe flag only allows a missing hash; a given one is always checked.
    target = out_dir / "root.img"
    wrong = hashlib.sha384(b"nope").hexdigest()
    run = stream(image.path, target, "--skip-verification-unsafe", "--sha384", wrong)
    assert run.code == 4, run.stderr
    assert list(out_dir.iterdir()) == []


def test_allowed_dir_confines_file_targets(
    image: SampleImage, out_dir: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "extensions"
    allowed.mkdir()
    outside = stream(
        image.path,
        out_dir / "root.img",
        "--sha384",
        image.sha384,
        "--allowed-dir",
        allowed,
    )
    assert_exited(outside, 5, "TargetNotAllowed")
    assert list(out_dir.iterdir()) == []
    # A symlink inside the allowed directory that points outside it is still outside.
    (allowed / "escape").symlink_to(out_dir)
    via_link = stream(
        image.path,
        allowed / "escape" / "x.img",
        "--sha384",
        image.sha384,
        "--allowed-dir",
        allowed,
    )
    assert via_link.code == 5, via_link.stderr
    assert list(out_dir.iterdir()) == []
    inside = stream(
        image.path,
        allowed / "tools.raw",
        "--sha384",
        image.sha384,
        "--allowed-dir",
        allowed,
    )
    assert inside.code == 0, inside.stderr
    assert sha384_of(allowed / "tools.raw") == image.raw_sha384


# -- links never lead the write out of the directory ------------------------------------------


def test_a_link_planted_at_the_staging_name_is_not_followed(
    image: SampleImage, out_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"somebody else's file")
    target = out_dir / "root.img"
    staging_path(target).symlink_to(victim)

    run = stream(image.path, target, "--sha384", image.sha384)

    assert_exited(run, 5, "TargetInvalid", "symbolic link")
    assert victim.read_bytes() == b"somebody else's file"
    assert not target.exists()
    assert staging_path(target).is_symlink()  # left for the user to look at, not followed


def test_a_directory_swapped_for_a_link_does_not_move_the_write(tmp_path: Path) -> None:
    """Once opened, the staging file, the rename and the fsync go through the directory's
    descriptor: a directory replaced by a link to elsewhere meanwhile changes nothing."""
    allowed = tmp_path / "extensions"
    (allowed / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    data = os.urandom(2 * MiB)
    # Through the page cache: `data` is not aligned for O_DIRECT as the pipeline's buffers are.
    plan = file_plan(allowed / "sub/tools.raw", allowed_dirs=(allowed,), direct_io=False)

    sink = open_sink(plan)
    try:
        sink.write(memoryview(data))
        (allowed / "sub").rename(allowed / "sub.old")
        (allowed / "sub").symlink_to(outside)
        sink.flush()
        sink.restore_header()
        sink.publish()
    except BaseException:
        sink.invalidate()
        raise

    assert (allowed / "sub.old/tools.raw").read_bytes() == data
    assert sorted(p.name for p in (allowed / "sub.old").iterdir()) == ["tools.raw"]
    assert list(outside.iterdir()) == []


def test_a_link_that_stays_inside_the_allowed_directory_is_resolved_once(
    image: SampleImage, tmp_path: Path
) -> None:
    allowed = tmp_path / "extensions"
    (allowed / "real").mkdir(parents=True)
    (allowed / "link").symlink_to(allowed / "real")
    # Resolved once, then walked without following links: inside the allowed directory.
    inside = stream(
        image.path, allowed / "link/x.img", "--sha384", image.sha384, "--allowed-dir", allowed
    )
    assert inside.code == 0, inside.stderr
    assert sha384_of(allowed / "real/x.img") == image.raw_sha384


def test_no_direct_io_is_honoured_for_files(image: SampleImage, tmp_path: Path) -> None:
    """`--no-direct-io` (direct_io=False) writes a file through the page cache; without it
    O_DIRECT is used where the file system takes it (the ext4 of the test's tmp dir)."""

    def staging_flags(target: Path, direct_io: bool) -> list[int]:
        seen: list[int] = []

        def look(progress: Progress) -> None:
            # "Verifying": every byte is written and the staging file is still open.
            if progress.phase == "Verifying":
                seen.extend(_open_flags(staging_path(target)))

        plan = file_plan(target, direct_io=direct_io)
        run_stream(StreamRequest(str(image.path), plan, image.sha384), look)
        return seen

    with_direct = staging_flags(tmp_path / "direct.img", direct_io=True)
    if not with_direct or not with_direct[0] & os.O_DIRECT:
        fail_or_skip(f"{tmp_path} does not take O_DIRECT, so the flag cannot show")
    without = staging_flags(tmp_path / "cached.img", direct_io=False)
    assert without, "the staging file was not open while verifying"
    assert all(not flags & os.O_DIRECT for flags in without), without


def _open_flags(path: Path) -> list[int]:
    """The open flags of this process's descriptors on `path` (from /proc/self/fdinfo)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != str(path):
                continue
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue
        flags = next(line for line in info.splitlines() if line.startswith("flags:"))
        found.append(int(flags.split()[1], 8))
    return found


def test_a_failed_writer_removes_only_its_own_staging_file(tmp_path: Path) -> None:
    """The staging file is unlinked while its lock is held, and only if the name still is that
    file: a writer whose staging file was replaced meanwhile leaves the new one alone."""
    target = tmp_path / "tools.raw"
    plan = file_plan(target, direct_io=False)
    first = open_sink(plan)
    staging_path(target).unlink()  # removed under the first writer (by hand, or a cleanup)
    second = open_sink(plan)
    try:
        first.invalidate()
        assert staging_path(target).exists(), "the first writer removed the second's file"
        data = os.urandom(MiB)
        second.write(memoryview(data))
        second.restore_header()
        second.publish()
    except BaseException:
        second.invalidate()
        raise
    assert target.read_bytes() == data
