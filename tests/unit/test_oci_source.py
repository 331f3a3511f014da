"""OCI sources end to end through `run_stream`, against a registry stand-in (MockTransport).

The stand-in answers like distribution with token auth: 401 + Bearer challenges, a token service,
spec error codes, manifests by tag or digest, ranged blob reads with the digest as ETag, and
optionally a redirect of blobs to object storage. A real registry (Debian's docker-registry) with
artifacts pushed by oras is the integration tests' job; what a real one does differently: it
speaks real HTTP over sockets (lengths, connection reuse), and it cannot be made to cut a body at
an exact byte, expire a token between two requests, or lie about a digest, which these tests do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from tests.support.http_fakes import Body, Unreadable, partial_response, range_start

from imagestream.cli import build_parser, request_from_args
from imagestream.errors import IntegrityError, SourceError, UsageError
from imagestream.pipeline import sources
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.oci_select import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    TITLE_ANNOTATION,
)
from imagestream.pipeline.pipeline import StreamRequest, StreamResult, run_stream
from imagestream.pipeline.range_reader import RetryPolicy
from imagestream.pipeline.sources import OciSource, SourceOptions, open_source
from imagestream.progress_display import report_success
from imagestream.targets import TargetRequest, plan_target

HOST = "registry.example"
REALM = "https://auth.example/token"
REPO = "fleet/os/node"
DATA = bytes(range(256)) * 1200  # 307200 bytes; every offset distinguishable modulo 256

Handler = Callable[[httpx.Request], httpx.Response | None]


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


@dataclass(frozen=True)
class Sent:
    """A request as it was sent (the auth flow re-sends the same request object)."""

    method: str
    host: str
    path: str
    range: str | None
    authorization: str | None
    accept: str | None


@dataclass
class FakeRegistry:
    """A distribution-like registry with a token service and, optionally, blob storage."""

    auth: bool = True
    redirect_blobs: bool = False
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    token_count: int = 0
    sent: list[Sent] = field(default_factory=list)
    blob_script: list[Handler] = field(default_factory=list)
    # What a GET of an unknown manifest gets: 404 by the spec, 500 from distribution 2.8 when
    # the digest is a blob's.
    unknown_manifest_status: int = 404

    # -- content ----------------------------------------------------------------------------

    def add_blob(self, data: bytes, title: str | None = None) -> dict[str, object]:
        digest = sha256(data)
        self.blobs[digest] = data
        found: dict[str, object] = {
            "mediaType": "application/octet-stream",
            "digest": digest,
            "size": len(data),
        }
        if title is not None:
            found["annotations"] = {TITLE_ANNOTATION: title}
        return found

    def add_manifest(
        self,
        document: dict[str, object],
        media_type: str,
        tags: tuple[str, ...] = (),
        repository: str = REPO,
    ) -> dict[str, object]:
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type, **document}).encode()
        digest = sha256(body)
        for ref in (digest, *tags):
            self.manifests[(repository, ref)] = (media_type, body)
        return {"mediaType": media_type, "digest": digest, "size": len(body)}

    def add_artifact(self, *layers: dict[str, object], tag: str = "v1") -> dict[str, object]:
        config = self.add_blob(b"{}")
        return self.add_manifest(
            {"config": config, "layers": list(layers)}, OCI_MANIFEST, tags=(tag,)
        )

    # -- serving ----------------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        headers = request.headers
        self.sent.append(
            Sent(
                request.method,
                request.url.host,
                request.url.path,
                headers.get("range"),
                headers.get("authorization"),
                headers.get("accept"),
            )
        )
        if request.url.host == "auth.example":
            return self.token(request)
        if request.url.host == "storage.example":
            return self.blob(request, request.url.path.rsplit("/", 1)[1])
        return self.registry(request)

    def token(self, request: httpx.Request) -> httpx.Response:
        self.token_count += 1
        token = f"token-{self.token_count}"
        self.tokens.add(token)
        # Streamed like a socket's body (`json=` would be pre-read and hide how it is consumed).
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        return httpx.Response(200, stream=httpx.ByteStream(body))

    def registry(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":  # the spec's API version check
            return httpx.Response(401 if self.auth else 200)
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs|tags)/(.+)", request.url.path)
        assert match, request.url.path
        repository, kind, ref = match.groups()
        if self.auth and not self.authorized(request):
            scope = f"repository:{repository}:pull"
            challenge = f'Bearer realm="{REALM}",service="{HOST}",scope="{scope}"'
            return error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
        known = {r for r, _ in self.manifests}
        if repository not in known:
            return error(404, "NAME_UNKNOWN" if kind == "tags" else "MANIFEST_UNKNOWN")
        if kind == "tags":
            tags = sorted(t for r, t in self.manifests if r == repository and ":" not in t)
            return httpx.Response(200, json={"name": repository, "tags": tags})
        if kind == "manifests":
            if (repository, ref) not in self.manifests:
                status = self.unknown_manifest_status
                return error(status, "MANIFEST_UNKNOWN" if status == 404 else "UNKNOWN")
            media_type, body = self.manifests[(repository, ref)]
            # A streamed body, as from a socket (`content=` would be pre-read by httpx).
            return httpx.Response(200, headers={"Content-Type": media_type}, stream=Body(body))
        if ref not in self.blobs:
            return error(404, "BLOB_UNKNOWN")
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(self.blobs[ref]))})
        if self.redirect_blobs:
            location = f"https://storage.example/data/{ref}?X-Amz-Signature=abc"
            return httpx.Response(307, headers={"Location": location})
        return self.blob(request, ref)

    def authorized(self, request: httpx.Request) -> bool:
        return request.headers.get("authorization", "").removeprefix("Bearer ") in self.tokens

    def blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        if self.blob_script and (scripted := self.blob_script.pop(0)(request)) is not None:
            return scripted
        return partial(request, self.blobs[digest], digest)


def error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"errors": [{"code": code, "message": code.lower().replace("_", " ")}]}
    return httpx.Response(status, headers=headers, json=body)


def partial(
    request: httpx.Request, data: bytes, digest: str, cut: int | None = None
) -> httpx.Response:
    """A 206 from the asked offset, optionally broken off at absolute byte `cut`."""
    start = range_start(request)
    etag = {"ETag": f'"{digest}"'}
    return partial_response(data, start, etag, cut=None if cut is None else cut - start)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resume at once instead of sleeping through the retry backoff."""
    monkeypatch.setattr(Interrupt, "sleep", lambda _interrupt, _seconds: None)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    """The stand-in, wired under the real `make_client` (redirects, timeouts) as its network."""
    fake = FakeRegistry()
    transport = httpx.MockTransport(fake)
    monkeypatch.setattr(
        sources, "make_client", functools.partial(sources.make_client, transport=transport)
    )
    return fake


def stream(
    tmp_path: Path,
    reference: str,
    data: bytes = DATA,
    options: SourceOptions | None = None,
    expected_sha384: str | None = None,
) -> StreamResult:
    request = StreamRequest(
        source=reference,
        target=plan_target(TargetRequest(kind="file", path=tmp_path / "disk.img")),
        sha384=expected_sha384 or sha384(data),
        source_options=options or SourceOptions(),
    )
    return run_stream(request)


def blob_requests(registry: FakeRegistry) -> list[Sent]:
    return [s for s in registry.sent if "/blobs/" in s.path or s.host == "storage.example"]


# -- the happy paths --------------------------------------------------------------------------


def test_an_oras_artifact_streams_and_both_digests_are_reported(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_artifact(registry.add_blob(DATA, "disk.img"))

    result = stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    assert (tmp_path / "disk.img").read_bytes() == DATA
    assert result.digest == sha256(DATA)
    assert result.sha384 == sha384(DATA)
    assert result.bytes_fetched == len(DATA)
    manifest_requests = [s for s in registry.sent if "/manifests/" in s.path]
    assert manifest_requests[0].accept is not None
    for media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST):
        assert media_type in manifest_requests[0].accept
    # Registries need not send Accept-Ranges, and no HEAD is made to look for it.
    assert all(s.method == "GET" for s in registry.sent)
    assert [s.range for s in blob_requests(registry) if s.authorization] == ["bytes=0-"]


def test_the_default_tag_is_latest(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.add_artifact(registry.add_blob(DATA), tag="latest")

    assert stream(tmp_path, f"oci://{HOST}/{REPO}").digest == sha256(DATA)


@pytest.mark.parametrize(
    ("index_type", "manifest_type"), [(OCI_INDEX, OCI_MANIFEST), (DOCKER_LIST, DOCKER_MANIFEST)]
)
def test_an_index_gives_the_manifest_of_the_wanted_platform(
    registry: FakeRegistry, tmp_path: Path, index_type: str, manifest_type: str
) -> None:
    arm = DATA[::-1]
    entries = []
    for platform, data in (("amd64", DATA), ("arm64", arm)):
        config = registry.add_blob(platform.encode())
        manifest = registry.add_manifest(
            {"config": config, "layers": [registry.add_blob(data)]}, manifest_type
        )
        entries.append({**manifest, "platform": {"os": "linux", "architecture": platform}})
    registry.add_manifest({"manifests": entries}, index_type, tags=("v1",))

    result = stream(tmp_path, f"oci://{HOST}/{REPO}:v1", arm, SourceOptions(platform="linux/arm64"))

    assert result.digest == sha256(arm)
    assert (tmp_path / "disk.img").read_bytes() == arm


def test_a_reference_by_digest(registry: FakeRegistry, tmp_path: Path) -> None:
    manifest = registry.add_artifact(registry.add_blob(DATA))

    result = stream(tmp_path, f"oci://{HOST}/{REPO}@{manifest['digest']}")

    assert result.digest == sha256(DATA)


def test_a_layer_is_chosen_by_title(registry: FakeRegistry, tmp_path: Path) -> None:
    boot = b"boot partition" * 100
    registry.add_artifact(registry.add_blob(boot, "boot.img"), registry.add_blob(DATA, "root.img"))

    result = stream(tmp_path, f"oci://{HOST}/{REPO}:v1", options=SourceOptions(layer="root.img"))

    assert result.digest == sha256(DATA)


def test_anonymous_registry_without_auth(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.auth = False
    registry.add_artifact(registry.add_blob(DATA))

    stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    assert registry.token_count == 0


# -- resumes, token expiry, redirects, quirks -------------------------------------------------


def test_a_token_that_expires_mid_stream_is_refreshed_and_the_transfer_resumes(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    digest = sha256(DATA)
    registry.add_artifact(registry.add_blob(DATA))
    cut = 100_003

    def cut_and_expire(request: httpx.Request) -> httpx.Response:
        registry.tokens.clear()  # the token runs out while this response is on the wire
        return partial(request, DATA, digest, cut=cut)

    registry.blob_script = [cut_and_expire]

    result = stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    assert (tmp_path / "disk.img").read_bytes() == DATA
    assert result.resumes == 1
    blobs = blob_requests(registry)
    assert [(s.range, s.authorization) for s in blobs] == [
        ("bytes=0-", "Bearer token-1"),
        (f"bytes={cut}-", "Bearer token-1"),  # refused: 401
        (f"bytes={cut}-", "Bearer token-2"),  # the same range again, with a fresh token
    ]
    assert registry.token_count == 2


def test_blobs_redirected_to_storage_keep_range_lose_authorization_and_resume(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.redirect_blobs = True
    digest = sha256(DATA)
    registry.add_artifact(registry.add_blob(DATA))
    registry.blob_script = [lambda request: partial(request, DATA, digest, cut=70_000)]

    result = stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    assert result.digest == digest
    storage = [s for s in registry.sent if s.host == "storage.example"]
    assert [(s.range, s.authorization) for s in storage] == [
        ("bytes=0-", None),
        ("bytes=70000-", None),
    ]
    to_registry = [s for s in blob_requests(registry) if s.host == HOST]
    assert all(s.authorization == "Bearer token-1" for s in to_registry)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "999999"},  # no Content-Range, and the length of something else
        {"Content-Range": f"bytes */{len(DATA)}", "Content-Length": "999999"},
    ],
)
def test_a_416_at_the_end_with_a_wrong_content_length_ends_the_blob(
    registry: FakeRegistry, tmp_path: Path, headers: dict[str, str]
) -> None:
    digest = sha256(DATA)
    registry.add_artifact(registry.add_blob(DATA))
    registry.blob_script = [
        # Every byte arrives, then the connection breaks before the response completes.
        lambda request: partial(request, DATA, digest, cut=len(DATA)),
        lambda request: httpx.Response(416, headers=headers, stream=Unreadable()),
    ]

    result = stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    assert result.digest == digest
    assert [s.range for s in blob_requests(registry)] == ["bytes=0-", f"bytes={len(DATA)}-"]


def test_a_blob_served_with_another_size_fails(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.add_artifact(registry.add_blob(DATA))
    longer = DATA + b"extra"
    registry.blob_script = [lambda request: partial(request, longer, sha256(longer))]

    with pytest.raises(IntegrityError) as caught:
        stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    assert caught.value.reason == "SizeMismatch"
    assert not (tmp_path / "disk.img").exists()


# -- digests ----------------------------------------------------------------------------------


def test_a_blob_that_does_not_match_its_digest_fails_and_leaves_no_target(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_artifact(registry.add_blob(DATA))
    corrupt = bytes([DATA[0] ^ 1]) + DATA[1:]
    registry.blob_script = [lambda request: partial(request, corrupt, "etag")]

    with pytest.raises(IntegrityError) as caught:
        # Even with the SHA-384 of what is served: the registry's digest still catches it.
        stream(tmp_path, f"oci://{HOST}/{REPO}:v1", expected_sha384=sha384(corrupt))

    assert caught.value.reason == "DigestMismatch"
    assert caught.value.message.startswith("blob digest mismatch")
    assert sha256(DATA) in caught.value.message
    assert sha256(corrupt) in caught.value.message
    assert not (tmp_path / "disk.img").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_right_blob_with_a_wrong_sha384_is_a_hash_mismatch(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_artifact(registry.add_blob(DATA))

    with pytest.raises(IntegrityError) as caught:
        stream(tmp_path, f"oci://{HOST}/{REPO}:v1", expected_sha384="0" * 96)

    assert caught.value.reason == "HashMismatch"
    assert not (tmp_path / "disk.img").exists()


def test_a_manifest_that_does_not_match_its_digest_fails(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    manifest = registry.add_artifact(registry.add_blob(DATA))
    digest = str(manifest["digest"])
    media_type, body = registry.manifests[(REPO, digest)]
    registry.manifests[(REPO, digest)] = (
        media_type,
        body.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'),
    )

    with pytest.raises(IntegrityError) as caught:
        stream(tmp_path, f"oci://{HOST}/{REPO}@{digest}")

    assert caught.value.reason == "DigestMismatch"
    assert caught.value.message.startswith("manifest digest mismatch")
    assert blob_requests(registry) == []


# -- errors a user can act on -----------------------------------------------------------------


def open_oci(reference: str, options: SourceOptions | None = None) -> OciSource:
    source = open_source(reference, options or SourceOptions())
    assert isinstance(source, OciSource)
    return source


def test_an_unknown_repository(registry: FakeRegistry) -> None:
    registry.add_artifact(registry.add_blob(DATA))

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://{HOST}/fleet/other:v1")

    assert caught.value.reason == "NameUnknown"
    assert caught.value.exit_code == 3
    assert f"{HOST}/fleet/other" in caught.value.message


def test_an_unknown_tag_lists_the_tags(registry: FakeRegistry) -> None:
    registry.add_artifact(registry.add_blob(DATA), tag="v1")
    registry.add_artifact(registry.add_blob(DATA), tag="v2")

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://{HOST}/{REPO}:v3")

    assert caught.value.reason == "ManifestUnknown"
    assert "'v3'" in caught.value.message
    assert "v1, v2" in caught.value.message


def test_an_unknown_digest(registry: FakeRegistry) -> None:
    registry.add_artifact(registry.add_blob(DATA))
    missing = sha256(b"nothing")

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://{HOST}/{REPO}@{missing}")

    assert caught.value.reason == "ManifestUnknown"
    assert missing in caught.value.message


def manifest_gets(registry: FakeRegistry) -> list[Sent]:
    return [s for s in registry.sent if "/manifests/" in s.path and s.authorization]


def blob_heads(registry: FakeRegistry) -> list[Sent]:
    return [s for s in blob_requests(registry) if s.method == "HEAD" and s.authorization]


@pytest.mark.parametrize("status", [500, 404])
def test_a_layer_digest_is_not_a_manifest_and_fails_at_once(
    registry: FakeRegistry, tmp_path: Path, status: int
) -> None:
    """A blob's digest given as the reference fails after one manifest GET and one blob HEAD.

    Stand-in: the fake answers 500 as distribution 2.8 does for a blob's digest (the integration
    test checks the real one), or 404 MANIFEST_UNKNOWN as the spec and newer registries do.
    """
    registry.unknown_manifest_status = status
    layer = registry.add_blob(DATA)
    registry.add_artifact(layer)
    digest = str(layer["digest"])

    with pytest.raises(SourceError) as caught:
        stream(tmp_path, f"oci://{HOST}/{REPO}@{digest}")

    assert caught.value.reason == "NotAManifest"
    assert caught.value.exit_code == 3
    assert f"{digest} is the digest of a blob" in caught.value.message
    assert f"{HOST}/{REPO}" in caught.value.message
    assert len(manifest_gets(registry)) == 1
    assert [s.path for s in blob_heads(registry)] == [f"/v2/{REPO}/blobs/{digest}"]
    assert [s for s in blob_requests(registry) if s.method == "GET"] == []
    assert not (tmp_path / "disk.img").exists()


def test_a_failing_manifest_digest_that_is_no_blob_keeps_its_retries(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    """A digest naming no blob: one look for a blob, then the whole retry budget as before."""
    registry.unknown_manifest_status = 503
    registry.add_artifact(registry.add_blob(DATA))
    missing = sha256(b"nothing")
    policy = RetryPolicy(max_retries=3)

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://{HOST}/{REPO}@{missing}", SourceOptions(policy=policy))

    assert caught.value.reason == "RetriesExhausted"
    assert len(manifest_gets(registry)) == policy.max_retries + 1
    assert len(blob_heads(registry)) == 1


def test_a_failing_manifest_digest_is_paced_from_its_first_failure(
    registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob look does not cost the first retry its wait: Retry-After is honoured after the
    first 503 as after every other, and every GET counts in the message."""
    registry.unknown_manifest_status = 503
    registry.add_artifact(registry.add_blob(DATA))
    missing = sha256(b"nothing")
    serve = registry.registry

    def throttled(request: httpx.Request) -> httpx.Response:
        response = serve(request)
        if response.status_code == 503:
            response.headers["Retry-After"] = "7"
        return response

    registry.registry = throttled  # type: ignore[method-assign]
    waits: list[tuple[float, int]] = []  # each wait, with how many requests went out before it
    monkeypatch.setattr(
        Interrupt, "sleep", lambda _interrupt, seconds: waits.append((seconds, len(registry.sent)))
    )
    policy = RetryPolicy(max_retries=2)

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://{HOST}/{REPO}@{missing}", SourceOptions(policy=policy))

    assert caught.value.reason == "RetriesExhausted"
    assert "after 3 attempts" in caught.value.message
    authorized = [(s.method, s.path) for s in registry.sent if s.authorization]
    assert authorized == [
        ("GET", f"/v2/{REPO}/manifests/{missing}"),
        ("HEAD", f"/v2/{REPO}/blobs/{missing}"),
        ("GET", f"/v2/{REPO}/manifests/{missing}"),
        ("GET", f"/v2/{REPO}/manifests/{missing}"),
    ]
    head_sent = next(i for i, s in enumerate(registry.sent) if s.method == "HEAD") + 1
    assert [seconds for seconds, _ in waits] == [7.0, 7.0]
    assert waits[0][1] >= head_sent  # the first wait comes after the blob look


def test_a_refused_token_names_realm_service_and_scope(registry: FakeRegistry) -> None:
    registry.add_artifact(registry.add_blob(DATA))
    # The token service issues tokens the registry does not take (no pull right).
    useless = httpx.Response(200, json={"token": "useless"})
    registry.token = lambda request: useless  # type: ignore[method-assign]

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://{HOST}/{REPO}:v1")

    message = caught.value.message
    assert caught.value.reason == "Unauthorized"
    assert REALM in message
    assert f"'{HOST}'" in message
    assert f"repository:{REPO}:pull" in message
    assert "useless" not in message


def test_no_manifest_for_the_platform(registry: FakeRegistry) -> None:
    manifest = registry.add_artifact(registry.add_blob(DATA))
    entry = {**manifest, "platform": {"os": "linux", "architecture": "amd64"}}
    registry.add_manifest({"manifests": [entry]}, OCI_INDEX, tags=("multi",))

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://{HOST}/{REPO}:multi", SourceOptions(platform="linux/s390x"))

    assert caught.value.reason == "PlatformNotFound"
    assert "linux/amd64" in caught.value.message


def test_an_ambiguous_layer_is_a_usage_error(registry: FakeRegistry) -> None:
    registry.add_artifact(registry.add_blob(b"a", "a.img"), registry.add_blob(b"b", "b.img"))

    with pytest.raises(UsageError) as caught:
        open_oci(f"oci://{HOST}/{REPO}:v1")

    assert caught.value.reason == "AmbiguousLayer"
    assert "a.img, b.img" in caught.value.message


def test_a_missing_blob(registry: FakeRegistry, tmp_path: Path) -> None:
    layer = registry.add_blob(DATA)
    registry.add_artifact(layer)
    del registry.blobs[str(layer["digest"])]

    with pytest.raises(SourceError) as caught:
        stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    assert caught.value.reason == "BlobUnknown"
    assert str(layer["digest"]) in caught.value.message


# -- scheme -----------------------------------------------------------------------------------


def scheme_probe(monkeypatch: pytest.MonkeyPatch, https_error: Exception | None) -> list[str]:
    """Wire a registry on 127.0.0.1 whose HTTPS side fails with `https_error`; return URLs."""
    fake = FakeRegistry(auth=False)
    fake.add_artifact(fake.add_blob(DATA))
    schemes: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        schemes.append(f"{request.url.scheme} {request.url.path}")
        if request.url.scheme == "https" and https_error is not None:
            raise https_error
        return fake(request)

    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(
        sources, "make_client", functools.partial(sources.make_client, transport=transport)
    )
    return schemes


def _tls_error(exc: ssl.SSLError) -> httpx.ConnectError:
    try:
        raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as wrapped:
        return wrapped


def test_a_loopback_registry_without_tls_is_used_over_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schemes = scheme_probe(monkeypatch, _tls_error(ssl.SSLError(1, "WRONG_VERSION_NUMBER")))

    open_oci(f"oci://127.0.0.1:5000/{REPO}:v1").close()

    assert schemes[0] == "https /v2/"
    assert all(s.startswith("http ") for s in schemes[1:])


def test_a_loopback_registry_with_tls_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    schemes = scheme_probe(monkeypatch, None)

    open_oci(f"oci://localhost:5000/{REPO}:v1").close()

    assert all(s.startswith("https ") for s in schemes)


def test_a_certificate_that_does_not_verify_never_downgrades(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "self-signed certificate"
    schemes = scheme_probe(monkeypatch, _tls_error(verify))

    with pytest.raises(SourceError) as caught:
        open_oci(f"oci://127.0.0.1:5000/{REPO}:v1")

    assert caught.value.reason == "TLSVerificationFailed"
    assert all(s.startswith("https ") for s in schemes)


def test_plain_http_is_used_when_asked_without_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    schemes = scheme_probe(monkeypatch, None)

    open_oci(f"oci://{HOST}/{REPO}:v1", SourceOptions(plain_http=True)).close()

    assert schemes[0] == f"http /v2/{REPO}/manifests/v1"
    assert all(s.startswith("http ") for s in schemes)


def test_a_remote_registry_is_https_without_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    schemes = scheme_probe(monkeypatch, None)

    open_oci(f"oci://{HOST}/{REPO}:v1").close()

    assert schemes[0] == f"https /v2/{REPO}/manifests/v1"


# -- the CLI and the result record ------------------------------------------------------------


def test_cli_flags_reach_the_source_options(tmp_path: Path) -> None:
    auth = tmp_path / "config.json"
    auth.write_text(json.dumps({"auths": {HOST: {"username": "alice", "password": "pw"}}}))
    args = build_parser().parse_args(
        [
            "stream",
            f"oci://{HOST}/{REPO}:v1",
            str(tmp_path / "disk.img"),
            "--sha384",
            "0" * 96,
            "--platform",
            "linux/arm64",
            "--layer",
            "root.img",
            "--plain-http",
            "--auth-file",
            str(auth),
        ]
    )

    options = request_from_args(args, threading.Event()).source_options

    assert (options.platform, options.layer, options.plain_http) == (
        "linux/arm64",
        "root.img",
        True,
    )
    assert options.credentials is not None
    login = options.credentials.login_for(HOST)
    assert login is not None
    assert login.username == "alice"


def test_the_result_record_carries_the_digest(
    registry: FakeRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.add_artifact(registry.add_blob(DATA))
    result = stream(tmp_path, f"oci://{HOST}/{REPO}:v1")

    report_success(result, "json", Console())
    record = json.loads(capsys.readouterr().out)
    report_success(result, "plain", Console())
    summary = capsys.readouterr().out

    assert record["digest"] == sha256(DATA)
    assert f"digest   {sha256(DATA)}" in summary
