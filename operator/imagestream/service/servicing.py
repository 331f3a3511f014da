"""StreamDisk: one servicing at a time, run by the same targets layer and pipeline as the CLI.

The servicing runs on a thread of its own and hands its messages to the RPC through a queue,
so a client that goes away stops reading, not writing: a half-written disk is worse than one
that finished (verified or failed), and the outcome still reaches the server's log. Only the
server's own stop (SIGTERM) cancels a servicing; the pipeline then leaves the disk invalid.
"""

from __future__ import annotations

import logging
import queue
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from imagestream import defaults
from imagestream.errors import ImageStreamError, TargetError
from imagestream.pipeline.interrupt import watching
from imagestream.pipeline.pipeline import StreamRequest, StreamResult, run_stream
from imagestream.pipeline.progress import Progress
from imagestream.pipeline.redact import redact_url
from imagestream.pipeline.safety import HostView
from imagestream.pipeline.sources import SourceOptions
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason
from imagestream.service import wire
from imagestream.service.disks import Choice, choose_disk, disk_facts, probe_image
from imagestream.service.proto import streaming_pb2 as pb
from imagestream.service.proto import streaming_pb2_grpc
from imagestream.targets import TargetRequest, plan_target

log = logging.getLogger(__name__)

#: Progress lines at most this often (seconds); phase changes and resumes come at once.
PROGRESS_INTERVAL = 1.0
_REBOOT_TIMEOUT = 60.0

Emit = Callable[[pb.ServicingResponse], None]


@dataclass(frozen=True)
class ServiceConfig:
    """What `imagestream serve` was started with."""

    disks: tuple[Path, ...]
    allow_unverified: bool = False
    reboot_command: str = defaults.REBOOT_COMMAND
    host: HostView = field(default_factory=HostView)
    source_options: SourceOptions = field(default_factory=SourceOptions)


def plan_disk(disk: Path, host: HostView, *, cosi: bool) -> TargetPlan:
    """The one place a chosen disk becomes a target plan: a COSI image through the whole-disk
    COSI target (`disk:DEV`: its checks, partitions placed by the GPT, the primary GPT last),
    any other image written to the whole disk as is, as a device target (its safety checks,
    first-MiB and backup-GPT gating and verification)."""
    return plan_target(TargetRequest(kind="disk" if cosi else "device", path=disk, host=host))


class StreamingService(streaming_pb2_grpc.StreamingServiceServicer):
    """`trident.v1.StreamingService`: StreamDisk onto one of the configured disks."""

    def __init__(self, config: ServiceConfig, cancel: threading.Event) -> None:
        self._config = config
        self._cancel = cancel
        self._lock = threading.Lock()
        self._running: str | None = None
        self._worker: threading.Thread | None = None

    def StreamDisk(
        self, request: pb.StreamDiskRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ServicingResponse]:
        """Started, Log records, then exactly one Completed."""
        yield wire.started()
        try:
            wire.check_image_url(request.image_url)
            expected = wire.parse_image_hash(
                request.image_hash if request.HasField("image_hash") else None,
                self._config.allow_unverified,
            )
        except ImageStreamError as exc:
            log.warning("StreamDisk refused: %s", exc.message)
            yield wire.completed_failure(exc)
            return
        url = redact_url(request.image_url)
        with self._lock:
            refusal = self._refusal()
            if refusal is None:
                self._running = url
        if refusal is not None:
            log.warning("StreamDisk of %s refused: %s", url, refusal.message)
            yield wire.completed_failure(refusal)
            return
        messages: queue.Queue[pb.ServicingResponse] = queue.Queue()
        worker = threading.Thread(
            target=self._service,
            args=(request, expected, messages.put),
            name="imagestream-servicing",
        )
        self._worker = worker
        worker.start()
        while True:
            message = messages.get()
            yield message
            if message.HasField("completed"):
                return

    def _refusal(self) -> TargetError | None:
        """Why a new servicing cannot start now (called under the lock), or None."""
        if self._running is not None:
            return TargetError(
                f"another servicing is in progress (streaming {self._running}); wait for its "
                "Completed",
                reason=Reason.SERVICING_IN_PROGRESS,
            )
        if self._cancel.is_set():
            return TargetError("the server is stopping", reason=Reason.SERVICING_IN_PROGRESS)
        return None

    def wait_idle(self) -> None:
        """Wait until the running servicing (if any) has sent its Completed."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def _service(self, request: pb.StreamDiskRequest, expected: str | None, emit: Emit) -> None:
        url = redact_url(request.image_url)
        try:
            # The probe is cut by a stop like the stream; a cut probe tells nothing, and the
            # stream then ends at once as cancelled.
            with watching(self._cancel) as interrupt:
                facts = probe_image(request.image_url, self._config.source_options, interrupt)
            emit(wire.log(f"resolved source {facts.resolved or url}", target="source"))
            choice = self._choose(facts.needed, emit)
            plan = plan_disk(choice.disk, self._config.host, cosi=facts.cosi)
            what = "COSI image" if facts.cosi else "image"
            emit(wire.log(f"streaming the {what} {url} onto {choice.disk}", target="disk"))
            progress = _ProgressLog(emit, None if facts.cosi else facts.needed)
            result = run_stream(
                StreamRequest(
                    source=request.image_url,
                    target=plan,
                    sha384=expected,
                    source_options=self._config.source_options,
                    allow_unverified=expected is None,
                    cancel=self._cancel,
                ),
                progress,
            )
            emit(wire.log(_summary(result), target="disk"))
            if not result.verified:
                emit(
                    wire.log(
                        "no image_hash was given: the image was written UNVERIFIED",
                        level=pb.LOG_LEVEL_WARN,
                        target="disk",
                    )
                )
            log.info("StreamDisk of %s onto %s verified: %s", url, result.target, result.sha384)
            reboot = self._reboot(request.reboot.handling, emit)
            final = wire.completed_success(result.sha384, reboot)
        except ImageStreamError as exc:
            log.warning("StreamDisk of %s failed (%s): %s", url, exc.reason, exc.message)
            emit(wire.log(exc.message, level=pb.LOG_LEVEL_ERROR))
            final = wire.completed_failure(exc)
        except Exception as exc:  # a bug: the caller still gets its Completed
            log.exception("StreamDisk of %s: internal error", url)
            final = wire.completed_failure(
                ImageStreamError(
                    f"internal error: {type(exc).__name__}: {exc}", reason=Reason.INTERNAL_ERROR
                )
            )
        with self._lock:
            self._running = None
        emit(final)

    def _choose(self, needed: int | None, emit: Emit) -> Choice:
        disks = self._config.disks
        if len(disks) == 1:
            emit(wire.log(f"chose {disks[0]}: the only --disk", target="disk"))
            return Choice(disk=disks[0], why="the only --disk", skipped=())
        choice = choose_disk([disk_facts(disk, self._config.host) for disk in disks], needed)
        emit(wire.log(f"chose {choice.disk}: {choice.why}", target="disk"))
        for reason in choice.skipped:
            emit(wire.log(f"not chosen: {reason}", target="disk"))
        return choice

    def _reboot(
        self, handling: pb.RebootHandling.ValueType, emit: Emit
    ) -> pb.RebootStatus.ValueType:
        """After a success: the caller reboots, or we run the reboot command."""
        if handling == pb.CALLER_HANDLES_REBOOT:
            return pb.REBOOT_REQUIRED
        command = self._config.reboot_command
        try:
            done = subprocess.run(
                shlex.split(command),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_REBOOT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        else:
            if done.returncode == 0:
                emit(wire.log(f"reboot started ({command})", target="reboot"))
                return pb.REBOOT_STARTED
            failure = f"exit status {done.returncode}: {done.stderr.strip()[:500]}"
        emit(
            wire.log(
                f"the reboot command {command!r} failed ({failure}); reboot the machine to boot "
                "the new image",
                level=pb.LOG_LEVEL_WARN,
                target="reboot",
            )
        )
        return pb.REBOOT_REQUIRED


class _ProgressLog:
    """The pipeline's progress callback: a readable line at most once a second, and a Log at
    each phase change and each resume."""

    def __init__(self, emit: Emit, output_size: int | None) -> None:
        self._emit = emit
        self._output_size = output_size
        self._last = 0.0
        self._phase = "Running"
        self._resumes = 0
        self._partition: int | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.resumes > self._resumes:
            self._resumes = progress.resumes
            self._emit(
                wire.log(f"resumed the transfer (resume {progress.resumes})", target="source")
            )
        if progress.partition is not None and progress.partition > (self._partition or 0):
            self._partitions(progress.partition, progress.partitions)
        now = time.monotonic()
        if progress.phase != self._phase:
            self._phase = progress.phase
            self._emit(self._line(progress))
            if progress.phase == "Verifying":
                if self._partition is not None or progress.partitions:
                    self._partitions(None, progress.partitions)
                self._emit(wire.log("all bytes written; verifying and committing", target="disk"))
        elif now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._emit(self._line(progress))

    def _partitions(self, now: int | None, count: int | None) -> None:
        """Logs as partition images begin and end, up to `now` (None: the stream ended, so all
        `count` of them did). Progress is sampled, so a small image may pass unseen: it is
        logged all the same. Reaching the next image means the one before verified (each
        image's SHA-384 is checked at its end, before the next one starts)."""
        of = f" of {count}" if count is not None else ""
        last = self._partition or 0
        until = now if now is not None else (count or last)
        for number in range(last + 1, until + 1):
            if number > 1:
                self._emit(wire.log(f"partition {number - 1}{of} verified", target="disk"))
            self._emit(wire.log(f"writing partition {number}{of}", target="disk"))
        if now is None and until:
            self._emit(wire.log(f"partition {until}{of} verified", target="disk"))
        self._partition = until

    def _line(self, progress: Progress) -> pb.ServicingResponse:
        line = wire.progress_line(progress, self._output_size)
        return wire.log(line, target=wire.PROGRESS_TARGET)


def _summary(result: StreamResult) -> str:
    return (
        f"wrote {result.target}: {result.bytes_written} bytes from {result.bytes_fetched} "
        f"fetched ({result.compression.value}), sha384 {result.sha384}"
        f"{' verified' if result.verified else ''}, "
        f"{result.resumes} resumes, {result.seconds:.2f} s"
    )
