"""gzip, xz and bzip2 decoders from the standard library: concatenated streams, bounded output.

No I/O here (like httpx's decoders): a `StreamDecoder` is handed input when it asks for it
(`needs_input`) and gives back at most `max_length` bytes per call, so a highly compressible
image never makes one call balloon memory. Each format may hold several members (gzip) or
streams (xz, bzip2) back to back, as `cat a.gz b.gz`, `pigz` or `pbzip2` write them; every one
is decoded, and input that ends inside one is a truncated stream, never a short success.
zlib, lzma and bz2 check their own CRCs and sizes and release the GIL while they work.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from imagestream.errors import IntegrityError
from imagestream.reasons import Reason

GZIP_MAGIC = b"\x1f\x8b\x08"  # ID1 ID2 and CM=8 (deflate, the only method defined)
XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2_MAGIC = b"BZh"
# After "BZhN" comes the first block's magic (pi) or, for empty input, the end-of-stream one.
_BZIP2_BLOCK_MAGICS = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
# gzip only (no zlib or raw deflate), with the largest window: zlib checks CRC-32 and ISIZE.
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# liblzma counts about 1 MiB of its own state and buffers on top of the dictionary.
_LZMA_OVERHEAD = 1 << 20
# xz allows NUL padding between streams, in multiples of four bytes (xz file format §2.2).
_XZ_PADDING_UNIT = 4


def is_bzip2(head: bytes) -> bool:
    """True when the bytes start a bzip2 stream: `BZh`, a block size digit, a block magic."""
    return (
        head[:3] == _BZIP2_MAGIC
        and head[3:4] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9")
        and head[4:10] in _BZIP2_BLOCK_MAGICS
    )


class _Decompressor(Protocol):
    """What `lzma.LZMADecompressor` and `bz2.BZ2Decompressor` offer (and `_Inflate` adapts)."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Inflate:
    """A gzip member through `zlib.decompressobj`, with lzma's `needs_input` interface.

    zlib hands back the input it has not consumed (`unconsumed_tail`) instead of keeping it,
    and may hold pending output when a call stopped at `max_length`.
    """

    def __init__(self) -> None:
        self._z = zlib.decompressobj(wbits=_GZIP_WBITS)
        self.needs_input = True

    @property
    def eof(self) -> bool:
        return self._z.eof

    @property
    def unused_data(self) -> bytes:
        return self._z.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._z.decompress(self._z.unconsumed_tail + data, max_length)
        self.needs_input = not self._z.unconsumed_tail and len(out) < max_length
        return out


@dataclass(frozen=True)
class _Format:
    name: str
    unit: str  # what one of its concatenated parts is called
    new: Callable[[], _Decompressor]
    errors: tuple[type[Exception], ...]
    padding: int = 0  # NUL padding allowed between parts, in multiples of this (0: none)


class StreamDecoder:
    """Decodes one format's concatenated members or streams, at most `max_length` at a time."""

    def __init__(
        self, form: _Format, too_large: Callable[[Exception], IntegrityError] | None
    ) -> None:
        self.name = form.name
        self.parts = 0
        self.produced = 0
        self._format = form
        self._too_large = too_large
        self._current: _Decompressor | None = None
        self._pending = b""  # input after the end of the last part, not decoded yet
        self._padding = 0

    @property
    def needs_input(self) -> bool:
        """Whether `decode` needs new input to make progress (else call it with b"")."""
        if self._current is None:
            return not self._pending
        return self._current.needs_input

    def decode(self, data: bytes, max_length: int) -> bytes:
        """Decode `data` (b"" to drain); return at most `max_length` bytes of output."""
        if self._current is None:
            data = self._skip_padding(self._pending + data)
            self._pending = b""
            if not data:
                return b""
            self._current = self._format.new()
            self.parts += 1
        try:
            out = self._current.decompress(data, max_length)
        except self._format.errors as exc:
            raise self._error(exc) from exc
        self.produced += len(out)
        if self._current.eof:
            self._pending = self._current.unused_data
            self._current = None
        return out

    def finish(self) -> None:
        """At the end of the input: raise unless it ended exactly after a complete part."""
        form = self._format
        if self._current is not None:
            raise IntegrityError(
                f"the {form.name} stream is truncated: it ends inside {form.unit} {self.parts} "
                f"(after {self.produced} bytes of output)",
                reason=Reason.TRUNCATED_STREAM,
            )
        if self.parts == 0:
            raise IntegrityError(
                f"the {form.name} stream holds no {form.unit}", reason=Reason.TRUNCATED_STREAM
            )
        self._check_padding()

    def _skip_padding(self, data: bytes) -> bytes:
        if not self._format.padding or not self.parts:
            return data
        rest = data.lstrip(b"\0")
        self._padding += len(data) - len(rest)
        if rest:
            self._check_padding()
            self._padding = 0
        return rest

    def _check_padding(self) -> None:
        unit = self._format.padding
        if unit and self._padding % unit:
            raise IntegrityError(
                f"the {self._format.name} stream has {self._padding} bytes of padding after "
                f"{self._format.unit} {self.parts}, not a multiple of {unit}",
                reason=Reason.CORRUPT_STREAM,
            )

    def _error(self, exc: Exception) -> IntegrityError:
        if self._too_large is not None and "memory" in str(exc).lower():
            return self._too_large(exc)
        return IntegrityError(
            f"the {self.name} stream is corrupt in {self._format.unit} {self.parts}, near output "
            f"byte {self.produced}: {exc}",
            reason=Reason.CORRUPT_STREAM,
        )


_GZIP = _Format("gzip", "member", _Inflate, (zlib.error,))
# bz2 reports corrupt data as OSError ("Invalid data stream").
_BZIP2 = _Format("bzip2", "stream", bz2.BZ2Decompressor, (OSError,))


def gzip_decoder() -> StreamDecoder:
    """Every member of a (multi-member) gzip file; CRC-32 and size checked by zlib."""
    return StreamDecoder(_GZIP, None)


def bzip2_decoder() -> StreamDecoder:
    """Every stream of a (multi-stream) bzip2 file; block and stream CRCs checked by bz2."""
    return StreamDecoder(_BZIP2, None)


def xz_decoder(max_window_log: int) -> StreamDecoder:
    """Every stream of an xz file, refusing a dictionary larger than 2^`max_window_log`."""
    memlimit = (1 << max_window_log) + _LZMA_OVERHEAD

    def new() -> _Decompressor:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=memlimit)

    def too_large(exc: Exception) -> IntegrityError:
        return IntegrityError(
            f"the xz stream needs a larger dictionary than the allowed 2^{max_window_log} bytes "
            f"({exc}); raise --max-window-log if the image is trusted",
            reason=Reason.WINDOW_TOO_LARGE,
        )

    form = _Format("xz", "stream", new, (lzma.LZMAError,), padding=_XZ_PADDING_UNIT)
    return StreamDecoder(form, too_large)
