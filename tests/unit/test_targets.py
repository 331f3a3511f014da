"""The targets layer: the caller's words -> a plan; opening verifies what was planned.

Planning is pure and tested as such. Opening runs against real loop devices, real device
nodes (`mknod` in `tmp_path`, as a container's `/host/dev` holds them) and real files: what a
plan opens is checked on the descriptor, never guessed from a path.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.targets import device_plan, file_plan

from imagestream.errors import TargetError, UsageError
from imagestream.pipeline.safety import HostView, device_number
from imagestream.pipeline.sinks import BlockDeviceSink, FileSink, open_sink
from imagestream.targets import TargetPlan, TargetRequest, plan_target, target_from_argument
from imagestream.targets.parse import argument_kind

MIB = 1 << 20
_SWAPS = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


# -- planning (pure) --------------------------------------------------------------------------


def test_the_kind_comes_from_the_request_not_from_the_system(tmp_path: Path) -> None:
    # A path that does not exist, outside /dev: planned as a device it stays a device.
    missing = tmp_path / "host/dev/disk/by-partlabel/typo"
    plan = plan_target(TargetRequest(kind="device", path=missing, name="/dev/disk/typo"))
    assert (plan.kind, plan.path, plan.name) == ("device", missing, "/dev/disk/typo")
    assert plan.usage_checks is True
    forced = plan_target(TargetRequest(kind="device", path=missing, force=True))
    assert forced.usage_checks is False
    assert forced.name == str(missing)


def test_a_file_plan_keeps_its_allowed_directory(tmp_path: Path) -> None:
    allowed = (tmp_path / "var/lib/extensions",)
    plan = plan_target(
        TargetRequest(kind="file", path=allowed[0] / "tools.raw", allowed_dirs=allowed)
    )
    assert (plan.kind, plan.allowed_dirs) == ("file", allowed)


def test_plans_refuse_what_cannot_be_a_target_of_their_kind() -> None:
    with pytest.raises(UsageError):
        plan_target(TargetRequest(kind="device", path=Path("dev/sda")))
    with pytest.raises(TargetError) as excinfo:
        plan_target(TargetRequest(kind="file", path=Path("/")))
    assert excinfo.value.reason == "TargetInvalid"


def test_cli_argument_form(tmp_path: Path, loop_device_factory: LoopDeviceFactory) -> None:
    dev = loop_device_factory(2 * MIB)
    link = tmp_path / "root-b"
    link.symlink_to(dev)
    existing = tmp_path / "existing.img"
    existing.write_bytes(b"x")
    assert argument_kind(Path("/dev/imagestream-no-such-disk")) == "device"
    assert argument_kind(dev) == "device"
    assert argument_kind(link) == "device"  # a link to a device names that device
    assert argument_kind(existing) == "file"
    assert argument_kind(tmp_path / "new.img") == "file"
    plan = target_from_argument(Path("new.img"), direct_io=False)
    assert (plan.kind, plan.name, plan.direct_io) == ("file", "new.img", False)
    assert plan.path == Path.cwd() / "new.img"


# -- opening verifies the plan ----------------------------------------------------------------


def _refused(plan: TargetPlan) -> TargetError:
    with pytest.raises(TargetError) as excinfo:
        open_sink(plan)
    assert excinfo.value.exit_code == 5
    return excinfo.value


def test_a_missing_device_is_never_created(tmp_path: Path) -> None:
    host_dev = tmp_path / "host/dev"
    host_dev.mkdir(parents=True)
    error = _refused(device_plan(host_dev / "nvme0n1p9", name="/dev/nvme0n1p9"))
    assert error.reason == "TargetNotFound"
    assert "/dev/nvme0n1p9" in error.message
    assert str(tmp_path) not in error.message  # the name the user wrote, not the agent's path
    assert list(host_dev.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: tmp, "a directory"),
        (lambda tmp: Path("/dev/null"), "neither a block device"),
        (lambda tmp: _regular(tmp / "disk.img"), "a regular file"),
    ],
    ids=["directory", "char-device", "regular-file"],
)
def test_a_planned_device_must_be_a_block_device(
    make: Callable[[Path], Path], words: str, tmp_path: Path
) -> None:
    path = make(tmp_path)
    before = path.read_bytes() if path.is_file() else None
    error = _refused(device_plan(path))
    assert error.reason == "TargetInvalid"
    assert words in error.message
    if before is not None:
        assert path.read_bytes() == before


def _regular(path: Path) -> Path:
    path.write_bytes(b"an old image")
    return path


def test_a_planned_file_never_opens_a_block_device(
    tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    dev = loop_device_factory(2 * MIB)
    node = tmp_path / "tools.raw"
    rdev = os.stat(dev).st_rdev
    os.mknod(node, 0o600 | stat.S_IFBLK, rdev)
    error = _refused(file_plan(node))
    assert error.reason == "TargetInvalid"
    assert "a block device" in error.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "tools.raw"]


def test_a_device_node_under_a_host_prefix_opens(
    tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    """The agent's view: the host's device nodes in another directory than /dev."""
    dev = loop_device_factory(2 * MIB)
    node = tmp_path / "host-dev-loop"
    os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(dev).st_rdev)
    sink = open_sink(device_plan(node, name=str(dev)))
    try:
        assert sink.capacity == 2 * MIB
    finally:
        sink.invalidate()


# -- checks run on the opened descriptor ------------------------------------------------------


def test_checks_run_on_the_device_that_was_opened(
    tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    """A by-label link moved between the check and the open must not matter.

    The mount table is a FIFO: reading it blocks until this test writes it, which it does
    only after moving the link from `second` to `first` and with a table that says `first`
    is mounted. Checking the path and opening it afterwards would check `second` and write
    `first`; checking the opened descriptor checks and writes `second`.
    """
    first, second = loop_device_factory(2 * MIB), loop_device_factory(2 * MIB)
    link = tmp_path / "by-partlabel-root"
    link.symlink_to(second)
    mountinfo = tmp_path / "mountinfo"
    os.mkfifo(mountinfo)
    swaps = tmp_path / "swaps"
    swaps.write_text(_SWAPS)
    host = HostView(mountinfo=mountinfo, swaps=swaps, sysfs=Path("/sys"))
    outcome: list[BlockDeviceSink | FileSink | TargetError] = []

    def open_it() -> None:
        try:
            outcome.append(open_sink(device_plan(link, host=host)))
        except TargetError as exc:
            outcome.append(exc)

    opener = threading.Thread(target=open_it)
    opener.start()
    with open(mountinfo, "w") as table:  # returns once the checks are reading the table
        moved = tmp_path / "moved"
        moved.symlink_to(first)
        moved.replace(link)
        major, minor = device_number(first)
        table.write(f"22 1 {major}:{minor} / /mnt/first rw - ext4 {first} rw\n")
    opener.join(10)
    assert not opener.is_alive()

    (sink,) = outcome
    assert not isinstance(sink, TargetError), sink
    try:
        assert sink.path == second
    finally:
        sink.invalidate()
