"""The pure half of OCI sources: references, platforms, manifests, layer and platform choice."""

from __future__ import annotations

import hashlib
import json

import pytest

from imagestream.errors import IntegrityError, SourceError, UsageError
from imagestream.pipeline.oci_refs import (
    Platform,
    Reference,
    host_platform,
    is_loopback,
    parse_platform,
    parse_reference,
)
from imagestream.pipeline.oci_select import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    TITLE_ANNOTATION,
    Descriptor,
    parse_manifest,
    select_layer,
    select_platform,
    verify_digest,
)

DIGEST = "sha256:" + "ab" * 32


# -- references -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci://registry.example/os", Reference("registry.example", "os", "latest")),
        (
            "oci://Registry.Example:5000/fleet/os/node-image:v1.2_3",
            Reference("registry.example:5000", "fleet/os/node-image", "v1.2_3"),
        ),
        (f"oci://127.0.0.1:5000/os@{DIGEST}", Reference("127.0.0.1:5000", "os", None, DIGEST)),
        (f"oci://r.example/os:v1@{DIGEST}", Reference("r.example", "os", "v1", DIGEST)),
        ("oci://[::1]:5000/a/b__c:t", Reference("[::1]:5000", "a/b__c", "t")),
        ("oci://localhost/a.b-c/d", Reference("localhost", "a.b-c/d", "latest")),
    ],
)
def test_references_parse(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_a_digest_wins_over_the_tag_and_both_show_in_the_name() -> None:
    reference = parse_reference(f"oci://r.example/os:v1@{DIGEST}")

    assert reference.manifest_ref == DIGEST
    assert str(reference) == f"oci://r.example/os:v1@{DIGEST}"


@pytest.mark.parametrize(
    ("reference", "host"),
    [
        (Reference("registry.example:5000", "os"), "registry.example"),
        (Reference("[::1]:5000", "os"), "::1"),
        (Reference("[::1]", "os"), "::1"),
        (Reference("localhost", "os"), "localhost"),
    ],
)
def test_the_host_drops_port_and_brackets(reference: Reference, host: str) -> None:
    assert reference.host == host


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("oci://registry.example", "HOST"),
        ("oci:///os", "HOST"),
        ("oci://bad_host/os", "HOST"),
        ("oci://r.example:99999/os", "invalid port"),
        ("oci://r.example/OS", "invalid repository"),
        ("oci://r.example/os//x", "invalid repository"),
        ("oci://r.example/os-:v1", "invalid repository"),
        ("oci://r.example/os:-bad", "invalid tag"),
        # The spec's tag alphabet is ASCII; Python's `\w` alone takes any Unicode letter or digit.
        ("oci://h:5000/r:tägé", "invalid tag"),
        ("oci://r.example/os:v\u0661", "invalid tag"),
        ("oci://r.example/os@sha256:abc", "invalid digest"),
        ("oci://r.example/os@md5:" + "0" * 32, "invalid digest"),
        ("https://r.example/os", "starts with oci://"),
    ],
)
def test_invalid_references_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_reference(text)


def test_credentials_in_a_reference_are_refused_without_echoing_them() -> None:
    with pytest.raises(UsageError, match="--auth-file") as caught:
        parse_reference("oci://alice:hunter2@r.example/os")

    assert "hunter2" not in caught.value.message


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("registry.example", False),
        ("localhost.example", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- platforms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("Linux/ARM64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),  # v8 is arm64's only variant
        ("linux/arm", Platform("linux", "arm", "v7")),  # arm without variant means v7
        ("linux/arm/v6", Platform("linux", "arm", "v6")),
    ],
)
def test_platforms_parse_and_normalise(text: str, expected: Platform) -> None:
    assert parse_platform(text) == expected


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "linux/amd64/v1/x", "linux amd64"])
def test_invalid_platforms_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="OS/ARCH"):
        parse_platform(text)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("i686", "linux/386"),
        ("ppc64le", "linux/ppc64le"),
        ("mips64", "linux/mips64"),
    ],
)
def test_the_host_platform_maps_machine_names(
    monkeypatch: pytest.MonkeyPatch, machine: str, expected: str
) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    monkeypatch.setattr("sys.platform", "linux")

    assert str(host_platform()) == expected


# -- manifests --------------------------------------------------------------------------------


def descriptor_json(
    digest: str = DIGEST, size: int = 10, title: str | None = None, platform: str | None = None
) -> dict[str, object]:
    found: dict[str, object] = {"mediaType": "application/zstd", "digest": digest, "size": size}
    if title is not None:
        found["annotations"] = {TITLE_ANNOTATION: title}
    if platform is not None:
        keys = ("os", "architecture", "variant")
        found["platform"] = dict(zip(keys, platform.split("/"), strict=False))
    return found


@pytest.mark.parametrize(
    ("media_type", "in_body", "content_type", "is_index"),
    [
        (OCI_MANIFEST, True, "application/json", False),
        (DOCKER_MANIFEST, True, DOCKER_MANIFEST, False),
        (OCI_INDEX, True, OCI_INDEX, True),
        (DOCKER_LIST, False, DOCKER_LIST + "; charset=utf-8", True),
        (OCI_MANIFEST, False, OCI_MANIFEST, False),
    ],
)
def test_manifests_of_either_family_parse(
    media_type: str, in_body: bool, content_type: str, is_index: bool
) -> None:
    key = "manifests" if is_index else "layers"
    document: dict[str, object] = {"schemaVersion": 2, key: [descriptor_json(title="disk.zst")]}
    if in_body:
        document["mediaType"] = media_type

    manifest = parse_manifest(json.dumps(document).encode(), content_type, "m")

    assert manifest.media_type == media_type
    assert manifest.is_index is is_index
    assert manifest.entries[0].digest == DIGEST
    assert manifest.entries[0].title == "disk.zst"


@pytest.mark.parametrize("key", ["manifests", "layers"])
def test_a_manifest_without_media_type_is_known_by_its_shape(key: str) -> None:
    body = json.dumps({"schemaVersion": 2, key: []}).encode()

    manifest = parse_manifest(body, "application/octet-stream", "m")

    assert manifest.is_index is (key == "manifests")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not a JSON manifest"),
        (b"[1]", "not a JSON manifest"),
        (
            json.dumps({"mediaType": "application/vnd.docker.distribution.manifest.v1+json"}),
            "unsupported media type",
        ),
        (json.dumps({"mediaType": OCI_MANIFEST}), "no 'layers' list"),
        (json.dumps({"mediaType": OCI_MANIFEST, "layers": ["x"]}), "not an object"),
        (
            json.dumps({"mediaType": OCI_MANIFEST, "layers": [descriptor_json("sha1:00")]}),
            "unsupported digest",
        ),
        (
            json.dumps({"mediaType": OCI_MANIFEST, "layers": [descriptor_json(size=-1)]}),
            "invalid size",
        ),
    ],
)
def test_invalid_manifests(body: bytes | str, message: str) -> None:
    data = body.encode() if isinstance(body, str) else body

    with pytest.raises(SourceError, match=message) as caught:
        parse_manifest(data, None, "manifest v1")

    assert caught.value.reason == "InvalidManifest"


# -- platform choice --------------------------------------------------------------------------


def entries(*platforms: str | None) -> list[Descriptor]:
    index = {
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor_json(f"sha256:{i:064x}", platform=p) for i, p in enumerate(platforms)
        ],
    }
    return list(parse_manifest(json.dumps(index).encode(), None, "index").entries)


def test_the_entry_for_the_platform_is_chosen() -> None:
    found = entries("linux/amd64", "linux/arm64/v8", "linux/arm/v7")

    assert select_platform(found, Platform("linux", "arm64")) is found[1]
    assert select_platform(found, parse_platform("linux/arm")) is found[2]


def test_the_first_of_several_matches_is_chosen() -> None:
    found = entries("linux/amd64", "linux/amd64")

    assert select_platform(found, Platform("linux", "amd64")) is found[0]


def test_a_missing_platform_lists_the_available_ones() -> None:
    found = entries("linux/amd64", "linux/arm64", None)

    with pytest.raises(SourceError) as caught:
        select_platform(found, parse_platform("linux/riscv64"))

    assert caught.value.reason == "PlatformNotFound"
    assert caught.value.exit_code == 3
    assert "linux/riscv64" in caught.value.message
    assert "linux/amd64, linux/arm64" in caught.value.message


def test_a_single_entry_without_platform_is_taken() -> None:
    found = entries(None)

    assert select_platform(found, Platform("linux", "s390x")) is found[0]


# -- layer choice -----------------------------------------------------------------------------


def layers(*titles: str | None) -> list[Descriptor]:
    manifest = {
        "mediaType": OCI_MANIFEST,
        "layers": [descriptor_json(f"sha256:{i:064x}", title=t) for i, t in enumerate(titles)],
    }
    return list(parse_manifest(json.dumps(manifest).encode(), None, "manifest").entries)


def test_a_single_layer_needs_no_title() -> None:
    found = layers(None)

    assert select_layer(found, None) is found[0]


def test_a_layer_is_chosen_by_title() -> None:
    found = layers("boot.zst", "root.zst")

    assert select_layer(found, "root.zst") is found[1]


def test_several_layers_without_a_title_are_ambiguous() -> None:
    found = layers("boot.zst", None)

    with pytest.raises(UsageError) as caught:
        select_layer(found, None)

    assert caught.value.reason == "AmbiguousLayer"
    assert caught.value.exit_code == 2
    assert f"boot.zst, {found[1].digest}" in caught.value.message
    assert "--layer" in caught.value.message


def test_a_title_given_twice_is_ambiguous() -> None:
    with pytest.raises(UsageError) as caught:
        select_layer(layers("disk.zst", "disk.zst"), "disk.zst")

    assert caught.value.reason == "AmbiguousLayer"


def test_an_unknown_title_lists_the_candidates() -> None:
    with pytest.raises(UsageError) as caught:
        select_layer(layers("boot.zst", "root.zst"), "home.zst")

    assert caught.value.reason == "LayerNotFound"
    assert "'home.zst'" in caught.value.message
    assert "boot.zst, root.zst" in caught.value.message


def test_a_manifest_without_layers() -> None:
    with pytest.raises(UsageError) as caught:
        select_layer([], None)

    assert caught.value.reason == "LayerNotFound"


# -- digests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_a_matching_digest_passes(algorithm: str) -> None:
    data = b"manifest bytes"

    verify_digest(data, f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}", "manifest")


def test_a_digest_mismatch_names_what_and_both_digests() -> None:
    actual = f"sha256:{hashlib.sha256(b'x').hexdigest()}"

    with pytest.raises(IntegrityError) as caught:
        verify_digest(b"x", DIGEST, "manifest")

    assert caught.value.reason == "DigestMismatch"
    assert caught.value.exit_code == 4
    assert caught.value.message.startswith("manifest digest mismatch")
    assert DIGEST in caught.value.message
    assert actual in caught.value.message
