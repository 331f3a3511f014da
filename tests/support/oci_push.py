"""Pushing test artifacts into a real registry with a real client: the ``oras`` Python package.

:class:`OciPusher` wraps an ``oras`` client for one :class:`~tests.support.registry.Registry`
(plain HTTP or TLS with a CA file; anonymous, Basic or token authentication, which oras handles
itself) and pushes what the imagestream tests need:

* :meth:`OciPusher.push_artifact` — an ORAS artifact: one manifest whose layers are files, each
  with an ``org.opencontainers.image.title`` annotation (oras sets it to the file name, so name
  the files as the titles you want: :func:`titled`);
* :meth:`OciPusher.push_index` — an image index with one manifest per platform, each holding
  one image layer, in OCI media types or (``docker=True``) Docker's manifest list and schema-2
  manifest types. oras uploads the blobs; the manifests go up through the same client's
  authenticated requests (oras has no index command).

Every push returns the digests and sizes the registry now holds, for references
(``repo@sha256:...``) and for checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oras.client  # type: ignore[import-untyped]
import oras.oci  # type: ignore[import-untyped]

from .nginx import Nginx
from .registry import HtpasswdAuth, Registry
from .token_server import TokenServer

TITLE_ANNOTATION = "org.opencontainers.image.title"
#: Layer media type of a zstd-compressed disk image (IANA's type for zstd data).
ZSTD_LAYER = "application/zstd"
#: Layer media type of an uncompressed disk image.
RAW_LAYER = "application/octet-stream"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"


@dataclass(frozen=True)
class Descriptor:
    """What the registry holds: media type, ``sha256:...`` digest and size of one blob/manifest."""

    media_type: str
    digest: str
    size: int

    @classmethod
    def of_bytes(cls, media_type: str, data: bytes) -> Descriptor:
        """The descriptor of ``data``."""
        return cls(media_type, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))

    def as_json(self) -> dict[str, Any]:
        """The OCI descriptor JSON."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Layer:
    """A file to push as a layer; its title is the file name (oras's rule)."""

    path: Path
    media_type: str = ZSTD_LAYER

    @property
    def title(self) -> str:
        """The ``org.opencontainers.image.title`` the layer gets."""
        return self.path.name


@dataclass(frozen=True)
class Platform:
    """An OCI platform: ``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    def as_json(self) -> dict[str, str]:
        """The ``platform`` object of an index entry."""
        found = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            found["variant"] = self.variant
        return found


@dataclass(frozen=True)
class PushedArtifact:
    """An artifact as pushed: its manifest and its layers by title."""

    repository: str
    tag: str
    manifest: Descriptor
    layers: dict[str, Descriptor]


@dataclass(frozen=True)
class PushedIndex:
    """An index as pushed: its own descriptor and each platform's manifest and image layer."""

    repository: str
    tag: str
    index: Descriptor
    manifests: dict[Platform, Descriptor]
    layers: dict[Platform, Descriptor]


def titled(source: Path, title: str, directory: Path) -> Layer:
    """A :class:`Layer` titled ``title`` with ``source``'s bytes (a hard link in ``directory``)."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / title
    os.link(source, link)
    return Layer(link)


def file_descriptor(media_type: str, path: Path) -> Descriptor:
    """The descriptor of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return Descriptor(media_type, f"sha256:{digest.hexdigest()}", path.stat().st_size)


class OciPusher:
    """An ``oras`` client for ``registry``, logged in with ``credentials`` when given.

    ``ca_file`` is the CA bundle that verifies a TLS registry's certificate.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        credentials: tuple[str, str] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.registry = registry
        backend = "basic" if isinstance(registry.auth, HtpasswdAuth) else "token"
        self.client = oras.client.OrasClient(
            hostname=registry.address,
            insecure=registry.scheme == "http",
            tls_verify=str(ca_file) if ca_file is not None else True,
            auth_backend=backend,
        )
        # Never through a proxy from the developer's environment: the registry is on loopback.
        self.client.session.trust_env = False
        if credentials is not None:
            self.client.auth.set_basic_auth(*credentials)

    def _target(self, repository: str, reference: str) -> str:
        separator = "@" if reference.startswith("sha256:") else ":"
        return f"{self.registry.address}/{repository}{separator}{reference}"

    def push_artifact(
        self,
        repository: str,
        tag: str,
        layers: Sequence[Layer],
        *,
        annotations: dict[str, str] | None = None,
    ) -> PushedArtifact:
        """``oras push REGISTRY/REPO:TAG FILE:MEDIATYPE...``: one manifest, one layer per file."""
        self._authorize_push(repository)
        response = self.client.push(
            target=self._target(repository, tag),
            files=[f"{layer.path}:{layer.media_type}" for layer in layers],
            disable_path_validation=True,
            manifest_annotations=annotations,
            quiet=True,
        )
        _check(response, f"push {repository}:{tag}")
        manifest = self.get_manifest(repository, tag)
        if manifest.digest != response.headers["Docker-Content-Digest"]:
            raise RuntimeError(f"{repository}:{tag} is not the manifest just pushed")
        document = json.loads(self.get_manifest_bytes(repository, manifest.digest))
        found = {
            entry["annotations"][TITLE_ANNOTATION]: Descriptor(
                entry["mediaType"], entry["digest"], entry["size"]
            )
            for entry in document["layers"]
        }
        return PushedArtifact(repository, tag, manifest, found)

    def push_index(
        self,
        repository: str,
        tag: str,
        images: dict[Platform, Layer],
        *,
        docker: bool = False,
    ) -> PushedIndex:
        """Push one image manifest per platform (one layer each) and an index naming them all.

        With ``docker=True`` the index is a Docker manifest list and the manifests are Docker
        schema-2 manifests (the formats ``docker manifest push`` produces).
        """
        manifest_type, config_type = (
            (DOCKER_MANIFEST, DOCKER_CONFIG)
            if docker
            else (
                OCI_MANIFEST,
                OCI_CONFIG,
            )
        )
        self._authorize_push(repository)
        manifests: dict[Platform, Descriptor] = {}
        layers: dict[Platform, Descriptor] = {}
        for platform, layer in images.items():
            layers[platform] = self._upload_file(repository, layer)
            config = self._upload_bytes(
                repository,
                config_type,
                _canonical({"os": platform.os, "architecture": platform.architecture}),
            )
            manifest = {
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": config.as_json(),
                "layers": [
                    {
                        **layers[platform].as_json(),
                        "annotations": {TITLE_ANNOTATION: layer.title},
                    }
                ],
            }
            manifests[platform] = self.put_manifest(repository, None, manifest_type, manifest)
        index_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
        index = {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [
                {**manifests[platform].as_json(), "platform": platform.as_json()}
                for platform in images
            ],
        }
        descriptor = self.put_manifest(repository, tag, index_type, index)
        return PushedIndex(repository, tag, descriptor, manifests, layers)

    def put_manifest(
        self, repository: str, tag: str | None, media_type: str, manifest: dict[str, Any]
    ) -> Descriptor:
        """PUT ``manifest`` under ``tag`` (or under its own digest when ``tag`` is None)."""
        data = _canonical(manifest)
        descriptor = Descriptor.of_bytes(media_type, data)
        reference = tag if tag is not None else descriptor.digest
        response = self.client.do_request(
            self._manifest_url(repository, reference),
            "PUT",
            data=data,
            headers={"Content-Type": media_type},
        )
        _check(response, f"PUT manifest {repository}:{reference}")
        if response.headers.get("Docker-Content-Digest") != descriptor.digest:
            raise RuntimeError(
                f"the registry stored {response.headers.get('Docker-Content-Digest')}, "
                f"not {descriptor.digest}"
            )
        return descriptor

    def get_manifest(self, repository: str, reference: str) -> Descriptor:
        """The descriptor of the manifest or index ``reference`` (a tag or digest) names."""
        response = self._get_manifest(repository, reference)
        media_type = response.headers["Content-Type"].split(";")[0].strip()
        return Descriptor.of_bytes(media_type, response.content)

    def get_manifest_bytes(self, repository: str, reference: str) -> bytes:
        """The manifest or index exactly as the registry serves it."""
        content: bytes = self._get_manifest(repository, reference).content
        return content

    def _get_manifest(self, repository: str, reference: str) -> Any:
        url = self._manifest_url(repository, reference)
        accept = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
        response = self.client.do_request(url, "GET", headers={"Accept": accept})
        _check(response, f"GET manifest {repository}:{reference}")
        return response

    def _manifest_url(self, repository: str, reference: str) -> str:
        host = f"{self.client.prefix}://{self.registry.address}"
        return f"{host}/v2/{repository}/manifests/{reference}"

    def _authorize_push(self, repository: str) -> None:
        """Make oras hold a token that allows pushing to ``repository``.

        oras-py keeps ONE token and reuses it after any 401: the token it got for its first
        request (a pull-only HEAD) is then offered for the upload and refused again. Starting
        (and cancelling) an upload first makes the registry challenge for ``pull,push``.
        """
        self.client.auth.token = None  # a token for another repository does not help here
        url = f"{self.client.prefix}://{self.registry.address}/v2/{repository}/blobs/uploads/"
        response = self.client.do_request(url, "POST")
        _check(response, f"start an upload to {repository}")
        location = response.headers["Location"]
        if location.startswith("/"):
            location = f"{self.client.prefix}://{self.registry.address}{location}"
        self.client.do_request(location, "DELETE")

    def _upload_file(self, repository: str, layer: Layer) -> Descriptor:
        descriptor = file_descriptor(layer.media_type, layer.path)
        container = self.client.get_container(self._target(repository, "latest"))
        response = self.client.upload_blob(str(layer.path), container, descriptor.as_json())
        _check(response, f"upload {layer.path.name}")
        return descriptor

    def _upload_bytes(self, repository: str, media_type: str, data: bytes) -> Descriptor:
        with tempfile.TemporaryDirectory(prefix="oci-blob-") as directory:
            path = Path(directory) / "blob"
            path.write_bytes(data)
            return self._upload_file(repository, Layer(path, media_type))


def _canonical(document: dict[str, Any]) -> bytes:
    """Compact JSON with sorted keys: the bytes whose sha256 is the digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _check(response: Any, what: str) -> None:
    if response.status_code not in (200, 201, 202):
        raise RuntimeError(f"{what} failed: HTTP {response.status_code} {response.text[:500]}")


@dataclass(frozen=True)
class LiveRegistry:
    """A started :class:`Registry` with what a test needs around it.

    ``pusher`` is logged in with ``credentials`` (None: anonymous); ``ca_file`` verifies a TLS
    registry; ``token_server`` issues its tokens when it uses token authentication.
    """

    registry: Registry
    pusher: OciPusher
    credentials: tuple[str, str] | None = None
    ca_file: Path | None = None
    token_server: TokenServer | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return self.registry.address

    def reference(self, repository: str, tag: str | None = None, digest: str | None = None) -> str:
        """``oci://127.0.0.1:PORT/REPO:TAG`` or ``...@DIGEST``."""
        return self.registry.reference(repository, tag=tag, digest=digest)


@dataclass(frozen=True)
class RedirectingRegistry:
    """A registry whose blob downloads are redirected to ``blob_host`` (another host name)."""

    live: LiveRegistry
    blob_host: Nginx
