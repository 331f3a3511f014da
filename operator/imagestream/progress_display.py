"""How the CLI shows progress: a rich bar on a terminal, plain lines in logs, or JSON lines."""

from __future__ import annotations

import json
import sys
import time
from contextlib import AbstractContextManager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import (
    Progress as RichProgress,
)
from rich.text import Text

from imagestream.errors import ImageStreamError
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamResult
from imagestream.pipeline.progress import Progress
from imagestream.status_fields import progress_fields

_PLAIN_INTERVAL = 2.0


class ProgressDisplay(AbstractContextManager["ProgressDisplay"]):
    """Base: a callback for the pipeline plus setup and teardown of the display."""

    def update(self, progress: Progress) -> None:
        """Show a snapshot; called about ten times a second."""

    def close(self) -> None:
        """Tear the display down (nothing to do for line-based displays)."""

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BarDisplay(ProgressDisplay):
    """A rich progress bar on stderr."""

    def __init__(self, console: Console) -> None:
        self._bar = RichProgress(
            TextColumn("[bold]{task.fields[phase]}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("written {task.fields[written]}  resumes {task.fields[resumes]}"),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> BarDisplay:
        self._bar.start()
        self._task = self._bar.add_task(
            "stream", total=None, phase="Starting", written="0 B", resumes=0
        )
        return self

    def update(self, progress: Progress) -> None:
        """Move the bar."""
        assert self._task is not None
        self._bar.update(
            self._task,
            completed=progress.bytes_fetched,
            total=progress.bytes_total,
            phase=progress.phase,
            written=_human(progress.bytes_written) + _partition(progress),
            resumes=progress.resumes,
        )

    def close(self) -> None:
        """Stop redrawing, leaving the final bar on screen."""
        self._bar.stop()


class _ThrottledDisplay(ProgressDisplay):
    """Shows a snapshot at most every `interval` seconds, and always on a phase change."""

    interval = 1.0

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = 0.0
        self._phase = ""

    def update(self, progress: Progress) -> None:
        """Show the snapshot when due."""
        now = time.monotonic()
        if progress.phase == self._phase and now - self._last < self.interval:
            return
        self._last, self._phase = now, progress.phase
        self.show(progress)

    def show(self, progress: Progress) -> None:
        """Render one snapshot."""
        raise NotImplementedError


class PlainDisplay(_ThrottledDisplay):
    """A line every few seconds and at phase changes, for logs and pipes."""

    interval = _PLAIN_INTERVAL

    def show(self, progress: Progress) -> None:
        """Print a human line."""
        total = _human(progress.bytes_total) if progress.bytes_total else "?"
        percent = f" {progress.fraction * 100:5.1f}%" if progress.fraction is not None else ""
        print(
            f"{progress.phase}:{percent} fetched {_human(progress.bytes_fetched)} of {total}, "
            f"written {_human(progress.bytes_written)}, "
            f"{_human(int(progress.bytes_per_second))}/s, resumes {progress.resumes}"
            f"{_partition(progress)}",
            file=self._stream,
            flush=True,
        )


class JsonDisplay(_ThrottledDisplay):
    """One JSON object a line, at most once a second and at phase changes."""

    def show(self, progress: Progress) -> None:
        """Print a JSON line."""
        emit_json(self._stream, {"event": "progress", **progress_fields(progress)})


def emit_json(stream: TextIO, record: dict[str, object]) -> None:
    """Write one JSON line and flush it."""
    stream.write(json.dumps(record, sort_keys=True) + "\n")
    stream.flush()


def make_display(mode: str, console: Console) -> ProgressDisplay:
    """Pick the display for `--progress MODE` (auto: a bar on a terminal, else plain)."""
    if mode == "auto":
        mode = "bar" if console.is_terminal else "plain"
    if mode == "bar":
        return BarDisplay(console)
    if mode == "json":
        return JsonDisplay(sys.stdout)
    return PlainDisplay(sys.stderr)


def _partition(progress: Progress) -> str:
    """Which partition image a COSI stream is writing; nothing for other targets."""
    if progress.partitions is None:
        return ""
    return f", partition {progress.partition or 0} of {progress.partitions}"


def _human(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def report_success(result: StreamResult, mode: str, console: Console) -> None:
    """Print the summary: hashes, bytes, time, resumes; JSON with `--progress json`."""
    verdict = "verified" if result.verified else "UNVERIFIED (no expected hash was given)"
    if mode == "json":
        emit_json(
            sys.stdout,
            {
                "event": "result",
                "ok": True,
                "verified": result.verified,
                "target": str(result.target),
                "sha384": result.sha384,
                "digest": result.digest,
                "compression": result.compression.value,
                "bytesFetched": result.bytes_fetched,
                "bytesWritten": result.bytes_written,
                "seconds": round(result.seconds, 3),
                "resumes": result.resumes,
                "readBackVerified": result.read_back_verified,
                **({"partitions": result.partitions} if result.partitions is not None else {}),
            },
        )
        return
    rate = result.bytes_written / result.seconds / 2**20 if result.seconds else 0.0
    # markup=False: the target is the user's text, and "[red]" or "q[/x]" must print as is.
    out = Console(file=sys.stdout, highlight=False, soft_wrap=True, markup=False)
    style = "green" if result.verified else "bold red"
    out.print(Text(f"Wrote {result.target}: {verdict}", style=style))
    out.print(f"  sha384   {result.sha384}")
    if result.digest:
        out.print(f"  digest   {result.digest} (registry blob digest, verified)")
    out.print(
        f"  fetched  {result.bytes_fetched} bytes ({_format_name(result.compression)}), "
        f"written {result.bytes_written} bytes"
    )
    out.print(
        f"  time     {result.seconds:.2f} s ({rate:.0f} MiB/s written), resumes {result.resumes}"
    )
    if result.partitions is not None:
        out.print(f"  partitions {result.partitions} (COSI), primary GPT written last")
    if result.read_back_verified:
        out.print("  read-back verified")


def _format_name(compression: Compression) -> str:
    if compression is Compression.NONE:
        return "uncompressed, written as is"
    return f"{compression.value}, decompressed"


def report_failure(exc: ImageStreamError, mode: str, console: Console) -> int:
    """Print the error with its reason code; return the exit code of its family."""
    if mode == "json":
        emit_json(
            sys.stdout,
            {"event": "result", "ok": False, "reason": exc.reason, "message": exc.message},
        )
    # A Text, never markup: messages carry URLs, paths and servers' words.
    line = Text.assemble(("error", "bold red"), f" ({exc.reason}): {exc.message}")
    console.print(line, highlight=False)
    return exc.exit_code
