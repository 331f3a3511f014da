"""A stand-in for the node's own mount namespace, for the `nsenter` that runs an extension refresh.

The agent (or the CLI with `--host-root DIR`) runs `nsenter --mount=HOST_ROOT/proc/1/ns/mnt
-- systemd-sysext refresh`: the command runs in PID 1's mount namespace, where the extension
directory has the host's own path. Here "PID 1" is a `sleep` started by `unshare --mount` in a
namespace of its own, in which `/var/lib` is the test's host root's `var/lib` (bind-mounted),
and the host root's `proc/1` is that process's `/proc/PID`. So the real nsenter enters a real,
separate mount namespace, and a command run there sees `/var/lib/extensions/NAME.raw` exactly
when the stream put it into the host root. Only the refresh command is a stand-in (a script
first on PATH), since the real one would merge extensions into this machine's `/usr`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .tools import require_tool, wait_until


@contextlib.contextmanager
def host_namespace(host_root: Path) -> Iterator[Path]:
    """A mount namespace whose /var/lib is ``host_root``/var/lib, entered through
    ``host_root``/proc/1/ns/mnt; yields that path. Its process is killed at the end."""
    var_lib = host_root / "var/lib"
    ready = host_root.parent / f"{host_root.name}.ns-ready"
    script = 'mount --bind "$1" /var/lib && touch "$2" && exec sleep 600'
    process = subprocess.Popen(
        [
            require_tool("unshare"),
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            var_lib,
            ready,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(ready.exists, 10, what="the host mount namespace", process=process)
        # `exec sleep` keeps the PID; its mounts are the namespace's once `ready` exists.
        (host_root / "proc").mkdir(exist_ok=True)
        (host_root / "proc/1").symlink_to(f"/proc/{process.pid}")
        yield host_root / "proc/1/ns/mnt"
    finally:
        process.kill()
        process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(host_root / "proc/1")


def fake_refresh_tool(bin_dir: Path, tool: str, log: Path, *, exit_code: int = 0) -> Path:
    """A stand-in for ``tool`` (systemd-sysext or systemd-confext) in ``bin_dir``: it appends
    its arguments and the SHA-384 of every image it sees in the host's extension directories
    to ``log``, prints a line as the real one does, and exits with ``exit_code``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / tool
    script.write_text(
        "#!/bin/sh\n"
        f'echo "args: $*" >> "{log}"\n'
        "for image in /var/lib/extensions/*.raw /var/lib/confexts/*.raw; do\n"
        f'  [ -f "$image" ] && sha384sum "$image" >> "{log}"\n'
        "done\n"
        "echo 'Merged extensions into /usr.'\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return script


def path_with(*directories: Path) -> str:
    """A PATH of ``directories`` then this machine's usual ones (nsenter, sh, sha384sum)."""
    return os.pathsep.join([*map(str, directories), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


def path_without_refresh_tools(bin_dir: Path) -> str:
    """A PATH on which only nsenter is found: neither systemd-sysext nor systemd-confext,
    whatever this machine has installed."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "nsenter").symlink_to(require_tool("nsenter"))
    return str(bin_dir)
