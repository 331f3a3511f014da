"""Deterministic, filesystem-like sample images for the demo, tests and benchmarks.

The raw data mimics what an OS partition image looks like to a compressor: runs of zeros
(free space), incompressible blocks (already compressed files), base64-like encoded data
(certificates, keys, identifiers) and tables of repeated text records. zstd level 3 reaches
about 2.5x on it, like a real image, so ratios and decompression speeds measured on it are
representative.

Everything is streamed: the image is generated, hashed, compressed and written a segment
(at most 1 MiB) at a time, so memory stays bounded whatever the size.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

import zstandard

__all__ = ["SampleImage", "iter_raw_data", "write_raw_image", "write_sample_image"]

# Filesystems allocate in 4 KiB blocks; keeping segments aligned keeps the data plausible.
_BLOCK = 4096
_MAX_SEGMENT_BLOCKS = 256  # 1 MiB: bounds memory and keeps the kind mix fine-grained

# Cumulative thresholds of the segment kinds, by count (sizes share one distribution, so
# this is also roughly the share by bytes).
_ZEROS_UNTIL = 0.30
_RANDOM_UNTIL = 0.50
_ENCODED_UNTIL = 0.75
# ... and the rest are repeated records.

_RECORD_POOL = 16

# Random bytes mapped onto 64 symbols: 6 bits of entropy per byte, so zstd gets ~1.33x from
# entropy coding alone. A flat alphabet matters for speed: skewed low-entropy alphabets
# (letter frequencies, hex) make zstd level 3 chase short spurious matches and drop below
# 100 MB/s, which would make a 1 GiB image take tens of seconds to build.
_ENCODED_TABLE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" * 4

# Record text: random bytes mapped onto characters with roughly English letter frequencies.
_TEXT_TABLE = (
    b" " * 43
    + b"e" * 24
    + b"t" * 17
    + b"a" * 16
    + b"o" * 15
    + b"i" * 14
    + b"n" * 14
    + b"s" * 12
    + b"r" * 12
    + b"h" * 12
    + b"l" * 9
    + b"d" * 9
    + b"c" * 6
    + b"u" * 6
    + b"m" * 5
    + b"f" * 5
    + b"p" * 4
    + b"g" * 4
    + b"/" * 3
    + b"y" * 3
    + b"bw._=-:0123456789vkxjqz"
)


def _segments(seed: int) -> Iterator[bytes]:
    """Yield the endless raw byte stream for `seed`, one segment (4 KiB..1 MiB) at a time.

    The stream does not depend on the image size, so a smaller image is a prefix of a larger
    one with the same seed.
    """
    rng = random.Random(seed)
    # A small pool of records (think inode tables, package databases): a binary header and
    # a line of text. Repeating them gives the long matches of a real image.
    records = [
        rng.randbytes(rng.randint(8, 32))
        + rng.randbytes(rng.randint(64, 480)).translate(_TEXT_TABLE)
        + b"\n"
        for _ in range(_RECORD_POOL)
    ]
    while True:
        kind = rng.random()
        size = _BLOCK * rng.randint(1, _MAX_SEGMENT_BLOCKS)
        if kind < _ZEROS_UNTIL:
            yield bytes(size)
        elif kind < _RANDOM_UNTIL:
            yield rng.randbytes(size)
        elif kind < _ENCODED_UNTIL:
            yield rng.randbytes(size).translate(_ENCODED_TABLE)
        else:
            # Records average ~300 bytes; over-draw, then cut to the aligned size.
            picked = rng.choices(records, k=size // 128 + 1)
            yield b"".join(picked)[:size]


def iter_raw_data(raw_size: int, *, seed: int = 0) -> Iterator[bytes]:
    """Yield the raw image for `seed` as chunks (at most 1 MiB each) totalling `raw_size` bytes.

    This is the exact data `write_sample_image` compresses and `write_raw_image` writes,
    useful to compare a written target against without keeping a copy of the image.
    """
    # Checked here, not in the generator below, so a bad size fails at the call.
    if raw_size < 0:
        raise ValueError(f"raw_size must be >= 0, got {raw_size}")
    return _take(_segments(seed), raw_size)


def _take(segments: Iterator[bytes], size: int) -> Iterator[bytes]:
    """Yield the first `size` bytes of `segments`, cutting the last segment short."""
    remaining = size
    if remaining <= 0:
        return
    for segment in segments:
        piece = segment[:remaining] if len(segment) > remaining else segment
        remaining -= len(piece)
        yield piece
        if remaining <= 0:  # before drawing another segment, which would be wasted work
            return


def _frame_sizes(raw_size: int, frames: int) -> list[int]:
    """Split `raw_size` into `frames` near-equal parts, the remainder going to the last."""
    base = raw_size // frames
    return [base] * (frames - 1) + [raw_size - base * (frames - 1)]


def _split(chunks: Iterator[bytes], sizes: list[int]) -> Iterator[Iterator[memoryview]]:
    """Regroup a chunk stream into consecutive groups of exactly `sizes[i]` bytes each."""
    pending = memoryview(b"")

    def group(size: int) -> Iterator[memoryview]:
        nonlocal pending
        while size > 0:
            if not pending:
                pending = memoryview(next(chunks))
            piece, pending = pending[:size], pending[size:]
            size -= len(piece)
            yield piece

    for size in sizes:
        yield group(size)


def _hashed(chunks: Iterator[bytes], update: Callable[[bytes], None]) -> Iterator[bytes]:
    """Pass `chunks` through, feeding each to `update` (a digest's) on the way."""
    for chunk in chunks:
        update(chunk)
        yield chunk


_DONE = object()


def _in_background(chunks: Iterator[bytes], depth: int = 4) -> Generator[bytes, None, None]:
    """Iterate `chunks` on a helper thread, `depth` chunks ahead of the consumer.

    Generation holds the GIL while hashing and zstd release it, so generating (and hashing
    the raw data) on one thread while compressing on another keeps two cores busy. Memory
    stays bounded by `depth` chunks.
    """
    handoff: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        # A timed put, so that a consumer that gave up (an exception while writing) does not
        # leave this thread blocked forever on a full queue.
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        else:
            put(_DONE)

    thread = threading.Thread(target=produce, name="sample-image-generator", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield cast(bytes, item)
    finally:
        stop.set()
        thread.join()


class _HashingWriter:
    """A write-only file wrapper that hashes and counts everything written through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.hash = hashlib.sha384()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()


@dataclass(frozen=True)
class SampleImage:
    """A generated image on disk, with the facts a test or the demo checks against."""

    path: Path
    raw_size: int
    compressed_size: int
    sha384: str  # of the file as written (the "fetched" bytes)
    raw_sha384: str  # of the raw (decompressed) data


def _compressor(
    level: int, *, content_size: bool, long_window_log: int | None
) -> zstandard.ZstdCompressor:
    # Single-threaded on purpose: zstd's multi-threaded encoding was seen to differ by a few
    # bytes between runs on the same input, and generation, not compression, is the slow
    # stage here (see `_in_background`).
    if long_window_log is None:
        return zstandard.ZstdCompressor(level=level, write_content_size=content_size)
    if not zstandard.WINDOWLOG_MIN <= long_window_log <= zstandard.WINDOWLOG_MAX:
        raise ValueError(
            f"long_window_log must be in {zstandard.WINDOWLOG_MIN}..{zstandard.WINDOWLOG_MAX},"
            f" got {long_window_log}"
        )
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        window_log=long_window_log,
        enable_ldm=True,
        write_content_size=content_size,
    )
    return zstandard.ZstdCompressor(compression_params=params)


def write_sample_image(
    dest: Path,
    raw_size: int,
    *,
    seed: int = 0,
    level: int = 3,
    frames: int = 1,
    content_size: bool = True,
    long_window_log: int | None = None,
) -> SampleImage:
    """Write a deterministic zstd-compressed image of `raw_size` raw bytes to `dest`.

    `frames` > 1 writes that many independent frames back to back (as `zstd` does when files
    are concatenated); `content_size=False` leaves the decompressed size out of the frame
    headers (as when compressing from a pipe); `long_window_log` enables long-distance
    matching with that window log, like `zstd --long=N`. Decoding a frame whose window
    exceeds 2**27 needs the decompressor's `max_window_size` raised, like `zstd -d --long=N`.
    Note that when the content size is written, zstd shrinks the window to fit the frame, so
    only `content_size=False` guarantees a header that declares the full `2**long_window_log`.

    The output is reproducible: the same arguments give the same raw data on any machine
    and the same compressed bytes with the same zstd library version. Compare against the
    returned hashes rather than hard-coding them, as another zstd version may encode
    differently.

    Returns the sizes and the SHA-384 of both the compressed file and the raw data.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    raw = iter_raw_data(raw_size, seed=seed)
    cctx = _compressor(level, content_size=content_size, long_window_log=long_window_log)
    raw_hash = hashlib.sha384()
    sizes = _frame_sizes(raw_size, frames)
    chunks = _in_background(_hashed(raw, raw_hash.update))
    with closing(chunks), dest.open("wb") as fh:
        out = _HashingWriter(fh)
        for frame_size, pieces in zip(sizes, _split(chunks, sizes), strict=True):
            # Pledging the size is what puts it in the header; without it zstd also keeps the
            # full window, which is what a streamed (`zstd < pipe`) image looks like.
            size = frame_size if content_size else -1
            writer = cctx.stream_writer(cast(IO[bytes], out), size=size, closefd=False)
            for piece in pieces:
                writer.write(piece)
            # Ends the frame (and writes it out); the next frame gets a fresh writer.
            writer.flush(zstandard.FLUSH_FRAME)
        # Drain to the end so the generator thread has finished (and hashed everything).
        for _ in chunks:
            raise AssertionError("the raw data outgrew raw_size")
    return SampleImage(
        path=dest,
        raw_size=raw_size,
        compressed_size=out.size,
        sha384=out.hash.hexdigest(),
        raw_sha384=raw_hash.hexdigest(),
    )


def write_raw_image(dest: Path, raw_size: int, *, seed: int = 0) -> SampleImage:
    """Write the same raw data as `write_sample_image` uncompressed to `dest`.

    The returned `compressed_size` equals `raw_size` and `sha384` equals `raw_sha384`: the
    fetched bytes are the raw bytes.
    """
    raw = iter_raw_data(raw_size, seed=seed)
    with dest.open("wb") as fh:
        out = _HashingWriter(fh)
        for chunk in raw:
            out.write(chunk)
    digest = out.hash.hexdigest()
    return SampleImage(
        path=dest,
        raw_size=raw_size,
        compressed_size=out.size,
        sha384=digest,
        raw_sha384=digest,
    )
