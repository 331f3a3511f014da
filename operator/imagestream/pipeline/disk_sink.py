"""A whole disk written region by region from a COSI image, never looking bootable early.

The writer stage hands over the partition images' bytes one after the other, in the order of
the layout; this sink puts each at its partition's offset. Before the first of them the
primary GPT area at the disk's start and the backup GPT area at its end are zeroed (and made
durable), so neither the old table nor a half-written new one can be booted or "repaired"
from. Only once every image verified does the commit write the primary GPT from the image,
then the backup GPT at the end of this disk (which may be larger than the image's), then fsync.
Any failure zeroes both areas again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from imagestream.errors import TargetError
from imagestream.pipeline.disk_layout import DiskImage, DiskLayout, Region
from imagestream.pipeline.safety import is_whole_disk
from imagestream.pipeline.sinks import (
    BACKUP_GPT_SECTORS,
    Aftermath,
    DescriptorSink,
    open_block_device,
    pwrite_all,
    set_direct,
    target_io,
    try_direct,
)
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason

log = logging.getLogger(__name__)

#: linux/fs.h: the logical sector size of a block device, an int.
BLKSSZGET = 0x1268
#: linux/fs.h: re-read the partition table.
BLKRRPART = 0x125F
#: The protective MBR, the GPT header and 32 sectors of 128-byte entries (16 KiB).
_PRIMARY_GPT_BYTES = 2 * 512 + 16384
_ALIGN = 4096
_READ_BACK = 4 << 20


class DiskSink(DescriptorSink):
    """The writer stage's view of a whole disk: `write` follows the layout's regions in order."""

    def __init__(self, plan: TargetPlan, layout: DiskLayout, opened_fd: int, path: Path) -> None:
        super().__init__(plan, path, opened_fd)
        self.layout = layout
        self.capacity: int | None = os.lseek(opened_fd, 0, os.SEEK_END)
        self.sector_size = _logical_sector_size(opened_fd)
        self._direct = plan.direct_io and try_direct(opened_fd, plan.name)
        self._regions: tuple[Region, ...] = ()
        self._primary_gpt = b""
        self._index = 0
        self._filled = 0
        self._begun = False

    @property
    def _disk_size(self) -> int:
        assert self.capacity is not None
        return self.capacity

    def check_disk(self, disk: DiskImage) -> None:
        """Refuse a disk smaller than the image's, or one with another sector size."""
        if self._disk_size < disk.size:
            raise TargetError(
                f"target {self.plan.name} holds {self._disk_size} bytes but the COSI image's "
                f"disk is {disk.size} bytes",
                reason=Reason.TARGET_TOO_SMALL,
            )
        if self.sector_size != disk.lba_size:
            raise TargetError(
                f"target {self.plan.name} has {self.sector_size}-byte logical sectors but the "
                f"COSI image's GPT counts {disk.lba_size}-byte sectors; its partitions would "
                "land at the wrong offsets",
                reason=Reason.SECTOR_SIZE_MISMATCH,
            )

    def begin(self, primary_gpt: bytes, regions: tuple[Region, ...]) -> None:
        """Take the primary GPT (written at the commit) and the regions the writes fill."""
        self._primary_gpt = primary_gpt
        self._regions = regions

    def _touch(self) -> None:
        """Before the first byte lands: zero both GPT areas, durably (once)."""
        if self._begun:
            return
        self._begun = True
        with target_io(f"zeroing the GPT areas of {self.plan.name}"):
            self._zero_gpt_areas()

    def _primary_span(self) -> int:
        return max(len(self._primary_gpt), _PRIMARY_GPT_BYTES // 512 * self.sector_size)

    def _zero_gpt_areas(self) -> None:
        backup = BACKUP_GPT_SECTORS * self.sector_size
        self._set_direct(False)
        for start, size in ((0, self._primary_span()), (self._disk_size - backup, backup)):
            pwrite_all(self._fd, memoryview(bytes(size)), start)
        os.fsync(self._fd)

    def write(self, data: memoryview) -> None:
        """The next bytes of the regions' images, each placed at its region's offset.

        The COSI stage hands over page-aligned pool buffers that each hold bytes of one region,
        so O_DIRECT applies to all but the unaligned tail of a region.
        """
        self._touch()
        while len(data):
            if self._index >= len(self._regions):
                raise TargetError(
                    f"more output than the COSI layout of {self.plan.name} places",
                    reason=Reason.WRITE_FAILED,
                )
            region = self._regions[self._index]
            room = region.image.uncompressed_size - self._filled
            if room == 0:
                self._index, self._filled = self._index + 1, 0
                continue
            n = min(room, len(data))
            offset = region.offset + self._filled
            self._set_direct(self._direct and offset % _ALIGN == 0 and n % _ALIGN == 0)
            with target_io(f"writing partition {region.number} of {self.plan.name}"):
                pwrite_all(self._fd, data[:n], offset)
            self._filled += n
            data = data[n:]

    def _set_direct(self, on: bool) -> None:
        set_direct(self._fd, on)

    def restore_header(self) -> None:
        """The commit: the primary GPT from the image, the backup GPT at this disk's end, fsync."""
        self._touch()  # a disk image without partitions: its old tables go now
        with target_io(f"writing the primary GPT of {self.plan.name}"):
            self._set_direct(False)
            pwrite_all(self._fd, memoryview(self._primary_gpt), 0)
            os.fsync(self._fd)
        self.layout.finish(self.path)
        self.flush()

    def sha384_on_disk(self, length: int, checkpoint: Callable[[int], None]) -> str:
        """Hash the regions' images as the disk returns them (past the page cache), in order;
        `checkpoint(done)` runs before each chunk with the bytes hashed so far."""
        self.flush()
        digest = hashlib.sha384()
        with target_io(f"reading back {self.plan.name}"):
            self._set_direct(False)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            left = length
            for region in self._regions:
                done = 0
                while done < region.image.uncompressed_size and left > 0:
                    checkpoint(length - left)
                    n = min(_READ_BACK, region.image.uncompressed_size - done, left)
                    chunk = os.pread(self._fd, n, region.offset + done)
                    if not chunk:
                        return digest.hexdigest()  # shorter than written: it will not match
                    digest.update(chunk)
                    done += len(chunk)
                    left -= len(chunk)
        return digest.hexdigest()

    def publish(self) -> None:
        """The GPT was written in place: release the disk (and its lock), then ask the kernel
        to read the new partition table (a disk it cannot rescan keeps the old view)."""
        self.close()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.info("cannot reopen %s to re-read its partitions: %s", self.plan.name, exc)
            return
        try:
            fcntl.ioctl(fd, BLKRRPART)
        except OSError as exc:
            log.info("the kernel did not re-read the partitions of %s: %s", self.plan.name, exc)
        finally:
            os.close(fd)

    def invalidate(self) -> Aftermath:
        """Zero both GPT areas again, if anything was written; never raises. Says which."""
        failure = None
        if self._begun and self._fd >= 0:
            try:
                self._zero_gpt_areas()
            except OSError as exc:
                log.error("could not wipe the GPT of %s: %s", self.plan.name, exc.strerror)
                failure = f"wiping its GPT failed: {exc.strerror}"
        self.close()
        return Aftermath(self.plan.name, written=self._begun, failure=failure)


def open_disk_sink(plan: TargetPlan) -> DiskSink:
    """Open the planned whole disk exclusively, checked and locked; refuse a partition."""
    if plan.layout is None:
        raise ValueError("a disk plan needs a layout")
    opened = open_block_device(plan)
    try:
        if not is_whole_disk(opened.device, plan.host):
            raise TargetError(
                f"target {plan.name} is a partition; a COSI image is written to a whole disk",
                reason=Reason.TARGET_INVALID,
            )
        return DiskSink(plan, plan.layout, opened.fd, opened.path)
    except BaseException:
        os.close(opened.fd)
        raise


def _logical_sector_size(fd: int) -> int:
    """The disk's logical sector size, from the kernel (BLKSSZGET on the open descriptor)."""
    buffer = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
    size: int = struct.unpack("i", buffer)[0]
    return size
