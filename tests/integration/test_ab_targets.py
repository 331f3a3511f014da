"""A/B updates on real loop devices: the inactive volume is written, the active one never.

A test host is a directory given as `--host-root`: its `proc/1/mountinfo` holds lines of this
machine's real mount table (real ext4 file systems made with mkfs.ext4 on the loop devices,
really mounted) with their mount points rewritten to `/` or `/usr`, as the node's PID 1 would
show them. Each volume is filled with a pattern first, so "untouched" means something.

This kernel has no device-mapper (no CONFIG_BLK_DEV_DM, no modules): the dm-verity/LVM case
runs for real through `dmsetup` where the kernel has it (`test_dm_linear_device_on_a_volume`),
and the holder logic is also tested here through a sysfs view built by the test (the `holders/`
links of a dm-verity-on-LVM stack) over the real loop devices, and through real partitions of
a loop disk (a volume whose partition is the root).
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from tests.support.blockdev import LoopDeviceFactory, mounted_ext4, small_tmpfs
from tests.support.blockdev import run as run_command
from tests.support.cli import run_imagestream
from tests.support.targets import MIB, fill_pattern, read_device
from tests.support.tools import require_tool

from imagestream.agent.contract import AgentInstructions
from imagestream.agent.runner import run_agent
from imagestream.demo.image import SampleImage, iter_raw_data, write_sample_image
from imagestream.errors import TargetError
from imagestream.pipeline.pipeline import StreamRequest, run_stream
from imagestream.pipeline.safety import HostView
from imagestream.reasons import Reason
from imagestream.targets import ab

IMAGE_SIZE = 3 * MIB
VOLUME_SIZE = 16 * MIB
#: Of each volume, compared before and after: superblock and the image's size plus some.
CHECKED = IMAGE_SIZE + MIB
EXIT_TARGET = 5

pytestmark = pytest.mark.usefixtures("require_root")

stream = functools.partial(run_imagestream, "stream")


def raw_data(size: int, seed: int) -> bytes:
    return b"".join(iter_raw_data(size, seed=seed))


@pytest.fixture
def image(tmp_path: Path) -> SampleImage:
    return write_sample_image(tmp_path / "root.img.zst", IMAGE_SIZE, seed=11)


@pytest.fixture
def volumes(loop_device_factory: LoopDeviceFactory) -> tuple[Path, Path]:
    """Two loop devices, each filled with the pattern."""
    pair = (loop_device_factory(VOLUME_SIZE), loop_device_factory(VOLUME_SIZE))
    for volume in pair:
        fill_pattern(volume, VOLUME_SIZE)
    return pair


def mountinfo_line(mount_point: Path) -> str:
    """This machine's mountinfo line of `mount_point` (the last: the visible mount)."""
    lines = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(mount_point)
    ]
    assert lines, f"{mount_point} is not mounted"
    return lines[-1]


def presented_as(mount_point: Path, shown: str) -> str:
    """The real mountinfo line of `mount_point` with its mount point shown as `shown`."""
    fields = mountinfo_line(mount_point).split()
    fields[4] = shown
    return " ".join(fields)


def host_root(tmp_path: Path, lines: list[str]) -> Path:
    """A `--host-root` whose PID 1 mount table is `lines` (and an empty swap list)."""
    root = tmp_path / "host"
    (root / "proc/1").mkdir(parents=True, exist_ok=True)
    (root / "proc/1/mountinfo").write_text("".join(line + "\n" for line in lines))
    (root / "proc/swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    return root


def host_view(root: Path, sysfs: Path = Path("/sys")) -> HostView:
    return HostView(mountinfo=root / "proc/1/mountinfo", swaps=root / "proc/swaps", sysfs=sysfs)


@contextmanager
def mounted(volumes: list[Path], tmp_path: Path) -> Iterator[list[Path]]:
    """Each of `volumes` with a real ext4 file system, mounted read-only (so that the kernel
    writes nothing to it either); yields the mount points."""
    with ExitStack() as stack:
        points = [
            stack.enter_context(mounted_ext4(volume, tmp_path / f"mnt-{index}", read_only=True))
            for index, volume in enumerate(volumes)
        ]
        yield points


def ab_target(first: Path, second: Path) -> str:
    return f"ab:{first},{second}"


# -- the inactive volume is written ------------------------------------------------------------


@pytest.mark.parametrize("active_index", [0, 1], ids=["A-active", "B-active"])
def test_the_volume_root_is_not_on_is_written(
    active_index: int, image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    active, inactive = volumes[active_index], volumes[1 - active_index]
    with mounted([active], tmp_path) as (point,):
        root = host_root(tmp_path, [presented_as(point, "/")])
        before = read_device(active, CHECKED)

        plain = stream(
            image.path, ab_target(*volumes), "--sha384", image.sha384, "--host-root", root
        )
        json_run = stream(
            image.path,
            ab_target(*volumes),
            "--sha384",
            image.sha384,
            "--host-root",
            root,
            "--progress",
            "json",
        )

        assert read_device(active, CHECKED) == before, "the active volume was written"
    assert plain.code == 0, plain.text
    assert f"Wrote {inactive}: verified" in plain.text
    assert json_run.code == 0, json_run.text
    assert json_run.result()["target"] == str(inactive)
    assert read_device(inactive, IMAGE_SIZE) == raw_data(IMAGE_SIZE, seed=11)


def test_usr_only_layout_the_volume_usr_is_not_on_is_written(
    image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = volumes
    with (
        small_tmpfs(tmp_path / "rootfs", "1m") as rootfs,
        mounted([b], tmp_path) as (usr,),
    ):
        root = host_root(tmp_path, [presented_as(rootfs, "/"), presented_as(usr, "/usr")])
        before = read_device(b, CHECKED)
        run = stream(image.path, ab_target(a, b), "--sha384", image.sha384, "--host-root", root)
        assert read_device(b, CHECKED) == before
    assert run.code == 0, run.text
    assert f"Wrote {a}: verified" in run.text
    assert read_device(a, IMAGE_SIZE) == raw_data(IMAGE_SIZE, seed=11)


def test_a_partition_of_the_volume_is_the_root(
    image: SampleImage, loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    """Volume A is a whole (loop) disk whose first partition holds the root: a real device on
    top of the volume, seen through sysfs as a partition of it."""
    disk = loop_device_factory(VOLUME_SIZE)
    other = loop_device_factory(VOLUME_SIZE)
    fill_pattern(other, VOLUME_SIZE)
    sfdisk = require_tool("sfdisk")
    subprocess.run([sfdisk, "--quiet", disk], input="label: gpt\n,8M\n", text=True, check=True)
    run_command([require_tool("partx"), "--add", disk])
    partition = Path(f"{disk}p1")
    try:
        with mounted([partition], tmp_path) as (point,):
            root = host_root(tmp_path, [presented_as(point, "/")])
            before = read_device(disk, CHECKED)
            run = stream(
                image.path, ab_target(disk, other), "--sha384", image.sha384, "--host-root", root
            )
            assert read_device(disk, CHECKED) == before
    finally:
        run_command([require_tool("partx"), "--delete", disk])
    assert run.code == 0, run.text
    assert f"Wrote {other}: verified" in run.text


# -- refusals: nothing is written ---------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["checked", "forced"])
def test_neither_volume_active_is_refused(
    force: bool, image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = volumes
    with (
        small_tmpfs(tmp_path / "rootfs", "1m") as rootfs,
        mounted([b], tmp_path) as (elsewhere,),
    ):
        root = host_root(tmp_path, [presented_as(rootfs, "/"), mountinfo_line(elsewhere)])
        before = [read_device(volume, CHECKED) for volume in volumes]
        run = stream(
            image.path,
            ab_target(a, b),
            "--sha384",
            image.sha384,
            "--host-root",
            root,
            "--progress",
            "json",
            *(["--force"] if force else []),
        )
        assert [read_device(volume, CHECKED) for volume in volumes] == before
    assert run.code == EXIT_TARGET, run.text
    result = run.result()
    assert result["reason"] == Reason.ACTIVE_VOLUME_UNKNOWN
    message = result["message"]
    assert "neither volume backs the running system" in message
    # What was seen, for each volume: its device number and its mounts (or none).
    number_a = os.stat(a).st_rdev
    assert f"{a} is {a.name} ({os.major(number_a)}:{os.minor(number_a)})" in message
    assert f"{a.name} ({os.major(number_a)}:{os.minor(number_a)}), with no partitions" in message
    assert f"mounted at {elsewhere} (as {b}, {os.major(os.stat(b).st_rdev)}:" in message
    assert "/ is tmpfs" in message


@pytest.mark.parametrize("force", [False, True], ids=["checked", "forced"])
def test_both_volumes_active_is_refused(
    force: bool, image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = volumes
    with mounted([a, b], tmp_path) as (point_a, point_b):
        root = host_root(tmp_path, [presented_as(point_a, "/"), presented_as(point_b, "/usr")])
        before = [read_device(volume, CHECKED) for volume in volumes]
        run = stream(
            image.path,
            ab_target(a, b),
            "--sha384",
            image.sha384,
            "--host-root",
            root,
            *(["--force"] if force else []),
        )
        assert [read_device(volume, CHECKED) for volume in volumes] == before
    assert run.code == EXIT_TARGET, run.text
    assert "error (ActiveVolumeUnknown)" in run.text
    assert "both volumes back the running system" in run.text
    assert f"mounted at / (as {a}" in run.text
    assert f"mounted at /usr (as {b}" in run.text


def test_an_unreadable_host_mount_table_is_refused(
    image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    before = [read_device(volume, CHECKED) for volume in volumes]
    run = stream(image.path, ab_target(*volumes), "--sha384", image.sha384, "--host-root", tmp_path)
    assert run.code == EXIT_TARGET, run.text
    assert "error (ActiveVolumeUnknown)" in run.text
    assert f"{tmp_path}/proc/1/mountinfo" in run.text
    assert [read_device(volume, CHECKED) for volume in volumes] == before


def test_two_names_of_one_device_are_no_pair(
    image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _ = volumes
    link = tmp_path / "by-partlabel-root-b"
    link.symlink_to(a)
    root = host_root(tmp_path, ["21 1 254:3 / / rw - ext4 /dev/vda3 rw"])
    before = read_device(a, CHECKED)
    run = stream(image.path, ab_target(a, link), "--sha384", image.sha384, "--host-root", root)
    assert run.code == EXIT_TARGET, run.text
    assert "error (TargetInvalid)" in run.text
    assert f"the A/B volumes {a} and {link} are the same device" in run.text
    assert read_device(a, CHECKED) == before


# -- stacked devices: dm-verity, LVM --------------------------------------------------------------


def sysfs_view(tmp_path: Path, volumes: tuple[Path, Path], stacks: dict[int, list[str]]) -> Path:
    """A sysfs tree as the kernel lays it out, for `volumes` and device-mapper devices on them.

    `stacks[i]` lists dm devices stacked on `volumes[i]`, bottom first (`dm-0` on the volume,
    `dm-1` on `dm-0`, ...); each gets the number 253:N and the name `dm/name`. As in the real
    sysfs, `dev/block/M:m` links to the device's directory and `holders/NAME` to the holder's.
    """
    sysfs = tmp_path / "sysfs"
    devices = sysfs / "devices/virtual/block"
    (sysfs / "dev/block").mkdir(parents=True)

    def add(name: str, number: str) -> Path:
        directory = devices / name
        (directory / "holders").mkdir(parents=True)
        (directory / "dev").write_text(number + "\n")
        (sysfs / "dev/block" / number).symlink_to(directory)
        return directory

    for volume in volumes:
        rdev = os.stat(volume).st_rdev
        add(volume.name, f"{os.major(rdev)}:{os.minor(rdev)}")
    minor = 0
    for index, names in stacks.items():
        below = devices / volumes[index].name
        for name in names:
            directory = add(f"dm-{minor}", f"253:{minor}")
            (directory / "dm").mkdir()
            (directory / "dm/name").write_text(name + "\n")
            (below / "holders" / f"dm-{minor}").symlink_to(directory)
            below = directory
            minor += 1
    return sysfs


@pytest.mark.parametrize("by", ["number", "mapper-name"])
def test_a_verity_root_on_lvm_on_a_volume_keeps_that_volume(
    by: str, image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    """Volume B carries an LVM volume (dm-0) carrying a dm-verity device (dm-1) that is `/`.

    `number`: the mount table names the device 253:1, as ext4 and erofs roots do; `mapper-name`:
    it shows an anonymous number (0:42, as btrfs does) and the source /dev/mapper/root.
    """
    a, b = volumes
    sysfs = sysfs_view(tmp_path, volumes, {1: ["vg-root", "root"]})
    number, source = ("253:1", "/dev/dm-1") if by == "number" else ("0:42", "/dev/mapper/root")
    root = host_root(tmp_path, [f"21 1 {number} / / ro,relatime shared:1 - ext4 {source} ro"])
    before = read_device(b, CHECKED)

    plan = ab.plan([ab.Volume(a, "A"), ab.Volume(b, "B")], host=host_view(root, sysfs))
    result = run_stream(StreamRequest(source=str(image.path), target=plan, sha384=image.sha384))

    assert plan.name == "A"
    assert result.target == a
    assert read_device(a, IMAGE_SIZE) == raw_data(IMAGE_SIZE, seed=11)
    assert read_device(b, CHECKED) == before


def test_a_held_volume_that_is_not_the_root_is_no_answer(
    volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    """An LVM device on A that is mounted at /srv: neither volume is the system."""
    a, b = volumes
    sysfs = sysfs_view(tmp_path, volumes, {0: ["data"]})
    root = host_root(
        tmp_path,
        [
            "21 1 254:3 / / rw - ext4 /dev/vda3 rw",
            "22 21 253:0 / /srv rw - ext4 /dev/mapper/data rw",
        ],
    )
    with pytest.raises(TargetError) as refused:
        ab.plan([ab.Volume(a, "A"), ab.Volume(b, "B")], host=host_view(root, sysfs))
    assert refused.value.reason == Reason.ACTIVE_VOLUME_UNKNOWN
    assert refused.value.exit_code == EXIT_TARGET
    message = refused.value.message
    assert (
        "with dm-0 (253:0) on top, mounted at /srv (as /dev/mapper/data, 253:0, through dm-0)"
        in message
    )
    assert "/ is /dev/vda3 (254:3)" in message


# -- the agent: instructions with both volumes, the host's /proc, a verdict naming the volume ------


def agent_instructions(
    image: SampleImage, volumes: tuple[Path, Path], host: Path
) -> AgentInstructions:
    return AgentInstructions(
        name="root",
        namespace="imagestream-system",
        uid="u",
        generation=1,
        source=str(image.path),
        sha384=image.sha384,
        target=str(volumes[0]),
        target_b=str(volumes[1]),
        target_kind="abUpdate",
        host_proc=str(host / "proc"),
        host_prefix="",
    )


def test_the_agent_writes_the_inactive_volume_and_names_both(
    image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = volumes
    with mounted([b], tmp_path) as (point,):
        root = host_root(tmp_path, [presented_as(point, "/")])
        before = read_device(b, CHECKED)
        run = run_agent(agent_instructions(image, volumes, root), threading.Event())
        assert read_device(b, CHECKED) == before
    assert (run.exit_code, run.result.outcome) == (0, "Succeeded"), run.result
    assert run.result.target == str(a)
    assert run.result.message == (
        f"wrote {a}, the inactive A/B volume ({b} runs the node): SHA-384 verified"
    )
    assert read_device(a, IMAGE_SIZE) == raw_data(IMAGE_SIZE, seed=11)


def test_the_agent_refuses_when_neither_volume_is_active(
    image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    root = host_root(tmp_path, ["21 1 254:3 / / rw - ext4 /dev/vda3 rw"])
    before = [read_device(volume, CHECKED) for volume in volumes]
    run = run_agent(agent_instructions(image, volumes, root), threading.Event())
    assert run.exit_code == EXIT_TARGET
    assert run.result.reason == Reason.ACTIVE_VOLUME_UNKNOWN
    assert run.result.target == ""  # no volume was chosen: the status names none
    assert "neither volume backs the running system" in run.result.message
    assert [read_device(volume, CHECKED) for volume in volumes] == before


def test_a_failed_agent_stream_names_the_volume_it_left_invalid(
    image: SampleImage, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = volumes
    with mounted([a], tmp_path) as (point,):
        root = host_root(tmp_path, [presented_as(point, "/")])
        before = read_device(a, CHECKED)
        wrong = replace(agent_instructions(image, volumes, root), sha384="0" * 96)
        run = run_agent(wrong, threading.Event())
        assert read_device(a, CHECKED) == before
    assert run.result.reason == Reason.HASH_MISMATCH
    assert run.result.target == str(b)
    assert read_device(b, MIB) == bytes(MIB), "the volume written must not look valid"
