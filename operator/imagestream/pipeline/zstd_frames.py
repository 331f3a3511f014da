"""A light walk over a zstd stream's frame and block headers, alongside the real decoder.

libzstd (through python-zstandard's stream reader) treats input that ends mid-frame as a clean
end of stream, so a truncated image would decompress to a short "success". Walking the headers
costs a few operations per 128 KiB block and tells, at the end, whether the stream stopped on a
frame boundary, how many frames it had, and the sum of their declared content sizes. It also
refuses a frame whose window exceeds the allowed one before the decoder sees a byte of it, so
the user learns the window the image needs (libzstd only says it needs "too much memory").
"""

from __future__ import annotations

import enum

from imagestream import defaults
from imagestream.errors import IntegrityError
from imagestream.reasons import Reason

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)


class _State(enum.Enum):
    MAGIC = enum.auto()
    DESCRIPTOR = enum.auto()
    HEADER = enum.auto()
    BLOCK_HEADER = enum.auto()
    SKIPPABLE_SIZE = enum.auto()


def is_zstd(head: bytes) -> bool:
    """True when the bytes start a zstd frame or a skippable frame."""
    if len(head) < 4:
        return False
    magic = int.from_bytes(head[:4], "little")
    return head[:4] == ZSTD_MAGIC or (magic & _SKIPPABLE_MASK) == _SKIPPABLE_MAGIC


def not_zstd(head: bytes) -> IntegrityError:
    """The error for data asked to be zstd that does not start like it."""
    return IntegrityError(
        f"not a zstd stream (starts with {_shown(head)}); check the compression asked for "
        "(auto tells the format by its magic bytes)",
        reason=Reason.CORRUPT_STREAM,
    )


class WindowTooLarge(IntegrityError):
    """A zstd frame needs a larger window than the stream allows.

    `detail` names the frame and both windows without saying which knob raises the limit; the
    message adds the CLI's flag, and a front end with another knob words its own hint from
    `detail` and `needed_log`.
    """

    def __init__(self, frame: int, window_size: int, allowed_log: int) -> None:
        # zstd never uses a window below its minimum, whatever a header declares.
        self.needed_log = max(defaults.MIN_WINDOW_LOG, (window_size - 1).bit_length())
        self.allowed_log = allowed_log
        self.detail = (
            f"zstd frame {frame} declares a window of {window_size} bytes (needs "
            f"2^{self.needed_log}), more than the allowed 2^{allowed_log}"
        )
        super().__init__(
            f"{self.detail}; raise --max-window-log to {self.needed_log} if the image is trusted",
            reason=Reason.WINDOW_TOO_LARGE,
        )


class FrameWalker:
    """Follows frame boundaries in a zstd stream fed in arbitrary chunks.

    With `max_window_log`, a frame header declaring a larger window raises `WindowTooLarge`.
    """

    def __init__(self, max_window_log: int | None = None) -> None:
        self.max_window_log = max_window_log
        self.frames = 0
        self.content_size: int | None = 0
        self._state = _State.MAGIC
        self._pending = bytearray()
        self._need = 4
        self._skip = 0
        self._descriptor = 0
        self._checksum = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Advance over `data`; raises `IntegrityError` on a header that is not zstd."""
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._pending), end - pos)
            self._pending += view[pos : pos + take]
            pos += take
            if len(self._pending) == self._need:
                header = bytes(self._pending)
                self._pending.clear()
                self._advance(header)

    def finish(self) -> None:
        """Raise `IntegrityError` unless the stream ended exactly on a frame boundary."""
        if self._state is not _State.MAGIC or self._pending or self._skip:
            between_frames = self._state is _State.MAGIC and not self._skip
            inside = self.frames + 1 if between_frames else self.frames
            raise IntegrityError(
                f"the zstd stream is truncated: it ends inside frame {inside}",
                reason=Reason.TRUNCATED_STREAM,
            )
        if self.frames == 0:
            raise IntegrityError("the zstd stream holds no frame", reason=Reason.TRUNCATED_STREAM)

    def _expect(self, state: _State, need: int, skip: int = 0) -> None:
        self._state = state
        self._need = need
        self._skip = skip

    def _advance(self, header: bytes) -> None:
        if self._state is _State.MAGIC:
            self._on_magic(header)
        elif self._state is _State.SKIPPABLE_SIZE:
            self._expect(_State.MAGIC, 4, skip=int.from_bytes(header, "little"))
        elif self._state is _State.DESCRIPTOR:
            self._on_descriptor(header[0])
        elif self._state is _State.HEADER:
            self._on_header(header)
        else:
            self._on_block(header)

    def _on_magic(self, magic: bytes) -> None:
        if magic == ZSTD_MAGIC:
            self.frames += 1
            self._expect(_State.DESCRIPTOR, 1)
        elif (int.from_bytes(magic, "little") & _SKIPPABLE_MASK) == _SKIPPABLE_MAGIC:
            self._expect(_State.SKIPPABLE_SIZE, 4)
        elif self.frames == 0:
            raise not_zstd(magic)
        else:
            raise IntegrityError(
                f"data after zstd frame {self.frames} is not a zstd frame (it starts with "
                f"{_shown(magic)})",
                reason=Reason.CORRUPT_STREAM,
            )

    def _on_descriptor(self, descriptor: int) -> None:
        self._descriptor = descriptor
        single_segment = bool(descriptor & 0x20)
        fcs = _FCS_SIZES[descriptor >> 6] or (1 if single_segment else 0)
        rest = (0 if single_segment else 1) + _DICT_ID_SIZES[descriptor & 0x03] + fcs
        self._checksum = 4 if descriptor & 0x04 else 0
        if rest:
            self._expect(_State.HEADER, rest)
        else:
            self._frame_size(None)
            self._expect(_State.BLOCK_HEADER, 3)

    def _on_header(self, header: bytes) -> None:
        fcs_flag = self._descriptor >> 6
        fcs_len = _FCS_SIZES[fcs_flag] or (1 if self._descriptor & 0x20 else 0)
        value = int.from_bytes(header[len(header) - fcs_len :], "little") if fcs_len else None
        if value is not None and fcs_len == 2:
            value += 256
        self._check_window(header, value)
        self._frame_size(value)
        self._expect(_State.BLOCK_HEADER, 3)

    def _check_window(self, header: bytes, content_size: int | None) -> None:
        if self.max_window_log is None:
            return
        if self._descriptor & 0x20:
            # A single-segment frame's window is its content (which then is always declared).
            window = content_size or 0
        else:
            exponent, mantissa = header[0] >> 3, header[0] & 0x07
            base = 1 << (defaults.MIN_WINDOW_LOG + exponent)
            window = base + (base >> 3) * mantissa
        if window > 1 << self.max_window_log:
            raise WindowTooLarge(self.frames, window, self.max_window_log)

    def _frame_size(self, size: int | None) -> None:
        if size is None or self.content_size is None:
            self.content_size = None
        else:
            self.content_size += size

    def _on_block(self, header: bytes) -> None:
        word = int.from_bytes(header, "little")
        last = word & 1
        block_type = (word >> 1) & 3
        size = word >> 3
        if block_type == 3:
            raise IntegrityError(
                f"zstd frame {self.frames} has a reserved block type", reason=Reason.CORRUPT_STREAM
            )
        content = 1 if block_type == 1 else size
        if last:
            self._expect(_State.MAGIC, 4, skip=content + self._checksum)
        else:
            self._expect(_State.BLOCK_HEADER, 3, skip=content)


def _shown(data: bytes) -> str:
    """Bytes as a user can compare them with `xxd` or `file`: hex, then the printable text."""
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)
    return f"{data.hex(' ')} {text!r}"
