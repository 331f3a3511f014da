"""OCI registry sources: references, platforms, manifests and the choice of the image's blob.

`oci://HOST[:PORT]/REPO[:TAG|@DIGEST]` names a manifest in a registry (OCI distribution spec).
A tag or digest resolves to an image manifest, directly or through an index (an OCI image index
or a Docker manifest list, whose entry for the wanted platform is taken); the image is one of the
manifest's layers, as `oras push` stores a file. Everything but `Registry` is a pure function of
its inputs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import platform as host
import re
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import httpx

from imagestream import defaults
from imagestream.errors import ImageStreamError, IntegrityError, SourceError, UsageError
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.range_reader import (
    BeforeRetry,
    HttpRangeReader,
    Refusal,
    RetryableError,
    RetryPolicy,
    cause_of,
)
from imagestream.pipeline.registry_auth import preferred_challenge
from imagestream.reasons import Reason

OCI_SCHEME = "oci://"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
TITLE_ANNOTATION = "org.opencontainers.image.title"
DEFAULT_TAG = "latest"

# Manifests are small; containerd refuses those over 4 MiB too.
MANIFEST_LIMIT = 4 << 20
_ERROR_BODY_LIMIT = 64 << 10
_MAX_INDEX_DEPTH = 4
_TAGS_SHOWN = 20
_DIGEST_ALGORITHMS = frozenset({"sha256", "sha512"})
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
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


# -- descriptors and manifests ----------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a manifest or a blob it points to."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def title(self) -> str | None:
        """The `org.opencontainers.image.title` annotation (the file name `oras push` kept)."""
        return self.annotations.get(TITLE_ANNOTATION)

    def label(self) -> str:
        """How to name the descriptor to a user: its title, else its digest."""
        return self.title or self.digest


@dataclass(frozen=True)
class Manifest:
    """A fetched manifest: an index (`entries` are manifests) or an image (`entries` are layers)."""

    media_type: str
    entries: tuple[Descriptor, ...]

    @property
    def is_index(self) -> bool:
        """Whether this lists manifests (per platform) rather than layers."""
        return self.media_type in INDEX_TYPES


def parse_manifest(body: bytes, content_type: str | None, where: str) -> Manifest:
    """Parse a manifest served with an OCI or Docker media type (or a generic JSON type)."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"{where} is not a JSON manifest", reason=Reason.INVALID_MANIFEST
        ) from exc
    if not isinstance(document, dict):
        raise SourceError(f"{where} is not a JSON manifest", reason=Reason.INVALID_MANIFEST)
    media_type = _media_type(document, content_type)
    if media_type in INDEX_TYPES:
        key = "manifests"
    elif media_type in MANIFEST_TYPES:
        key = "layers"
    else:
        raise SourceError(
            f"{where} has the unsupported media type {media_type!r}; expected an OCI image "
            "manifest or index, or a Docker v2 manifest or manifest list",
            reason=Reason.INVALID_MANIFEST,
        )
    items = document.get(key)
    if not isinstance(items, list):
        raise SourceError(f"{where} has no {key!r} list", reason=Reason.INVALID_MANIFEST)
    return Manifest(media_type, tuple(parse_descriptor(item, where) for item in items))


def _media_type(document: dict[str, Any], content_type: str | None) -> str:
    """The document's own `mediaType`, else the Content-Type, else what its shape says."""
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    served = (content_type or "").split(";", 1)[0].strip().lower()
    if served in INDEX_TYPES | MANIFEST_TYPES:
        return served
    # `mediaType` is optional in OCI manifests, and some servers say application/json.
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document:
        return OCI_MANIFEST
    return served


def parse_descriptor(item: object, where: str) -> Descriptor:
    """One descriptor; the digest must be sha256 or sha512 and the size a natural number."""
    if not isinstance(item, dict):
        raise SourceError(
            f"{where} holds a descriptor that is not an object", Reason.INVALID_MANIFEST
        )
    digest, size = item.get("digest"), item.get("size")
    if not isinstance(digest, str) or not defaults.DIGEST.fullmatch(digest):
        raise SourceError(
            f"{where} holds an unsupported digest {digest!r}", Reason.INVALID_MANIFEST
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(f"{where} holds an invalid size for {digest}", Reason.INVALID_MANIFEST)
    found = item.get("platform")
    platform = None
    if isinstance(found, dict):
        fields = (str(found.get(key, "")) for key in ("os", "architecture", "variant"))
        platform = Platform(*fields)
    annotations = item.get("annotations")
    if not isinstance(annotations, dict):
        annotations = {}
    return Descriptor(
        media_type=str(item.get("mediaType", "")),
        digest=digest,
        size=size,
        platform=platform,
        annotations=MappingProxyType({str(k): str(v) for k, v in annotations.items()}),
    )


def select_platform(entries: Sequence[Descriptor], wanted: Platform) -> Descriptor:
    """The first index entry for `wanted` (the image-index spec's rule for several matches).

    An index whose only entry names no platform (an artifact index) yields that entry.
    """
    if len(entries) == 1 and entries[0].platform is None:
        return entries[0]
    for entry in entries:
        if entry.platform == wanted:
            return entry
    available = sorted({str(e.platform) for e in entries if e.platform is not None})
    raise SourceError(
        f"no manifest for platform {wanted} in the index; available: "
        f"{', '.join(available) or 'none'} (choose one with --platform)",
        reason=Reason.PLATFORM_NOT_FOUND,
    )


def select_layer(layers: Sequence[Descriptor], title: str | None) -> Descriptor:
    """The single layer, or the one titled `title`; a clear error naming the candidates."""
    candidates = ", ".join(layer.label() for layer in layers) or "none"
    if title is not None:
        matches = [layer for layer in layers if layer.title == title]
        if not matches:
            raise UsageError(
                f"no layer titled {title!r} in the manifest; layers: {candidates}",
                reason=Reason.LAYER_NOT_FOUND,
            )
    else:
        matches = list(layers)
        if not matches:
            raise UsageError("the manifest has no layers", reason=Reason.LAYER_NOT_FOUND)
    if len(matches) > 1:
        raise UsageError(
            f"the manifest has {len(matches)} layers{'' if title is None else ' titled ' + title}"
            f": {candidates}; choose one with --layer TITLE",
            reason=Reason.AMBIGUOUS_LAYER,
        )
    return matches[0]


def new_hash(digest: str) -> hashlib._Hash:
    """A hash object for the digest's algorithm (sha256 or sha512)."""
    algorithm = digest.split(":", 1)[0]
    if algorithm not in _DIGEST_ALGORITHMS:
        raise UsageError(f"unsupported digest algorithm {algorithm!r}")
    return hashlib.new(algorithm)


def digest_of(hasher: hashlib._Hash) -> str:
    """`algorithm:hex` of a hash made by `new_hash`."""
    return f"{hasher.name}:{hasher.hexdigest()}"


def verify_digest(data: bytes, digest: str, what: str) -> None:
    """Fail with `DigestMismatch` unless `data` hashes to `digest`."""
    hasher = new_hash(digest)
    hasher.update(data)
    actual = digest_of(hasher)
    if actual != digest:
        raise IntegrityError(
            f"{what} digest mismatch: expected {digest}, the registry served {actual}",
            reason=Reason.DIGEST_MISMATCH,
        )


# -- the registry -----------------------------------------------------------------------------


def registry_scheme(client: httpx.Client, reference: Reference, plain_http: bool) -> str:
    """`https`, unless `--plain-http`, or the registry is on loopback and does not speak TLS.

    A loopback registry is tried with TLS first (the distribution spec's `/v2/` version check),
    so a local registry with a certificate keeps it; one that answers TLS with plain HTTP is
    used over HTTP. A certificate that does not verify is never a reason to drop TLS.
    """
    if plain_http:
        return "http"
    if not is_loopback(reference.host):
        return "https"
    try:
        client.get(f"https://{reference.registry}/v2/", auth=None).close()
    except httpx.ConnectError as exc:
        # A TLS handshake that failed, unless over the certificate (an SSLError subclass).
        tls_error = cause_of(exc, ssl.SSLError)
        if tls_error is not None and not isinstance(tls_error, ssl.SSLCertVerificationError):
            return "http"
    except httpx.TransportError:
        pass  # not a TLS question: the real requests report it
    return "https"


class Registry:
    """One repository of one registry, reached over an httpx client (auth, proxies, CA)."""

    def __init__(
        self,
        client: httpx.Client,
        base_url: str,
        reference: Reference,
        policy: RetryPolicy,
        interrupt: Interrupt | None = None,
    ) -> None:
        self.client = client
        self.reference = reference
        self.policy = policy
        self.interrupt = interrupt
        self._repository_url = f"{base_url.rstrip('/')}/v2/{reference.repository}"

    def blob_url(self, digest: str) -> str:
        """Where the blob is served (often a redirect to object storage)."""
        return f"{self._repository_url}/blobs/{digest}"

    def fetch_manifest(self, ref: str, expected: Descriptor | None = None) -> Manifest:
        """GET a manifest by tag or digest; one reached by digest must hash to that digest.

        The reference's own digest may be a blob's, copied from a manifest or `oras push`:
        distribution 2.8 answers that with HTTP 500, which the retries would only wait out, and
        newer registries with 404 MANIFEST_UNKNOWN. So when the first attempt fails either way,
        the blob is looked up once; a digest that names no blob keeps its error, or the rest of
        its retries, paced as any other.
        """
        url = f"{self._repository_url}/manifests/{ref}"
        what = f"manifest {ref} of {self.reference.registry}/{self.reference.repository}"
        refusal = self.refusal(what)
        before_retry = None
        if ref == self.reference.digest:
            refusal = self._refusal_of_blob_digest(ref, refusal)
            before_retry = self._blob_check_on_first_failure(ref)
        reader = HttpRangeReader(
            url,
            self.client,
            self.policy,
            {"Accept": MANIFEST_ACCEPT},
            size=expected.size if expected else None,
            refusal=refusal,
            before_retry=before_retry,
            interrupt=self.interrupt,
        )
        by_digest = defaults.DIGEST.fullmatch(ref) is not None
        received = bytearray()
        try:
            for chunk in reader.chunks():
                received += chunk
                if len(received) > MANIFEST_LIMIT:
                    raise SourceError(
                        f"{what} is larger than {MANIFEST_LIMIT >> 20} MiB",
                        reason=Reason.INVALID_MANIFEST,
                    )
        except SourceError as exc:
            if exc.reason == "ManifestUnknown" and not by_digest:
                raise self._missing_tag(ref, exc) from exc
            raise
        body = bytes(received)
        if by_digest:
            verify_digest(body, ref, "manifest")
        return parse_manifest(body, reader.content_type, what)

    def _refusal_of_blob_digest(self, digest: str, refusal: Refusal) -> Refusal:
        """`refusal`, but a MANIFEST_UNKNOWN for `digest` first checks whether it names a blob.

        A 404 is final, so this look happens once.
        """

        def refuse(response: httpx.Response) -> ImageStreamError:
            error = refusal(response)
            if isinstance(error, SourceError) and error.reason == "ManifestUnknown":
                self._refuse_blob_digest(digest, error)
            return error

        return refuse

    def _blob_check_on_first_failure(self, digest: str) -> BeforeRetry:
        """Check once, after the first attempt, whether a failing `digest` names a blob.

        Only an answer counts (a RetryableError: 5xx, 408, 429); a network that failed says
        nothing about the digest. Later failures are the registry's own trouble.
        """

        def check(error: Exception, attempt: int) -> None:
            if attempt == 1 and isinstance(error, RetryableError):
                self._refuse_blob_digest(digest, error)

        return check

    def _refuse_blob_digest(self, digest: str, error: Exception) -> None:
        """Fail with `NotAManifest` if `digest` names a blob of this repository."""
        try:
            # Without following: a registry that redirects blobs to storage has the blob too.
            response = self.client.head(self.blob_url(digest), follow_redirects=False)
        except (httpx.TransportError, RetryableError):
            return  # no answer about the blob: the manifest's own error stands
        if response.status_code == 200 or response.is_redirect:
            repository = f"{self.reference.registry}/{self.reference.repository}"
            raise SourceError(
                f"{digest} is the digest of a blob (a layer) in {repository}, not of a manifest: "
                "reference the manifest digest (`oras push` prints it as 'Digest:') or a tag",
                reason=Reason.NOT_A_MANIFEST,
            ) from error

    def _missing_tag(self, tag: str, error: SourceError) -> SourceError:
        """Tell an unknown repository from an unknown tag, and name the tags there are.

        Registries answer MANIFEST_UNKNOWN for both (distribution 2.8 does); the tag list
        answers NAME_UNKNOWN for a repository that does not exist.
        """
        repository = f"{self.reference.registry}/{self.reference.repository}"
        url = f"{self._repository_url}/tags/list"
        try:
            with self.client.stream("GET", url, params={"n": _TAGS_SHOWN}) as response:
                found = _json_or_none(read_capped(response, _ERROR_BODY_LIMIT))
        except httpx.TransportError:
            return error
        if response.status_code == 404 and "NAME_UNKNOWN" in _error_codes(found)[0]:
            return SourceError(f"repository {repository} not found", reason=Reason.NAME_UNKNOWN)
        tags = found.get("tags") if isinstance(found, dict) else None
        if response.status_code != 200 or not isinstance(tags, list):
            return error
        shown = ", ".join(str(t) for t in tags[:_TAGS_SHOWN]) or "none"
        return SourceError(
            f"tag {tag!r} not found in {repository}; tags there: {shown}",
            reason=Reason.MANIFEST_UNKNOWN,
        )

    def refusal(self, what: str) -> Refusal:
        """How a final error answer about `what` is reported: the registry's own error codes."""

        def refuse(response: httpx.Response) -> ImageStreamError:
            return registry_error(response, self.reference, what)

        return refuse


def registry_error(response: httpx.Response, reference: Reference, what: str) -> ImageStreamError:
    """Turn a registry's error answer into an error a user can act on (spec error codes)."""
    status = response.status_code
    codes, detail = _error_codes(_json_or_none(read_capped(response, _ERROR_BODY_LIMIT)))
    repository = f"{reference.registry}/{reference.repository}"
    if status in (401, 403):
        challenge = preferred_challenge(response.headers)
        refused = f" ({challenge.describe()})" if challenge else ""
        return SourceError(
            f"unauthorized: {reference.registry} refused access to {what}{refused}, HTTP {status}"
            f"{detail}; check the credentials (--auth-file or the Secret) and their pull access",
            reason=Reason.UNAUTHORIZED,
        )
    if status == 404 and "NAME_UNKNOWN" in codes:
        return SourceError(f"repository {repository} not found{detail}", reason=Reason.NAME_UNKNOWN)
    if status == 404 and "BLOB_UNKNOWN" in codes:
        return SourceError(f"{what} not found in {repository}{detail}", reason=Reason.BLOB_UNKNOWN)
    if status == 404 and ("MANIFEST_UNKNOWN" in codes or "/manifests/" in response.url.path):
        return SourceError(
            f"{reference.manifest_ref} not found in {repository} (unknown tag or digest){detail}",
            reason=Reason.MANIFEST_UNKNOWN,
        )
    return SourceError(
        f"{repository} answered HTTP {status} {response.reason_phrase} for {what}{detail}",
        reason=Reason.HTTP_ERROR,
    )


def read_capped(response: httpx.Response, limit: int) -> bytes:
    """Up to `limit` bytes of a streamed body; a body that breaks off yields what arrived.

    Error and token bodies are small; the cap keeps a misbehaving server from filling memory.
    """
    body = bytearray()
    try:
        for piece in response.iter_bytes():
            body += piece
            if len(body) >= limit:
                break
    except httpx.TransportError:
        pass  # a lying Content-Length on an error body: what arrived is all there is
    return bytes(body[:limit])


def _json_or_none(body: bytes) -> object:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _error_codes(document: object) -> tuple[set[str], str]:
    """The spec's `{"errors": [{"code", "message"}]}`: the codes, and a message suffix."""
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return set(), ""
    found = [e for e in errors if isinstance(e, dict)]
    codes = {str(e.get("code", "")) for e in found}
    messages = [f"{e.get('code')}: {e.get('message')}" for e in found if e.get("code")]
    return codes, f" [{'; '.join(messages)}]" if messages else ""


def resolve_layer(registry: Registry, wanted: Platform, title: str | None) -> Descriptor:
    """Follow the reference through indexes to an image manifest and pick its layer."""
    manifest = registry.fetch_manifest(registry.reference.manifest_ref)
    for _ in range(_MAX_INDEX_DEPTH):
        if not manifest.is_index:
            return select_layer(manifest.entries, title)
        entry = select_platform(manifest.entries, wanted)
        manifest = registry.fetch_manifest(entry.digest, expected=entry)
    raise SourceError(
        f"{registry.reference} nests indexes deeper than {_MAX_INDEX_DEPTH}",
        reason=Reason.INVALID_MANIFEST,
    )
