"""Whole-disk COSI streaming against the native tools, in the same run (issue 11).

A COSI image of more than 1 GiB of partitions (a 64 MiB FAT ESP and a 1 GiB ext4 holding
`--payload-mib` of filesystem-like data, zstd level 3, real GPT, GNU tar; built by
`tests.support.cosi.build_cosi`) is written to a loop disk, alternately by

* ours:        ``imagestream stream IMAGE.cosi disk:DEV --sha384 HEX --progress plain``
               (tar entries, per-image SHA-384 and sizes, zstd, region writes, GPT last,
               ``sgdisk -e``),
* ours-http:   the same from a real nginx on loopback,
* native:      for each partition, one after the other,
               ``zstd -dc PART.rawzst | dd of=DEV bs=4M seek=OFFSET oflag=direct,seek_bytes
               conv=fsync status=none`` (no hashing, no tar, no GPT: a floor, not a twin),
* native-sha:  the same with the SHA-384 ours checks of each image:
               ``tee >(sha384sum >/dev/null) <PART.rawzst | zstd -dc | dd ...``.

Before every run the disk is discarded (``blkdiscard``); the image stays in the page cache
(warm: the two cores of this machine are shared, dropping caches would disturb others). After
every run, outside the timed part, each partition region is read back and compared with its
raw image by SHA-384; a run that fails that is reported BROKEN. Nothing here asserts.

Run as root::

    .venv/bin/python benchmarks/bench_cosi.py [--runs 3] [--payload-mib 900] [--tmp-dir /var/tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

# `tests.support` lives in the repository, not in the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.blockdev import loop_device
from tests.support.cosi import ESP_TYPE, LINUX_TYPE, CosiImage, PartitionSpec, build_cosi
from tests.support.nginx import Nginx
from tests.support.tools import find_tool

from imagestream.demo.image import write_raw_image

MIB = 1 << 20
IMAGESTREAM = Path(sys.executable).with_name("imagestream")


def _filesystem_like(path: Path, size: int, seed: int) -> None:
    write_raw_image(path, size, seed=seed)


def build(directory: Path, payload_mib: int) -> CosiImage:
    """The benchmark's COSI image: > 1 GiB of partitions."""
    partitions = (
        PartitionSpec("esp", "vfat", 64 * MIB, 64 * MIB, "/boot/efi", ESP_TYPE),
        PartitionSpec("root", "ext4", 1024 * MIB, 1024 * MIB, "/", LINUX_TYPE),
    )
    return build_cosi(
        directory,
        disk_size=1100 * MIB,
        partitions=partitions,
        content_size=payload_mib * MIB,
        payload=_filesystem_like,
    )


def tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        sys.exit(f"bench_cosi: {name} is needed")
    return found


def timed(command: Callable[[], None]) -> float:
    started = time.monotonic()
    command()
    return time.monotonic() - started


def ours(source: str, disk: Path, sha384: str) -> None:
    subprocess.run(
        [IMAGESTREAM, "stream", source, f"disk:{disk}", "--sha384", sha384, "--progress", "plain"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def native(image: CosiImage, disk: Path, *, sha: bool = False) -> None:
    zstd, dd = tool("zstd"), tool("dd")
    for part in image.partitions:
        source = (
            f"{tool('tee')} >({tool('sha384sum')} >/dev/null) <{part.compressed} | {zstd} -dc"
            if sha
            else f"{zstd} -dc {part.compressed}"
        )
        script = (
            f"{source} | {dd} of={disk} bs=4M seek={part.offset} "
            "oflag=direct,seek_bytes conv=fsync status=none"
        )
        subprocess.run(["bash", "-o", "pipefail", "-c", script], check=True)


def intact(image: CosiImage, disk: Path) -> bool:
    """Every partition region holds its raw image (read past the page cache)."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for part in image.partitions:
            size = part.raw.stat().st_size
            on_disk, raw = hashlib.sha384(), hashlib.sha384()
            done = 0
            with part.raw.open("rb") as source:
                while done < size:
                    chunk = os.pread(fd, min(16 * MIB, size - done), part.offset + done)
                    on_disk.update(chunk)
                    raw.update(source.read(len(chunk)))
                    done += len(chunk)
            if on_disk.digest() != raw.digest():
                return False
    finally:
        os.close(fd)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--payload-mib", type=int, default=900)
    parser.add_argument("--tmp-dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cosi: run as root (loop devices)")
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmp_dir)))
        print("building the COSI image ...", flush=True)
        started = time.monotonic()
        image = build(work / "cosi", args.payload_mib)
        built = time.monotonic() - started
        partitions = sum(part.raw.stat().st_size for part in image.partitions)
        compressed = image.path.stat().st_size
        print(
            f"built in {built:.0f} s: {len(image.partitions)} partitions, "
            f"{partitions / MIB:.0f} MiB raw, COSI file {compressed / MIB:.0f} MiB"
        )
        docroot = work / "docroot"
        docroot.mkdir()
        os.link(image.path, docroot / "image.cosi")
        nginx = stack.enter_context(Nginx(docroot, work / "nginx"))
        disk = stack.enter_context(loop_device(image.disk_size + 64 * MIB, work))
        contenders: dict[str, Callable[[], None]] = {
            "ours": lambda: ours(str(image.path), disk, image.metadata_sha384),
            "ours-http": lambda: ours(nginx.url_for("image.cosi"), disk, image.metadata_sha384),
            "native": lambda: native(image, disk),
            "native-sha": lambda: native(image, disk, sha=True),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        blkdiscard = tool("blkdiscard")
        for round_ in range(args.runs):
            order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
            for name in order:
                subprocess.run([blkdiscard, disk], check=True)
                seconds = timed(contenders[name])
                ok = intact(image, disk)
                times[name].append(seconds)
                state = "" if ok else "  BROKEN"
                print(
                    f"round {round_ + 1} {name:10s} {seconds:6.2f} s  "
                    f"{partitions / seconds / 1e6:7.0f} MB/s of partitions{state}",
                    flush=True,
                )
        print("\nmedians (partitions written / wall time):")
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, seconds in medians.items():
            print(f"  {name:10s} {seconds:6.2f} s  {partitions / seconds / 1e6:7.0f} MB/s")
        for other in ("native", "native-sha"):
            print(f"  ours / {other}: {medians[other] / medians['ours']:.2f}x its speed")
        shutil.rmtree(work / "cosi", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
