"""Planning extension targets and the TARGET prefixes: pure decisions, nothing opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagestream.errors import UsageError
from imagestream.pipeline.target_plan import ExtensionPlan
from imagestream.targets import target_from_argument
from imagestream.targets.extension import (
    Record,
    host_file,
    mount_namespace_of,
    plan,
    refresh_command,
    validate_name,
)


def test_the_plan_is_a_file_confined_to_the_extension_directory(tmp_path: Path) -> None:
    directory = tmp_path / "var/lib/confexts"
    planned = plan("confext", "site", directory=directory, where="TARGET", refresh=True)

    assert planned.kind == "file"
    assert planned.path == tmp_path / "var/lib/confexts/site.raw"
    assert planned.allowed_dirs == (tmp_path / "var/lib/confexts",)
    assert planned.name == "/var/lib/confexts/site.raw"  # as the host names it
    assert planned.extension == ExtensionPlan("confext", "site", refresh=True)


def test_the_cli_argument_plans_the_same(tmp_path: Path) -> None:
    planned = target_from_argument("sysext:tools", host_root=tmp_path, refresh=True)

    assert planned.path == tmp_path / "var/lib/extensions/tools.raw"
    assert planned.allowed_dirs == (tmp_path / "var/lib/extensions",)
    assert planned.host.mountinfo == tmp_path / "proc/1/mountinfo"
    assert planned.extension is not None
    assert planned.extension.mount_namespace == tmp_path / "proc/1/ns/mnt"
    assert target_from_argument("sysext:tools").extension == ExtensionPlan("sysext", "tools")


def test_the_refresh_runs_directly_on_the_host_and_through_nsenter_elsewhere(
    tmp_path: Path,
) -> None:
    assert mount_namespace_of(Path("/")) is None
    (tmp_path / "root").symlink_to("/")
    assert mount_namespace_of(tmp_path / "root") is None  # a link to / is the host too
    assert refresh_command(ExtensionPlan("sysext", "x")) == ("systemd-sysext", "refresh")
    assert refresh_command(
        ExtensionPlan("confext", "x", mount_namespace=Path("/host/proc/1/ns/mnt"))
    ) == (
        "nsenter",
        "--mount=/host/proc/1/ns/mnt",
        "--",
        "systemd-confext",
        "refresh",
    )


@pytest.mark.parametrize("name", ["tools", "a", "A9._-x", "x" * 128, "v1.2.3"])
def test_good_names(name: str) -> None:
    assert validate_name(name, "TARGET") == name
    assert host_file("sysext", name) == f"/var/lib/extensions/{name}.raw"


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "x/y", ".x", "x.raw", "x" * 129, "a b", "a\nb", "_x", "ü"]
)
def test_bad_names_name_the_argument(name: str) -> None:
    with pytest.raises(UsageError) as excinfo:
        validate_name(name, "spec.target.extension.name")
    assert excinfo.value.exit_code == 2
    assert excinfo.value.message.startswith("spec.target.extension.name: the extension name ")


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("sysxt:tools", "InvalidRequest"),
        ("http:x", "InvalidRequest"),
    ],
)
def test_prefixes_other_than_the_extensions(argument: str, reason: str) -> None:
    with pytest.raises(UsageError) as excinfo:
        target_from_argument(argument)
    assert excinfo.value.reason == reason


def test_allowed_dirs_are_for_paths_not_extensions(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as excinfo:
        target_from_argument("sysext:tools", allowed_dirs=(tmp_path,))
    assert "--allowed-dir confines file paths" in excinfo.value.message


def test_paths_without_a_prefix_stay_paths() -> None:
    assert target_from_argument("/dev/imagestream-none").kind == "device"
    assert target_from_argument("./sysext:tools").extension is None
    assert target_from_argument("dir/x:y").path == Path.cwd() / "dir/x:y"


def test_a_record_reads_back_and_garbage_is_no_record() -> None:
    record = Record("a" * 96, "b" * 96, "zstd")
    assert Record.decode(record.encode()) == record
    for garbage in (b"", b"{", b"[]", b'{"sha384": "x"}', b"\xff"):
        assert Record.decode(garbage) is None
