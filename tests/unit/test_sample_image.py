"""Tests for the deterministic sample image generator (imagestream.demo.image)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import zstandard

from imagestream.demo.image import (
    SampleImage,
    iter_raw_data,
    write_raw_image,
    write_sample_image,
)

MIB = 1 << 20
# An odd size, so a frame or chunk boundary bug cannot hide behind round numbers.
SIZE = 3 * MIB + 12345


def decompress_all(data: bytes) -> bytes:
    """Decompress every frame of `data`, as a careful streaming client would."""
    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
        data, read_across_frames=True
    )
    return reader.read()


def split_frames(data: bytes) -> list[bytes]:
    """Decompress `data` frame by frame, each with a fresh decoder; return their outputs.

    A fresh decoder per frame also proves the frames are independent.
    """
    outputs = []
    while data:
        dobj = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        outputs.append(dobj.decompress(data))
        assert dobj.eof, "truncated frame"
        data = dobj.unused_data
    return outputs


def sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


def check_consistent(image: SampleImage) -> bytes:
    """Assert the returned facts match the file on disk; return the raw data."""
    data = image.path.read_bytes()
    assert image.compressed_size == len(data)
    assert image.sha384 == sha384(data)
    raw = decompress_all(data)
    assert len(raw) == image.raw_size
    assert image.raw_sha384 == sha384(raw)
    return raw


def test_sizes_and_hashes_match_the_file_and_its_decompression(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "a.zst", SIZE)

    raw = check_consistent(image)

    assert image.path == tmp_path / "a.zst"
    assert image.raw_size == SIZE
    assert raw == b"".join(iter_raw_data(SIZE))
    # A single frame that declares its content size.
    assert len(split_frames(image.path.read_bytes())) == 1
    params = zstandard.get_frame_parameters(image.path.read_bytes())
    assert params.content_size == SIZE


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    first = write_sample_image(tmp_path / "a.zst", SIZE, seed=7)
    second = write_sample_image(tmp_path / "b.zst", SIZE, seed=7)

    assert first.path.read_bytes() == second.path.read_bytes()
    assert (first.sha384, first.raw_sha384, first.compressed_size) == (
        second.sha384,
        second.raw_sha384,
        second.compressed_size,
    )


def test_another_seed_gives_other_data(tmp_path: Path) -> None:
    first = write_sample_image(tmp_path / "a.zst", SIZE, seed=1)
    second = write_sample_image(tmp_path / "b.zst", SIZE, seed=2)

    assert first.raw_sha384 != second.raw_sha384


def test_smaller_image_is_a_prefix_of_a_larger_one() -> None:
    small = b"".join(iter_raw_data(100_000, seed=3))
    large = b"".join(iter_raw_data(5 * MIB, seed=3))

    assert len(small) == 100_000
    assert len(large) == 5 * MIB
    assert large.startswith(small)


def test_raw_data_is_filesystem_like() -> None:
    raw = b"".join(iter_raw_data(16 * MIB, seed=0))
    blocks = [raw[i : i + 4096] for i in range(0, len(raw), 4096)]

    zero_blocks = sum(1 for block in blocks if block.count(0) == 4096)
    incompressible = sum(
        1 for block in blocks if len(zstandard.compress(block, 3)) > 4000 and block.count(0) < 64
    )
    # Free space and already-compressed files both make up a real share of an OS image.
    assert 0.1 < zero_blocks / len(blocks) < 0.6
    assert 0.05 < incompressible / len(blocks) < 0.5


def test_compression_ratio_is_like_an_os_image(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "a.zst", 32 * MIB, seed=0)

    assert 2.0 <= image.raw_size / image.compressed_size <= 4.0


def test_multi_frame_stream_decompresses_to_the_same_data(tmp_path: Path) -> None:
    single = write_sample_image(tmp_path / "one.zst", SIZE, seed=5)
    multi = write_sample_image(tmp_path / "three.zst", SIZE, seed=5, frames=3)

    check_consistent(multi)
    outputs = split_frames(multi.path.read_bytes())
    assert len(outputs) == 3
    assert [len(out) for out in outputs] == [SIZE // 3, SIZE // 3, SIZE - 2 * (SIZE // 3)]
    assert multi.raw_sha384 == single.raw_sha384
    assert multi.sha384 != single.sha384


def test_every_frame_declares_its_own_content_size(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "a.zst", SIZE, frames=2)
    data = image.path.read_bytes()

    dobj = zstandard.ZstdDecompressor().decompressobj()
    first = dobj.decompress(data)
    second_frame = dobj.unused_data
    assert zstandard.get_frame_parameters(data).content_size == len(first) == SIZE // 2
    assert zstandard.get_frame_parameters(second_frame).content_size == SIZE - SIZE // 2


def test_content_size_can_be_left_out(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "a.zst", SIZE, content_size=False, frames=2)

    check_consistent(image)
    data = image.path.read_bytes()
    assert zstandard.get_frame_parameters(data).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert len(split_frames(data)) == 2


def test_long_window_needs_a_decoder_that_allows_it(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "a.zst", 2 * MIB, content_size=False, long_window_log=31)

    data = image.path.read_bytes()
    assert zstandard.get_frame_parameters(data).window_size == 1 << 31
    # Like `zstd -d` without `--long=31`: the default decoder limit (2**27) refuses it.
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().stream_reader(data).read()
    check_consistent(image)


def test_long_window_with_content_size_still_round_trips(tmp_path: Path) -> None:
    plain = write_sample_image(tmp_path / "plain.zst", SIZE, seed=4)
    long = write_sample_image(tmp_path / "long.zst", SIZE, seed=4, long_window_log=27)

    check_consistent(long)
    assert long.raw_sha384 == plain.raw_sha384
    assert long.sha384 != plain.sha384


def test_raw_image_is_the_decompressed_sample(tmp_path: Path) -> None:
    compressed = write_sample_image(tmp_path / "a.zst", SIZE, seed=9)
    raw = write_raw_image(tmp_path / "a.raw", SIZE, seed=9)

    data = raw.path.read_bytes()
    assert raw.raw_size == raw.compressed_size == len(data) == SIZE
    assert raw.sha384 == raw.raw_sha384 == sha384(data) == compressed.raw_sha384
    assert data == decompress_all(compressed.path.read_bytes())


def test_empty_image(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "empty.zst", 0)

    assert check_consistent(image) == b""
    assert image.compressed_size > 0  # still a valid (empty) zstd frame
    assert write_raw_image(tmp_path / "empty.raw", 0).compressed_size == 0


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frames"):
        write_sample_image(tmp_path / "a.zst", SIZE, frames=0)
    with pytest.raises(ValueError, match="raw_size"):
        write_raw_image(tmp_path / "a.raw", -1)
    with pytest.raises(ValueError, match="long_window_log"):
        write_sample_image(tmp_path / "a.zst", SIZE, long_window_log=40)
