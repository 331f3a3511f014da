"""Parsing an ImageStream body: target resolution, defaults, and what ends the stream early."""

from __future__ import annotations

from typing import Any

import pytest
from tests.support.streams import SHA384, stream_body

from imagestream.controller.spec import (
    StreamOptions,
    blocking_keys_of,
    held_keys_of,
    parse_stream,
)
from imagestream.errors import UsageError
from imagestream.reasons import Reason


def test_device_target_resolves_under_the_host_dev_mount() -> None:
    stream = parse_stream(stream_body())
    assert stream.target.kind == "device"
    assert stream.target.host_path == "/dev/disk/by-partlabel/root-b"
    assert stream.target.agent_path == "/host/dev/disk/by-partlabel/root-b"
    assert stream.target.host_dir is None
    assert stream.target.agent_kind == "device"  # must exist: never created as a file
    assert stream.target_keys == (("node-7", "/dev/disk/by-partlabel/root-b"),)


@pytest.mark.parametrize(
    ("kind", "host_path", "host_dir"),
    [
        ("sysext", "/var/lib/extensions/tools.raw", "/var/lib/extensions"),
        ("confext", "/var/lib/confexts/tools.raw", "/var/lib/confexts"),
    ],
)
def test_extension_targets_are_files_in_the_mounted_extension_dir(
    kind: str, host_path: str, host_dir: str
) -> None:
    stream = parse_stream(stream_body(target={"extension": {"type": kind, "name": "tools"}}))
    assert stream.target.kind == "extension"
    assert stream.target.host_path == host_path
    assert stream.target.host_dir == host_dir
    assert stream.target.agent_dir == "/host" + host_dir
    # The agent plans it from type and name, as the CLI's `sysext:tools`.
    assert (stream.target.agent_kind, stream.target.agent_path) == (kind, "tools")
    assert stream.target.refresh is False


def test_an_extension_may_ask_for_a_refresh() -> None:
    body = stream_body(target={"extension": {"type": "sysext", "name": "tools", "refresh": True}})
    assert parse_stream(body).target.refresh is True


def test_disk_target_is_a_whole_disk_for_the_agent() -> None:
    stream = parse_stream(stream_body(target={"disk": "/dev/disk/by-id/nvme-1"}))
    assert stream.target.kind == "disk"
    assert stream.target.host_path == "/dev/disk/by-id/nvme-1"
    assert stream.target.agent_path == "/host/dev/disk/by-id/nvme-1"
    assert stream.target.agent_kind == "disk"
    assert stream.target.host_dir is None


@pytest.mark.parametrize("path", ["/dev/../etc/passwd", "sda", "/dev/disk//x"])
def test_disk_target_must_be_a_normalized_dev_path(path: str) -> None:
    with pytest.raises(UsageError, match=r"spec\.target\.disk") as caught:
        parse_stream(stream_body(target={"disk": path}))
    assert caught.value.reason == Reason.INVALID_SPEC


def test_a_whole_disk_holds_every_target_of_its_node() -> None:
    disk = parse_stream(stream_body(target={"disk": "/dev/sda"}))
    device = parse_stream(stream_body(target={"device": "/dev/disk/by-partlabel/root-b"}))
    other = parse_stream(stream_body(target={"device": "/dev/sdb1"}))
    # A device stream waits for a disk stream of its node, whatever device it names ...
    assert set(device.blocking_keys()) & set(disk.held_keys())
    # ... a disk stream for any stream of its node ...
    assert set(disk.blocking_keys()) & set(device.held_keys())
    # ... while two devices of the node wait for each other only when they are the same.
    assert not set(device.blocking_keys()) & set(other.held_keys())
    assert set(device.blocking_keys()) & set(device.held_keys())
    elsewhere = parse_stream(stream_body(target={"disk": "/dev/sda"}, node="node-8"))
    assert not set(device.blocking_keys()) & set(elsewhere.held_keys())


def test_an_ab_pair_holds_both_volumes_and_names_none_until_the_agent_chose() -> None:
    volumes = ["/dev/disk/by-partlabel/root-a", "/dev/disk/by-partlabel/root-b"]
    stream = parse_stream(stream_body(target={"abUpdate": {"volumes": volumes}}))
    assert stream.target.kind == "abUpdate"
    assert stream.target.agent_kind == "abUpdate"
    assert stream.target.volumes == tuple(volumes)
    assert stream.target.agent_volumes == tuple("/host" + volume for volume in volumes)
    assert stream.target.agent_path == "/host" + volumes[0]
    assert stream.target.known_path is None
    assert stream.target_keys == (("node-7", volumes[0]), ("node-7", volumes[1]))
    assert stream.target.description == f"the A/B pair {volumes[0]}, {volumes[1]}"


@pytest.mark.parametrize(
    ("ab_update", "words"),
    [
        ({"volumes": ["/dev/sda1"]}, "must list two devices"),
        ({"volumes": "/dev/sda1,/dev/sda2"}, "must list two devices"),
        ({"volumes": ["/dev/sda1", "/dev/sda1"]}, "names /dev/sda1 twice"),
        ({"volumes": ["/dev/sda1", "/etc/shadow"]}, "volumes[1] '/etc/shadow' must be"),
        ({"volumes": ["/dev/../etc/x", "/dev/sda2"]}, "volumes[0] '/dev/../etc/x' must be"),
    ],
)
def test_malformed_ab_pairs_are_invalid(ab_update: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_stream(stream_body(target={"abUpdate": ab_update}))
    assert caught.value.reason == Reason.INVALID_SPEC
    assert words in caught.value.message


def test_source_fields_and_defaults() -> None:
    source = {
        "url": "oci://registry.example/os/root:1.2",
        "sha384": SHA384.upper(),
        "compression": "zstd",
        "authSecretRef": {"name": "creds"},
        "caConfigMapRef": {"name": "corp-ca"},
        "platform": "linux/arm64",
        "layer": "root.raw.zst",
        "maxWindowLog": 30,
    }
    parsed = parse_stream(stream_body(source=source)).source
    assert parsed.sha384 == SHA384  # lower-cased: the agent reports lower-case hex
    assert parsed.compression == "zstd"
    assert parsed.auth_secret == "creds"
    assert (parsed.ca_config_map, parsed.ca_key) == ("corp-ca", "ca.crt")
    assert (parsed.platform, parsed.layer) == ("linux/arm64", "root.raw.zst")
    assert parsed.max_window_log == 30
    bare = parse_stream(stream_body()).source
    assert (bare.compression, bare.auth_secret, bare.ca_config_map) == ("auto", None, None)
    assert bare.max_window_log == 27  # zstd's own default limit, as the CRD's default


def test_knobs_default_as_the_crd_does_and_are_read_when_set() -> None:
    assert parse_stream(stream_body()).options == StreamOptions(
        stall_timeout_seconds=30,
        max_retries=8,
        active_deadline_seconds=7200,
        verify_after_write=False,
        force=False,
    )
    knobs: dict[str, Any] = {
        "stallTimeoutSeconds": 5,
        "maxRetries": 2,
        "activeDeadlineSeconds": 600,
        "verifyAfterWrite": True,
        "force": True,
    }
    assert parse_stream(stream_body(**knobs)).options == StreamOptions(5, 2, 600, True, True)


def test_identity_comes_from_metadata() -> None:
    stream = parse_stream(stream_body(name="n", namespace="ns", uid="u", generation=4))
    assert (stream.name, stream.namespace, stream.uid, stream.generation) == ("n", "ns", "u", 4)


@pytest.mark.parametrize(
    "change",
    [
        {"nodeName": None},
        {"nodeName": "Node_7"},
        {"source": {"url": "ftp://images.example/x", "sha384": SHA384}},
        {"source": {"url": "https://images.example/x", "sha384": "ab" * 47}},
        {"source": {"url": "https://images.example/x", "sha384": SHA384, "compression": "lz4"}},
        {"source": {"url": "https://images.example/x", "sha384": SHA384, "maxWindowLog": 9}},
        {"source": {"url": "https://images.example/x", "sha384": SHA384, "maxWindowLog": 32}},
        {"source": {"url": "https://images.example/x", "sha384": SHA384, "maxWindowLog": "30"}},
        {"source": {"url": "https://images.example/x", "sha384": SHA384, "maxWindowLog": True}},
        {"target": {}},
        {"target": {"device": "/dev/sda", "disk": "/dev/sdb"}},
        {"target": {"device": "/dev/../etc/shadow"}},
        {"target": {"device": "/etc/shadow"}},
        {"target": {"extension": {"type": "sysext", "name": "../../etc/x"}}},
        {"target": {"extension": {"type": "portable", "name": "tools"}}},
        {"target": {"extension": {"type": "sysext", "name": "tools", "refresh": "yes"}}},
        {"target": {"extension": {"type": "sysext", "name": ".tools"}}},
        {"target": {"extension": {"type": "sysext", "name": "tools.raw"}}},
        {"maxRetries": -1},
        {"activeDeadlineSeconds": "soon"},
    ],
)
def test_malformed_specs_are_invalid(change: dict[str, Any]) -> None:
    body = stream_body()
    body["spec"].update(change)
    with pytest.raises(UsageError) as caught:
        parse_stream(body)
    assert caught.value.reason == Reason.INVALID_SPEC
    assert held_keys_of(body) == ()
    assert blocking_keys_of(body) == ()


def test_missing_spec_is_invalid() -> None:
    body = stream_body()
    del body["spec"]
    with pytest.raises(UsageError, match="spec is missing"):
        parse_stream(body)
