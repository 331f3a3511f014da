"""OCI manifests: parsing, digests, and the choice of an index entry and of the image's layer.

A tag or digest resolves to an image manifest, directly or through an index (an OCI image index
or a Docker manifest list, whose entry for the wanted platform is taken); the image is one of the
manifest's layers, as `oras push` stores a file. Pure functions of their inputs: fetching is
`oci.Registry`'s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from imagestream import defaults
from imagestream.errors import IntegrityError, SourceError, UsageError
from imagestream.pipeline.oci_refs import Platform
from imagestream.reasons import Reason

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
TITLE_ANNOTATION = "org.opencontainers.image.title"

_DIGEST_ALGORITHMS = frozenset({"sha256", "sha512"})


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
