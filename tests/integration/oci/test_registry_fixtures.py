"""The OCI test fixtures themselves, checked with plain httpx (independent of imagestream).

If one of these fails, the tests in ``test_oci_stream.py`` would be testing the fixtures, not
imagestream: a registry that does not hold what was pushed, a token flow the registry refuses,
a proxy that does not reset where asked.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from pathlib import Path

import httpx
import pytest
from tests.support.fault_proxy import (
    BLOB_GETS,
    BLOB_REQUESTS,
    MANIFEST_GETS,
    FaultProxy,
    FaultProxyFactory,
)
from tests.support.oci_push import (
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Layer,
    LiveRegistry,
    Platform,
    RedirectingRegistry,
    titled,
)
from tests.support.range_server import Fault, FaultKind
from tests.support.registry import TEST_USER
from tests.support.token_server import Access, TokenServer
from tests.support.tools import wait_until

from imagestream.demo.image import SampleImage, write_sample_image

pytestmark = pytest.mark.timeout(60)

ACCEPT_ALL = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST])
AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def blob_url(live: LiveRegistry, repository: str, digest: str, address: str | None = None) -> str:
    return f"{live.registry.scheme}://{address or live.address}/v2/{repository}/blobs/{digest}"


def manifest_url(live: LiveRegistry, repository: str, reference: str) -> str:
    return f"{live.registry.base_url}/v2/{repository}/manifests/{reference}"


def bearer_token(server: TokenServer, scope: str, auth: tuple[str, str] | None) -> str:
    response = httpx.get(
        server.realm, params={"service": server.service, "scope": scope}, auth=auth
    )
    response.raise_for_status()
    token: str = response.json()["token"]
    return token


# -- push, then pull with httpx ---------------------------------------------------------------


def test_artifact_push_then_pull(
    registry: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    other = write_sample_image(tmp_path / "other.zst", 1 * 1 << 20, seed=12)
    pushed = registry.pusher.push_artifact(
        "os/root",
        "v1",
        [titled(sample_image.path, "root.raw.zst", tmp_path / "layers"), Layer(other.path)],
    )

    manifest = httpx.get(manifest_url(registry, "os/root", "v1"), headers={"Accept": OCI_MANIFEST})
    assert manifest.status_code == 200
    assert sha256_digest(manifest.content) == pushed.manifest.digest
    assert manifest.headers["Docker-Content-Digest"] == pushed.manifest.digest
    titles = [
        layer["annotations"]["org.opencontainers.image.title"]
        for layer in manifest.json()["layers"]
    ]
    assert titles == ["root.raw.zst", "other.zst"]

    layer = pushed.layers["root.raw.zst"]
    blob = httpx.get(blob_url(registry, "os/root", layer.digest))
    assert blob.status_code == 200
    assert sha256_digest(blob.content) == layer.digest
    assert hashlib.sha384(blob.content).hexdigest() == sample_image.sha384
    # The registry serves byte ranges, which resuming relies on.
    tail = httpx.get(blob_url(registry, "os/root", layer.digest), headers={"Range": "bytes=1000-"})
    assert tail.status_code == 206
    assert tail.content == blob.content[1000:]


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-manifest-list"])
def test_index_push_then_pull(
    docker: bool, registry: LiveRegistry, sample_image: SampleImage, tmp_path: Path
) -> None:
    arm = write_sample_image(tmp_path / "arm.zst", 1 << 20, seed=13)
    pushed = registry.pusher.push_index(
        "os/multi", "v1", {AMD64: Layer(sample_image.path), ARM64: Layer(arm.path)}, docker=docker
    )

    index = httpx.get(manifest_url(registry, "os/multi", "v1"), headers={"Accept": ACCEPT_ALL})
    assert index.headers["Content-Type"] == (DOCKER_MANIFEST_LIST if docker else OCI_INDEX)
    assert sha256_digest(index.content) == pushed.index.digest
    platforms = {
        (entry["platform"]["architecture"], entry["platform"].get("variant")): entry["digest"]
        for entry in index.json()["manifests"]
    }
    assert platforms == {
        ("amd64", None): pushed.manifests[AMD64].digest,
        ("arm64", "v8"): pushed.manifests[ARM64].digest,
    }
    for platform, image in ((AMD64, sample_image), (ARM64, arm)):
        manifest = httpx.get(
            manifest_url(registry, "os/multi", pushed.manifests[platform].digest),
            headers={"Accept": ACCEPT_ALL},
        )
        layer_digest = manifest.json()["layers"][0]["digest"]
        assert layer_digest == pushed.layers[platform].digest
        blob = httpx.get(blob_url(registry, "os/multi", layer_digest))
        assert hashlib.sha384(blob.content).hexdigest() == image.sha384


def test_overwritten_blob_file_is_served(registry: LiveRegistry, sample_image: SampleImage) -> None:
    # The premise of the "corrupted blob" tests: the registry keeps no copy of blob contents.
    pushed = registry.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    digest = pushed.layers[sample_image.path.name].digest
    path = registry.registry.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    served = httpx.get(blob_url(registry, "os/root", digest)).content
    assert served == bytes(data)
    assert sha256_digest(served) != digest


# -- authentication ---------------------------------------------------------------------------


def test_basic_auth(registry_basic: LiveRegistry, sample_image: SampleImage) -> None:
    pushed = registry_basic.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    url = manifest_url(registry_basic, "os/root", "v1")
    assert registry_basic.credentials is not None

    anonymous = httpx.get(url, headers={"Accept": OCI_MANIFEST})
    wrong = httpx.get(url, headers={"Accept": OCI_MANIFEST}, auth=(TEST_USER, "wrong"))
    right = httpx.get(url, headers={"Accept": OCI_MANIFEST}, auth=registry_basic.credentials)

    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert sha256_digest(right.content) == pushed.manifest.digest


def test_token_flow(registry_token: LiveRegistry, sample_image: SampleImage) -> None:
    server = registry_token.token_server
    assert server is not None
    assert registry_token.credentials is not None
    registry_token.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    url = manifest_url(registry_token, "os/root", "v1")
    scope = "repository:os/root:pull"

    challenge = httpx.get(url, headers={"Accept": OCI_MANIFEST})
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"] == (
        f'Bearer realm="{server.realm}",service="{server.service}",scope="{scope}"'
    )

    # Anonymous: a token that grants nothing, which the registry refuses.
    anonymous = bearer_token(server, scope, None)
    refused = httpx.get(url, headers={"Authorization": f"Bearer {anonymous}"})
    assert refused.status_code == 401
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]

    # Wrong credentials: the token server itself refuses.
    wrong = httpx.get(
        server.realm, params={"service": server.service, "scope": scope}, auth=(TEST_USER, "x")
    )
    assert wrong.status_code == 401

    token = bearer_token(server, scope, registry_token.credentials)
    accepted = httpx.get(url, headers={"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST})
    assert accepted.status_code == 200
    granted = server.requests[-1]
    assert (granted.account, granted.granted) == (
        TEST_USER,
        (Access("repository", "os/root", ("pull",)),),
    )


def test_token_from_refresh_token(
    registry_token: LiveRegistry, sample_image: SampleImage, identity_token: str
) -> None:
    # What a Docker client does with a config's identitytoken: the OAuth2 refresh-token grant.
    server = registry_token.token_server
    assert server is not None
    registry_token.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    form = {
        "grant_type": "refresh_token",
        "service": server.service,
        "scope": "repository:os/root:pull",
        "client_id": "tests",
    }

    wrong = httpx.post(server.realm, data={**form, "refresh_token": "not-it"})
    right = httpx.post(server.realm, data={**form, "refresh_token": identity_token})

    assert wrong.status_code == 401
    assert right.status_code == 200
    token = right.json()["access_token"]
    manifest = httpx.get(
        manifest_url(registry_token, "os/root", "v1"),
        headers={"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST},
    )
    assert manifest.status_code == 200
    assert server.requests[-1].account == TEST_USER


def test_token_expires_after_its_ttl(
    registry_token: LiveRegistry, sample_image: SampleImage
) -> None:
    # The registry allows 60 s of clock skew; the token server compensates, so a short TTL is
    # really short. The test waits for the registry to refuse (no timing assertion).
    server = registry_token.token_server
    assert server is not None
    registry_token.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    server.ttl = 2
    token = bearer_token(server, "repository:os/root:pull", registry_token.credentials)
    url = manifest_url(registry_token, "os/root", "v1")
    headers = {"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST}
    issued = time.monotonic()

    assert httpx.get(url, headers=headers).status_code == 200
    wait_until(
        lambda: httpx.get(url, headers=headers).status_code == 401,
        timeout=10,
        what="the registry to refuse the expired token",
        interval=0.2,
    )
    assert time.monotonic() - issued >= 1.0, "the token was refused before its TTL ran out"


def test_tls_registry(registry_tls: LiveRegistry, sample_image: SampleImage) -> None:
    pushed = registry_tls.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    digest = pushed.layers[sample_image.path.name].digest
    assert registry_tls.ca_file is not None
    url = blob_url(registry_tls, "os/root", digest)
    assert url.startswith("https://127.0.0.1:")

    blob = httpx.get(url, verify=ssl.create_default_context(cafile=registry_tls.ca_file))
    assert hashlib.sha384(blob.content).hexdigest() == sample_image.sha384
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url)  # the system trust store does not know the test CA


# -- redirects and the fault proxy ------------------------------------------------------------


def test_redirect_to_blob_host(
    redirecting_registry: RedirectingRegistry, sample_image: SampleImage
) -> None:
    live, blob_host = redirecting_registry.live, redirecting_registry.blob_host
    pushed = live.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    digest = pushed.layers[sample_image.path.name].digest

    redirect = httpx.get(blob_url(live, "os/root", digest), auth=live.credentials)
    assert redirect.status_code == 307
    location = redirect.headers["Location"]
    assert location.startswith(f"http://localhost:{blob_host.port}/")
    ranged = httpx.get(location, headers={"Range": "bytes=100-"})
    with_auth = httpx.get(location, headers={"Authorization": "Bearer x"})

    assert ranged.status_code == 206
    assert ranged.content == sample_image.path.read_bytes()[100:]
    assert with_auth.status_code == 403
    log = blob_host.access_log(min_entries=2)
    assert [(entry.status, entry.range) for entry in log] == [(206, "bytes=100-"), (403, "")]


def test_fault_proxy_resets_then_serves_the_rest(
    fault_proxy: FaultProxy, registry: LiveRegistry, sample_image: SampleImage
) -> None:
    pushed = registry.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    digest = pushed.layers[sample_image.path.name].digest
    url = blob_url(registry, "os/root", digest, address=fault_proxy.address)
    fault_proxy.add(Fault.reset(after=300_000, on=BLOB_GETS))
    received = bytearray()

    with pytest.raises(httpx.TransportError), httpx.stream("GET", url) as response:  # noqa: PT012
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert len(received) == 300_000
    rest = httpx.get(url, headers={"Range": f"bytes={len(received)}-"})

    assert rest.status_code == 206
    assert hashlib.sha384(bytes(received) + rest.content).hexdigest() == sample_image.sha384
    gets = fault_proxy.blob_gets()
    assert [(g.range, g.status, g.body_bytes, g.faults) for g in gets] == [
        (None, 200, 300_000, [FaultKind.RESET]),
        ("bytes=300000-", 206, sample_image.compressed_size - 300_000, []),
    ]
    assert fault_proxy.pending == []


def test_fault_proxy_tampers_manifests_and_strips_accept_ranges(
    fault_proxy_factory: FaultProxyFactory, registry: LiveRegistry, sample_image: SampleImage
) -> None:
    pushed = registry.pusher.push_artifact("os/root", "v1", [Layer(sample_image.path)])
    proxy = fault_proxy_factory(
        registry.registry,
        Fault.tamper(on=MANIFEST_GETS),
        Fault.strip_accept_ranges(on=BLOB_REQUESTS),
    )
    base = f"http://{proxy.address}/v2/os/root"
    digest = pushed.manifest.digest

    tampered = httpx.get(f"{base}/manifests/{digest}", headers={"Accept": OCI_MANIFEST})
    honest = httpx.get(f"{base}/manifests/{digest}", headers={"Accept": OCI_MANIFEST})
    head = httpx.head(f"{base}/blobs/{pushed.layers[sample_image.path.name].digest}")

    assert tampered.headers["Docker-Content-Digest"] == digest  # the header still claims it
    assert sha256_digest(tampered.content) != digest
    assert tampered.json() == honest.json()
    assert sha256_digest(honest.content) == digest
    assert head.status_code == 200
    assert "Accept-Ranges" not in head.headers
