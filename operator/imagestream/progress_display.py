"""How the CLI shows progress: a rich bar on a terminal, plain lines in logs, or JSON lines.

Sizes and rates are binary units (KiB, MiB, GiB) everywhere: in the bar, in the plain lines and in
the summary, as disk and partition sizes are given. Every display ends on the outcome, drawn when
the stream's `with` block is left: Succeeded, Failed (reason) or Cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from imagestream.errors import Cancelled, ImageStreamError
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamResult, VerificationFailed
from imagestream.pipeline.progress import Progress, ProgressCallback, RateMeter
from imagestream.pipeline.redact import redact_url
from imagestream.reasons import Reason
from imagestream.status_fields import progress_fields

_PLAIN_INTERVAL = 2.0
_BAR_REFRESH_PER_SECOND = 10
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_OUTCOME_STYLES = {"Succeeded": "bold green", "Failed": "bold red", "Cancelled": "bold yellow"}


# -- units and words ---------------------------------------------------------------------------


def format_bytes(count: float) -> str:
    """A byte count in binary units: "512 B", "1.5 KiB", "23.0 MiB"."""
    if count < 1024:
        return f"{count:.0f} B"
    value = float(count)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def format_rate(per_second: float) -> str:
    """A rate in the units of `format_bytes`: "12.3 MiB/s"."""
    return f"{format_bytes(per_second)}/s"


def format_duration(seconds: float) -> str:
    """Hours, minutes and seconds: "0:01:05"."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def stream_header(source: str, target: str | os.PathLike[str]) -> str:
    """The line shown before a stream starts: "SOURCE -> TARGET", credentials left out."""
    return f"{redact_url(source)} -> {os.fspath(target)}"


@dataclass(frozen=True)
class Outcome:
    """How the stream ended, as the display's last state shows it."""

    phase: str
    reason: str | None = None

    @property
    def label(self) -> str:
        """The outcome as the display names it: Succeeded, Cancelled or Failed (REASON)."""
        return f"{self.phase} ({self.reason})" if self.reason else self.phase


SUCCEEDED = Outcome("Succeeded")


def outcome_of(exc: BaseException | None) -> Outcome:
    """The outcome a stream that raised `exc` (None: returned) ended with."""
    if exc is None:
        return SUCCEEDED
    if isinstance(exc, Cancelled | KeyboardInterrupt):
        return Outcome("Cancelled")
    if isinstance(exc, ImageStreamError):
        return Outcome("Failed", exc.reason)
    return Outcome("Failed", Reason.INTERNAL_ERROR)


# -- what is shown: rows decided from snapshots, rendered by each display ---------------------


@dataclass(frozen=True)
class Row:
    """One bar: its label, how far it got (None: the total is unknown) and its details."""

    label: str
    fraction: float | None
    details: tuple[str, ...]
    active: bool
    style: str = "bold"

    def percent(self) -> str:
        """The share done, as 37.5%; empty while the total is unknown."""
        return "" if self.fraction is None else f"{self.fraction * 100:.1f}%"


class Tracker:
    """Turns the pipeline's snapshots into rows: remembers when the streaming and the read-back
    ran, so a finished stage shows its average rate rather than a window rate decaying to 0."""

    def __init__(self) -> None:
        self.latest: Progress | None = None
        self._stream_end: float | None = None
        self._read_back_start: float | None = None
        self._read_back_rate = RateMeter()
        self._read_back_now = 0.0

    def update(self, progress: Progress) -> None:
        """Record a snapshot."""
        self.latest = progress
        if progress.phase != "Running" and self._stream_end is None:
            self._stream_end = progress.elapsed
        if progress.bytes_read_back is not None:
            if self._read_back_start is None:
                self._read_back_start = progress.elapsed
            self._read_back_now = self._read_back_rate.update(
                progress.elapsed, progress.bytes_read_back
            )

    def rows(self, outcome: Outcome | None = None) -> list[Row]:
        """The stream's row, then the read-back's once it began; `outcome` once it ended."""
        progress = self.latest
        if progress is None:
            return [Row(outcome.label if outcome else "Starting", None, (), outcome is None)]
        read_back = progress.bytes_read_back
        streaming = outcome is None and progress.phase == "Running"
        rows = [self._stream_row(progress, outcome, streaming)]
        if read_back is not None:
            rows.append(self._read_back_row(progress, read_back, outcome))
        return rows

    def _stream_row(self, progress: Progress, outcome: Outcome | None, streaming: bool) -> Row:
        if outcome is not None:
            label, style = outcome.label, _OUTCOME_STYLES.get(outcome.phase, "bold")
        elif progress.phase == "Running":
            label, style = "Streaming", "bold"
        elif progress.phase == "Verifying":
            label = "Streamed" if progress.bytes_read_back is not None else "Verifying"
            style = "bold"
        else:
            label, style = progress.phase, _OUTCOME_STYLES.get(progress.phase, "bold")
        total, fetched = progress.bytes_total, progress.bytes_fetched
        sizes = f"fetched {_of(fetched, total)}"
        output_total = progress.output_total
        if output_total is not None and progress.bytes_written > output_total:
            output_total = None  # several zstd frames: the first one declared only its own size
        sizes += f" · written {_of(progress.bytes_written, output_total)}"
        if progress.partitions is not None:
            # A COSI image: which of its partition images is being written.
            sizes += f" · partition {progress.partition or 0} of {progress.partitions}"
        timing: list[str] = []
        if streaming:
            rate = progress.bytes_per_second
            if rate > 0:
                timing.append(format_rate(rate))
                if total:
                    timing.append(f"ETA {format_duration(max(0, total - fetched) / rate)}")
        else:
            seconds = self._stream_end if self._stream_end is not None else progress.elapsed
            if fetched and seconds > 0:
                timing.append(f"{format_rate(fetched / seconds)} average")
        timing.append(f"elapsed {format_duration(progress.elapsed)}")
        timing.append(f"resumes {progress.resumes}")
        return Row(label, progress.fraction, (sizes, " · ".join(timing)), streaming, style)

    def _read_back_row(self, progress: Progress, done: int, outcome: Outcome | None) -> Row:
        total = progress.bytes_written
        active = outcome is None and progress.phase == "Verifying"
        details = [f"read back {_of(done, total)}"]
        if active:
            if self._read_back_now > 0:
                details.append(format_rate(self._read_back_now))
                details.append(f"ETA {format_duration(max(0, total - done) / self._read_back_now)}")
        elif self._read_back_start is not None:
            seconds = progress.elapsed - self._read_back_start
            if done and seconds > 0:
                details.append(f"{format_rate(done / seconds)} average")
        fraction = min(1.0, done / total) if total else 1.0
        return Row("Verifying" if active else "Read back", fraction, (" · ".join(details),), active)


def _of(count: int, total: int | None) -> str:
    return f"{format_bytes(count)} of {format_bytes(total)}" if total else format_bytes(count)


# -- the displays ------------------------------------------------------------------------------


class ProgressDisplay(AbstractContextManager["ProgressDisplay"]):
    """Base: a callback for the pipeline plus setup and teardown of the display.

    Leaving the `with` block draws the outcome: the exception that left it, or success.
    """

    def __init__(self, header: str | None = None) -> None:
        self.header = header
        self.tracker = Tracker()

    def __enter__(self) -> ProgressDisplay:
        if self.header is not None:
            self.show_header(self.header)
        return self

    def show_header(self, header: str) -> None:
        """Show the "SOURCE -> TARGET" line (line-based displays: nothing)."""

    def update(self, progress: Progress) -> None:
        """Show a snapshot; called about ten times a second."""
        self.tracker.update(progress)

    def finish(self, outcome: Outcome) -> None:
        """Draw the outcome and tear the display down."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.finish(outcome_of(exc))


class BarDisplay(ProgressDisplay):
    """A rich progress bar on stderr: a spinner instead of a bar while the total is unknown."""

    def __init__(self, console: Console, header: str | None = None) -> None:
        super().__init__(header)
        self._console = console
        self._live = Live(
            render_rows(self.tracker.rows()),
            console=console,
            auto_refresh=True,
            refresh_per_second=_BAR_REFRESH_PER_SECOND,
            transient=False,
        )

    def __enter__(self) -> BarDisplay:
        super().__enter__()
        self._live.start()
        return self

    def show_header(self, header: str) -> None:
        """Print the header above the bar."""
        self._console.print(Text(header, style="bold"), highlight=False)

    def update(self, progress: Progress) -> None:
        """Move the bar."""
        super().update(progress)
        self._live.update(render_rows(self.tracker.rows()))

    def finish(self, outcome: Outcome) -> None:
        """Draw the outcome and stop redrawing, leaving it on screen."""
        self._live.update(render_rows(self.tracker.rows(outcome)), refresh=True)
        self._live.stop()


def render_rows(rows: Sequence[Row]) -> RenderableType:
    """The bar's screen: per row, its label, bar and percent, then its details below."""
    width = max(len(row.label) for row in rows)
    parts: list[RenderableType] = []
    for row in rows:
        label = Text(row.label.ljust(width), style=row.style)
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(no_wrap=True)
        details = list(row.details)
        if row.fraction is None:
            # No total (a pipe): no bar to fill; a spinner while it runs, then the sizes.
            cells: list[RenderableType] = [label]
            if row.active:
                grid.add_column(no_wrap=True)
                cells.append(Spinner("dots"))
            grid.add_column(ratio=1)
            cells.append(_wrapping(details.pop(0) if details else ""))
            grid.add_row(*cells)
        else:
            grid.add_column(ratio=1)
            grid.add_column(no_wrap=True, justify="right", width=6)
            grid.add_row(label, ProgressBar(total=1.0, completed=row.fraction), Text(row.percent()))
        parts.append(grid)
        parts.extend(_wrapping(f"  {detail}") for detail in details)
    return Group(*parts)


def _wrapping(text: str) -> Text:
    # Details wrap on a narrow terminal rather than lose their end (elapsed, resumes), even on
    # the CLI's soft-wrapping console (which leaves printed lines whole for copying).
    return Text(text, no_wrap=False, overflow="fold")


class _ThrottledDisplay(ProgressDisplay):
    """Shows a snapshot at most every `interval` seconds, and always on a phase change."""

    interval = 1.0

    def __init__(self, stream: TextIO, header: str | None = None) -> None:
        super().__init__(header)
        self._stream = stream
        self._last = 0.0
        self._phase = ""

    def update(self, progress: Progress) -> None:
        """Show the snapshot when due."""
        super().update(progress)
        now = time.monotonic()
        if progress.phase == self._phase and now - self._last < self.interval:
            return
        self._last, self._phase = now, progress.phase
        self.show(progress)

    def show(self, progress: Progress) -> None:
        """Render one snapshot."""
        raise NotImplementedError


class PlainDisplay(_ThrottledDisplay):
    """A line every few seconds and at phase changes, for logs and pipes: never padded."""

    interval = _PLAIN_INTERVAL

    def show_header(self, header: str) -> None:
        """Print the header line."""
        self._print(header)

    def show(self, progress: Progress) -> None:
        """Print the active row (the read-back's while it runs), or every row once it ended."""
        rows = self.tracker.rows()
        active = [row for row in rows if row.active]
        for row in active[-1:] or rows:
            self._print(plain_line(row))

    def finish(self, outcome: Outcome) -> None:
        """Print the outcome, unless the last line already said it (Succeeded)."""
        if outcome.label != self._phase:
            for row in self.tracker.rows(outcome):
                self._print(plain_line(row))

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)


def plain_line(row: Row) -> str:
    """The row as one line of a log: its label, percent and details, comma-separated."""
    shown = " ".join(part for part in (row.percent(), ", ".join(row.details)) if part)
    return f"{row.label}: {shown.replace(' · ', ', ')}" if shown else row.label


class JsonDisplay(_ThrottledDisplay):
    """One JSON object a line, at most once a second and at phase changes."""

    def show(self, progress: Progress) -> None:
        """Print a JSON line."""
        emit_json(self._stream, {"event": "progress", **progress_fields(progress)})


def emit_json(stream: TextIO, record: dict[str, object]) -> None:
    """Write one JSON line and flush it."""
    stream.write(json.dumps(record, sort_keys=True) + "\n")
    stream.flush()


def make_display(mode: str, console: Console, header: str | None = None) -> ProgressDisplay:
    """Pick the display for `--progress MODE` (auto: a bar on a terminal, else plain).

    `header` (see `stream_header`) is shown before the stream starts, except in JSON mode.
    """
    if mode == "auto":
        mode = "bar" if console.is_terminal else "plain"
    if mode == "bar":
        return BarDisplay(console, header)
    if mode == "json":
        return JsonDisplay(sys.stdout)
    return PlainDisplay(sys.stderr, header)


def log_handler(console: Console) -> logging.Handler:
    """Where log records go: rich's handler on a terminal (it keeps them above the bar), plain
    "LEVEL: message" lines otherwise, never wrapped or padded to a console width."""
    if console.is_terminal:
        return RichHandler(console=console, show_path=False, show_time=False, markup=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    return handler


@dataclass
class RunFacts:
    """What a run's JSON result reports beside its outcome: what was asked, and what the
    stream got to (the last progress snapshot it reported)."""

    source: str | None = None
    target: str | None = None
    expected_sha384: str | None = None
    started: float = field(default_factory=time.monotonic)
    last: Progress | None = None

    def watch(self, display: ProgressCallback) -> ProgressCallback:
        """`display`, remembering each snapshot on the way."""

        def on_progress(progress: Progress) -> None:
            self.last = progress
            display(progress)

        return on_progress


def result_record(
    facts: RunFacts,
    outcome: ImageStreamError | StreamResult,
) -> dict[str, object]:
    """The one `result` object of `--progress json`; docs/result.schema.json is its schema."""
    last = facts.last
    record: dict[str, object] = {
        "event": "result",
        "source": facts.source,
        "target": facts.target,
        "expectedSha384": facts.expected_sha384,
        "sha384": None,
        "digest": None,
        "compression": None,
        "verified": False,
        "readBackVerified": False,
        "bytesFetched": last.bytes_fetched if last else 0,
        "bytesWritten": last.bytes_written if last else 0,
        "bytesTotal": last.bytes_total if last else None,
        "resumes": last.resumes if last else 0,
        "seconds": round(time.monotonic() - facts.started, 3),
    }
    if isinstance(outcome, StreamResult):
        record.update(
            ok=True,
            outcome="Succeeded",
            exitCode=0,
            reason=Reason.SUCCEEDED,
            message=f"wrote {outcome.target}: {_verdict(outcome)}",
            target=str(outcome.target),
            sha384=outcome.sha384,
            digest=outcome.digest,
            compression=outcome.compression.value,
            verified=outcome.verified,
            readBackVerified=outcome.read_back_verified,
            bytesFetched=outcome.bytes_fetched,
            bytesWritten=outcome.bytes_written,
            resumes=outcome.resumes,
            seconds=round(outcome.seconds, 3),
        )
        if outcome.partitions is not None:
            record["partitions"] = outcome.partitions
        return record
    record.update(
        ok=False,
        outcome="Cancelled" if isinstance(outcome, Cancelled) else "Failed",
        exitCode=outcome.exit_code,
        reason=outcome.reason,
        message=outcome.message,
    )
    if isinstance(outcome, VerificationFailed):
        record["sha384"] = outcome.computed_sha384
    return record


def _verdict(result: StreamResult) -> str:
    return "verified" if result.verified else "UNVERIFIED (no expected hash was given)"


def report_success(
    result: StreamResult,
    mode: str,
    console: Console,
    facts: RunFacts | None = None,
    *,
    headline: str | None = None,
    notes: Sequence[str] = (),
    fields: Mapping[str, object] | None = None,
) -> None:
    """Print the summary: hashes, bytes, time, resumes; JSON with `--progress json`.

    The target's kind may replace the first line's "Wrote TARGET" (`headline`) and add lines
    (`notes`: an extension already current, its refresh) and JSON `fields`.
    """
    if mode == "json":
        record = result_record(facts or RunFacts(), result)
        record.update(fields or {})
        emit_json(sys.stdout, record)
        return
    verdict = _verdict(result)
    # markup=False: the target is the user's text, and "[red]" or "q[/x]" must print as is.
    out = Console(file=sys.stdout, highlight=False, soft_wrap=True, markup=False)
    style = "green" if result.verified else "bold red"
    out.print(Text(f"{headline or f'Wrote {result.target}'}: {verdict}", style=style))
    out.print(f"  sha384   {result.sha384}")
    if result.digest:
        out.print(f"  digest   {result.digest} (registry blob digest, verified)")
    out.print(
        f"  fetched  {result.bytes_fetched} bytes ({_format_name(result.compression)}), "
        f"written {result.bytes_written} bytes"
    )
    out.print(f"  time     {result.seconds:.2f} s{_written_rate(result)}, resumes {result.resumes}")
    if result.partitions is not None:
        out.print(f"  partitions {result.partitions} (COSI), primary GPT written last")
    if result.read_back_verified:
        out.print("  read-back verified")
    for note in notes:
        out.print(f"  {note}")


def _written_rate(result: StreamResult) -> str:
    if not result.seconds or not result.bytes_written:
        return ""
    return f" ({format_rate(result.bytes_written / result.seconds)} written)"


def _format_name(compression: Compression) -> str:
    if compression is Compression.NONE:
        return "uncompressed, written as is"
    return f"{compression.value}, decompressed"


def report_failure(
    exc: ImageStreamError, mode: str, console: Console, facts: RunFacts | None = None
) -> int:
    """Print the error with its reason code; return the exit code of its family."""
    if mode == "json":
        emit_json(sys.stdout, result_record(facts or RunFacts(), exc))
    # A Text, never markup: messages carry URLs, paths and servers' words.
    line = Text.assemble(("error", "bold red"), f" ({exc.reason}): {exc.message}")
    console.print(line, highlight=False)
    return exc.exit_code
