"""One stream onto a planned target, with the steps its kind adds around the pipeline.

The CLI and the agent both call `stream_target`. A device or a plain file is the pipeline's
stream and nothing else; an extension image is first checked for being current already (then
nothing is fetched or written), recorded once committed, and refreshed on the host when asked.
Kept apart from the planning modules, which the controller imports without the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from imagestream import defaults
from imagestream.errors import Cancelled
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamRequest, StreamResult, run_stream, validate_sha384
from imagestream.pipeline.progress import ProgressCallback
from imagestream.targets import extension

StreamFunction = Callable[[StreamRequest, ProgressCallback | None], StreamResult]


@dataclass(frozen=True)
class TargetOutcome:
    """A stream that succeeded: the pipeline's result (or, for an image already current, what
    was found in place), and what the target's kind did beside it."""

    result: StreamResult
    already_current: bool = False
    refreshed: extension.Refreshed | None = None

    @property
    def headline(self) -> str | None:
        """The summary's first words when they are not "Wrote TARGET"."""
        if self.already_current:
            return f"{self.result.target} is already current, not rewritten"
        return None

    @property
    def notes(self) -> list[str]:
        """Lines for the summary beyond the pipeline's own."""
        return [] if self.refreshed is None else [self.refreshed.note]

    @property
    def fields(self) -> dict[str, object]:
        """Fields of the JSON result beyond the pipeline's own."""
        found: dict[str, object] = {}
        if self.already_current:
            found["alreadyCurrent"] = True
        if self.refreshed is not None:
            found["refresh"] = {
                "status": self.refreshed.status,
                "command": list(self.refreshed.command),
                "output": self.refreshed.output,
            }
        return found


def stream_target(
    request: StreamRequest,
    on_progress: ProgressCallback | None = None,
    *,
    stream: StreamFunction = run_stream,
) -> TargetOutcome:
    """Stream `request` onto its target; `stream` is the pipeline (a parameter for tests)."""
    planned = request.target.extension
    if planned is None:
        return TargetOutcome(stream(request, on_progress))
    started = time.monotonic()
    expected = validate_sha384(request.sha384, request.allow_unverified)
    extension.prepare_directory(request.target)
    record = None
    if expected is not None:
        record = extension.current_record(request.target, expected, _checkpoint(request))
    if record is not None and record.compression not in {c.value for c in Compression}:
        record = None  # not a record this product wrote
    if record is None:
        result = stream(request, on_progress)
        if result.verified:
            extension.record_commit(request.target, result.sha384, result.compression.value)
    else:
        result = StreamResult(
            target=request.target.path,
            sha384=record.sha384,
            verified=True,
            compression=Compression(record.compression),
            bytes_fetched=0,
            bytes_written=0,
            resumes=0,
            seconds=time.monotonic() - started,
            # The bytes in place were just hashed and matched the record of their commit.
            read_back_verified=True,
        )
    refreshed = None
    if planned.refresh:
        refreshed = extension.refresh(planned, defaults.EXTENSION_REFRESH_TIMEOUT_SECONDS)
    return TargetOutcome(result, already_current=record is not None, refreshed=refreshed)


def _checkpoint(request: StreamRequest) -> Callable[[], None]:
    def check() -> None:
        if request.cancel is not None and request.cancel.is_set():
            raise Cancelled(
                "the stream was cancelled while checking the image in place; nothing was "
                "written, the target is unchanged"
            )

    return check
