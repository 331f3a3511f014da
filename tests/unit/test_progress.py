"""What the pipeline tells a progress consumer: the declared output size and the read-back."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.targets import file_plan

from imagestream.demo.image import write_raw_image, write_sample_image
from imagestream.pipeline.pipeline import StreamRequest, run_stream
from imagestream.pipeline.progress import Progress

MIB = 1 << 20


def _stream(source: Path, target: Path, sha384: str, *, verify: bool) -> list[Progress]:
    seen: list[Progress] = []
    run_stream(
        StreamRequest(
            source=str(source),
            target=file_plan(target),
            sha384=sha384,
            verify_after_write=verify,
        ),
        seen.append,
    )
    return seen


def test_the_read_back_reports_its_start_and_its_end(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "image.zst", 24 * MIB, seed=5)
    seen = _stream(image.path, tmp_path / "out.img", image.sha384, verify=True)
    read_back = [p.bytes_read_back for p in seen if p.bytes_read_back is not None]
    assert read_back[0] == 0  # the second bar appears as the read-back starts
    assert read_back == sorted(read_back)
    assert seen[-1].phase == "Succeeded"
    assert seen[-1].bytes_read_back == seen[-1].bytes_written == 24 * MIB
    assert all(p.bytes_read_back is None for p in seen if p.phase == "Running")


def test_without_read_back_there_is_no_read_back_progress(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "image.zst", 4 * MIB, seed=5)
    seen = _stream(image.path, tmp_path / "out.img", image.sha384, verify=False)
    assert all(p.bytes_read_back is None for p in seen)


@pytest.mark.parametrize("frames", [1, 3])
def test_the_output_total_is_the_first_zstd_frames_declared_size(
    tmp_path: Path, frames: int
) -> None:
    image = write_sample_image(tmp_path / "image.zst", 12 * MIB, seed=5, frames=frames)
    seen = _stream(image.path, tmp_path / "out.img", image.sha384, verify=False)
    # Several frames: only the first one's size is known up front (the display drops it once
    # the output grows past it).
    assert seen[-1].output_total == 12 * MIB // frames


def test_uncompressed_data_declares_the_source_size_as_output(tmp_path: Path) -> None:
    image = write_raw_image(tmp_path / "image.raw", 3 * MIB, seed=5)
    seen = _stream(image.path, tmp_path / "out.img", image.sha384, verify=False)
    assert seen[-1].output_total == 3 * MIB


def test_without_a_content_size_the_output_total_is_unknown(tmp_path: Path) -> None:
    image = write_sample_image(tmp_path / "image.zst", 2 * MIB, seed=5, content_size=False)
    seen = _stream(image.path, tmp_path / "out.img", image.sha384, verify=False)
    assert {p.output_total for p in seen} == {None}
