"""FrameWalker against real zstd encoders: frame counts, content sizes, truncation, garbage.

The frames come from python-zstandard (levels, checksums, content size, dictionaries with 1-, 2-
and 4-byte IDs, streaming frames without a size) and from the `zstd` command line; skippable
frames are built by hand (python-zstandard cannot write them) and checked to be accepted by
libzstd itself, so every stream here is one the real decoder takes.
"""

from __future__ import annotations

import functools
import io
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import zstandard

from imagestream.errors import IntegrityError
from imagestream.pipeline.zstd_frames import ZSTD_MAGIC, FrameWalker, WindowTooLarge, is_zstd

KiB = 1024


def _data(size: int, seed: int = 0) -> bytes:
    """Half compressible text, half random bytes: zstd makes compressed and raw blocks of it."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"kernel", b"initrd", b"\n", b" "]
    text = b"".join(rng.choice(words) for _ in range(size // 8 + 1))
    mixed = bytearray()
    while len(mixed) < size:
        mixed += text[len(mixed) : len(mixed) + 20 * KiB]
        mixed += rng.randbytes(5 * KiB)
    return bytes(mixed[:size])


def _skippable(payload: bytes, variant: int = 0) -> bytes:
    magic = (0x184D2A50 + variant).to_bytes(4, "little")
    return magic + len(payload).to_bytes(4, "little") + payload


def _compress(
    data: bytes, *, level: int = 3, checksum: bool = False, content_size: bool = True
) -> bytes:
    cctx = zstandard.ZstdCompressor(
        level=level, write_checksum=checksum, write_content_size=content_size
    )
    if content_size:
        return bytes(cctx.compress(data))
    # compress() always knows the size; a stream writer without a pledged size does not.
    out = io.BytesIO()
    with cctx.stream_writer(out, size=-1, closefd=False) as writer:
        writer.write(data)
    return out.getvalue()


def _decodes_to(stream: bytes) -> bytes:
    """What libzstd makes of the whole stream (all frames, skippable ones skipped)."""
    reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    out = bytearray()
    while chunk := reader.read(1 << 20):
        out += chunk
    return bytes(out)


@dataclass(frozen=True)
class Case:
    """An encoded stream and what the walker must report for it."""

    stream: bytes
    frames: int
    content_size: int | None


@functools.cache
def _case_single(level: int, checksum: bool, content_size: bool, size: int) -> Case:
    data = _data(size, seed=level)
    stream = _compress(data, level=level, checksum=checksum, content_size=content_size)
    assert _decodes_to(stream) == data
    params = zstandard.get_frame_parameters(stream)
    assert params.has_checksum == checksum
    assert (
        (params.content_size == size)
        if content_size
        else (params.content_size == zstandard.CONTENTSIZE_UNKNOWN)
    )
    return Case(stream, 1, size if content_size else None)


SINGLE = {
    f"level{level}-{'ck' if ck else 'nock'}-{'size' if cs else 'nosize'}-{size}": (
        level,
        ck,
        cs,
        size,
    )
    for level in (1, 3, 9, 19)
    for ck in (False, True)
    for cs in (False, True)
    for size in (200 * KiB,)  # two 128 KiB blocks
}
# Frame content sizes hit every FCS field width: none (streaming), 1 byte (single segment,
# < 256), 2 bytes (256..65791, stored minus 256), 4 bytes; plus the empty frame.
SINGLE.update(
    {f"size-{size}": (3, True, True, size) for size in (0, 1, 255, 256, 257, 65791, 65792)}
)


def _feeds_whole(stream: bytes) -> Iterator[bytes | memoryview]:
    yield stream


def _feeds_bytewise(stream: bytes) -> Iterator[bytes | memoryview]:
    for i in range(len(stream)):
        yield stream[i : i + 1]


def _feeds_random(stream: bytes) -> Iterator[bytes | memoryview]:
    rng = random.Random(len(stream))
    pos = 0
    while pos < len(stream):
        step = rng.choice((1, 2, 3, 5, 7, 13, 64, 1000, 4096, 65536))
        yield stream[pos : pos + step]
        pos += step


def _feeds_memoryview(stream: bytes) -> Iterator[bytes | memoryview]:
    view = memoryview(stream)
    rng = random.Random(7)
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 9000)
        yield view[pos : pos + step]  # feed() takes memoryviews too
        pos += step


FEEDS: dict[str, Callable[[bytes], Iterator[bytes | memoryview]]] = {
    "whole": _feeds_whole,
    "bytewise": _feeds_bytewise,
    "random": _feeds_random,
    "memoryview": _feeds_memoryview,
}


def _walk(
    stream: bytes,
    feed: Callable[[bytes], Iterator[bytes | memoryview]],
    max_window_log: int | None = None,
) -> FrameWalker:
    walker = FrameWalker(max_window_log)
    for piece in feed(stream):
        walker.feed(piece)
    walker.finish()
    return walker


@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS.keys())
@pytest.mark.parametrize(("level", "checksum", "content_size", "size"), SINGLE.values(), ids=SINGLE)
def test_single_frame(
    level: int,
    checksum: bool,
    content_size: bool,
    size: int,
    feed: Callable[[bytes], Iterator[bytes | memoryview]],
) -> None:
    case = _case_single(level, checksum, content_size, size)
    walker = _walk(case.stream, feed)
    assert walker.frames == case.frames
    assert walker.content_size == case.content_size


def _multi_frame_cases() -> dict[str, Case]:
    a, b, c = _data(200 * KiB, 1), _data(1, 2), _data(70 * KiB, 3)
    fa = _compress(a, level=1, checksum=True)
    fb = _compress(b, level=5)
    fc = _compress(c, level=3, checksum=True)
    fc_nosize = _compress(c, content_size=False)
    cases = {
        "three-frames": Case(fa + fb + fc, 3, len(a) + len(b) + len(c)),
        "one-frame-without-size": Case(fa + fc_nosize + fb, 3, None),
        "skippable-first": Case(_skippable(b"metadata" * 10) + fa, 1, len(a)),
        "skippable-between-and-after": Case(
            fa + _skippable(b"", 5) + fc + _skippable(bytes(300), 15), 2, len(a) + len(c)
        ),
        "empty-frame-then-data": Case(_compress(b"") + fc, 2, len(c)),
    }
    for name, case in cases.items():
        # libzstd accepts every one of these streams (skippable frames included).
        assert len(_decodes_to(case.stream)) == (case.content_size or len(a) + len(b) + len(c)), (
            name
        )
    return cases


MULTI = _multi_frame_cases()


@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS.keys())
@pytest.mark.parametrize("case", MULTI.values(), ids=MULTI.keys())
def test_multi_frame_and_skippable(
    case: Case, feed: Callable[[bytes], Iterator[bytes | memoryview]]
) -> None:
    walker = _walk(case.stream, feed)
    assert walker.frames == case.frames
    assert walker.content_size == case.content_size


def _training_samples() -> list[bytes | bytearray | memoryview]:
    rng = random.Random(11)
    words = ["node", "image", "root", "boot", "efi", "usr", "var", "etc", "lib", "share"]
    samples: list[bytes | bytearray | memoryview] = [
        " ".join(rng.choice(words) for _ in range(30)).encode() for _ in range(2000)
    ]
    return samples


@pytest.mark.parametrize("dict_id", [200, 40000, 70000], ids=["id1byte", "id2bytes", "id4bytes"])
def test_frames_with_dictionary_ids(dict_id: int) -> None:
    samples = _training_samples()
    dictionary = zstandard.train_dictionary(2048, samples, dict_id=dict_id)
    cctx = zstandard.ZstdCompressor(dict_data=dictionary, write_checksum=True)
    payload = b"\n".join(samples[:50])
    stream = cctx.compress(payload) + cctx.compress(samples[0])
    assert zstandard.get_frame_parameters(stream).dict_id == dict_id
    walker = _walk(stream, _feeds_bytewise)
    assert walker.frames == 2
    assert walker.content_size == len(payload) + len(samples[0])


def test_eight_byte_content_size_header() -> None:
    # No test can compress 4 GiB; build the header by hand: FCS flag 3 (8 bytes), window
    # descriptor, then one last RLE block. The walker reads headers only.
    size = (5 << 30) + 12345
    frame = (
        ZSTD_MAGIC
        + bytes([0xC0])  # FCS flag 3, no single segment, no checksum, no dict id
        + bytes([0x58])  # window descriptor
        + size.to_bytes(8, "little")
        + (1 << 3 | 1 << 1 | 1).to_bytes(3, "little")  # last RLE block of 1 byte
        + b"\x00"
    )
    walker = _walk(frame, _feeds_bytewise)
    assert walker.frames == 1
    assert walker.content_size == size


def test_frames_from_the_zstd_command() -> None:
    binary = shutil.which("zstd")
    if binary is None:
        pytest.skip("the zstd command is not installed")
    data = _data(400 * KiB, 5)
    # From a pipe, zstd does not know the size: no content size; it writes a checksum.
    piped = subprocess.run([binary, "-q", "-c", "-"], input=data, capture_output=True, check=True)
    sized = subprocess.run(
        [binary, "-q", "-c", "--no-check", "-19", f"--stream-size={len(data)}", "-"],
        input=data,
        capture_output=True,
        check=True,
    )
    walker = _walk(piped.stdout + sized.stdout, _feeds_random)
    assert walker.frames == 2
    assert walker.content_size is None
    walker = _walk(sized.stdout, _feeds_random)
    assert walker.content_size == len(data)


def _truncation_stream() -> tuple[bytes, set[int]]:
    """A small multi-block stream: compressed and raw blocks, checksums, skippable frames."""
    # 300 KiB of repetitive data: three 128 KiB blocks in a few hundred bytes.
    repetitive = b"".join(b"block %d of the root file system\n" % (i % 97) for i in range(9000))
    frame_a = _compress(repetitive[: 300 * KiB], level=1, checksum=True)
    frame_b = _compress(b"tiny", checksum=False)
    # Random bytes do not compress: a raw block.
    frame_c = _compress(random.Random(10).randbytes(1500), content_size=False, checksum=True)
    parts = [frame_a, _skippable(b"skip me"), frame_b, frame_c]
    boundaries = set()
    pos = 0
    for part in parts:
        pos += len(part)
        boundaries.add(pos)
    return b"".join(parts), boundaries


def test_every_truncation_point_is_caught() -> None:
    stream, boundaries = _truncation_stream()
    first_frame_end = min(boundaries)
    # Every cut inside a frame, bytewise fed and fed whole.
    checked = 0
    for cut in range(len(stream)):
        if cut in boundaries:
            continue  # a stream cut between frames is itself a valid stream
        for feed in (_feeds_whole, _feeds_random):
            walker = FrameWalker()
            for piece in feed(stream[:cut]):
                walker.feed(piece)
            with pytest.raises(IntegrityError) as excinfo:
                walker.finish()
            assert excinfo.value.reason == "TruncatedStream", cut
            assert "truncated" in excinfo.value.message or "no frame" in excinfo.value.message
        checked += 1
    assert checked > first_frame_end > 100  # the loop really walked the stream
    # Cuts on a frame boundary end cleanly (only the hash can tell those apart).
    for cut in sorted(boundaries):
        walker = _walk(stream[:cut], _feeds_whole)
        assert walker.frames >= 1


def test_truncation_inside_the_first_frame_names_frame_one() -> None:
    stream = _compress(_data(50 * KiB), checksum=True)
    walker = FrameWalker()
    walker.feed(stream[: len(stream) // 2])
    with pytest.raises(IntegrityError, match="inside frame 1") as excinfo:
        walker.finish()
    assert excinfo.value.reason == "TruncatedStream"


def test_empty_stream_holds_no_frame() -> None:
    walker = FrameWalker()
    with pytest.raises(IntegrityError, match="no frame") as excinfo:
        walker.finish()
    assert excinfo.value.reason == "TruncatedStream"
    # Only skippable frames is no image either.
    walker = FrameWalker()
    walker.feed(_skippable(b"meta"))
    with pytest.raises(IntegrityError, match="no frame"):
        walker.finish()


@pytest.mark.parametrize(
    "garbage",
    [b"garbage!", b"\x00\x00\x00\x00", b"\x28\xb5\x2f\xfe rest", b"PK\x03\x04zipfile"],
    ids=["text", "zeros", "almost-magic", "zip"],
)
@pytest.mark.parametrize("feed", [_feeds_whole, _feeds_bytewise], ids=["whole", "bytewise"])
def test_garbage_after_a_frame_is_corrupt(
    garbage: bytes, feed: Callable[[bytes], Iterator[bytes | memoryview]]
) -> None:
    stream = _compress(_data(20 * KiB), checksum=True) + garbage
    walker = FrameWalker()

    def feed_all() -> None:
        for piece in feed(stream):
            walker.feed(piece)

    with pytest.raises(IntegrityError) as excinfo:
        feed_all()
    assert excinfo.value.reason == "CorruptStream"
    assert walker.frames == 1


def test_short_garbage_after_a_frame_fails_at_finish() -> None:
    stream = _compress(_data(20 * KiB)) + b"\x01\x02"
    walker = FrameWalker()
    walker.feed(stream)
    with pytest.raises(IntegrityError) as excinfo:
        walker.finish()
    assert excinfo.value.reason == "TruncatedStream"


def test_reserved_block_type_is_corrupt() -> None:
    frame = bytearray(_compress(b"x" * 1000, content_size=True))
    # Header: magic, descriptor, FCS (single segment, 2 bytes for 1000): block header follows.
    descriptor = frame[4]
    assert descriptor & 0x20  # single segment
    header_end = 4 + 1 + 2
    block = int.from_bytes(frame[header_end : header_end + 3], "little")
    block |= 3 << 1  # block type 3 is reserved
    frame[header_end : header_end + 3] = block.to_bytes(3, "little")
    walker = FrameWalker()
    with pytest.raises(IntegrityError, match="reserved block type") as excinfo:
        walker.feed(bytes(frame))
    assert excinfo.value.reason == "CorruptStream"
    with pytest.raises(zstandard.ZstdError):
        _decodes_to(bytes(frame))  # libzstd agrees


@pytest.mark.parametrize("variant", range(16))
def test_is_zstd_on_skippable_magics(variant: int) -> None:
    assert is_zstd(_skippable(b"x", variant))


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (ZSTD_MAGIC, True),
        (ZSTD_MAGIC + b"\x00" * 14, True),
        (b"\x28\xb5\x2f", False),  # too short
        (b"", False),
        (b"\x00" * 18, False),
        ((0x184D2A60).to_bytes(4, "little"), False),  # just past the skippable range
        ((0x184D2A4F).to_bytes(4, "little"), False),  # just before it
        (b"\x1f\x8b\x08\x00", False),  # gzip
        (b"\xfd7zXZ\x00", False),  # xz
        (b"\xeb\x3c\x90mkfs", False),  # a boot sector
    ],
    ids=[
        "magic",
        "magic-long",
        "short",
        "empty",
        "zeros",
        "after-skippable",
        "before-skippable",
        "gzip",
        "xz",
        "boot-sector",
    ],
)
def test_is_zstd(head: bytes, expected: bool) -> None:
    assert is_zstd(head) is expected


def test_is_zstd_on_real_frames() -> None:
    assert is_zstd(_compress(b"hello"))
    assert is_zstd(_compress(b"hello", content_size=False))
    assert not is_zstd(b"hello, raw image data")


# -- the window limit -------------------------------------------------------------------------


def _one_byte_frame(window_descriptor: int) -> bytes:
    """A frame with no content size whose window is `window_descriptor`'s, holding one raw
    byte: the windows zstd can declare, without compressing gigabytes."""
    last_raw_block = (1 << 3 | 1).to_bytes(3, "little")
    return ZSTD_MAGIC + bytes([0x00, window_descriptor]) + last_raw_block + b"x"


def _libzstd_accepts(stream: bytes, max_window_log: int) -> bool:
    """Whether libzstd decodes `stream` within the window limit. Read in pieces smaller than a
    frame's content, as the pipeline reads a large frame: given room for a whole small frame
    at once, libzstd decodes it without checking its window."""
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << max_window_log)
    reader = dctx.stream_reader(io.BytesIO(stream), read_across_frames=True)
    try:
        while reader.read(512):
            pass
    except zstandard.ZstdError:
        return False
    return True


def _walker_accepts(stream: bytes, max_window_log: int) -> bool:
    try:
        FrameWalker(max_window_log).feed(stream)
    except WindowTooLarge:
        return False
    return True


@pytest.mark.parametrize(
    "descriptor",
    [0x00, 0x07, 10 << 3, 17 << 3, 17 << 3 | 3, 17 << 3 | 7, 20 << 3, 20 << 3 | 1, 21 << 3],
    ids=lambda d: f"exponent{d >> 3}-mantissa{d & 7}",
)
def test_the_window_limit_is_libzstds(descriptor: int) -> None:
    """For every allowed window log, the walker refuses exactly the frames libzstd refuses,
    and names the smallest log that decodes the frame."""
    frame = _one_byte_frame(descriptor)
    window = zstandard.get_frame_parameters(frame).window_size
    for log in range(10, 32):
        assert _walker_accepts(frame, log) == _libzstd_accepts(frame, log), (log, window)
    with pytest.raises(WindowTooLarge) as excinfo:
        FrameWalker(9).feed(frame)
    needed = excinfo.value.needed_log
    if needed <= 31:  # 2^31 + 1/8 is beyond any decoder
        assert _libzstd_accepts(frame, needed)
    if needed > 10:
        assert not _libzstd_accepts(frame, needed - 1)


def test_a_long_window_frame_names_the_log_it_needs() -> None:
    """A `zstd --long=30` frame without a content size, as a pipe makes it."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=30, enable_ldm=True, write_content_size=False
    )
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        out, size=-1, closefd=False
    ) as writer:
        writer.write(_data(64 * KiB))
    stream = out.getvalue()
    assert zstandard.get_frame_parameters(stream).window_size == 1 << 30
    with pytest.raises(WindowTooLarge) as excinfo:
        _walk(stream, _feeds_bytewise, max_window_log=27)
    error = excinfo.value
    assert (error.needed_log, error.allowed_log, error.reason) == (30, 27, "WindowTooLarge")
    assert "2^30" in error.message
    assert "--max-window-log to 30" in error.message
    assert "--max-window-log" not in error.detail  # a front end words its own hint
    assert _walk(stream, _feeds_random, max_window_log=30).frames == 1


def test_a_single_segment_frames_window_is_its_content() -> None:
    data = _data(3000)
    frame = _compress(data)
    assert zstandard.get_frame_parameters(frame).window_size == 3000
    with pytest.raises(WindowTooLarge) as excinfo:
        FrameWalker(11).feed(frame)
    assert excinfo.value.needed_log == 12
    assert not _libzstd_accepts(frame, 11)
    assert _walker_accepts(frame, 12)
    assert _libzstd_accepts(frame, 12)


def test_a_later_frame_with_a_larger_window_is_named() -> None:
    stream = _compress(_data(1000)) + _one_byte_frame(20 << 3)
    with pytest.raises(WindowTooLarge, match="zstd frame 2 ") as excinfo:
        _walk(stream, _feeds_whole, max_window_log=27)
    assert excinfo.value.needed_log == 30
