"""The stream: fetch, hash, decompress and write on four threads, then verify and commit.

hashlib and zstandard release the GIL on large buffers, and writes block in the kernel, so the
threads overlap the stages on separate cores. Bounded channels and a fixed buffer pool cap the
memory whatever the image size; one abort event stops every stage when any of them fails.
"""

from __future__ import annotations

import hashlib
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
from imagestream.pipeline.decompress import (
    ChannelReader,
    Compression,
    decompress_stage,
    resolve_compression,
)
from imagestream.pipeline.oci import digest_of, new_hash
from imagestream.pipeline.progress import Counters, ProgressCallback, RateMeter, snapshot
from imagestream.pipeline.sinks import Sink, open_sink
from imagestream.pipeline.sources import Source, SourceOptions, open_source
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason

_REPORT_INTERVAL = 0.1
_FETCH_QUEUE = 4
_POOL_BUFFERS = 4
_ZSTD_HEADER_PEEK = 18
#: What a failure's message claims about the target once the sink invalidated it.
LEFT_INVALID = "the target was left invalid"
_INVALID_CLAIMS = (f"; {LEFT_INVALID}", "; the target is invalid")


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
    if not defaults.SHA384.fullmatch(normalised):
        raise UsageError(
            f"--sha384 must be 96 hexadecimal digits, got {len(normalised)} characters"
        )
    return normalised


def run_stream(request: StreamRequest, on_progress: ProgressCallback | None = None) -> StreamResult:
    """Stream the source onto the target; return only once the output verified and is durable."""
    expected = validate_sha384(request.sha384, request.allow_unverified)
    sink = open_sink(request.target)
    try:
        source = open_source(request.source, request.source_options)
        try:
            return _Stream(request, source, sink, on_progress).run(expected)
        finally:
            source.close()
    except ImageStreamError as exc:
        failure = sink.invalidate()
        if failure is not None:
            raise _not_invalidated(exc, request.target.name, failure) from exc
        raise
    except BaseException:
        sink.invalidate()
        raise


def _not_invalidated(exc: ImageStreamError, name: str, failure: str) -> ImageStreamError:
    """`exc` with its message no longer claiming an invalid target: it could not be made so."""
    message = exc.message
    for claim in _INVALID_CLAIMS:
        message = message.removesuffix(claim)
    return type(exc)(
        f"{message}; the target {name} could NOT be invalidated ({failure}): it may still "
        "look valid, do not boot from it",
        reason=exc.reason,
    )


class _Stream:
    """One run's threads and shared state."""

    def __init__(
        self,
        request: StreamRequest,
        source: Source,
        sink: Sink,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.request = request
        self.source = source
        self.sink = sink
        self.on_progress = on_progress
        self.counters = Counters()
        self.rate = RateMeter()
        self.abort = threading.Event()
        self.errors: list[BaseException] = []
        self.fetched_hash = hashlib.sha384()
        # The registry's own digest of the blob, checked beside the requested SHA-384.
        self.blob_hash = new_hash(source.digest) if source.digest else None
        self.output_hash = hashlib.sha384() if request.verify_after_write else None
        self.compression = request.compression
        self.chunks: Channel[bytes] = Channel(_FETCH_QUEUE, self.abort)
        self.to_hash: Channel[bytes] = Channel(_FETCH_QUEUE, self.abort)
        self.filled: Channel[Filled] = Channel(_POOL_BUFFERS, self.abort)
        self.pool = BufferPool(_POOL_BUFFERS, WRITE_BUFFER, self.abort)

    def run(self, expected: str | None) -> StreamResult:
        threads = [
            self._thread("fetch", self._fetch),
            self._thread("hash", self._hash),
            self._thread("decompress", self._decompress),
            self._thread("write", self._write),
        ]
        self._supervise(threads)
        if self.errors:
            raise self.errors[0]
        return self._verify_and_commit(expected)

    def _thread(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def guarded() -> None:
            try:
                body()
            except Aborted:
                pass
            except BaseException as exc:  # handed to the supervisor
                self.errors.append(exc)
                self.abort.set()

        thread = threading.Thread(target=guarded, name=f"imagestream-{name}", daemon=True)
        thread.start()
        return thread

    def _supervise(self, threads: list[threading.Thread]) -> None:
        """Report progress until the stages end; turn a cancel request into an abort."""
        cancel = self.request.cancel
        fetch, *rest = threads
        try:
            while any(t.is_alive() for t in rest):
                rest[-1].join(_REPORT_INTERVAL)
                if cancel is not None and cancel.is_set() and not self.abort.is_set():
                    self.errors.append(Cancelled("the stream was cancelled; the target is invalid"))
                    self.abort.set()
                self._report()
        except BaseException:
            # A failing progress consumer or an interrupt: stop the stages before the caller
            # invalidates the target, so no late write lands after the invalidation.
            self.abort.set()
            for thread in rest:
                thread.join()
            raise
        # The fetch thread may sit in a network read after an abort; the stall timeout ends it.
        fetch.join(None if not self.abort.is_set() else 1.0)

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
        while (chunk := self.to_hash.get()) is not None:
            self.fetched_hash.update(chunk)
            if blob_hash is not None:
                blob_hash.update(chunk)

    def _decompress(self) -> None:
        reader = ChannelReader(self.chunks)
        head = reader.peek(_ZSTD_HEADER_PEEK)
        self.compression = resolve_compression(self.request.compression, head)
        self._check_capacity(self._known_output_size(head))
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
        self.counters.phase = "Verifying"
        self._report()
        # The blob digest first: when both differ, the bytes are not the registry's blob at all.
        digest = self._verify_blob_digest()
        actual = self.fetched_hash.hexdigest()
        if expected is not None and actual != expected:
            raise IntegrityError(
                f"SHA-384 mismatch: expected {expected}, the fetched image has {actual}; "
                f"{LEFT_INVALID}",
                reason=Reason.HASH_MISMATCH,
            )
        read_back = False
        if self.output_hash is not None:
            # Read back while the held bytes are still zeros on the target: a kill during a
            # long read-back leaves it invalid. The held bytes are hashed from memory.
            on_disk = self.sink.sha384_on_disk(self.counters.bytes_written)
            if on_disk != self.output_hash.hexdigest():
                raise IntegrityError(
                    f"read-back of {self.request.target.name} does not match what was written "
                    f"(the device lost or altered data); {LEFT_INVALID}",
                    reason=Reason.READ_BACK_MISMATCH,
                )
            read_back = True
        self.sink.restore_header()
        self.sink.publish()
        self.counters.phase = "Succeeded"
        self._report()
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
        )

    def _verify_blob_digest(self) -> str | None:
        expected = self.source.digest
        if expected is None or self.blob_hash is None:
            return None
        actual = digest_of(self.blob_hash)
        if actual != expected:
            raise IntegrityError(
                f"blob digest mismatch: {self.source.name} promised {expected}, the fetched "
                f"bytes have {actual}; {LEFT_INVALID}",
                reason=Reason.DIGEST_MISMATCH,
            )
        return expected
