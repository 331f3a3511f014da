"""The peak RSS of a process, as the kernel counts it (``wait4``'s ``ru_maxrss``).

Linux folds the high-water RSS of the address space a process had before ``exec`` into its
``ru_maxrss`` (fs/exec.c, exec_mmap), and a child made by fork/vfork starts from its parent's.
Spawned straight from pytest, a command would report pytest's own peak (over 150 MiB after the
other test files ran). So a small launcher process spawns the command and reports the child's
``wait4`` usage, together with its own high-water mark: the floor the measurement cannot go
below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_LAUNCHER = """
import json, os, subprocess, sys
report, argv = sys.argv[1], sys.argv[2:]
with open("/proc/self/status") as status_file:
    hwm = next(int(line.split()[1]) for line in status_file if line.startswith("VmHWM:"))
child = subprocess.Popen(argv)
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open(report, "w") as fh:
    json.dump({"exit_code": child.returncode, "maxrss_kib": usage.ru_maxrss, "floor_kib": hwm}, fh)
"""
#: The launcher's floor must stay well below what is measured, or the number would mean nothing.
FLOOR_LIMIT_MIB = 40


@dataclass(frozen=True)
class PeakRss:
    """How a measured command ended and the most memory it held at once."""

    exit_code: int
    peak_rss_mib: float


def run_measured(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: IO[bytes],
    stderr: IO[bytes],
    report: Path,
    timeout: float,
) -> PeakRss:
    """Run ``command`` as a grandchild (through the launcher); return its exit code and peak."""
    report.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(report), *command],
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env=dict(env),
        check=True,
        timeout=timeout,
    )
    measured = json.loads(report.read_text())
    assert measured["floor_kib"] / 1024 < FLOOR_LIMIT_MIB, measured
    return PeakRss(exit_code=measured["exit_code"], peak_rss_mib=measured["maxrss_kib"] / 1024)
