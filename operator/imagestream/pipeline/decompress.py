"""The decompression stage: detect the format, inflate into pool buffers, check the result.

zstd, gzip, xz and bzip2 are told apart by their magic bytes; anything else is written as it
is. One decoder per stream, used from this stage's thread only, and output bounded per call
(zstd's `stream_reader.readinto`, the standard library's `max_length`) into 4 MiB buffers: a
highly compressible image can never balloon memory.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import IO, cast

import zstandard

from imagestream import defaults
from imagestream.errors import IntegrityError
from imagestream.pipeline.buffers import BufferPool, Filled
from imagestream.pipeline.channel import Channel
from imagestream.pipeline.decoders import (
    GZIP_MAGIC,
    XZ_MAGIC,
    StreamDecoder,
    bzip2_decoder,
    gzip_decoder,
    is_bzip2,
    xz_decoder,
)
from imagestream.pipeline.zstd_frames import FrameWalker, is_zstd, not_zstd
from imagestream.reasons import Reason

_READ_SIZE = 1 << 20
#: The longest zstd frame header (magic, descriptor, window, dictionary id, content size).
_FRAME_HEADER_MAX = 18

log = logging.getLogger(__name__)


class Compression(enum.StrEnum):
    """What the fetched bytes are; AUTO looks at the magic bytes."""

    AUTO = "auto"
    ZSTD = "zstd"
    GZIP = "gzip"
    XZ = "xz"
    BZIP2 = "bzip2"
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
    """AUTO becomes the format whose magic bytes start `head`, NONE if none does."""
    if requested is not Compression.AUTO:
        return requested
    if is_zstd(head):
        return Compression.ZSTD
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(XZ_MAGIC):
        return Compression.XZ
    if is_bzip2(head):
        return Compression.BZIP2
    return Compression.NONE


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
        return _zstd_stage(reader, pool, out, max_window_log)
    decoder = _stdlib_decoder(compression, max_window_log)
    readinto = _copy_into(reader) if decoder is None else _decoded_into(reader, decoder)
    return _fill_buffers(readinto, pool, out)


def _stdlib_decoder(compression: Compression, max_window_log: int) -> StreamDecoder | None:
    """The decoder of a format the standard library reads; None for raw data."""
    if compression is Compression.GZIP:
        return gzip_decoder()
    if compression is Compression.XZ:
        return xz_decoder(max_window_log)
    if compression is Compression.BZIP2:
        return bzip2_decoder()
    return None


def _zstd_stage(
    reader: ChannelReader, pool: BufferPool, out: Channel[Filled], max_window_log: int
) -> int:
    head = reader.peek(4)
    if head and not is_zstd(head):
        # Before libzstd sees it: its "Unknown frame descriptor" tells a user nothing.
        raise not_zstd(head)
    _log_frame(reader.peek(_FRAME_HEADER_MAX))
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


def _log_frame(head: bytes) -> None:
    """For -v: the first zstd frame's parameters (window, declared size, checksum)."""
    if not log.isEnabledFor(logging.INFO):
        return
    try:
        frame = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError:
        return  # a skippable frame first, or too short: the stream's own checks speak
    size = frame.content_size if frame.content_size >= 0 else "undeclared"
    log.info(
        "zstd frame 1: window %d bytes, content size %s, checksum %s",
        frame.window_size,
        size,
        "yes" if frame.has_checksum else "no",
    )


def _decoded_into(reader: ChannelReader, decoder: StreamDecoder) -> Callable[[memoryview], int]:
    """A `readinto` through `decoder`: input only when it asks, output bounded by the target."""

    def readinto(target: memoryview) -> int:
        while True:
            data = b""
            if decoder.needs_input:
                data = reader.read(_READ_SIZE)
                if not data:
                    decoder.finish()
                    return 0
            decoded = decoder.decode(data, len(target))
            if decoded:
                target[: len(decoded)] = decoded
                return len(decoded)

    return readinto


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
