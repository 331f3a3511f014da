"""The CLI's progress displays: what each mode prints, how often, and how it ends."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path

import pytest
from rich.console import Console

from imagestream.errors import Cancelled, ImageStreamError, IntegrityError, SourceError
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamResult
from imagestream.pipeline.progress import Progress
from imagestream.progress_display import (
    SUCCEEDED,
    BarDisplay,
    JsonDisplay,
    Outcome,
    PlainDisplay,
    Tracker,
    format_bytes,
    format_duration,
    format_rate,
    log_handler,
    make_display,
    outcome_of,
    plain_line,
    render_rows,
    report_success,
    stream_header,
)
from imagestream.reasons import Reason
from imagestream.status_fields import progress_fields

MiB = 1 << 20
#: Any decimal unit: one unit system (binary) is used everywhere.
DECIMAL_UNITS = re.compile(r"\d (kB|KB|MB|GB|TB)\b")


def _progress(
    phase: str = "Running",
    fetched: int = 1 * MiB,
    *,
    total: int | None = 4 * MiB,
    written: int = 3 * MiB,
    output_total: int | None = 12 * MiB,
    rate: float = 2 * MiB,
    elapsed: float = 1.0,
    read_back: int | None = None,
) -> Progress:
    return Progress(
        phase=phase,
        bytes_fetched=fetched,
        bytes_total=total,
        bytes_written=written,
        bytes_per_second=rate,
        resumes=2,
        elapsed=elapsed,
        output_total=output_total,
        bytes_read_back=read_back,
    )


def _screen(display_rows: object) -> str:
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    console.print(display_rows)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def _tracked(*snapshots: Progress) -> Tracker:
    tracker = Tracker()
    for snapshot in snapshots:
        tracker.update(snapshot)
    return tracker


def test_units_are_binary_and_durations_hours_minutes_seconds() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(25 * MiB) == "25.0 MiB"
    assert format_bytes(3 << 30) == "3.0 GiB"
    assert format_rate(12.5 * MiB) == "12.5 MiB/s"
    assert format_duration(65.4) == "0:01:05"
    assert format_duration(3 * 3600 + 7) == "3:00:07"


def test_the_header_names_source_and_target_without_credentials() -> None:
    header = stream_header("https://user:secret@images.example/root.zst?token=t", Path("/dev/sdb"))
    assert header == "https://images.example/root.zst?<redacted> -> /dev/sdb"
    assert "secret" not in header


def test_the_bar_shows_percent_fetched_written_rate_eta_elapsed_and_resumes() -> None:
    screen = _screen(render_rows(_tracked(_progress()).rows()))
    assert "Streaming" in screen
    assert "25.0%" in screen
    assert "━" in screen
    assert "fetched 1.0 MiB of 4.0 MiB" in screen
    assert "written 3.0 MiB of 12.0 MiB" in screen
    # 3 MiB left at 2 MiB/s: two seconds (rounded from 1.5).
    assert "2.0 MiB/s · ETA 0:00:02 · elapsed 0:00:01 · resumes 2" in screen


def test_output_total_is_dropped_once_several_frames_wrote_past_the_first_frames_size() -> None:
    screen = _screen(render_rows(_tracked(_progress(written=13 * MiB)).rows()))
    assert "fetched 1.0 MiB of 4.0 MiB · written 13.0 MiB\n" in screen
    assert "of 12.0 MiB" not in screen


def test_one_unit_system_in_the_bar_the_plain_lines_and_the_summary() -> None:
    tracker = _tracked(_progress(), _progress("Succeeded", 4 * MiB, elapsed=2.0))
    bar = _screen(render_rows(tracker.rows(SUCCEEDED)))
    plain = "\n".join(plain_line(row) for row in tracker.rows(SUCCEEDED))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdout", out)
        report_success(
            StreamResult(
                target=Path("/tmp/t.img"),
                sha384="0" * 96,
                verified=True,
                compression=Compression.ZSTD,
                bytes_fetched=4 * MiB,
                bytes_written=12 * MiB,
                resumes=2,
                seconds=2.0,
                read_back_verified=False,
            ),
            "plain",
            Console(file=io.StringIO()),
        )
    summary = out.getvalue()
    for text in (bar, plain, summary):
        assert "MiB/s" in text
        assert not DECIMAL_UNITS.search(text), text
    assert "6.0 MiB/s written" in summary


def test_a_finished_stream_shows_its_average_rate_never_zero() -> None:
    # The window rate of a stream that ended seconds ago decays to 0: that is not its speed.
    tracker = _tracked(
        _progress(fetched=2 * MiB, elapsed=1.0),
        _progress("Verifying", 4 * MiB, rate=0.0, elapsed=2.0),
        _progress("Succeeded", 4 * MiB, rate=0.0, elapsed=5.0),
    )
    lines = [plain_line(row) for row in tracker.rows(SUCCEEDED)]
    assert lines == [
        "Succeeded: 100.0% fetched 4.0 MiB of 4.0 MiB, written 3.0 MiB of 12.0 MiB, "
        "2.0 MiB/s average, elapsed 0:00:05, resumes 2"
    ]


def test_plain_lines_omit_an_unknown_rate_rather_than_print_zero() -> None:
    lines = [plain_line(row) for row in _tracked(_progress(rate=0.0)).rows()]
    assert lines == [
        "Streaming: 25.0% fetched 1.0 MiB of 4.0 MiB, written 3.0 MiB of 12.0 MiB, "
        "elapsed 0:00:01, resumes 2"
    ]
    assert not any("0 B/s" in line for line in lines)


def test_unknown_totals_show_a_spinner_with_bytes_and_rate_not_a_bar() -> None:
    tracker = _tracked(_progress(total=None, output_total=None))
    rows = tracker.rows()
    assert [row.fraction for row in rows] == [None]
    screen = _screen(render_rows(rows))
    assert "━" not in screen
    assert "%" not in screen
    assert re.search("[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]", screen)
    assert re.search("^Streaming [⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] fetched 1.0 MiB · written 3.0 MiB$", screen, re.M)
    assert "\n  2.0 MiB/s · elapsed 0:00:01 · resumes 2\n" in screen
    final = _screen(render_rows(tracker.rows(SUCCEEDED)))
    assert not re.search("[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]", final)
    assert final.startswith("Succeeded fetched 1.0 MiB · written 3.0 MiB\n")


def test_the_read_back_has_its_own_bar_with_bytes_read_back_of_total() -> None:
    tracker = _tracked(
        _progress(fetched=4 * MiB, elapsed=1.0),
        _progress("Verifying", 4 * MiB, written=12 * MiB, elapsed=2.0, read_back=0),
        _progress("Verifying", 4 * MiB, written=12 * MiB, elapsed=3.0, read_back=3 * MiB),
    )
    screen = _screen(render_rows(tracker.rows()))
    assert [row.label for row in tracker.rows()] == ["Streamed", "Verifying"]
    assert "read back 3.0 MiB of 12.0 MiB · 3.0 MiB/s · ETA 0:00:03" in screen
    assert "25.0%" in screen
    tracker.update(
        _progress("Succeeded", 4 * MiB, written=12 * MiB, elapsed=6.0, read_back=12 * MiB)
    )
    lines = [plain_line(row) for row in tracker.rows(SUCCEEDED)]
    assert lines[0].startswith("Succeeded: 100.0%")
    assert lines[1] == "Read back: 100.0% read back 12.0 MiB of 12.0 MiB, 3.0 MiB/s average"


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (None, "Succeeded"),
        (IntegrityError("mismatch", reason=Reason.HASH_MISMATCH), "Failed (HashMismatch)"),
        (SourceError("gone"), f"Failed ({Reason.SOURCE_UNAVAILABLE})"),
        (Cancelled("cancelled"), "Cancelled"),
        (KeyboardInterrupt(), "Cancelled"),
        (RuntimeError("bug"), f"Failed ({Reason.INTERNAL_ERROR})"),
    ],
)
def test_the_outcome_comes_from_what_ended_the_stream(
    exc: BaseException | None, label: str
) -> None:
    assert outcome_of(exc).label == label


def _bar_screen(exc: ImageStreamError | None) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    display = BarDisplay(console, "src -> dst")
    with contextlib.suppress(ImageStreamError), display:
        display.update(_progress())
        if exc is not None:
            raise exc
        display.update(_progress("Succeeded", 4 * MiB))
    return out.getvalue()


@pytest.mark.parametrize(
    ("exc", "last"),
    [
        (None, "Succeeded"),
        (IntegrityError("mismatch", reason=Reason.HASH_MISMATCH), "Failed (HashMismatch)"),
        (Cancelled("cancelled"), "Cancelled"),
    ],
)
def test_the_bar_ends_on_the_outcome_never_on_running(
    exc: ImageStreamError | None, last: str
) -> None:
    screen = _bar_screen(exc)
    assert screen.startswith("src -> dst\n")
    # The last frame rich drew: after its final cursor movement.
    final = re.split(r"\x1b\[[0-9;]*[A-Za-z]", screen.rstrip())[-4:]
    tail = "".join(final)
    assert tail.lstrip("\r\n").startswith(last), tail
    assert "Streaming" not in tail


def test_plain_lines_are_throttled_but_phase_changes_always_show() -> None:
    out = io.StringIO()
    display = PlainDisplay(out)
    for _ in range(50):
        display.update(_progress())
    display.update(_progress("Verifying", 4 * MiB))
    display.update(_progress("Succeeded", 4 * MiB))
    display.finish(SUCCEEDED)  # already said: not repeated
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Streaming", "Verifying", "Succeeded"]
    assert "25.0%" in lines[0]
    assert "resumes 2" in lines[0]


def test_plain_lines_end_on_a_failure_and_start_with_the_header() -> None:
    out = io.StringIO()
    with contextlib.suppress(IntegrityError), PlainDisplay(out, "src -> dst") as display:
        display.update(_progress())
        raise IntegrityError("mismatch", reason=Reason.HASH_MISMATCH)
    lines = out.getvalue().splitlines()
    assert lines[0] == "src -> dst"
    assert lines[-1].startswith("Failed (HashMismatch): 25.0% fetched 1.0 MiB of 4.0 MiB")
    assert all(line == line.rstrip() for line in lines)


def test_a_failure_before_any_progress_is_one_word_line() -> None:
    out = io.StringIO()
    PlainDisplay(out).finish(Outcome("Failed", Reason.SOURCE_UNAVAILABLE))
    assert out.getvalue() == f"Failed ({Reason.SOURCE_UNAVAILABLE})\n"


def test_json_lines_carry_the_status_fields() -> None:
    out = io.StringIO()
    display = JsonDisplay(out)
    display.update(_progress())
    display.update(_progress())  # within the second: dropped
    display.update(_progress("Succeeded", 4 * MiB))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["phase"] for r in records] == ["Running", "Succeeded"]
    assert records[0] == {"event": "progress", **progress_fields(_progress())}
    assert records[0]["bytesTotal"] == 4 * MiB
    assert records[0]["resumes"] == 2


def test_log_lines_off_a_terminal_are_neither_wrapped_nor_padded() -> None:
    out = io.StringIO()
    console = Console(file=out, width=40)  # not a terminal
    handler = log_handler(console)
    stream = io.StringIO()
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    message = "connection reset by peer; resuming at byte 6639246 in 0.2s (attempt 1 of 8)"
    handler.handle(logging.makeLogRecord({"msg": message, "levelno": 30, "levelname": "WARNING"}))
    assert stream.getvalue() == f"WARNING: {message}\n"


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


def test_a_narrow_terminal_wraps_the_details_rather_than_cut_them() -> None:
    # The CLI's console soft-wraps (printed lines stay whole); the bar's details must still fit.
    console = Console(file=io.StringIO(), width=40, record=True, soft_wrap=True)
    console.print(render_rows(_tracked(_progress()).rows()))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 40 for line in lines)
    assert "elapsed 0:00:01 · resumes 2" in " ".join(line.strip() for line in lines)
