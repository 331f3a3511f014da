"""The stream: fetch, hash, decompress and write on four threads, then verify and commit.

hashlib and zstandard release the GIL on large buffers, and writes block in the kernel, so the
threads overlap the stages on separate cores. Bounded channels and a fixed buffer pool cap the
memory whatever the image size; one abort event stops every stage when any of them fails.

A cancel (the request's event, set by a signal) is honoured at every step until the commit:
while the source opens (manifest resolution, token requests), while the stages run (reads,
stalls, retry sleeps, cut through the run's `Interrupt`) and while the output is verified and
read back. The stage threads are always joined before the source and the target are closed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from imagestream import defaults
from imagestream.errors import Cancelled, ImageStreamError, IntegrityError, TargetError, UsageError
from imagestream.pipeline.buffers import WRITE_BUFFER, BufferPool, Filled
from imagestream.pipeline.channel import Aborted, Channel
from imagestream.pipeline.cosi_stream import CosiStage
from imagestream.pipeline.decompress import (
    ChannelReader,
    Compression,
    decompress_stage,
    resolve_compression,
)
from imagestream.pipeline.disk_sink import DiskSink, open_disk_sink
from imagestream.pipeline.interrupt import Interrupt, join_all, watching
from imagestream.pipeline.oci_select import digest_of, new_hash
from imagestream.pipeline.progress import Counters, ProgressCallback, RateMeter, snapshot
from imagestream.pipeline.sinks import Aftermath, Sink, open_sink
from imagestream.pipeline.sources import Source, SourceOptions, open_source
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason

log = logging.getLogger(__name__)

_REPORT_INTERVAL = 0.1
_FETCH_QUEUE = 4
_POOL_BUFFERS = 4
_ZSTD_HEADER_PEEK = 18
#: What the fetched bytes of a disk target may be said to be: the tar as it is.
_COSI_COMPRESSIONS = (Compression.AUTO, Compression.NONE)


@dataclass(frozen=True)
class StreamRequest:
    """Everything one stream needs; `sha384=None` is only accepted with `allow_unverified`.

    `target` is planned by `imagestream.targets` (device or file, checks, allowed directory).
    """

    source: str
    target: TargetPlan
    sha384: str | None
    compression: Compression = Compression.AUTO
    source_options: SourceOptions = field(default_factory=SourceOptions)
    verify_after_write: bool = False
    allow_unverified: bool = False
    max_window_log: int = defaults.CLI_MAX_WINDOW_LOG
    cancel: threading.Event | None = None


@dataclass(frozen=True)
class StreamResult:
    """The outcome of a stream that succeeded; `digest` is the verified OCI blob digest."""

    target: Path
    sha384: str
    verified: bool
    compression: Compression
    bytes_fetched: int
    bytes_written: int
    resumes: int
    seconds: float
    read_back_verified: bool
    digest: str | None = None
    #: How many partition images a COSI image wrote (None for other targets).
    partitions: int | None = None


class VerificationFailed(IntegrityError):
    """A check of the whole image failed; carries the SHA-384 the fetched bytes have, for the
    results that report it beside the expected one."""

    def __init__(self, message: str, reason: Reason, computed_sha384: str) -> None:
        super().__init__(message, reason=reason)
        self.computed_sha384 = computed_sha384


def validate_sha384(value: str | None, allow_unverified: bool) -> str | None:
    """Normalise the expected hash, or refuse a request that has none."""
    if value is None:
        if not allow_unverified:
            raise UsageError(
                "an expected SHA-384 is required (--sha384); skipping verification needs "
                "--skip-verification-unsafe"
            )
        return None
    normalised = value.strip().lower()
    if defaults.SHA384.fullmatch(normalised):
        return normalised
    wrong = next((i for i, c in enumerate(normalised) if c not in "0123456789abcdef"), None)
    if len(normalised) == 96 and wrong is not None:
        raise UsageError(
            f"--sha384 must be 96 hexadecimal digits; character {wrong + 1} is "
            f"{value.strip()[wrong]!r}, which is not one (0-9, a-f)"
        )
    raise UsageError(f"--sha384 must be 96 hexadecimal digits, got {len(normalised)} characters")


def run_stream(request: StreamRequest, on_progress: ProgressCallback | None = None) -> StreamResult:
    """Stream the source onto the target; return only once the output verified and is durable.

    A cancel raises `Cancelled`, and so does a KeyboardInterrupt (a second Ctrl-C). Every error
    raised once the target is open ends with what was left on it (`Aftermath.clause`).
    """
    expected = validate_sha384(request.sha384, request.allow_unverified)
    if request.target.kind == "disk" and request.compression not in _COSI_COMPRESSIONS:
        raise UsageError(
            f"a COSI image is an uncompressed tar (its images are zstd inside it): compression "
            f"{request.compression.value} does not apply to disk target {request.target.name}"
        )
    sink: Sink = (
        open_disk_sink(request.target)
        if request.target.kind == "disk"
        else open_sink(request.target)
    )
    stream: _Stream | None = None
    try:
        with watching(request.cancel) as interrupt:
            source = open_source(request.source, request.source_options, interrupt)
            try:
                stream = _Stream(request, source, sink, on_progress, interrupt, expected=expected)
                return stream.run()
            finally:
                source.close()
    except BaseException as exc:
        stopped: BaseException = exc
        try:
            left = sink.invalidate()
        except KeyboardInterrupt as again:
            stopped = again  # Ctrl-C again while invalidating: stop now, as asked
            left = None
        # A cancel can end the stream through its side effects first: Ctrl-C in a shell also
        # stops the writer of a pipe source, whose early EOF would read as a truncated image.
        cancel_asked = request.cancel is not None and request.cancel.is_set()
        if isinstance(stopped, Cancelled | KeyboardInterrupt) or (
            cancel_asked and isinstance(stopped, ImageStreamError)
        ):
            error: ImageStreamError = _cancelled(stopped, stream.counters if stream else None)
        elif isinstance(exc, ImageStreamError):
            error = exc
        else:
            raise
        _conclude(error, left)
        if error is exc:
            raise
        raise error from exc


def _cancelled(exc: BaseException, counters: Counters | None) -> Cancelled:
    """The cancel as the user sees it: when it came (what it left is added by `_conclude`)."""
    how = (
        "stopped at once (interrupted again)" if isinstance(exc, KeyboardInterrupt) else "cancelled"
    )
    if counters is None:
        when = "while opening the source"
    elif counters.phase == "Verifying":
        when = "while verifying"
    else:
        when = "while streaming"
    return Cancelled(f"the stream was {how} {when}")


def _conclude(error: ImageStreamError, left: Aftermath | None) -> None:
    """End `error`'s message with what the sink says it left on the target (in place, so the
    error keeps its type and attributes); `None`: the sink was stopped before it could say."""
    clause = (
        left.clause()
        if left is not None
        else "stopped while invalidating the target: it may still look valid, do not boot from it"
    )
    error.message = f"{error.message}; {clause}"
    error.args = (error.message,)


class _Stream:
    """One run's threads and shared state."""

    def __init__(
        self,
        request: StreamRequest,
        source: Source,
        sink: Sink,
        on_progress: ProgressCallback | None,
        interrupt: Interrupt,
        *,
        expected: str | None,
    ) -> None:
        self.request = request
        self.expected = expected
        self.interrupt = interrupt
        self.source = source
        self.sink = sink
        self.on_progress = on_progress
        self.counters = Counters()
        self.rate = RateMeter()
        self._read_back_reported = 0.0
        self.abort = threading.Event()
        self.errors: list[BaseException] = []
        #: CPU seconds each stage thread used, for -v.
        self.stage_cpu: dict[str, float] = {}
        self.fetched_hash = hashlib.sha384()
        # The registry's own digest of the blob, checked beside the requested SHA-384.
        self.blob_hash = new_hash(source.digest) if source.digest else None
        self.output_hash = hashlib.sha384() if request.verify_after_write else None
        self.compression = request.compression
        self.chunks: Channel[bytes] = Channel(_FETCH_QUEUE, self.abort)
        self.to_hash: Channel[bytes] = Channel(_FETCH_QUEUE, self.abort)
        self.filled: Channel[Filled] = Channel(_POOL_BUFFERS, self.abort)
        self.pool = BufferPool(_POOL_BUFFERS, WRITE_BUFFER, self.abort)
        # A whole disk from a COSI image: its tar entries replace the decompress stage.
        self.cosi = (
            CosiStage(
                sink,
                sink.layout,
                pool=self.pool,
                out=self.filled,
                counters=self.counters,
                expected=expected,
                max_window_log=request.max_window_log,
            )
            if isinstance(sink, DiskSink)
            else None
        )

    def run(self) -> StreamResult:
        threads: list[threading.Thread] = []
        try:
            for name, body in (
                ("fetch", self._fetch),
                ("hash", self._hash),
                ("decompress", self._decompress),
                ("write", self._write),
            ):
                threads.append(self._thread(name, body))
            self._supervise(threads)
        except BaseException:
            # A failing progress consumer or an interrupt: stop the stages before the caller
            # closes the source and invalidates the target, so no late write lands after it.
            self.abort.set()
            self.interrupt.set()
            join_all(threads)
            raise
        if self.errors:
            raise self.errors[0]
        return self._verify_and_commit(self.expected)

    def _thread(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def guarded() -> None:
            try:
                body()
            except Aborted:
                pass
            except BaseException as exc:  # handed to the supervisor
                self.errors.append(exc)
                self.abort.set()
            finally:
                self.stage_cpu[name] = time.thread_time()

        # Listed in the order the stages were started, not the order they happened to end.
        self.stage_cpu[name] = 0.0
        thread = threading.Thread(target=guarded, name=f"imagestream-{name}", daemon=True)
        thread.start()
        return thread

    def _supervise(self, threads: list[threading.Thread]) -> None:
        """Report progress until every stage ended; turn a cancel request into an abort.

        An abort also sets the interrupt, which cuts the fetch out of a network read or a retry
        sleep, so that every stage ends and is joined before the source and the target close.
        """
        cancel = self.request.cancel
        while alive := [t for t in threads if t.is_alive()]:
            alive[-1].join(_REPORT_INTERVAL)
            if cancel is not None and cancel.is_set() and not self.abort.is_set():
                self.errors.append(Cancelled("the stream was cancelled"))
                self.abort.set()
            if self.abort.is_set() and not self.interrupt.is_set():
                self.interrupt.set()
            self._report()

    def _report(self) -> None:
        # The source keeps its own size and resume count; copy them in at report time.
        self.counters.bytes_total = self.source.total
        self.counters.resumes = self.source.resumes
        if self.on_progress is not None:
            self.on_progress(snapshot(self.counters, self.rate))

    def _fetch(self) -> None:
        counters = self.counters
        for chunk in self.source.chunks():
            counters.bytes_fetched += len(chunk)
            # The same immutable chunk goes to both consumers: no copy.
            self.to_hash.put(chunk)
            self.chunks.put(chunk)
        self.to_hash.close()
        self.chunks.close()

    def _hash(self) -> None:
        # Its own thread: SHA-384 is the slowest per-byte step after the network, and hashlib
        # releases the GIL, so it runs beside the socket reads instead of between them.
        blob_hash = self.blob_hash
        # A COSI image's hash is that of its metadata, and each image's is checked on its own:
        # a SHA-384 of the whole tar would only cost a core.
        fetched_hash = self.fetched_hash if self.cosi is None else None
        while (chunk := self.to_hash.get()) is not None:
            if fetched_hash is not None:
                fetched_hash.update(chunk)
            if blob_hash is not None:
                blob_hash.update(chunk)

    def _decompress(self) -> None:
        reader = ChannelReader(self.chunks)
        if self.cosi is not None:
            self.compression = Compression.ZSTD
            self.cosi.run(reader)
            return
        head = reader.peek(_ZSTD_HEADER_PEEK)
        self.compression = resolve_compression(self.request.compression, head)
        self.counters.output_total = self._known_output_size(head)
        self._check_capacity(self.counters.output_total)
        decompress_stage(
            reader,
            compression=self.compression,
            pool=self.pool,
            out=self.filled,
            max_window_log=self.request.max_window_log,
        )

    def _known_output_size(self, head: bytes) -> int | None:
        """The output size, or a lower bound of it (the first zstd frame's declared size)."""
        if self.compression is Compression.NONE:
            return self.source.total
        try:
            size = zstandard.frame_content_size(head)
        except zstandard.ZstdError:
            return None
        return size if size >= 0 else None

    def _check_capacity(self, size: int | None) -> None:
        capacity = self.sink.capacity
        if size is not None and capacity is not None and size > capacity:
            raise TargetError(
                f"target {self.request.target.name} holds {capacity} bytes but the image needs at "
                f"least {size}",
                reason=Reason.TARGET_TOO_SMALL,
            )

    def _write(self) -> None:
        while (item := self.filled.get()) is not None:
            view = item.view()
            if self.output_hash is not None:
                self.output_hash.update(view)
            self.sink.write(view)
            view.release()
            self.counters.bytes_written += item.length
            self.pool.give_back(item.buffer)
        self.sink.flush()

    def _verify_and_commit(self, expected: str | None) -> StreamResult:
        verifying = time.monotonic()
        self.counters.phase = "Verifying"
        self._report()
        # The blob digest first: when both differ, the bytes are not the registry's blob at all.
        digest = self._verify_blob_digest(self.fetched_hash.hexdigest())
        # A COSI image's expected hash is that of its metadata.json, checked before any write.
        actual = (
            self.cosi.sha384 if self.cosi and self.cosi.sha384 else self.fetched_hash.hexdigest()
        )
        if expected is not None and actual != expected:
            raise VerificationFailed(
                f"SHA-384 mismatch: expected {expected}, the fetched image has {actual}",
                reason=Reason.HASH_MISMATCH,
                computed_sha384=actual,
            )
        self._checkpoint()
        read_back = False
        if self.output_hash is not None:
            # Read back while the held bytes are still zeros on the target: a kill during a
            # long read-back leaves it invalid. The held bytes are hashed from memory.
            on_disk = self.sink.sha384_on_disk(self.counters.bytes_written, self._read_back)
            self.counters.bytes_read_back = self.counters.bytes_written
            if on_disk != self.output_hash.hexdigest():
                raise VerificationFailed(
                    f"read-back of {self.request.target.name} does not match what was written "
                    "(the device lost or altered data)",
                    reason=Reason.READ_BACK_MISMATCH,
                    computed_sha384=actual,
                )
            read_back = True
        self._checkpoint()
        self.sink.restore_header()
        self.sink.publish()
        self.counters.phase = "Succeeded"
        self._report()
        self._log_timings(verifying)
        return StreamResult(
            target=self.sink.path,
            sha384=actual,
            verified=expected is not None,
            compression=self.compression,
            bytes_fetched=self.counters.bytes_fetched,
            bytes_written=self.counters.bytes_written,
            resumes=self.source.resumes,
            seconds=time.monotonic() - self.counters.started,
            read_back_verified=read_back,
            digest=digest,
            partitions=self.counters.partitions,
        )

    def _log_timings(self, verifying: float) -> None:
        """For -v: where the time went, so a slow stream shows its slow stage."""
        now = time.monotonic()
        stages = ", ".join(f"{name} {cpu:.2f} s" for name, cpu in self.stage_cpu.items())
        log.info(
            "CPU per stage: %s; streaming %.2f s, verifying and commit %.2f s",
            stages,
            verifying - self.counters.started,
            now - verifying,
        )

    def _read_back(self, done: int) -> None:
        """The read-back's checkpoint: a cancel raises here; progress is reported as it goes."""
        self._checkpoint()
        first = self.counters.bytes_read_back is None
        self.counters.bytes_read_back = done
        now = time.monotonic()
        if first or now - self._read_back_reported >= _REPORT_INTERVAL:
            self._read_back_reported = now
            self._report()

    def _checkpoint(self) -> None:
        """Raise `Cancelled` if a cancel came: called between the steps up to the commit."""
        cancel = self.request.cancel
        if cancel is not None and cancel.is_set():
            self.interrupt.set()
        self.interrupt.check()

    def _verify_blob_digest(self, sha384: str) -> str | None:
        expected = self.source.digest
        if expected is None or self.blob_hash is None:
            return None
        actual = digest_of(self.blob_hash)
        if actual != expected:
            raise VerificationFailed(
                f"blob digest mismatch: {self.source.name} promised {expected}, the fetched "
                f"bytes have {actual}",
                reason=Reason.DIGEST_MISMATCH,
                computed_sha384=sha384,
            )
        return expected
