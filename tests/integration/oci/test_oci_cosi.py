"""A whole-disk COSI image pulled from a real registry (docker-registry, pushed with oras).

The registry's sha256 digest of the layer covers the whole COSI file and is verified beside the
metadata's SHA-384 (the stream's expected hash) and every image's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.support.blockdev import loop_device
from tests.support.blockdev import run as run_command
from tests.support.cli import run_imagestream
from tests.support.cosi import build_cosi
from tests.support.oci_push import Layer, LiveRegistry
from tests.support.targets import read_device
from tests.support.tools import require_tool

pytestmark = pytest.mark.usefixtures("require_root")

COSI_LAYER = "application/vnd.imagestream.cosi"


def test_cosi_image_from_a_registry_onto_a_whole_disk(
    registry: LiveRegistry, tmp_path: Path
) -> None:
    image = build_cosi(tmp_path / "cosi")
    pushed = registry.pusher.push_artifact("os/disk", "v1", [Layer(image.path, COSI_LAYER)])
    with loop_device(image.disk_size, tmp_path) as disk:
        run = run_imagestream(
            "stream",
            registry.reference("os/disk", tag="v1"),
            f"disk:{disk}",
            "--sha384",
            image.metadata_sha384,
            "--progress",
            "json",
        )
        assert run.code == 0, run.stderr
        result = run.result()
        assert result["digest"] == pushed.layers[image.path.name].digest
        assert result["sha384"] == image.metadata_sha384
        assert result["partitions"] == len(image.partitions)
        table = json.loads(run_command([require_tool("sfdisk"), "--json", disk]))
        assert len(table["partitiontable"]["partitions"]) == len(image.partitions)
        assert "No problems found" in run_command([require_tool("sgdisk"), "-v", disk])
        for part in image.partitions:
            raw = part.raw.read_bytes()
            assert read_device(disk, len(raw), part.offset) == raw
