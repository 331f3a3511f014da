"""The decompression stage: detect the format, inflate into pool buffers, check the result.

One `ZstdDecompressor` per stream, used from this stage's thread only, and output bounded by
`stream_reader.readinto` into 4 MiB buffers: a highly compressible image can never balloon memory.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import IO, cast

import zstandard

from imagestream import defaults
from imagestream.errors import IntegrityError
from imagestream.pipeline.buffers import BufferPool, Filled
from imagestream.pipeline.channel import Channel
from imagestream.pipeline.zstd_frames import FrameWalker, is_zstd
from imagestream.reasons import Reason

_READ_SIZE = 1 << 20


class Compression(enum.StrEnum):
    """What the fetched bytes are; AUTO looks at the magic bytes."""

    AUTO = "auto"
    ZSTD = "zstd"
    NONE = "none"


class ChannelReader:
    """A read-only file object over the fetch stage's chunks, for `zstandard.stream_reader`."""

    def __init__(self, chunks: Channel[bytes]) -> None:
        self._chunks = chunks
        # Sees every byte handed to the decoder (the frame walker); peeking does not count.
        self.observe: Callable[[bytes], None] | None = None
        self._current = b""
        self._pos = 0
        self._eof = False

    def peek(self, size: int) -> bytes:
        """Up to `size` bytes from the front without consuming them."""
        while len(self._current) - self._pos < size and not self._eof:
            nxt = self._next_chunk()
            self._current = self._current[self._pos :] + nxt
            self._pos = 0
        return self._current[self._pos : self._pos + size]

    def read(self, size: int = -1) -> bytes:
        """The next bytes, at most `size`; b"" only at the end of the stream."""
        if self._pos >= len(self._current):
            self._current = self._next_chunk()
            self._pos = 0
        if size < 0 or size >= len(self._current) - self._pos:
            data = self._current[self._pos :] if self._pos else self._current
            self._pos = len(self._current)
        else:
            data = self._current[self._pos : self._pos + size]
            self._pos += size
        if self.observe is not None and data:
            self.observe(data)
        return data

    def _next_chunk(self) -> bytes:
        if self._eof:
            return b""
        chunk = self._chunks.get()
        if chunk is None:
            self._eof = True
            return b""
        return chunk


def resolve_compression(requested: Compression, head: bytes) -> Compression:
    """AUTO becomes ZSTD on zstd magic bytes, NONE otherwise."""
    if requested is not Compression.AUTO:
        return requested
    return Compression.ZSTD if is_zstd(head) else Compression.NONE


def decompress_stage(
    reader: ChannelReader,
    *,
    compression: Compression,
    pool: BufferPool,
    out: Channel[Filled],
    max_window_log: int = defaults.CLI_MAX_WINDOW_LOG,
) -> int:
    """Fill pool buffers with output until the input ends; return the output byte count.

    Each buffer is filled completely before it is handed on, except the last, so the writer
    sees aligned lengths everywhere but at the tail.
    """
    if compression is Compression.ZSTD:
        walker = FrameWalker(max_window_log)
        reader.observe = walker.feed
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << max_window_log)
        # zstandard only calls read(); its stubs ask for a full IO object.
        source = cast("IO[bytes]", reader)
        stream = dctx.stream_reader(source, read_size=_READ_SIZE, read_across_frames=True)
        produced = _fill_buffers(stream.readinto, pool, out)
        if reader.read(1):
            raise IntegrityError("data follows the last zstd frame", reason=Reason.CORRUPT_STREAM)
        walker.finish()
        if walker.content_size is not None and walker.content_size != produced:
            raise IntegrityError(
                f"the zstd frames declare {walker.content_size} bytes of content but "
                f"{produced} were decompressed",
                reason=Reason.SIZE_MISMATCH,
            )
        return produced
    return _fill_buffers(_copy_into(reader), pool, out)


def _copy_into(reader: ChannelReader) -> Callable[[memoryview], int]:
    def readinto(target: memoryview) -> int:
        data = reader.read(len(target))
        target[: len(data)] = data
        return len(data)

    return readinto


def _fill_buffers(
    readinto: Callable[[memoryview], int],
    pool: BufferPool,
    out: Channel[Filled],
) -> int:
    produced = 0
    while True:
        buffer = pool.take()
        view = memoryview(buffer)
        filled = 0
        while filled < pool.size:
            try:
                n = readinto(view[filled:])
            except zstandard.ZstdError as exc:
                raise _zstd_error(exc, produced + filled) from exc
            if not n:
                break
            filled += n
        view.release()
        if filled:
            out.put(Filled(buffer, filled))
            produced += filled
        else:
            pool.give_back(buffer)
        if filled < pool.size:
            out.close()
            return produced


def _zstd_error(exc: zstandard.ZstdError, offset: int) -> IntegrityError:
    # A window beyond the limit never gets here: the frame walker refuses its header first.
    text = str(exc)
    return IntegrityError(
        f"the zstd stream is corrupt near output byte {offset}: {text}",
        reason=Reason.CORRUPT_STREAM,
    )
