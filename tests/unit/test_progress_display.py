"""The CLI's progress displays: what each mode prints, and how often."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from imagestream.pipeline.progress import Progress
from imagestream.progress_display import (
    BarDisplay,
    JsonDisplay,
    PlainDisplay,
    make_display,
)
from imagestream.status_fields import progress_fields


def _progress(phase: str = "Running", fetched: int = 1 << 20) -> Progress:
    return Progress(
        phase=phase,
        bytes_fetched=fetched,
        bytes_total=4 << 20,
        bytes_written=3 << 20,
        bytes_per_second=2e6,
        resumes=2,
        elapsed=1.0,
    )


def test_plain_lines_are_throttled_but_phase_changes_always_show() -> None:
    out = io.StringIO()
    display = PlainDisplay(out)
    for _ in range(50):
        display.update(_progress())
    display.update(_progress("Verifying", 4 << 20))
    display.update(_progress("Succeeded", 4 << 20))
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Running", "Verifying", "Succeeded"]
    assert "25.0%" in lines[0]
    assert "resumes 2" in lines[0]


def test_json_lines_carry_the_status_fields() -> None:
    out = io.StringIO()
    display = JsonDisplay(out)
    display.update(_progress())
    display.update(_progress())  # within the second: dropped
    display.update(_progress("Succeeded", 4 << 20))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["phase"] for r in records] == ["Running", "Succeeded"]
    assert records[0] == {"event": "progress", **progress_fields(_progress())}
    assert records[0]["bytesTotal"] == 4 << 20
    assert records[0]["resumes"] == 2


def test_bar_renders_phase_bytes_and_resumes() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with BarDisplay(console) as display:
        display.update(_progress())
        display.update(_progress("Succeeded", 4 << 20))
    screen = out.getvalue()
    assert "Succeeded" in screen
    assert "4.0/4.0 MiB" in screen
    assert "resumes 2" in screen


@pytest.mark.parametrize(
    ("mode", "terminal", "kind"),
    [
        ("auto", True, BarDisplay),
        ("auto", False, PlainDisplay),
        ("plain", True, PlainDisplay),
        ("json", True, JsonDisplay),
        ("bar", False, BarDisplay),
    ],
)
def test_make_display_picks_by_mode_and_terminal(
    mode: str, terminal: bool, kind: type[object]
) -> None:
    console = Console(file=io.StringIO(), force_terminal=terminal)
    assert isinstance(make_display(mode, console), kind)
