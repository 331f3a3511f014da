"""`imagestream stream oci://...` against a real registry (``docker-registry``), through the CLI.

Images are pushed with the ``oras`` client, then streamed by the real CLI in a subprocess with
``--progress json``. A success is checked on the target (the file or loop device holds exactly
the raw image) and in the result record (SHA-384, the verified blob digest, resumes); a failure
by its exit code, reason and message, and by the target being left invalid. Faults come from
the registry's own storage (a corrupted blob file), from its redirect middleware, and from a
proxy written for the tests (resets, a tampered manifest); tokens from a token server written
for the tests (real registries use their vendor's; the protocol is the same).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.cli import CliRun, assert_failed, assert_succeeded, stream_fast_retries
from tests.support.fault_proxy import (
    BLOB_GETS,
    BLOB_REQUESTS,
    MANIFEST_GETS,
    FaultProxy,
    FaultProxyFactory,
)
from tests.support.oci_push import (
    RAW_LAYER,
    Layer,
    LiveRegistry,
    Platform,
    PushedArtifact,
    RedirectingRegistry,
    titled,
)
from tests.support.range_server import Fault, FaultKind
from tests.support.registry import TEST_USER, write_docker_config
from tests.support.targets import (
    MIB,
    PATTERN,
    assert_file_target_invalid,
    fill_pattern,
    read_device,
    sha384_of,
)

from imagestream.demo.image import SampleImage, write_raw_image, write_sample_image

pytestmark = pytest.mark.timeout(90)

REPO = "os/root"
TAG = "v1"
AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")


# -- helpers ----------------------------------------------------------------------------------


#: `imagestream stream SOURCE TARGET --sha384 ... --progress json EXTRA...` with fast retries.
stream = functools.partial(stream_fast_retries, max_retries=4, stall_timeout=10, timeout=80)


def push(live: LiveRegistry, image: SampleImage, repository: str = REPO) -> PushedArtifact:
    """Push `image` as a one-layer artifact `repository:v1`."""
    return live.pusher.push_artifact(repository, TAG, [Layer(image.path)])


def layer_digest(pushed: PushedArtifact, image: SampleImage) -> str:
    return pushed.layers[image.path.name].digest


def file_target(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir(exist_ok=True)
    return directory / "root.raw"


def auth_file(live: LiveRegistry, tmp_path: Path, address: str | None = None) -> Path:
    """A Docker config JSON with `live`'s credentials for `address` (default: the registry)."""
    assert live.credentials is not None
    user, password = live.credentials
    return write_docker_config(tmp_path / "config.json", address or live.address, user, password)


def stream_with_credentials(
    live: LiveRegistry, target: Path, image: SampleImage, tmp_path: Path
) -> CliRun:
    """Stream `live`'s REPO:TAG into `target` with its credentials in an `--auth-file`."""
    return stream(
        live.reference(REPO, tag=TAG), target, image, "--auth-file", str(auth_file(live, tmp_path))
    )


def assert_oci_succeeded(
    run: CliRun, target: Path, image: SampleImage, digest: str
) -> dict[str, Any]:
    """A verified file target (see `assert_succeeded`) and the blob digest in the result."""
    result = assert_succeeded(run, target, image)
    assert result["digest"] == digest
    return result


def filled_device(loop_device_factory: LoopDeviceFactory, size: int = 8 * MIB) -> Path:
    """A loop device of `size` bytes filled with PATTERN, so "untouched" means something."""
    device = loop_device_factory(size)
    fill_pattern(device, size)
    return device


def assert_device_succeeded(run: CliRun, device: Path, image: SampleImage, digest: str) -> None:
    """Exit 0, a verified result, and the device starts with exactly the raw image."""
    assert run.code == 0, run.text
    result = run.result()
    assert (result["ok"], result["verified"]) == (True, True)
    assert (result["sha384"], result["digest"]) == (image.sha384, digest)
    assert sha384_of(device, image.raw_size) == image.raw_sha384


def assert_device_not_valid(device: Path) -> None:
    """After a failure the device is untouched, or its first MiB is zeros (never valid)."""
    head = read_device(device, MIB)
    assert head in (PATTERN, bytes(MIB)), (
        "a failed stream must leave the first MiB untouched or zeroed"
    )


@pytest.fixture
def arm_image(tmp_path: Path) -> SampleImage:
    return write_sample_image(tmp_path / "arm.raw.zst", 3 * MIB, seed=21)


# -- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_tag_and_digest_references(
    by: str, registry: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    pushed = push(registry, sample_image)
    reference = (
        registry.reference(REPO, tag=TAG)
        if by == "tag"
        else registry.reference(REPO, digest=pushed.manifest.digest)
    )
    target = file_target(tmp_path)

    run = stream(reference, target, sample_image)

    assert_oci_succeeded(run, target, sample_image, layer_digest(pushed, sample_image))


def test_onto_loop_device(
    registry: LiveRegistry, sample_image: SampleImage, loop_device_factory: LoopDeviceFactory
) -> None:
    pushed = push(registry, sample_image)
    device = filled_device(loop_device_factory)

    run = stream(registry.reference(REPO, tag=TAG), device, sample_image)

    assert_device_succeeded(run, device, sample_image, layer_digest(pushed, sample_image))


@pytest.mark.parametrize(
    ("repository", "reference", "reason"),
    [
        ("os/missing", "v1", "NameUnknown"),
        (REPO, "v2", "ManifestUnknown"),
        (REPO, f"sha256:{'ab' * 32}", "ManifestUnknown"),
    ],
    ids=["unknown-repository", "unknown-tag", "unknown-digest"],
)
def test_unknown_references(
    repository: str,
    reference: str,
    reason: str,
    *,
    registry: LiveRegistry,
    sample_image: SampleImage,
    tmp_path: Path,
) -> None:
    push(registry, sample_image)
    ref = (
        registry.reference(repository, digest=reference)
        if reference.startswith("sha256:")
        else registry.reference(repository, tag=reference)
    )
    target = file_target(tmp_path)

    run = stream(ref, target, sample_image)

    result = assert_failed(run, 3, reason, repository)
    assert result["reason"] == reason
    assert_file_target_invalid(target)


def test_a_layer_digest_is_refused_at_once(
    fault_proxy: FaultProxy, registry: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    """A blob's digest where a manifest's belongs (as copied from a manifest or `oras push`)
    fails at once with NotAManifest. The proxy only forwards and counts: the HTTP 500 for the
    manifest GET is the real registry's own answer (distribution 2.8).
    """
    pushed = push(registry, sample_image)
    digest = layer_digest(pushed, sample_image)
    target = file_target(tmp_path)

    run = stream(f"oci://{fault_proxy.address}/{REPO}@{digest}", target, sample_image)

    result = assert_failed(run, 3, "NotAManifest", digest, "is the digest of a blob")
    assert result["reason"] == "NotAManifest"
    assert "RetriesExhausted" not in run.text
    repository = f"/v2/{REPO}/"
    exchanges = [
        (r.method, r.path, r.status) for r in fault_proxy.requests if r.path.startswith(repository)
    ]
    # One manifest GET (the registry's 500), one blob HEAD, no retry and no blob GET.
    assert exchanges == [
        ("GET", f"/v2/{REPO}/manifests/{digest}", 500),
        ("HEAD", f"/v2/{REPO}/blobs/{digest}", 200),
    ]
    assert_file_target_invalid(target)


# -- indexes and layers -----------------------------------------------------------------------


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-manifest-list"])
@pytest.mark.parametrize("platform", [AMD64, ARM64], ids=str)
def test_index_platforms(
    docker: bool,
    platform: Platform,
    *,
    registry: LiveRegistry,
    sample_image: SampleImage,
    arm_image: SampleImage,
    tmp_path: Path,
) -> None:
    images = {AMD64: sample_image, ARM64: arm_image}
    pushed = registry.pusher.push_index(
        REPO, TAG, {p: Layer(image.path) for p, image in images.items()}, docker=docker
    )
    target = file_target(tmp_path)

    run = stream(
        registry.reference(REPO, tag=TAG), target, images[platform], "--platform", str(platform)
    )

    assert_oci_succeeded(run, target, images[platform], pushed.layers[platform].digest)


def test_platform_not_in_index(
    registry: LiveRegistry, sample_image: SampleImage, arm_image: SampleImage, tmp_path: Path
) -> None:
    registry.pusher.push_index(
        REPO, TAG, {AMD64: Layer(sample_image.path), ARM64: Layer(arm_image.path)}
    )
    target = file_target(tmp_path)

    run = stream(
        registry.reference(REPO, tag=TAG), target, sample_image, "--platform", "linux/s390x"
    )

    result = assert_failed(run, 3, "PlatformNotFound", "linux/s390x", "linux/amd64", "linux/arm64")
    assert result["reason"] == "PlatformNotFound"
    assert_file_target_invalid(target)


@pytest.fixture
def multi_layer(
    registry: LiveRegistry, sample_image: SampleImage, arm_image: SampleImage, tmp_path: Path
) -> PushedArtifact:
    """`os/root:v1` with layers root.raw.zst (sample_image), usr.raw.zst (arm_image), README."""
    layers = tmp_path / "layers"
    readme = tmp_path / "README.txt"
    readme.write_text("two partitions of one OS image\n", encoding="utf-8")
    return registry.pusher.push_artifact(
        REPO,
        TAG,
        [
            titled(sample_image.path, "root.raw.zst", layers),
            titled(arm_image.path, "usr.raw.zst", layers),
            Layer(readme, "text/plain"),
        ],
    )


@pytest.mark.parametrize("title", ["root.raw.zst", "usr.raw.zst"])
def test_layer_by_title(
    title: str,
    *,
    multi_layer: PushedArtifact,
    registry: LiveRegistry,
    sample_image: SampleImage,
    arm_image: SampleImage,
    tmp_path: Path,
) -> None:
    image = sample_image if title == "root.raw.zst" else arm_image
    target = file_target(tmp_path)

    run = stream(registry.reference(REPO, tag=TAG), target, image, "--layer", title)

    assert_oci_succeeded(run, target, image, multi_layer.layers[title].digest)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [((), "AmbiguousLayer"), (("--layer", "var.raw.zst"), "LayerNotFound")],
    ids=["no-layer-given", "unknown-title"],
)
def test_layer_choice_refused(
    extra: tuple[str, ...],
    reason: str,
    *,
    multi_layer: PushedArtifact,
    registry: LiveRegistry,
    sample_image: SampleImage,
    tmp_path: Path,
) -> None:
    target = file_target(tmp_path)

    run = stream(registry.reference(REPO, tag=TAG), target, sample_image, *extra)

    result = assert_failed(run, 2, reason, "root.raw.zst", "usr.raw.zst", "README.txt")
    assert result["reason"] == reason
    assert_file_target_invalid(target)


# -- integrity --------------------------------------------------------------------------------


def test_tampered_manifest_is_refused(
    fault_proxy: FaultProxy, registry: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    """A manifest whose bytes do not hash to the digest asked for is refused. Stand-in: the proxy
    plays a corrupting intermediary (or a registry serving wrong bytes); a real one would
    rarely keep the JSON valid.
    """
    # The intermediary keeps the registry's Docker-Content-Digest header but changes the bytes:
    # only hashing the manifest against the digest asked for can tell.
    pushed = push(registry, sample_image)
    fault_proxy.add(Fault.tamper(on=MANIFEST_GETS))
    reference = f"oci://{fault_proxy.address}/{REPO}@{pushed.manifest.digest}"
    target = file_target(tmp_path)

    run = stream(reference, target, sample_image)

    result = assert_failed(run, 4, "DigestMismatch", pushed.manifest.digest)
    assert result["reason"] == "DigestMismatch"
    assert_file_target_invalid(target)
    assert [r.faults for r in fault_proxy.requests if "/manifests/" in r.path][:1] == [
        [FaultKind.TAMPER]
    ]
    assert fault_proxy.blob_gets() == [], "no blob may be fetched for an unverified manifest"


@pytest.mark.parametrize("target_kind", ["file", "device"])
def test_corrupted_blob_in_storage(
    target_kind: str,
    registry: LiveRegistry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # An uncompressed image with one byte flipped in the registry's storage, and the SHA-384 of
    # the corrupted bytes as the expected hash: decompression and the SHA-384 both pass, so only
    # the registry's sha256 digest can catch it.
    image = write_raw_image(tmp_path / "root.raw", 4 * MIB, seed=31)
    pushed = registry.pusher.push_artifact(REPO, TAG, [Layer(image.path, RAW_LAYER)])
    digest = pushed.layers[image.path.name].digest
    blob = registry.registry.blob_path(digest)
    data = bytearray(blob.read_bytes())
    data[3 * MIB + 12345] ^= 0x01
    blob.write_bytes(bytes(data))
    corrupted = replace(image, sha384=hashlib.sha384(data).hexdigest())
    if target_kind == "device":
        loop_device_factory: LoopDeviceFactory = request.getfixturevalue("loop_device_factory")
        target = filled_device(loop_device_factory)
    else:
        target = file_target(tmp_path)

    run = stream(registry.reference(REPO, tag=TAG), target, corrupted)

    result = assert_failed(run, 4, "DigestMismatch", digest)
    assert result["reason"] == "DigestMismatch"
    if target_kind == "device":
        assert_device_not_valid(target)
    else:
        assert_file_target_invalid(target)


# -- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["auth", "username_password", "user:password"])
def test_basic_auth_file_forms(
    form: str, registry_basic: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    pushed = push(registry_basic, sample_image)
    assert registry_basic.credentials is not None
    user, password = registry_basic.credentials
    if form == "user:password":  # the older, plain form of --auth-file
        credentials = tmp_path / "credentials"
        credentials.write_text(f"{user}:{password}\n", encoding="utf-8")
    else:
        credentials = write_docker_config(
            tmp_path / "config.json",
            registry_basic.address,
            user,
            password,
            form="auth" if form == "auth" else "username_password",
        )
    target = file_target(tmp_path)

    run = stream(
        registry_basic.reference(REPO, tag=TAG),
        target,
        sample_image,
        "--auth-file",
        str(credentials),
    )

    assert_oci_succeeded(run, target, sample_image, layer_digest(pushed, sample_image))


@pytest.mark.parametrize("credentials", ["none", "wrong"])
def test_basic_auth_refused(
    credentials: str, registry_basic: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    push(registry_basic, sample_image)
    extra: tuple[str, ...] = ()
    if credentials == "wrong":
        config = write_docker_config(
            tmp_path / "config.json", registry_basic.address, TEST_USER, "wrong"
        )
        extra = ("--auth-file", str(config))
    target = file_target(tmp_path)

    run = stream(registry_basic.reference(REPO, tag=TAG), target, sample_image, *extra)

    result = assert_failed(run, 3, "Unauthorized", "imagestream-test-registry")
    assert result["reason"] == "Unauthorized"
    assert_file_target_invalid(target)


def test_token_auth_anonymous_is_refused(
    registry_token: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    """Anonymous pulls from a token registry end as Unauthorized. Stand-in: the token server is
    written for the tests; a real one (Docker Hub, Harbor, GitLab) speaks the same protocol and
    JWT format but has its own grant policy.
    """
    server = registry_token.token_server
    assert server is not None
    push(registry_token, sample_image)
    target = file_target(tmp_path)

    run = stream(registry_token.reference(REPO, tag=TAG), target, sample_image)

    # The message names where tokens come from and what access was missing.
    result = assert_failed(run, 3, "Unauthorized", server.realm, f"repository:{REPO}:pull")
    assert result["reason"] == "Unauthorized"
    assert "no credentials were sent (an anonymous pull)" in result["message"]
    assert_file_target_invalid(target)
    anonymous = [r for r in server.requests if r.account is None and r.status == 200]
    assert anonymous, "the CLI should have asked for an anonymous token first"


def test_token_auth_with_credentials(
    registry_token: LiveRegistry,
    sample_image: SampleImage,
    tmp_path: Path,
    loop_device_factory: LoopDeviceFactory,
) -> None:
    """Basic credentials are traded for a pull token. Stand-in: the token server is written for
    the tests; a real one (Docker Hub, Harbor, GitLab) speaks the same protocol and JWT format
    but has its own grant policy.
    """
    server = registry_token.token_server
    assert server is not None
    pushed = push(registry_token, sample_image)
    before = len(server.requests)
    device = filled_device(loop_device_factory)

    run = stream_with_credentials(registry_token, device, sample_image, tmp_path)

    assert_device_succeeded(run, device, sample_image, layer_digest(pushed, sample_image))
    cli_requests = server.requests[before:]
    assert cli_requests, "the CLI never asked the token server"
    assert {(r.account, r.status) for r in cli_requests} == {(TEST_USER, 200)}
    assert all(r.scopes == (f"repository:{REPO}:pull",) for r in cli_requests)


def test_token_auth_with_identity_token(
    registry_token: LiveRegistry, sample_image: SampleImage, identity_token: str, tmp_path: Path
) -> None:
    """An identitytoken is traded with the OAuth2 refresh-token grant. Stand-in: the token server
    is written for the tests; a real one (Docker Hub, Harbor, GitLab) speaks the same protocol
    and JWT format but has its own grant policy.
    """
    server = registry_token.token_server
    assert server is not None
    pushed = push(registry_token, sample_image)
    config = write_docker_config(
        tmp_path / "config.json",
        registry_token.address,
        TEST_USER,
        identity_token,
        form="identitytoken",
    )
    before = len(server.requests)
    target = file_target(tmp_path)

    run = stream(
        registry_token.reference(REPO, tag=TAG), target, sample_image, "--auth-file", str(config)
    )

    assert_oci_succeeded(run, target, sample_image, layer_digest(pushed, sample_image))
    assert {(r.account, r.status) for r in server.requests[before:]} == {(TEST_USER, 200)}


def test_token_expires_mid_stream(
    registry_token: LiveRegistry,
    fault_proxy_factory: FaultProxyFactory,
    tmp_path: Path,
) -> None:
    """A token that expires while the blob is cut off is renewed on resume. Stand-in: the token
    server is written for the tests; a real one (Docker Hub, Harbor, GitLab) speaks the same
    protocol and JWT format but has its own grant policy. Stand-in: the fault proxy is written
    for the tests; a real flaky link or load balancer cuts connections at random points, not
    after an exact byte count.
    """
    # The download is cut after 1 MiB and held until the first token has expired at the
    # registry, so the resumed request needs a new token (asked for after a 401, or ahead of
    # time from `expires_in`: either is right).
    server = registry_token.token_server
    assert server is not None
    image = write_sample_image(tmp_path / "root.raw.zst", 6 * MIB, seed=41)
    pushed = push(registry_token, image)
    server.ttl = 2
    proxy = fault_proxy_factory(
        registry_token.registry, Fault.reset(after=MIB, pause=server.ttl + 1.5, on=BLOB_GETS)
    )
    before = len(server.requests)
    target = file_target(tmp_path)

    run = stream(
        f"oci://{proxy.address}/{REPO}:{TAG}",
        target,
        image,
        "--auth-file",
        str(auth_file(registry_token, tmp_path, proxy.address)),
    )

    result = assert_oci_succeeded(run, target, image, layer_digest(pushed, image))
    assert result["resumes"] >= 1
    tokens = [r.token for r in server.requests[before:] if r.account == TEST_USER]
    assert len(tokens) >= 2, "the CLI did not fetch a new token after the first one expired"
    gets = proxy.blob_gets()
    assert (gets[0].body_bytes, gets[0].faults) == (MIB, [FaultKind.RESET])
    first_token = gets[0].authorization
    resumed = [g for g in gets[1:] if g.status == 206]
    assert resumed, "the download was never resumed with a range request"
    assert resumed[0].range == f"bytes={MIB}-"
    assert resumed[-1].authorization not in (None, first_token)
    # The first token really has expired at the registry: the scenario happened.
    blob = f"{registry_token.registry.base_url}/v2/{REPO}/blobs/{layer_digest(pushed, image)}"
    assert httpx.head(blob, headers={"Authorization": str(first_token)}).status_code == 401


# -- network faults ---------------------------------------------------------------------------


def test_resets_during_the_blob(
    fault_proxy: FaultProxy, registry: LiveRegistry, tmp_path: Path
) -> None:
    """Two connection resets during the blob are resumed from the exact byte. Stand-in: the fault
    proxy is written for the tests; a real flaky link or load balancer cuts connections at
    random points, not after an exact byte count.
    """
    image = write_sample_image(tmp_path / "root.raw.zst", 6 * MIB, seed=51)
    pushed = push(registry, image)
    fault_proxy.add(Fault.reset(after=700_000, times=2, on=BLOB_GETS))
    target = file_target(tmp_path)

    run = stream(f"oci://{fault_proxy.address}/{REPO}:{TAG}", target, image)

    result = assert_oci_succeeded(run, target, image, layer_digest(pushed, image))
    assert result["resumes"] == 2
    gets = fault_proxy.blob_gets()
    # Each request asks for exactly the next byte after what the client already has.
    offsets = [0, 700_000, 1_400_000]
    assert [g.range for g in gets] == [f"bytes={offset}-" for offset in offsets]
    assert [g.body_bytes for g in gets] == [700_000, 700_000, image.compressed_size - 1_400_000]
    assert fault_proxy.pending == []


def test_cut_after_the_last_byte_ends_at_the_registrys_416(
    fault_proxy: FaultProxy, registry: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    """A response cut after the blob's last byte is resumed at the blob's size, and the
    registry's 416 there means "done". Stand-in: the fault proxy plays a proxy whose upstream
    connection broke after the last byte (a real one would break at a random point, rarely
    exactly there); the 416 is the real registry's own.
    """
    # docker-registry 2.8 answers a range at the end with 416 and `Content-Range: bytes */SIZE`,
    # but with `Content-Length: SIZE` over a 33-byte error text, and then closes: a client that
    # read that body would fail on the missing bytes and retry until it gives up.
    pushed = push(registry, sample_image)
    size = sample_image.compressed_size
    fault_proxy.add(Fault.cut_before_end(on=BLOB_GETS))
    target = file_target(tmp_path)

    run = stream(f"oci://{fault_proxy.address}/{REPO}:{TAG}", target, sample_image)

    result = assert_oci_succeeded(run, target, sample_image, layer_digest(pushed, sample_image))
    assert result["resumes"] >= 1
    gets = fault_proxy.blob_gets()
    assert (gets[0].body_bytes, gets[0].faults) == (size, [FaultKind.CUT_BEFORE_END])
    assert [(g.range, g.status) for g in gets[1:]] == [(f"bytes={size}-", 416)]
    # The registry's quirk really was served: a Content-Length its body does not have.
    assert gets[1].content_length == size
    assert gets[1].body_bytes < size


def test_resume_without_accept_ranges(
    fault_proxy: FaultProxy, registry: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    """A registry behind a CDN that drops `Accept-Ranges` still honours ranges on resume.

    Stand-in: the fault proxy plays the CDN; a real one would also cut at a random point.
    """
    pushed = push(registry, sample_image)
    fault_proxy.add(
        Fault.strip_accept_ranges(on=BLOB_REQUESTS), Fault.reset(after=500_000, on=BLOB_GETS)
    )
    target = file_target(tmp_path)

    run = stream(f"oci://{fault_proxy.address}/{REPO}:{TAG}", target, sample_image)

    result = assert_oci_succeeded(run, target, sample_image, layer_digest(pushed, sample_image))
    assert result["resumes"] >= 1
    gets = fault_proxy.blob_gets()
    assert set(gets[0].faults) == {FaultKind.RESET, FaultKind.STRIP_ACCEPT_RANGES}
    assert all(FaultKind.STRIP_ACCEPT_RANGES in g.faults for g in gets)


def test_redirect_to_another_host(
    redirecting_registry: RedirectingRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    live, blob_host = redirecting_registry.live, redirecting_registry.blob_host
    pushed = push(live, sample_image)
    target = file_target(tmp_path)

    run = stream_with_credentials(live, target, sample_image, tmp_path)

    assert_oci_succeeded(run, target, sample_image, layer_digest(pushed, sample_image))
    log = blob_host.access_log(min_entries=1)
    # nginx answers 403 to any request carrying Authorization: none did, and each was a range.
    assert [(entry.status, entry.range) for entry in log] == [(206, "bytes=0-")]


# -- TLS --------------------------------------------------------------------------------------


def test_tls_registry_with_ca_file(
    registry_tls: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    pushed = push(registry_tls, sample_image)
    assert registry_tls.ca_file is not None
    target = file_target(tmp_path)

    run = stream(
        registry_tls.reference(REPO, tag=TAG),
        target,
        sample_image,
        "--ca-file",
        str(registry_tls.ca_file),
    )

    assert_oci_succeeded(run, target, sample_image, layer_digest(pushed, sample_image))


def test_tls_registry_without_its_ca_is_refused(
    registry_tls: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    # A loopback registry that speaks TLS must not be downgraded to plain HTTP because its
    # certificate does not verify.
    push(registry_tls, sample_image)
    target = file_target(tmp_path)

    run = stream(registry_tls.reference(REPO, tag=TAG), target, sample_image)

    assert_failed(run, 3, "certificate")
    assert_file_target_invalid(target)
    assert "HTTP request to an HTTPS server" not in run.text
