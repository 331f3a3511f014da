"""Safety checks before the first write, against real loop devices and a faked host view.

The device is real (a loop device, so `stat` gives a real major:minor); what the host says
about it — mount table, swap list, sysfs holders and partitions — comes from files under
`tmp_path`, so each refusal can be provoked without mounting, swapping or stacking anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.blockdev import LoopDeviceFactory, mounted_ext4

from imagestream.errors import TargetError
from imagestream.pipeline.safety import HostView, check_block_device, device_number

MiB = 1 << 20
_SWAPS_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"

# A realistic table: root, proc, a bind mount with optional fields, a tmpfs.
_BASE_MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
24 22 0:6 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=1024k,mode=755
25 22 0:23 / /run rw,nosuid,nodev shared:6 master:3 - tmpfs tmpfs rw,size=800k
26 22 254:1 /srv/data /srv/bind rw,relatime shared:1 - ext4 /dev/vda1 rw
"""


def _mount_line(number: str, mount_point: str, source: str, fs_type: str = "ext4") -> str:
    return f"99 22 {number} / {mount_point} rw,relatime shared:42 - {fs_type} {source} rw\n"


def _host(tmp_path: Path, mountinfo: str = _BASE_MOUNTINFO, swaps: str | None = None) -> HostView:
    host_dir = tmp_path / "host"
    host_dir.mkdir(exist_ok=True)
    (host_dir / "mountinfo").write_text(mountinfo, encoding="utf-8")
    swaps_file = host_dir / "swaps"
    swaps_file.write_text(_SWAPS_HEADER if swaps is None else swaps, encoding="utf-8")
    return HostView(mountinfo=host_dir / "mountinfo", swaps=swaps_file, sysfs=Path("/sys"))


def _check(dev: Path, host: HostView) -> None:
    """The checks for `dev`, by its device number, as the sink runs them on what it opened."""
    check_block_device(device_number(dev), str(dev), host)


def _number(dev: Path) -> str:
    major, minor = device_number(dev)
    return f"{major}:{minor}"


@pytest.fixture
def dev(loop_device_factory: LoopDeviceFactory) -> Path:
    return loop_device_factory(4 * MiB)


# -- mount table ------------------------------------------------------------------------------


def test_unmounted_device_passes_with_fake_and_real_tables(dev: Path, tmp_path: Path) -> None:
    major, minor = device_number(dev)
    # Another loop device's minor and a source that merely looks similar must not match.
    neighbour = _mount_line(f"{major}:{minor + 100}", "/mnt/other", f"{dev}0")
    _check(dev, _host(tmp_path, _BASE_MOUNTINFO + neighbour))
    _check(dev, HostView())  # the real host: the fresh loop device is unused


def test_mounted_by_device_number(dev: Path, tmp_path: Path) -> None:
    table = _BASE_MOUNTINFO + _mount_line(_number(dev), "/var/lib/images", "/dev/gone")
    with pytest.raises(TargetError) as excinfo:
        _check(dev, _host(tmp_path, table))
    assert excinfo.value.reason == "TargetMounted"
    assert excinfo.value.exit_code == 5
    assert "/var/lib/images" in excinfo.value.message
    assert str(dev) in excinfo.value.message


def test_mounted_by_source_path(dev: Path, tmp_path: Path) -> None:
    # btrfs and overlay-like mounts show an anonymous 0:N number; only the source names the
    # device, possibly through a symlink (/dev/disk/by-*, /dev/mapper/*).
    link = tmp_path / "by-label-root"
    link.symlink_to(dev)
    for source in (str(dev), str(link)):
        table = _BASE_MOUNTINFO + _mount_line("0:77", "/data", source, fs_type="btrfs")
        with pytest.raises(TargetError, match="mounted at /data") as excinfo:
            _check(dev, _host(tmp_path, table))
        assert excinfo.value.reason == "TargetMounted"


def test_device_named_through_a_symlink_is_still_checked(dev: Path, tmp_path: Path) -> None:
    link = tmp_path / "part-root-b"
    link.symlink_to(dev)
    table = _BASE_MOUNTINFO + _mount_line(_number(dev), "/boot", str(dev))
    with pytest.raises(TargetError, match="/boot"):
        _check(link, _host(tmp_path, table))


@pytest.mark.parametrize(
    ("escaped", "mount_point"),
    [
        # The kernel escapes space, tab, newline and backslash as octal in mountinfo.
        (r"/mnt/my\040disk\011tab\012nl\134back", "/mnt/my disk\ttab\nnl\\back"),
        (r"/mnt/données\040système", "/mnt/données système"),
    ],
    ids=["space-tab-newline-backslash", "non-ascii-with-escaped-space"],
)
def test_escaped_mount_point_is_unescaped_in_the_message(
    dev: Path, tmp_path: Path, escaped: str, mount_point: str
) -> None:
    table = _BASE_MOUNTINFO + _mount_line(_number(dev), escaped, str(dev))
    with pytest.raises(TargetError) as excinfo:
        _check(dev, _host(tmp_path, table))
    assert mount_point in excinfo.value.message


def test_unreadable_mount_table_refuses(dev: Path, tmp_path: Path) -> None:
    host = HostView(mountinfo=tmp_path / "absent", swaps=tmp_path / "absent", sysfs=Path("/sys"))
    with pytest.raises(TargetError) as excinfo:
        _check(dev, host)
    assert excinfo.value.reason == "TargetCheckFailed"
    assert "--force" in excinfo.value.message


def test_host_root_view_reads_pid1_mountinfo(dev: Path, tmp_path: Path) -> None:
    root = tmp_path / "host-root"
    (root / "proc/1").mkdir(parents=True)
    (root / "proc/1/mountinfo").write_text(
        _BASE_MOUNTINFO + _mount_line(_number(dev), "/host/var/data", str(dev)), encoding="utf-8"
    )
    host = HostView.from_host_root(root)
    assert host.mountinfo == root / "proc/1/mountinfo"
    with pytest.raises(TargetError, match="/host/var/data") as excinfo:
        _check(dev, host)
    assert excinfo.value.reason == "TargetMounted"


def test_real_mount_is_refused(dev: Path, tmp_path: Path) -> None:
    with mounted_ext4(dev, tmp_path / "mnt") as mount_point:
        with pytest.raises(TargetError) as excinfo:
            _check(dev, HostView())
        assert excinfo.value.reason == "TargetMounted"
        assert str(mount_point.resolve()) in excinfo.value.message


# -- swap -------------------------------------------------------------------------------------


def test_swap_device_is_refused(dev: Path, tmp_path: Path) -> None:
    swaps = _SWAPS_HEADER + f"{dev}                               partition\t4092\t\t0\t\t-2\n"
    with pytest.raises(TargetError) as excinfo:
        _check(dev, _host(tmp_path, swaps=swaps))
    assert excinfo.value.reason == "TargetInUse"
    assert "swap" in excinfo.value.message


def test_other_swaps_pass(dev: Path, tmp_path: Path) -> None:
    swapfile = tmp_path / "swapfile"
    swapfile.write_bytes(b"\0" * 4096)
    swaps = (
        _SWAPS_HEADER
        + f"{swapfile}                     file\t\t4\t\t0\t\t-2\n"
        + "/dev/zram0                              partition\t4092\t\t0\t\t100\n"
    )
    _check(dev, _host(tmp_path, swaps=swaps))
    _check(dev, _host(tmp_path, swaps=_SWAPS_HEADER))  # header only: no swap


@pytest.mark.parametrize("unreadable", ["missing", "directory"])
def test_unreadable_swap_list_refuses(unreadable: str, dev: Path, tmp_path: Path) -> None:
    host = _host(tmp_path)
    host.swaps.unlink()
    if unreadable == "directory":
        host.swaps.mkdir()
    with pytest.raises(TargetError) as excinfo:
        _check(dev, host)
    assert excinfo.value.reason == "TargetCheckFailed"
    assert str(host.swaps) in excinfo.value.message


# -- sysfs: holders and partitions ------------------------------------------------------------


def _fake_sysfs(tmp_path: Path, dev: Path) -> tuple[HostView, Path]:
    sysfs = tmp_path / "sys"
    node = sysfs / "dev/block" / _number(dev)
    (node / "holders").mkdir(parents=True)
    base = _host(tmp_path)
    host = HostView(mountinfo=base.mountinfo, swaps=base.swaps, sysfs=sysfs)
    return host, node


def test_holders_refuse(dev: Path, tmp_path: Path) -> None:
    host, node = _fake_sysfs(tmp_path, dev)
    _check(dev, host)  # an empty holders directory is fine
    (node / "holders/dm-3").mkdir()
    (node / "holders/md127").mkdir()
    with pytest.raises(TargetError) as excinfo:
        _check(dev, host)
    assert excinfo.value.reason == "TargetInUse"
    assert "dm-3, md127" in excinfo.value.message


def _fake_partition(sysfs: Path, node: Path, dev: Path, number: str) -> Path:
    part = node / f"{dev.name}p1"
    part.mkdir()
    (part / "partition").write_text("1\n")
    (part / "dev").write_text(f"{number}\n")
    (sysfs / "dev/block" / number / "holders").mkdir(parents=True)
    # Something that is not a partition (queue/, holders/ ...) is ignored even with a dev file.
    (node / "queue").mkdir()
    (node / "queue/dev").write_text("1:1\n")
    return sysfs / "dev/block" / number


def test_whole_disk_with_a_mounted_partition_is_refused(dev: Path, tmp_path: Path) -> None:
    host, node = _fake_sysfs(tmp_path, dev)
    _fake_partition(host.sysfs, node, dev, "259:7")
    _check(dev, host)  # the partition is not used yet
    table = _BASE_MOUNTINFO + _mount_line("259:7", "/var/lib/containerd", "/dev/vdb1")
    host_mounted = HostView(
        mountinfo=_host(tmp_path, table).mountinfo, swaps=host.swaps, sysfs=host.sysfs
    )
    with pytest.raises(TargetError, match="/var/lib/containerd") as excinfo:
        _check(dev, host_mounted)
    assert excinfo.value.reason == "TargetMounted"
    # ... but "1:1" (the non-partition child's dev) mounted is not ours.
    table = _BASE_MOUNTINFO + _mount_line("1:1", "/ramdisk", "/dev/ram1")
    _check(dev, HostView(_host(tmp_path, table).mountinfo, host.swaps, host.sysfs))


def test_whole_disk_with_a_held_partition_is_refused(dev: Path, tmp_path: Path) -> None:
    host, node = _fake_sysfs(tmp_path, dev)
    part = _fake_partition(host.sysfs, node, dev, "259:8")
    (part / "holders/dm-0").mkdir()
    with pytest.raises(TargetError, match="dm-0") as excinfo:
        _check(dev, host)
    assert excinfo.value.reason == "TargetInUse"
