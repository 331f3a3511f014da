"""Real systemd extension images for tests: an ext4 filesystem made by ``mkfs.ext4 -d`` from a
tree with the extension-release file systemd-sysext/-confext look for, compressed by the
``zstd`` tool; and a host root for them to go into.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .tools import require_tool

MIB = 1 << 20


@dataclass(frozen=True)
class ExtensionImage:
    """An extension image as built (``raw``) and as served (``compressed``, zstd)."""

    raw: Path
    compressed: Path

    @property
    def sha384(self) -> str:
        """SHA-384 of the fetched (compressed) bytes: what ``--sha384`` is given."""
        return hashlib.sha384(self.compressed.read_bytes()).hexdigest()

    @property
    def raw_bytes(self) -> bytes:
        """What the target must hold."""
        return self.raw.read_bytes()


def build_extension_image(
    directory: Path,
    name: str,
    *,
    kind: str = "sysext",
    seed: int = 1,
    size_mib: int = 8,
    payload_mib: int = 1,
) -> ExtensionImage:
    """An ext4 extension image named ``name`` in ``directory``: its release file (``ID=_any``)
    and ``payload_mib`` of incompressible data from ``seed``."""
    tree = directory / f"{name}-{seed}-tree"
    if kind == "sysext":
        release = tree / "usr/lib/extension-release.d" / f"extension-release.{name}"
        payload = tree / "usr/share" / name / "payload.bin"
    else:
        release = tree / "etc/extension-release.d" / f"extension-release.{name}"
        payload = tree / "etc" / name / "payload.bin"
    release.parent.mkdir(parents=True)
    release.write_text(f"ID=_any\nIMAGESTREAM_TEST_SEED={seed}\n")
    payload.parent.mkdir(parents=True)
    payload.write_bytes(random.Random(seed).randbytes(payload_mib * MIB))
    raw = directory / f"{name}-{seed}.raw"
    with raw.open("wb") as file:
        file.truncate(size_mib * MIB)
    subprocess.run(
        [require_tool("mkfs.ext4"), "-q", "-F", "-O", "^has_journal", "-d", tree, "-L", name, raw],
        check=True,
        capture_output=True,
    )
    compressed = raw.with_name(raw.name + ".zst")
    subprocess.run(
        [require_tool("zstd"), "-q", "-f", raw, "-o", compressed], check=True, capture_output=True
    )
    return ExtensionImage(raw, compressed)


def make_host_root(directory: Path) -> Path:
    """A host root with an empty /var/lib (no extension directory yet, as on a fresh host)."""
    (directory / "var/lib").mkdir(parents=True)
    return directory
