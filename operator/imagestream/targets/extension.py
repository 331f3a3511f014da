"""A systemd system or configuration extension image: `/var/lib/extensions/NAME.raw` (sysext) or
`/var/lib/confexts/NAME.raw` (confext) under the host's root.

The image is written like any file target (a staging file beside it, renamed into place once
verified, the directory fsynced), confined to the extension directory. Around the stream this
module adds what an extension needs: the already-current check, the record that makes it
possible, and the optional `systemd-sysext refresh` / `systemd-confext refresh`.

Already current: the expected SHA-384 is of the fetched (compressed) bytes, which a file on disk
cannot be compared with, and the output's own hash is only known once the whole image was
fetched and decompressed. So a commit records both on the file, as the extended attribute
`user.imagestream.sha384` (the fetched bytes' SHA-384 and the file's): a later request for the
same fetched SHA-384 re-hashes the file in place and calls it current only when that matches
the record. Nothing is fetched; a file changed since (whatever its mtime says) or one without a
record is streamed and replaced as usual. Re-hashing only when the size matches the zstd frame
header's content size would need the source opened first and still could not prove identity
before the whole stream was decoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imagestream import defaults
from imagestream.errors import TargetError, UsageError
from imagestream.pipeline.safety import HostView
from imagestream.pipeline.target_plan import ExtensionPlan, ExtensionType, TargetPlan
from imagestream.reasons import Reason

log = logging.getLogger(__name__)

#: The host directory of each extension type (as systemd-sysext/-confext look for images).
DIRECTORIES: dict[ExtensionType, str] = {
    "sysext": "/var/lib/extensions",
    "confext": "/var/lib/confexts",
}
SUFFIX = ".raw"
#: The record of a commit on the file: {"sha384": fetched, "output": the file's, "compression"}.
RECORD_XATTR = "user.imagestream.sha384"
_CHUNK = 4 << 20
#: nsenter's exit code when it cannot find the command to run (util-linux EX_EXEC_ENOENT).
_EXEC_NOT_FOUND = 127
_OUTPUT_TAIL = 600


def extension_type(value: str, where: str) -> ExtensionType:
    """`value` as an extension type; a UsageError naming `where` otherwise."""
    if value == "sysext":
        return "sysext"
    if value == "confext":
        return "confext"
    raise UsageError(f"{where} must be sysext or confext, got {value!r}")


def validate_name(name: str, where: str) -> str:
    """Refuse an extension name that is not a plain file name systemd accepts; `where` names
    the argument or field in the message."""
    problem = None
    if not name:
        problem = "is empty"
    elif "/" in name:
        problem = "contains '/': give the extension's name, not a path"
    elif name.startswith("."):
        problem = "starts with '.' (hidden and staging files are never extensions)"
    elif name.endswith(SUFFIX):
        problem = f"ends with {SUFFIX}: give the name without it, {SUFFIX} is added"
    elif len(name.encode()) > defaults.EXTENSION_NAME_MAX:
        problem = f"is longer than {defaults.EXTENSION_NAME_MAX} bytes"
    elif not defaults.EXTENSION_NAME.fullmatch(name):
        problem = (
            "may hold only letters, digits, '.', '_' and '-', and must start with a letter or "
            "a digit"
        )
    if problem is not None:
        raise UsageError(f"{where}: the extension name {name!r} {problem}")
    return name


def host_directory(kind: ExtensionType) -> str:
    """The extension directory as the host names it."""
    return DIRECTORIES[kind]


def host_file(kind: ExtensionType, name: str) -> str:
    """The image's path as the host names it (`name` already validated)."""
    return f"{DIRECTORIES[kind]}/{name}{SUFFIX}"


def directory_under(host_root: Path, kind: ExtensionType) -> Path:
    """Where the host's extension directory is seen through `host_root`."""
    return host_root / host_directory(kind).lstrip("/")


def plan(
    kind: ExtensionType,
    name: str,
    *,
    directory: Path,
    where: str,
    refresh: bool = False,
    mount_namespace: Path | None = None,
    host: HostView | None = None,
    direct_io: bool = True,
) -> TargetPlan:
    """The file plan of the extension image `name` in `directory`, where this process sees the
    host's extension directory (under the CLI's host root; the agent's mount of it), and
    confined to it.

    `mount_namespace` is where the refresh runs (see `ExtensionPlan`); `where` names the
    argument or field a bad name came from.
    """
    validate_name(name, where)
    return TargetPlan(
        kind="file",
        path=directory / f"{name}{SUFFIX}",
        name=host_file(kind, name),
        allowed_dirs=(directory,),
        direct_io=direct_io,
        host=host or HostView(),
        extension=ExtensionPlan(
            type=kind, name=name, refresh=refresh, mount_namespace=mount_namespace
        ),
    )


def mount_namespace_of(host_root: Path) -> Path | None:
    """The host's mount namespace as seen through `host_root`: None when this is the host."""
    if os.path.realpath(host_root) == "/":
        return None
    return host_root / "proc/1/ns/mnt"


def prepare_directory(target: TargetPlan) -> None:
    """Create the extension directory if the host has none yet (its parent must exist: a
    mistyped host root is not silently populated)."""
    directory = target.path.parent
    try:
        directory.mkdir(mode=0o755)
    except FileExistsError:
        pass  # a directory, or something else the open then refuses by name
    except FileNotFoundError:
        raise TargetError(
            f"the extension directory {target.name.rsplit('/', 1)[0]} cannot be created: "
            f"{directory.parent} does not exist (is the host root right?)",
            reason=Reason.TARGET_NOT_FOUND,
        ) from None
    except OSError as exc:
        raise TargetError(
            f"cannot create the extension directory {directory}: {exc.strerror}"
        ) from exc


@dataclass(frozen=True)
class Record:
    """What a commit recorded on an extension image."""

    sha384: str
    output: str
    compression: str

    def encode(self) -> bytes:
        """The attribute's value."""
        record = {"sha384": self.sha384, "output": self.output, "compression": self.compression}
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> Record | None:
        """The record in an attribute's value; None for anything else."""
        try:
            record = json.loads(value)
            return cls(str(record["sha384"]), str(record["output"]), str(record["compression"]))
        except (ValueError, TypeError, KeyError):
            return None


def current_record(
    target: TargetPlan, expected: str, checkpoint: Callable[[], None]
) -> Record | None:
    """The record of the image in place when it is the one `expected` (the fetched bytes'
    SHA-384) names and its bytes still hash to what was recorded; None otherwise.

    `checkpoint` runs before each chunk is hashed (a cancel raises there).
    """
    try:
        fd = os.open(target.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None  # absent, a link, unreadable: streamed and replaced as usual
    try:
        if not _is_regular(fd):
            return None
        try:
            record = Record.decode(os.getxattr(fd, RECORD_XATTR))
        except OSError:
            return None
        if record is None or record.sha384 != expected:
            return None
        return record if _sha384_of(fd, checkpoint) == record.output else None
    finally:
        os.close(fd)


def record_commit(target: TargetPlan, sha384: str, compression: str) -> None:
    """Record on the image just committed what it was streamed from and what it hashes to.

    Best effort: without the record (a filesystem without user xattrs) the next request for
    the same image streams it again, which is slower but just as correct.
    """
    try:
        fd = os.open(target.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot record %s as current: %s", target.name, exc.strerror)
        return
    try:
        record = Record(sha384, _sha384_of(fd, lambda: None), compression)
        os.setxattr(fd, RECORD_XATTR, record.encode())
    except OSError as exc:
        log.warning("cannot record %s as current: %s", target.name, exc.strerror)
    finally:
        os.close(fd)


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _sha384_of(fd: int, checkpoint: Callable[[], None]) -> str:
    digest = hashlib.sha384()
    offset = 0
    while True:
        checkpoint()
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


RefreshStatus = Literal["refreshed", "missing"]


@dataclass(frozen=True)
class Refreshed:
    """How `systemd-sysext refresh` (or -confext) went, when it ran or could not be found."""

    status: RefreshStatus
    command: tuple[str, ...]
    output: str

    @property
    def note(self) -> str:
        """One line for the summary and the agent's message."""
        tool = self.command[-2]
        if self.status == "missing":
            return f"{tool} refresh not run: {self.output}"
        return f"{tool} refresh done" + (f": {self.output}" if self.output else "")


def refresh_command(extension: ExtensionPlan) -> tuple[str, ...]:
    """The command that merges the host's extensions anew, in the host's mount namespace."""
    command = (f"systemd-{extension.type}", "refresh")
    if extension.mount_namespace is None:
        return command
    return ("nsenter", f"--mount={extension.mount_namespace}", "--", *command)


def refresh(extension: ExtensionPlan, timeout: float) -> Refreshed:
    """Run the refresh; `missing` when the host has no such command, a TargetError when it
    failed (the image itself is in place and verified, and the message says so)."""
    command = refresh_command(extension)
    tool = command[-2]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return Refreshed("missing", command, f"{command[0]} is not installed here")
    except subprocess.TimeoutExpired:
        raise _refresh_failed(extension, tool, f"it did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise _refresh_failed(extension, tool, f"it could not be started: {exc.strerror}") from exc
    output = _tail(f"{done.stdout}\n{done.stderr}")
    if done.returncode == _EXEC_NOT_FOUND and command[0] == "nsenter":
        return Refreshed("missing", command, f"the host has no {tool} ({output})")
    if done.returncode != 0:
        raise _refresh_failed(extension, tool, f"it exited with {done.returncode}: {output}")
    return Refreshed("refreshed", command, output)


def _refresh_failed(extension: ExtensionPlan, tool: str, why: str) -> TargetError:
    return TargetError(
        f"the extension image {host_file(extension.type, extension.name)} is in place and "
        f"verified, but `{tool} refresh` failed: {why}",
        reason=Reason.EXTENSION_REFRESH_FAILED,
    )


def _tail(text: str) -> str:
    folded = " ".join(text.split())
    return folded if len(folded) <= _OUTPUT_TAIL else "..." + folded[-_OUTPUT_TAIL:]
