"""OCI registry I/O: the scheme a registry speaks, its manifests by tag or digest, its errors.

`resolve_layer` follows a reference through indexes to the image's layer blob, with the pure
parsing of `oci_refs` and the choice of `oci_select`; `Registry` does the requests.
"""

from __future__ import annotations

import json
import ssl

import httpx

from imagestream import defaults
from imagestream.errors import ImageStreamError, SourceError
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.oci_refs import Platform, Reference, is_loopback
from imagestream.pipeline.oci_select import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    parse_manifest,
    select_layer,
    select_platform,
    verify_digest,
)
from imagestream.pipeline.range_reader import (
    HttpRangeReader,
    ReadHooks,
    RetryableError,
    RetryPolicy,
    cause_of,
)
from imagestream.pipeline.registry_auth import preferred_challenge
from imagestream.reasons import Reason

MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
# Manifests are small; containerd refuses those over 4 MiB too.
MANIFEST_LIMIT = 4 << 20
_ERROR_BODY_LIMIT = 64 << 10
_MAX_INDEX_DEPTH = 4
_TAGS_SHOWN = 20


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

        When the reference's own digest fails, it is checked for naming a blob instead (see
        `_DigestManifestHooks`).
        """
        url = f"{self._repository_url}/manifests/{ref}"
        what = f"manifest {ref} of {self.reference.registry}/{self.reference.repository}"
        hooks = self.hooks(what)
        if ref == self.reference.digest:
            hooks = _DigestManifestHooks(self, what, ref)
        reader = HttpRangeReader(
            url,
            self.client,
            self.policy,
            {"Accept": MANIFEST_ACCEPT},
            size=expected.size if expected else None,
            hooks=hooks,
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
            if exc.reason == Reason.MANIFEST_UNKNOWN and not by_digest:
                raise self._missing_tag(ref, exc) from exc
            raise
        body = bytes(received)
        if by_digest:
            verify_digest(body, ref, "manifest")
        return parse_manifest(body, reader.content_type, what)

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

    def hooks(self, what: str) -> RegistryHooks:
        """How a read of `what` reports a final error answer: the registry's own error codes."""
        return RegistryHooks(self, what)


class RegistryHooks(ReadHooks):
    """A registry's final error answers about `what`, told by its error codes."""

    def __init__(self, registry: Registry, what: str) -> None:
        self.registry = registry
        self.what = what

    def refusal(self, name: str, response: httpx.Response) -> ImageStreamError:
        """The registry's error codes, in words a user can act on (see `registry_error`)."""
        return registry_error(response, self.registry.reference, self.what)


class _DigestManifestHooks(RegistryHooks):
    """For the manifest the reference names by digest: is that digest a blob's instead?

    The digest may be a blob's, copied from a manifest or `oras push`: distribution 2.8 answers
    that with HTTP 500, which the retries would only wait out, and newer registries with 404
    MANIFEST_UNKNOWN. So when the first attempt fails either way, the blob is looked up once; a
    digest that names no blob keeps its error, or the rest of its retries, paced as any other.
    """

    def __init__(self, registry: Registry, what: str, digest: str) -> None:
        super().__init__(registry, what)
        self.digest = digest

    def refusal(self, name: str, response: httpx.Response) -> ImageStreamError:
        """A MANIFEST_UNKNOWN first checks for a blob; a 404 is final, so this happens once."""
        error = super().refusal(name, response)
        if isinstance(error, SourceError) and error.reason == Reason.MANIFEST_UNKNOWN:
            self._refuse_blob_digest(error)
        return error

    def before_retry(self, error: Exception, attempt: int) -> None:
        """After the first attempt only, and only for an answer (5xx, 408, 429).

        A network that failed says nothing about the digest; later failures are the registry's
        own trouble.
        """
        if attempt == 1 and isinstance(error, RetryableError):
            self._refuse_blob_digest(error)

    def _refuse_blob_digest(self, error: Exception) -> None:
        """Fail with `NotAManifest` if the digest names a blob of this repository."""
        registry = self.registry
        try:
            # Without following: a registry that redirects blobs to storage has the blob too.
            response = registry.client.head(registry.blob_url(self.digest), follow_redirects=False)
        except (httpx.TransportError, RetryableError):
            return  # no answer about the blob: the manifest's own error stands
        if response.status_code == 200 or response.is_redirect:
            repository = f"{registry.reference.registry}/{registry.reference.repository}"
            raise SourceError(
                f"{self.digest} is the digest of a blob (a layer) in {repository}, not of a "
                "manifest: reference the manifest digest (`oras push` prints it as 'Digest:') "
                "or a tag",
                reason=Reason.NOT_A_MANIFEST,
            ) from error


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
