"""Streaming into regular files: atomic publication, clean failures, every image encoding.

A file target is written as `.NAME.partial` beside it and renamed into place only after the
hash matched, so after any failure there is no file at the target path (or the previous one,
untouched) and no staging file. The CLI runs as a subprocess: exit codes and output are real.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zstandard
from tests.support.blockdev import small_tmpfs
from tests.support.nginx import Nginx
from tests.support.tools import require_tool

from imagestream.demo.image import SampleImage, iter_raw_data, write_raw_image, write_sample_image

MiB = 1 << 20
IMAGE_SIZE = 4 * MiB


# -- helpers ----------------------------------------------------------------------------------


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `imagestream ARGS...` (not only `stream`: usage errors are tested too)."""
    return subprocess.run(
        [sys.executable, "-m", "imagestream", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        # A wide console: rich would otherwise wrap messages at 80 columns.
        env={**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"},
        check=False,
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


def result_record(stdout: str) -> dict[str, Any]:
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert records, f"no JSON output: {stdout!r}"
    final: dict[str, Any] = records[-1]
    assert final["event"] == "result"
    return final


def raw_sha384(size: int, seed: int = 0) -> str:
    digest = hashlib.sha384()
    for chunk in iter_raw_data(size, seed=seed):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha384(path: Path) -> str:
    return hashlib.sha384(path.read_bytes()).hexdigest()


def staging(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def assert_no_output(target: Path) -> None:
    assert not target.exists(), f"{target} must not exist after a failure"
    assert not staging(target).exists(), "the staging file must be removed after a failure"


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
    result = cli("stream", image.path, target, "--sha384", image.sha384, "--progress", "json")
    assert result.returncode == 0, result.stderr
    assert file_sha384(target) == image.raw_sha384
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]
    final = result_record(result.stdout)
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
    result = cli(
        "stream",
        image.path,
        target,
        "--sha384",
        image.sha384,
        "--verify-after-write",
        "--progress",
        "json",
    )
    assert result.returncode == 0, result.stderr
    assert result_record(result.stdout)["readBackVerified"] is True
    assert file_sha384(target) == image.raw_sha384
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]


def test_file_target_replaces_an_existing_file(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    target.write_bytes(b"old image " * 1000000)  # larger than the new one: must be truncated
    result = cli("stream", image.path, target, "--sha384", image.sha384)
    assert result.returncode == 0, result.stderr
    assert target.stat().st_size == IMAGE_SIZE
    assert file_sha384(target) == image.raw_sha384
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]


def test_stale_staging_file_is_overwritten(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    staging(target).write_bytes(b"left over by a crashed run " * 400000)  # > IMAGE_SIZE
    result = cli("stream", image.path, target, "--sha384", image.sha384)
    assert result.returncode == 0, result.stderr
    assert file_sha384(target) == image.raw_sha384
    assert not staging(target).exists()


def test_file_target_over_http(
    image: SampleImage, nginx: Nginx, nginx_docroot: Path, out_dir: Path
) -> None:
    os.link(image.path, nginx_docroot / "image.zst")
    target = out_dir / "root.img"
    result = cli("stream", nginx.url_for("image.zst"), target, "--sha384", image.sha384)
    assert result.returncode == 0, result.stderr
    assert file_sha384(target) == image.raw_sha384


# -- failures leave nothing behind ------------------------------------------------------------


def test_hash_mismatch_leaves_no_file(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    wrong = hashlib.sha384(b"another image").hexdigest()
    result = cli("stream", image.path, target, "--sha384", wrong)
    assert result.returncode == 4, result.stderr
    assert "HashMismatch" in one_line(result.stderr)
    assert_no_output(target)
    assert list(out_dir.iterdir()) == []


def test_failure_leaves_an_existing_target_untouched(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    previous = b"the previous, good image\n" * 1000
    target.write_bytes(previous)
    os.utime(target, (1_700_000_000, 1_700_000_000))
    wrong = hashlib.sha384(b"another image").hexdigest()

    result = cli("stream", image.path, target, "--sha384", wrong)

    assert result.returncode == 4, result.stderr
    assert target.read_bytes() == previous
    assert target.stat().st_mtime == 1_700_000_000
    assert not staging(target).exists()
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.img"]


def test_truncated_image_leaves_no_file(image: SampleImage, out_dir: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.zst"
    truncated.write_bytes(image.path.read_bytes()[: image.compressed_size * 2 // 3])
    target = out_dir / "root.img"
    result = cli("stream", truncated, target, "--sha384", file_sha384(truncated))
    assert result.returncode == 4, result.stderr
    assert "TruncatedStream" in one_line(result.stderr)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("content_size", [True, False], ids=["declared-size", "no-size"])
def test_full_file_system_fails_with_target_too_small(
    content_size: bool, tmp_path: Path, require_root: None
) -> None:
    img = write_sample_image(tmp_path / "image.zst", IMAGE_SIZE, content_size=content_size)
    with small_tmpfs(tmp_path / "small", "2m") as mount_point:
        target = mount_point / "root.img"
        result = cli("stream", img.path, target, "--sha384", img.sha384, "--progress", "json")
        assert result.returncode == 5, result.stderr
        final = result_record(result.stdout)
        assert final["reason"] == "TargetTooSmall"
        # With a declared size the capacity check refuses up front; without one the writes
        # hit ENOSPC. Either way nothing is left to fill the file system.
        expected = "needs at least" if content_size else "is full after"
        assert expected in final["message"]
        assert_no_output(target)
        assert list(mount_point.iterdir()) == []


def test_second_writer_is_refused_and_does_not_disturb_the_first(
    image: SampleImage, out_dir: Path
) -> None:
    target = out_dir / "root.img"
    in_progress = b"a first writer's bytes " * 1000
    staging(target).write_bytes(in_progress)
    fd = os.open(staging(target), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the first writer holds the staging file's lock
        result = cli("stream", image.path, target, "--sha384", image.sha384)
    finally:
        os.close(fd)
    assert result.returncode == 5, result.stderr
    message = one_line(result.stderr)
    assert "TargetBusy" in message
    assert "locked" in message
    # Neither truncated nor removed: the first writer's file is as it was.
    assert staging(target).read_bytes() == in_progress
    assert not target.exists()


def test_directory_target_is_refused(image: SampleImage, out_dir: Path) -> None:
    result = cli("stream", image.path, out_dir, "--sha384", image.sha384)
    assert result.returncode == 5, result.stderr
    message = one_line(result.stderr)
    assert "TargetInvalid" in message
    assert "directory" in message
    assert list(out_dir.iterdir()) == []
    assert not staging(out_dir).exists()


def test_missing_parent_directory_is_refused(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "no-such-dir" / "root.img"
    result = cli("stream", image.path, target, "--sha384", image.sha384)
    assert result.returncode == 5, result.stderr
    assert "TargetNotFound" in one_line(result.stderr)
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
    result = cli("stream", img.path, target, "--sha384", img.sha384, "--progress", "json")
    assert result.returncode == 0, result.stderr
    assert file_sha384(target) == img.raw_sha384
    assert result_record(result.stdout)["compression"] == "zstd"


def test_long_window_needs_max_window_log(out_dir: Path, tmp_path: Path) -> None:
    img = write_sample_image(
        tmp_path / "long.zst", IMAGE_SIZE, long_window_log=27, content_size=False
    )
    assert zstandard.get_frame_parameters(img.path.read_bytes()[:18]).window_size == 1 << 27
    target = out_dir / "root.img"

    refused = cli("stream", img.path, target, "--sha384", img.sha384, "--max-window-log", "26")

    assert refused.returncode == 4, refused.stderr
    message = one_line(refused.stderr)
    assert "WindowTooLarge" in message
    assert "2^26" in message
    assert "--max-window-log" in message
    assert list(out_dir.iterdir()) == []

    accepted = cli("stream", img.path, target, "--sha384", img.sha384, "--max-window-log", "27")
    assert accepted.returncode == 0, accepted.stderr
    assert file_sha384(target) == img.raw_sha384


@pytest.mark.parametrize("compression", ["none", "auto"])
def test_raw_image_passthrough(compression: str, out_dir: Path, tmp_path: Path) -> None:
    img = write_raw_image(tmp_path / "image.raw", IMAGE_SIZE + 12345, seed=6)
    target = out_dir / "root.img"
    result = cli(
        "stream",
        img.path,
        target,
        "--sha384",
        img.sha384,
        "--compression",
        compression,
        "--progress",
        "json",
    )
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == img.path.read_bytes()
    final = result_record(result.stdout)
    assert final["compression"] == "none"
    assert final["bytesWritten"] == final["bytesFetched"] == IMAGE_SIZE + 12345


def test_compression_none_writes_a_zstd_image_verbatim(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "copy.zst"
    result = cli("stream", image.path, target, "--sha384", image.sha384, "--compression", "none")
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == image.path.read_bytes()


def test_compression_zstd_on_raw_data_fails(out_dir: Path, tmp_path: Path) -> None:
    img = write_raw_image(tmp_path / "image.raw", IMAGE_SIZE, seed=6)
    target = out_dir / "root.img"
    result = cli("stream", img.path, target, "--sha384", img.sha384, "--compression", "zstd")
    assert result.returncode == 4, result.stderr
    assert "CorruptStream" in one_line(result.stderr)
    assert list(out_dir.iterdir()) == []


# -- usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["abc", "0" * 95, "0" * 97, "g" * 96, hashlib.sha256(b"x").hexdigest()],
    ids=["short", "95", "97", "not-hex", "sha256"],
)
def test_bad_sha384_is_a_usage_error(bad: str, image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    result = cli("stream", image.path, target, "--sha384", bad)
    assert result.returncode == 2, result.stderr
    assert "--sha384" in one_line(result.stderr)
    assert list(out_dir.iterdir()) == []


def test_uppercase_sha384_is_accepted(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    result = cli("stream", image.path, target, "--sha384", image.sha384.upper())
    assert result.returncode == 0, result.stderr
    assert file_sha384(target) == image.raw_sha384


def test_missing_sha384_is_a_usage_error(image: SampleImage, out_dir: Path) -> None:
    result = cli("stream", image.path, out_dir / "root.img")
    assert result.returncode == 2, result.stderr
    output = one_line(result.stdout + result.stderr)
    assert "--sha384 is required" in output
    assert "--skip-verification-unsafe" in output
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
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr


def test_skip_verification_without_sha384(image: SampleImage, out_dir: Path) -> None:
    target = out_dir / "root.img"
    result = cli("stream", image.path, target, "--skip-verification-unsafe")
    assert result.returncode == 0, result.stderr
    assert "UNVERIFIED" in result.stdout
    assert image.sha384 in result.stdout  # the computed hash is still reported
    assert file_sha384(target) == image.raw_sha384

    as_json = cli("stream", image.path, target, "--skip-verification-unsafe", "--progress", "json")
    assert as_json.returncode == 0, as_json.stderr
    final = result_record(as_json.stdout)
    assert final["verified"] is False
    assert final["sha384"] == image.sha384


def test_skip_verification_with_a_wrong_sha384_still_fails(
    image: SampleImage, out_dir: Path
) -> None:
    # The unsafe flag only allows a missing hash; a given one is always checked.
    target = out_dir / "root.img"
    wrong = hashlib.sha384(b"nope").hexdigest()
    result = cli("stream", image.path, target, "--skip-verification-unsafe", "--sha384", wrong)
    assert result.returncode == 4, result.stderr
    assert list(out_dir.iterdir()) == []


def test_allowed_dir_confines_file_targets(
    image: SampleImage, out_dir: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "extensions"
    allowed.mkdir()
    outside = cli(
        "stream",
        image.path,
        out_dir / "root.img",
        "--sha384",
        image.sha384,
        "--allowed-dir",
        allowed,
    )
    assert outside.returncode == 5, outside.stderr
    assert "TargetNotAllowed" in one_line(outside.stderr)
    assert list(out_dir.iterdir()) == []
    # A symlink inside the allowed directory that points outside it is still outside.
    (allowed / "escape").symlink_to(out_dir)
    via_link = cli(
        "stream",
        image.path,
        allowed / "escape" / "x.img",
        "--sha384",
        image.sha384,
        "--allowed-dir",
        allowed,
    )
    assert via_link.returncode == 5, via_link.stderr
    assert list(out_dir.iterdir()) == []
    inside = cli(
        "stream",
        image.path,
        allowed / "tools.raw",
        "--sha384",
        image.sha384,
        "--allowed-dir",
        allowed,
    )
    assert inside.returncode == 0, inside.stderr
    assert file_sha384(allowed / "tools.raw") == image.raw_sha384
