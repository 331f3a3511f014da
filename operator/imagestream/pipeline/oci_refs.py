"""OCI references and platforms: what a user names with `oci://...` and `--platform`.

`oci://HOST[:PORT]/REPO[:TAG|@DIGEST]` names a manifest in a registry (OCI distribution spec);
a platform (`linux/arm64`) picks an image index's entry. Pure functions of their inputs.
"""

from __future__ import annotations

import ipaddress
import platform as host
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from imagestream import defaults
from imagestream.errors import UsageError

OCI_SCHEME = "oci://"
DEFAULT_TAG = "latest"

_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
# ASCII only, as the distribution spec writes it: without the flag `\w` is any Unicode letter.
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_PLATFORM = re.compile(r"([a-z0-9]+)/([a-z0-9_]+)(?:/([a-z0-9]+))?")

# platform.machine() spellings -> (GOARCH, variant), as image indexes name architectures.
_MACHINES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "x86_64": ("amd64", ""),
        "amd64": ("amd64", ""),
        "aarch64": ("arm64", ""),
        "arm64": ("arm64", ""),
        "armv8l": ("arm", "v8"),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i386": ("386", ""),
        "i686": ("386", ""),
        "ppc64le": ("ppc64le", ""),
        "s390x": ("s390x", ""),
        "riscv64": ("riscv64", ""),
    }
)


# -- references -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A parsed `oci://` reference. `registry` is `host[:port]` as the registry is addressed."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """The registry's host name or address, without port or brackets."""
        if self.registry.startswith("["):
            return self.registry[1 : self.registry.index("]")]
        return self.registry.split(":", 1)[0]

    @property
    def manifest_ref(self) -> str:
        """What to ask `/manifests/` for: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{OCI_SCHEME}{self.registry}/{self.repository}{tag}{digest}"


def parse_reference(text: str) -> Reference:
    """Parse `oci://HOST[:PORT]/REPO[:TAG][@DIGEST]`; the tag defaults to `latest`."""
    if not text.startswith(OCI_SCHEME):
        raise UsageError(f"an OCI reference starts with {OCI_SCHEME}")
    rest = text.removeprefix(OCI_SCHEME)
    registry, slash, path = rest.partition("/")
    if "@" in registry:
        # Never echoed: the part before "@" is a password.
        raise UsageError("credentials in an oci:// reference are not accepted; use --auth-file")
    host_port = _HOST.fullmatch(registry)
    if not host_port or not slash:
        raise UsageError(
            f"invalid OCI reference {text!r}: expected {OCI_SCHEME}HOST[:PORT]/REPOSITORY"
        )
    port = host_port.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise UsageError(f"invalid port {port} in {text!r}")
    name, _, digest = path.partition("@")
    repository, _, tag = name.partition(":")
    if not all(_PATH_COMPONENT.fullmatch(part) for part in repository.split("/")):
        raise UsageError(
            f"invalid repository {repository!r} in {text!r}: lower-case letters, digits and "
            "separators (. _ __ -) in components joined by /"
        )
    if tag and not _TAG.fullmatch(tag):
        raise UsageError(f"invalid tag {tag!r} in {text!r}")
    if digest and not defaults.DIGEST.fullmatch(digest):
        raise UsageError(
            f"invalid digest {digest!r} in {text!r}: expected sha256:<64 hex> or sha512:<128 hex>"
        )
    return Reference(
        registry=registry.lower(),
        repository=repository,
        tag=tag or (None if digest else DEFAULT_TAG),
        digest=digest or None,
    )


def require_registry_host(location: str) -> None:
    """The first component of an `oci://` reference must be a registry, as docker decides it.

    A name with a dot or a port, or `localhost`, is a registry; `oci://fleet/os:v1` would
    otherwise send a request to a host called `fleet`.
    """
    reference = parse_reference(location)
    registry = reference.registry
    if "." in registry or ":" in registry or registry == "localhost":
        return
    rest = location.removeprefix(OCI_SCHEME)
    raise UsageError(
        f"invalid OCI reference {location!r}: {registry!r} is not a registry host (it has no "
        f"dot, no port and is not localhost); write the registry first, e.g. "
        f"{OCI_SCHEME}registry.example/{rest}"
    )


def is_loopback(host_name: str) -> bool:
    """Whether the host is this machine: `localhost`, 127.0.0.0/8 or ::1."""
    if host_name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host_name).is_loopback
    except ValueError:
        return False


# -- platforms --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """An image index entry's platform, normalised as containerd does (arm64/v8 = arm64)."""

    os: str
    architecture: str
    variant: str = ""

    def __post_init__(self) -> None:
        variant = self.variant
        if self.architecture == "arm64" and variant == "v8":
            variant = ""
        elif self.architecture == "arm" and not variant:
            variant = "v7"
        object.__setattr__(self, "variant", variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platform(text: str) -> Platform:
    """`OS/ARCH[/VARIANT]`, e.g. `linux/arm64` or `linux/arm/v7`."""
    match = _PLATFORM.fullmatch(text.strip().lower())
    if not match:
        raise UsageError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return Platform(match.group(1), match.group(2), match.group(3) or "")


def host_platform() -> Platform:
    """This machine's platform: `linux/amd64` on x86_64, `linux/arm64` on aarch64, and so on."""
    machine = host.machine().lower()
    architecture, variant = _MACHINES.get(machine, (machine, ""))
    system = "linux" if sys.platform.startswith("linux") else host.system().lower()
    return Platform(system, architecture, variant)
