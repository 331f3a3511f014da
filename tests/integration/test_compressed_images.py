"""gzip, xz and bzip2 images, made by the real tools, streamed by the real CLI and compared.

Each image is compressed by `gzip`, `xz` or `bzip2` from the command line (multi-member and
multi-stream files as `cat` of two tool outputs, which is what `pigz`, `pbzip2` and `xz -T`
write too), served by nginx or read as a file, streamed onto a file target and onto a loop
device, and the written bytes are compared with the raw image. A cut or damaged image fails
with exit 4 and an invalid target; a highly compressible "bomb" streams in bounded memory.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.cli import assert_exited, imagestream_measured, one_line, run_imagestream
from tests.support.nginx import Nginx
from tests.support.targets import MIB, read_device, sha384_of, staging_path
from tests.support.tools import require_tool

from imagestream.demo.image import SampleImage, write_raw_image

pytestmark = pytest.mark.timeout(120)

RAW_SIZE = 5 * MIB + 12345  # more than the held-back first MiB, and not a multiple of 4 KiB
FORMATS = ("gzip", "xz", "bzip2")
# Peak RSS allowed for a stream (the same bound as tests/integration/test_memory.py's).
RSS_LIMIT_MIB = 80
BOMB_SIZE = 256 * MIB

#: `imagestream stream ARGS...`
stream = functools.partial(run_imagestream, "stream")


def compress(tool: str, raw: Path, dest: Path, *flags: str) -> Path:
    """`tool -c FLAGS RAW > DEST`, the real command-line tool."""
    with dest.open("wb") as out:
        subprocess.run([require_tool(tool), "-c", *flags, raw], stdout=out, check=True)
    return dest


def concatenated(tool: str, raws: list[Path], dest: Path) -> Path:
    """`cat` of one tool run per file: a multi-member (gzip) or multi-stream (xz, bzip2) file."""
    parts = [compress(tool, raw, raw.with_name(f"{raw.name}.{tool}")) for raw in raws]
    dest.write_bytes(b"".join(part.read_bytes() for part in parts))
    return dest


@pytest.fixture
def raw(tmp_path: Path) -> SampleImage:
    return write_raw_image(tmp_path / "image.raw", RAW_SIZE, seed=11)


@pytest.fixture
def halves(raw: SampleImage, tmp_path: Path) -> list[Path]:
    """The raw image split in two files at an odd offset."""
    data = raw.path.read_bytes()
    cut = len(data) // 2 + 7
    first, second = tmp_path / "first.raw", tmp_path / "second.raw"
    first.write_bytes(data[:cut])
    second.write_bytes(data[cut:])
    return [first, second]


def image_of(kind: str, raw: SampleImage, halves: list[Path], where: Path) -> Path:
    """`FORMAT` (one tool run) or `FORMAT-multi` (two, concatenated), under `where`."""
    tool, _, multi = kind.partition("-")
    dest = where / f"image.{kind}"
    if multi:
        return concatenated(tool, halves, dest)
    return compress(tool, raw.path, dest)


KINDS = [*FORMATS, *(f"{name}-multi" for name in FORMATS)]


# -- streamed and compared --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_streams_onto_a_file(
    kind: str, raw: SampleImage, halves: list[Path], nginx: Nginx, nginx_docroot: Path
) -> None:
    image = image_of(kind, raw, halves, nginx_docroot)
    target = nginx_docroot.parent / "out" / "root.img"
    target.parent.mkdir()

    run = stream(
        nginx.url_for(image.name), target, "--sha384", sha384_of(image), "--progress", "json"
    )

    assert run.code == 0, run.text
    result = run.result()
    assert result["compression"] == kind.partition("-")[0]
    assert result["bytesFetched"] == image.stat().st_size
    assert result["bytesWritten"] == RAW_SIZE
    assert target.stat().st_size == RAW_SIZE
    assert sha384_of(target) == raw.raw_sha384


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_streams_onto_a_loop_device(
    kind: str,
    raw: SampleImage,
    halves: list[Path],
    tmp_path: Path,
    loop_device_factory: LoopDeviceFactory,
) -> None:
    image = image_of(kind, raw, halves, tmp_path)
    dev = loop_device_factory(8 * MIB)

    run = stream(image, dev, "--sha384", sha384_of(image), "--progress", "plain")

    assert run.code == 0, run.text
    fmt = kind.partition("-")[0]
    assert f"({fmt}, decompressed)" in one_line(run.stdout), run.stdout
    assert sha384_of(dev, RAW_SIZE) == raw.raw_sha384


@pytest.mark.parametrize("name", FORMATS)
def test_an_explicit_compression_is_used(name: str, raw: SampleImage, tmp_path: Path) -> None:
    image = compress(name, raw.path, tmp_path / f"image.{name}")
    target = tmp_path / "root.img"

    decoded = stream(image, target, "--sha384", sha384_of(image), "--compression", name)
    assert decoded.code == 0, decoded.text
    assert sha384_of(target) == raw.raw_sha384

    verbatim = stream(image, target, "--sha384", sha384_of(image), "--compression", "none")
    assert verbatim.code == 0, verbatim.text
    assert target.read_bytes() == image.read_bytes()


def test_unknown_data_is_written_as_it_is(raw: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "root.img"

    run = stream(raw.path, target, "--sha384", raw.sha384, "--progress", "plain")

    assert run.code == 0, run.text
    assert "(uncompressed, written as is)" in one_line(run.stdout)
    assert sha384_of(target) == raw.raw_sha384


# -- cut and damaged images -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_truncated_image_fails_and_leaves_no_file(
    kind: str, raw: SampleImage, halves: list[Path], tmp_path: Path
) -> None:
    image = image_of(kind, raw, halves, tmp_path)
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size * 3 // 4])
    out = tmp_path / "out"
    out.mkdir()
    target = out / "root.img"

    run = stream(cut, target, "--sha384", sha384_of(cut))

    assert_exited(run, 4, "TruncatedStream", kind.partition("-")[0])
    assert "Traceback" not in run.stderr
    assert list(out.iterdir()) == []
    assert not staging_path(target).exists()


@pytest.mark.parametrize("name", FORMATS)
def test_a_truncated_image_leaves_a_device_invalid(
    name: str, raw: SampleImage, tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    image = compress(name, raw.path, tmp_path / f"image.{name}")
    cut = tmp_path / f"cut.{name}"
    cut.write_bytes(image.read_bytes()[:-100])
    dev = loop_device_factory(8 * MIB)

    run = stream(cut, dev, "--sha384", sha384_of(cut))

    assert_exited(run, 4, "TruncatedStream")
    assert read_device(dev, MIB) == bytes(MIB)


@pytest.mark.parametrize("name", FORMATS)
def test_a_corrupt_image_fails(name: str, raw: SampleImage, tmp_path: Path) -> None:
    data = bytearray(compress(name, raw.path, tmp_path / f"image.{name}").read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / f"corrupt.{name}"
    corrupt.write_bytes(bytes(data))
    target = tmp_path / "root.img"

    run = stream(corrupt, target, "--sha384", sha384_of(corrupt))

    assert_exited(run, 4, "CorruptStream", name)
    assert "Traceback" not in run.stderr
    assert not target.exists()


# -- bounded memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_a_compression_bomb_streams_in_bounded_memory(
    name: str, tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    # 256 MiB of zeros compress to well under 1 MiB: one unbounded call would hold it all.
    zeros = tmp_path / "zeros.raw"
    with zeros.open("wb") as out:
        out.truncate(BOMB_SIZE)
    bomb = compress(name, zeros, tmp_path / f"bomb.{name}")
    zeros.unlink()
    assert bomb.stat().st_size < MIB
    dev = loop_device_factory(BOMB_SIZE)

    measured = imagestream_measured(
        "stream", bomb, dev, "--sha384", sha384_of(bomb), "--progress", "json", workdir=tmp_path
    )

    assert measured.exit_code == 0, measured.stderr
    assert measured.result["bytesWritten"] == BOMB_SIZE
    assert measured.result["compression"] == name
    assert measured.peak_rss_mib < RSS_LIMIT_MIB, f"peak RSS {measured.peak_rss_mib:.1f} MiB"
