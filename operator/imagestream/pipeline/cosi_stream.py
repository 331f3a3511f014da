"""The COSI stage: a whole-disk image's tar entries, each checked and decoded into its region.

It replaces the decompress stage for a `disk` target. The fetched bytes are an uncompressed tar
read as they arrive (`tarfile` in stream mode: no seeking, no temporary copy): `cosi-marker`,
then `metadata.json`, whose SHA-384 is the stream's expected one and is checked before anything
is written, then the primary-GPT image (kept in memory; the sink writes it last), then the
partition images in the order of the metadata's `gptRegions`. Each image's size and SHA-384 are
checked as it streams, its zstd frames are decoded with the window the metadata declares, and
exactly its `uncompressedSize` bytes go to the writer, one region after the other.
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
from collections.abc import Iterator
from typing import IO, cast

import zstandard

from imagestream.errors import IntegrityError
from imagestream.pipeline.buffers import BufferPool, Filled
from imagestream.pipeline.channel import Aborted, Channel
from imagestream.pipeline.decompress import ChannelReader
from imagestream.pipeline.disk_layout import DiskImage, DiskLayout, ImageFile, Region
from imagestream.pipeline.disk_sink import DiskSink
from imagestream.pipeline.progress import Counters
from imagestream.pipeline.zstd_frames import FrameWalker, WindowTooLarge
from imagestream.reasons import Reason

MARKER = "cosi-marker"
METADATA = "metadata.json"
IMAGES_DIR = "images"
#: Bounds of what is held in memory, inside the agent's memory headroom: the metadata (a few
#: hundred KiB with thousands of packages) and the primary-GPT image (17-24 KiB, 1 MiB at most
#: when it runs up to the first partition).
_METADATA_LIMIT = 4 << 20
_PRIMARY_GPT_LIMIT = 4 << 20
#: zstd's own input block size: tarfile (whose default buffer is kept) copies least this way.
_READ_SIZE = 128 << 10
#: Compressed pieces waiting for the hashing thread (4 MiB).
_HASH_QUEUE = 32


class CosiStage:
    """One COSI stream's entries into the writer's channel; `sha384` is that of metadata.json."""

    def __init__(
        self,
        sink: DiskSink,
        layout: DiskLayout,
        *,
        pool: BufferPool,
        out: Channel[Filled],
        counters: Counters,
        expected: str | None,
        max_window_log: int,
    ) -> None:
        self.sink = sink
        self.layout = layout
        self.pool = pool
        self.out = out
        self.counters = counters
        self.expected = expected
        self.max_window_log = max_window_log
        self.sha384: str | None = None
        self._seen: set[str] = set()

    def run(self, reader: ChannelReader) -> None:
        """Read the archive to its end, then the rest of the stream (trailing data is allowed,
        and the source's own digest covers every byte)."""
        try:
            with tarfile.open(fileobj=cast("IO[bytes]", reader), mode="r|") as tar:
                self._read(tar)
        except tarfile.TarError as exc:
            raise _invalid(f"the COSI file is not a readable tar archive: {exc}") from exc
        while reader.read(_READ_SIZE):
            pass
        self.out.close()

    def _read(self, tar: tarfile.TarFile) -> None:
        members = iter(tar)
        self._expect(next(members, None), MARKER, "first")
        metadata = next(members, None)
        self._expect(metadata, METADATA, "second")
        assert metadata is not None
        disk = self._metadata(tar, metadata)
        self.sink.check_disk(disk)
        self.counters.partitions = len(disk.partitions)
        gpt = self._next_image(members)
        if gpt is None or gpt.name != disk.primary_gpt.path:
            found = "the end of the archive" if gpt is None else gpt.name
            raise _invalid(
                f"the primary-GPT image {disk.primary_gpt.path} must follow {METADATA} in a "
                f"COSI file, not {found}"
            )
        primary_gpt = self._primary_gpt(tar, gpt, disk)
        regions = self.layout.regions(disk, primary_gpt)
        self.sink.begin(primary_gpt, regions)
        for ordinal, region in enumerate(regions, 1):
            member = self._next_image(members)
            if member is None:
                raise IntegrityError(
                    f"the COSI file ends before {region.image.path} (partition image {ordinal} "
                    f"of {len(regions)})",
                    reason=Reason.TRUNCATED_STREAM,
                )
            if member.name != region.image.path:
                raise _invalid(
                    f"the COSI file has {member.name} where {region.image.path} belongs "
                    "(images come in the order of disk.gptRegions)"
                )
            self.counters.partition = ordinal
            self._region(tar, member, region, disk)
        for member in members:
            self._check_place(member)

    def _expect(self, member: tarfile.TarInfo | None, name: str, position: str) -> None:
        if member is None:
            raise _invalid(f"the COSI file ends before its {position} entry, {name}")
        self._check_place(member, allowed=(MARKER, METADATA))
        if member.name != name:
            raise _invalid(f"the {position} entry of a COSI file must be {name}, not {member.name}")

    def _check_place(self, member: tarfile.TarInfo, allowed: tuple[str, ...] = ()) -> None:
        """Every entry is a unique regular file under images/ (or the marker and metadata)."""
        name = member.name
        if name in self._seen:
            raise _invalid(f"the COSI file holds {name} twice")
        self._seen.add(name)
        if name in allowed:
            pass
        elif name in (MARKER, METADATA):
            raise _invalid(f"{name} is out of place in the COSI file (it must come first)")
        elif not name.startswith(IMAGES_DIR + "/") or ".." in name.split("/"):
            raise _invalid(f"the COSI file holds {name}, outside {IMAGES_DIR}/")
        if not member.isreg():
            raise _invalid(f"{name} in the COSI file is not a regular file")

    def _next_image(self, members: Iterator[tarfile.TarInfo]) -> tarfile.TarInfo | None:
        for member in members:
            if member.isdir() and member.name == IMAGES_DIR and member.name not in self._seen:
                self._seen.add(member.name)
                continue
            self._check_place(member)
            return member
        return None

    def _metadata(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> DiskImage:
        if member.size > _METADATA_LIMIT:
            raise _invalid(f"{METADATA} is {member.size} bytes, more than {_METADATA_LIMIT}")
        raw = _entry(tar, member).read()
        if len(raw) != member.size:
            raise IntegrityError(
                f"the COSI file ends inside {METADATA}", reason=Reason.TRUNCATED_STREAM
            )
        self.sha384 = hashlib.sha384(raw).hexdigest()
        if self.expected is not None and self.sha384 != self.expected:
            raise IntegrityError(
                f"SHA-384 mismatch: expected {self.expected}, the COSI file's {METADATA} has "
                f"{self.sha384} (the expected hash of a COSI image is that of its metadata); "
                "nothing was written",
                reason=Reason.HASH_MISMATCH,
            )
        disk = self.layout.read_metadata(raw)
        if disk.max_window_log > self.max_window_log:
            raise IntegrityError(
                f"the COSI image's compression.maxWindowLog is {disk.max_window_log}, more than "
                f"the allowed {self.max_window_log}; raise --max-window-log "
                f"(spec.source.maxWindowLog) to {disk.max_window_log} if the image is trusted",
                reason=Reason.WINDOW_TOO_LARGE,
            )
        return disk

    def _primary_gpt(self, tar: tarfile.TarFile, member: tarfile.TarInfo, disk: DiskImage) -> bytes:
        image = disk.primary_gpt
        if (
            image.uncompressed_size > _PRIMARY_GPT_LIMIT
            or image.compressed_size > _PRIMARY_GPT_LIMIT
        ):
            raise _invalid(
                f"the primary-GPT image {image.path} is larger than {_PRIMARY_GPT_LIMIT} bytes"
            )
        blob = bytearray(image.uncompressed_size)
        with _ImageSource(tar, member, image, disk.max_window_log) as source:
            stream = source.decoder()
            view = memoryview(blob)
            filled = 0
            while filled < len(blob):
                n = source.decode(stream, view[filled:])
                if not n:
                    break
                filled += n
            view.release()
            source.finish(stream, filled)
        return bytes(blob)

    def _region(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, region: Region, disk: DiskImage
    ) -> None:
        image = region.image
        with _ImageSource(tar, member, image, disk.max_window_log) as source:
            self._decode_region(source, image)

    def _decode_region(self, source: _ImageSource, image: ImageFile) -> None:
        stream = source.decoder()
        produced = 0
        while produced < image.uncompressed_size:
            buffer = self.pool.take()
            view = memoryview(buffer)
            want = min(self.pool.size, image.uncompressed_size - produced)
            filled = 0
            try:
                while filled < want:
                    n = source.decode(stream, view[filled:want])
                    if not n:
                        break
                    filled += n
            finally:
                view.release()
            if filled < want:
                self.pool.give_back(buffer)
                source.finish(stream, produced + filled)  # raises: too few bytes
            self.out.put(Filled(buffer, filled))
            produced += filled
        source.finish(stream, produced)


class _BackgroundHash:
    """SHA-384 on a thread of its own: hashlib releases the GIL, so it runs beside zstd."""

    def __init__(self) -> None:
        self._hash = hashlib.sha384()
        self._stop = threading.Event()
        self._pieces: Channel[bytes] = Channel(_HASH_QUEUE, self._stop)
        self._thread = threading.Thread(target=self._run, name="imagestream-image-hash")
        self._thread.start()

    def _run(self) -> None:
        try:
            while (piece := self._pieces.get()) is not None:
                self._hash.update(piece)
        except Aborted:
            pass

    def update(self, piece: bytes) -> None:
        """Hash `piece` (an immutable bytes object: no copy is made)."""
        self._pieces.put(piece)

    def hexdigest(self) -> str:
        """The digest of every piece, once the thread hashed them all."""
        self._pieces.close()
        self._thread.join()
        return self._hash.hexdigest()

    def cancel(self) -> None:
        """Stop the thread without a digest (the entry failed); joined before returning."""
        self._stop.set()
        self._thread.join()


class _ImageSource:
    """One image entry's compressed bytes: counted, hashed and frame-walked as zstd reads them.

    A context manager: its hashing thread is always joined when it is left.
    """

    def __init__(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, image: ImageFile, window_log: int
    ) -> None:
        if member.size != image.compressed_size:
            raise IntegrityError(
                f"{image.path} is {member.size} bytes in the COSI file but its metadata says "
                f"compressedSize {image.compressed_size}",
                reason=Reason.SIZE_MISMATCH,
            )
        self.image = image
        self.window_log = window_log
        self._file = _entry(tar, member)
        self._hash = _BackgroundHash()
        self._walker = FrameWalker(window_log)
        self.consumed = 0

    def __enter__(self) -> _ImageSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hash.cancel()

    def read(self, size: int = -1) -> bytes:
        """Up to `size` compressed bytes (zstandard's stream reader calls this)."""
        try:
            data = self._file.read(size if size >= 0 else _READ_SIZE)
        except tarfile.ReadError as exc:
            raise IntegrityError(
                f"the COSI file ends inside {self.image.path} ({exc})",
                reason=Reason.TRUNCATED_STREAM,
            ) from exc
        try:
            self._walker.feed(data)
        except WindowTooLarge as exc:
            raise IntegrityError(
                f"{self.image.path}: {exc.detail}, beyond the metadata's compression.maxWindowLog",
                reason=Reason.WINDOW_TOO_LARGE,
            ) from exc
        self._hash.update(data)
        self.consumed += len(data)
        return data

    def decoder(self) -> zstandard.ZstdDecompressionReader:
        """A bounded zstd reader over this entry: windows up to 2**maxWindowLog, no more."""
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << self.window_log)
        return dctx.stream_reader(
            cast("IO[bytes]", self), read_size=_READ_SIZE, read_across_frames=True
        )

    def decode(self, stream: zstandard.ZstdDecompressionReader, into: memoryview) -> int:
        """Decode into `into`; 0 at the end of the entry's frames."""
        try:
            n: int = stream.readinto(into)
        except zstandard.ZstdError as exc:
            raise IntegrityError(
                f"{self.image.path} in the COSI file is corrupt: {exc}",
                reason=Reason.CORRUPT_STREAM,
            ) from exc
        return n

    def finish(self, stream: zstandard.ZstdDecompressionReader, produced: int) -> None:
        """Check the whole entry: decoded size exactly, compressed size, frames, SHA-384."""
        extra = (
            self.decode(stream, memoryview(bytearray(1)))
            if produced == self.image.uncompressed_size
            else 0
        )
        if extra or produced != self.image.uncompressed_size:
            more = "more" if extra else f"{produced}"
            raise IntegrityError(
                f"{self.image.path} decodes to {more} bytes, not its metadata's "
                f"uncompressedSize {self.image.uncompressed_size}",
                reason=Reason.SIZE_MISMATCH,
            )
        while self.read(_READ_SIZE):
            pass
        try:
            self._walker.finish()
        except IntegrityError as exc:
            raise IntegrityError(f"{self.image.path}: {exc.message}", reason=exc.reason) from exc
        actual = self._hash.hexdigest()
        if actual != self.image.sha384:
            raise IntegrityError(
                f"SHA-384 mismatch of {self.image.path}: its metadata says {self.image.sha384}, "
                f"the COSI file holds {actual}",
                reason=Reason.HASH_MISMATCH,
            )


def _entry(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    file = tar.extractfile(member)
    assert file is not None  # a regular file, checked before
    return file


def _invalid(message: str) -> IntegrityError:
    return IntegrityError(message, reason=Reason.COSI_INVALID)
