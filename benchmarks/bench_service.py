"""The gRPC path's overhead: `imagestream stream-disk` through `imagestream serve` against
`imagestream stream` of the same image onto the same loop device, in one run.

The image (a zstd sample image) is served by a real nginx on loopback; the server listens on a
Unix socket in the temp dir with the loop device as its only `--disk`. The two contenders run
alternately (the order flips every round), the device discarded and the page cache dropped
before each run; the device is hashed after each one (outside the timing). Wall time covers the
client process from start to exit: for the gRPC path that includes the server's probe request,
its Log records and the client's own start-up. It reports; it never asserts.

Run as root::

    .venv/bin/python benchmarks/bench_service.py [--size-mib 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

# `tests.support` lives in the repository, not in the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.blockdev import loop_device
from tests.support.grpc_service import ServeProcess
from tests.support.nginx import Nginx
from tests.support.targets import read_device

from imagestream.demo.image import write_sample_image

MIB = 1 << 20
IMAGESTREAM = str(Path(sys.executable).with_name("imagestream"))


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _prepare(dev: Path) -> None:
    subprocess.run(["blkdiscard", "-f", str(dev)], check=True, capture_output=True)
    _drop_caches()


def _timed(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return time.monotonic() - started


def main() -> None:
    """Measure and print the medians and the overhead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="raw image size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tmp-dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmp_dir)))
        docroot = work / "docroot"
        docroot.mkdir()
        image = write_sample_image(docroot / "image.raw.zst", args.size_mib * MIB)
        nginx = stack.enter_context(Nginx(docroot, work / "nginx"))
        url = nginx.url_for("image.raw.zst")
        dev = stack.enter_context(loop_device(args.size_mib * MIB + 4 * MIB, work))
        server = stack.enter_context(
            ServeProcess("--listen", f"unix://{work}/serve.sock", "--disk", dev)
        )
        contenders = {
            "stream": [
                IMAGESTREAM,
                "stream",
                url,
                str(dev),
                "--sha384",
                image.sha384,
                "--progress",
                "plain",
            ],
            "stream-disk": [
                IMAGESTREAM,
                "stream-disk",
                url,
                "--sha384",
                image.sha384,
                "--server",
                server.address,
                "--caller-handles-reboot",
                "--progress",
                "plain",
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for round_number in range(args.runs):
            order = list(contenders) if round_number % 2 == 0 else list(contenders)[::-1]
            for name in order:
                _prepare(dev)
                seconds = _timed(contenders[name])
                _drop_caches()
                written = hashlib.sha384(read_device(dev, image.raw_size)).hexdigest()
                ok = written == image.raw_sha384
                print(
                    f"round {round_number + 1} {name:12} {seconds:6.2f} s"
                    f"{'' if ok else '  BROKEN (the device does not hold the image)'}"
                )
                if ok:
                    times[name].append(seconds)
    print(f"image: {image.raw_size // MIB} MiB raw, {image.compressed_size / MIB:.0f} MiB zstd")
    medians = {name: statistics.median(values) for name, values in times.items() if values}
    for name, median in medians.items():
        print(f"median {name:12} {median:6.2f} s ({image.raw_size / median / 1e6:.0f} MB/s)")
    if len(medians) == 2:
        overhead = medians["stream-disk"] - medians["stream"]
        print(f"gRPC overhead: {overhead:+.2f} s ({overhead / medians['stream'] * 100:+.1f} %)")


if __name__ == "__main__":
    main()
