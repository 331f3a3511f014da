"""Slow reads from one block device for one process: a real blkio cgroup's throttle.

A long read-back is what a slow disk gives; the kernel's block throttle makes one out of a loop
device, for the processes put into the cgroup only (other tests' loop devices are untouched).
cgroup v1's blkio hierarchy is used (where this host has it); without one the test fails under
CI and is skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.tools import fail_or_skip

BLKIO = Path("/sys/fs/cgroup/blkio")


@contextlib.contextmanager
def read_throttle(dev: Path, bytes_per_second: int) -> Iterator[Callable[[int], None]]:
    """Yield `admit(pid)`: from then on that process (all its threads, and their children)
    reads `dev` at `bytes_per_second` at most. The cgroup is removed at the end; its
    processes must have exited by then."""
    if not (BLKIO / "blkio.throttle.read_bps_device").exists():
        fail_or_skip(f"no cgroup v1 blkio throttle at {BLKIO}")
    group = BLKIO / f"imagestream-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        rdev = os.stat(dev).st_rdev
        limit = f"{os.major(rdev)}:{os.minor(rdev)} {bytes_per_second}\n"
        (group / "blkio.throttle.read_bps_device").write_text(limit)

        def admit(pid: int) -> None:
            (group / "cgroup.procs").write_text(f"{pid}\n")

        yield admit
    finally:
        group.rmdir()
