"""Page-aligned, reusable output buffers: O_DIRECT needs the alignment, the data path no churn."""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass

from imagestream.pipeline.channel import Channel

WRITE_BUFFER = 4 << 20


@dataclass
class Filled:
    """A pool buffer and how many of its bytes hold data."""

    buffer: mmap.mmap
    length: int

    def view(self) -> memoryview:
        """The data part of the buffer."""
        return memoryview(self.buffer)[: self.length]


class BufferPool:
    """A fixed set of anonymous mmaps handed out and given back; bounds memory by construction."""

    def __init__(self, count: int, size: int, abort: threading.Event) -> None:
        self.size = size
        self._free: Channel[mmap.mmap] = Channel(count, abort)
        for _ in range(count):
            self._free.put(mmap.mmap(-1, size))

    def take(self) -> mmap.mmap:
        """Wait for a free buffer."""
        buffer = self._free.get()
        assert buffer is not None  # the pool never holds the end marker
        return buffer

    def give_back(self, buffer: mmap.mmap) -> None:
        """Return a buffer once its data was written."""
        self._free.put(buffer)
