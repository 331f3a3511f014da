"""The A/B target's words: `ab:DEV_A,DEV_B` parsed, and refusals that need no device.

Choosing the volume on real devices is tested in tests/integration/test_ab_targets.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagestream.errors import TargetError, UsageError
from imagestream.pipeline.safety import HostView
from imagestream.reasons import Reason
from imagestream.targets import ab, target_from_argument
from imagestream.targets.parse import ab_volumes


def test_a_pair_is_two_volumes_named_as_written() -> None:
    volumes = ab_volumes("/dev/disk/by-partlabel/root-a,/dev/disk/by-partlabel/root-b")
    assert volumes == [
        ab.Volume(Path("/dev/disk/by-partlabel/root-a"), "/dev/disk/by-partlabel/root-a"),
        ab.Volume(Path("/dev/disk/by-partlabel/root-b"), "/dev/disk/by-partlabel/root-b"),
    ]


@pytest.mark.parametrize(
    ("pair", "words"),
    [
        ("/dev/a", "must name two volumes"),
        ("/dev/a,", "must name two volumes"),
        (",/dev/b", "must name two volumes"),
        ("/dev/a,/dev/b,/dev/c", "must name two volumes"),
        ("", "must name two volumes"),
        ("/dev/a,/dev/a", "names the same volume twice"),
        ("/dev/a,/dev/../dev/a", "names the same volume twice"),
    ],
)
def test_a_malformed_pair_is_a_usage_error(pair: str, words: str, tmp_path: Path) -> None:
    host = HostView(mountinfo=tmp_path / "missing")
    with pytest.raises(UsageError) as refused:
        target_from_argument(Path(f"ab:{pair}"), host=host)
    assert words in refused.value.message
    assert refused.value.exit_code == 2


def test_without_the_host_mount_table_no_volume_is_chosen(tmp_path: Path) -> None:
    """Read before anything else: an unreadable table is ActiveVolumeUnknown, not a guess."""
    host = HostView(mountinfo=tmp_path / "proc/1/mountinfo")
    with pytest.raises(TargetError) as refused:
        target_from_argument(Path("ab:/dev/a,/dev/b"), host=host, force=True)
    assert refused.value.reason == Reason.ACTIVE_VOLUME_UNKNOWN
    assert str(tmp_path / "proc/1/mountinfo") in refused.value.message
    assert refused.value.exit_code == 5


def test_a_missing_volume_is_not_found(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("21 1 254:3 / / rw - ext4 /dev/vda3 rw\n")
    missing = tmp_path / "no-such-volume"
    with pytest.raises(TargetError) as refused:
        ab.plan(
            [ab.Volume(missing, "/dev/root-a"), ab.Volume(missing, "/dev/root-b")],
            host=HostView(mountinfo=mountinfo),
        )
    assert refused.value.reason == Reason.TARGET_NOT_FOUND
    assert "A/B volume /dev/root-a does not exist" in refused.value.message


def test_a_volume_that_is_no_block_device_is_refused(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("")
    regular = tmp_path / "image"
    regular.write_bytes(b"")
    with pytest.raises(TargetError) as refused:
        ab.plan(
            [ab.Volume(regular, "a"), ab.Volume(regular, "b")], host=HostView(mountinfo=mountinfo)
        )
    assert refused.value.reason == Reason.TARGET_INVALID
    assert "A/B volume a is not a block device" in refused.value.message
