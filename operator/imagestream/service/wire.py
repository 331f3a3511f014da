"""Our words in Trident's messages, and Trident's in ours: pure functions, no I/O.

The error kinds follow what a caller can do about a failure: fix the request
(INVALID_INPUT_ERROR), retry or look at the network, the image or the disk (SERVICING_ERROR),
or give the machine another disk (UNSUPPORTED_CONFIGURATION_ERROR). Our reason always rides
in `subkind`, so a caller can branch on the same word the CLI and the operator report.
"""

from __future__ import annotations

import re
import time

from google.protobuf.timestamp_pb2 import Timestamp

from imagestream.errors import (
    Cancelled,
    ImageStreamError,
    IntegrityError,
    SourceError,
    TargetError,
    UsageError,
)
from imagestream.pipeline.progress import Progress
from imagestream.reasons import Reason
from imagestream.service.proto import streaming_pb2 as pb

_HASH_PREFIX = "sha384:"
_HASH = re.compile(r"sha384:[0-9a-f]{96}", re.ASCII)
#: Schemes a remote caller may name: a path on this machine is no image a client can send.
URL_SCHEMES = ("http://", "https://", "oci://")

#: Reasons that mean "this machine cannot take this image", whatever is retried.
_UNSUPPORTED = frozenset(
    {
        Reason.TARGET_TOO_SMALL,
        Reason.NO_DISK_FITS,
        Reason.SECTOR_SIZE_MISMATCH,
        Reason.TARGET_KIND_UNSUPPORTED,
    }
)
#: Reasons that mean the request (URL, hash) or the image itself is wrong.
_INVALID_INPUT = frozenset(
    {
        Reason.INVALID_REQUEST,
        Reason.HASH_REQUIRED,
        Reason.NOT_A_MANIFEST,
        Reason.INVALID_MANIFEST,
        Reason.PLATFORM_NOT_FOUND,
        Reason.AMBIGUOUS_LAYER,
        Reason.LAYER_NOT_FOUND,
        Reason.WINDOW_TOO_LARGE,
        Reason.COSI_INVALID,
        Reason.COSI_UNSUPPORTED,
    }
)


def parse_image_hash(value: str | None, allow_unverified: bool) -> str | None:
    """The 96 hex digits of `sha384:<hex>`; None for a missing hash when that is allowed.

    A missing hash is `HashRequired`, any other form `InvalidRequest` (both INVALID_INPUT).
    """
    if value is None or value == "":
        if allow_unverified:
            return None
        raise UsageError(
            "image_hash is required (sha384:<96 hex digits>); this server was not started "
            "with --allow-unverified",
            reason=Reason.HASH_REQUIRED,
        )
    normalised = value.strip().lower()
    if not _HASH.fullmatch(normalised):
        algorithm = normalised.split(":", 1)[0] if ":" in normalised else "no algorithm"
        raise UsageError(
            f"image_hash must be sha384:<96 hex digits>, got {algorithm} with "
            f"{len(normalised.split(':', 1)[-1])} characters"
        )
    return normalised.removeprefix(_HASH_PREFIX)


def check_image_url(url: str) -> None:
    """Refuse a URL that is no remote image (a local path, another scheme)."""
    if not url.startswith(URL_SCHEMES):
        raise UsageError(f"image_url must start with {', '.join(URL_SCHEMES)}; got {url[:64]!r}")


def error_kind(error: ImageStreamError) -> pb.TridentErrorKind.ValueType:
    """The Trident error kind of one of our failures."""
    if error.reason in _UNSUPPORTED:
        return pb.UNSUPPORTED_CONFIGURATION_ERROR
    if error.reason in _INVALID_INPUT or isinstance(error, UsageError):
        return pb.INVALID_INPUT_ERROR
    if error.reason is Reason.INTERNAL_ERROR:
        return pb.INTERNAL_ERROR
    return pb.SERVICING_ERROR


def trident_error(error: ImageStreamError) -> pb.TridentError:
    """The `TridentError` of a failure: its kind, our reason as `subkind`, the message."""
    return pb.TridentError(
        kind=error_kind(error),
        subkind=str(error.reason),
        message=error.message,
        error_message=error.message,
    )


def error_from_completed(completed: pb.Completed) -> ImageStreamError:
    """The failure a `Completed` reports, as our error of the right family (the client's
    exit code). A subkind we do not know is taken by its Trident kind."""
    error = completed.error
    try:
        reason: Reason | None = Reason(error.subkind)
    except ValueError:
        reason = None
    family = _family_of(reason, error.kind)
    return family(error.message or "the servicing failed", reason=reason)


def _family_of(
    reason: Reason | None, kind: pb.TridentErrorKind.ValueType
) -> type[ImageStreamError]:
    for family, reasons in _FAMILY_REASONS:
        if reason in reasons:
            return family
    if reason is Reason.INTERNAL_ERROR or kind == pb.INTERNAL_ERROR:
        return ImageStreamError
    if kind == pb.INVALID_INPUT_ERROR:
        return UsageError
    return TargetError if kind == pb.UNSUPPORTED_CONFIGURATION_ERROR else SourceError


_TARGET_REASONS = frozenset(
    {
        Reason.TARGET_UNSAFE,
        Reason.TARGET_NOT_FOUND,
        Reason.TARGET_INVALID,
        Reason.TARGET_NOT_ALLOWED,
        Reason.TARGET_MOUNTED,
        Reason.TARGET_IN_USE,
        Reason.TARGET_LOCKED,
        Reason.TARGET_CHECK_FAILED,
        Reason.TARGET_TOO_SMALL,
        Reason.NO_DISK_FITS,
        Reason.SECTOR_SIZE_MISMATCH,
        Reason.TARGET_KIND_UNSUPPORTED,
        Reason.WRITE_FAILED,
        Reason.SERVICING_IN_PROGRESS,
    }
)
_INTEGRITY_REASONS = frozenset(
    {
        Reason.INTEGRITY_CHECK_FAILED,
        Reason.HASH_MISMATCH,
        Reason.DIGEST_MISMATCH,
        Reason.SIZE_MISMATCH,
        Reason.TRUNCATED_STREAM,
        Reason.CORRUPT_STREAM,
        Reason.READ_BACK_MISMATCH,
        Reason.WINDOW_TOO_LARGE,
        Reason.COSI_INVALID,
        Reason.COSI_UNSUPPORTED,
    }
)
_SOURCE_REASONS = frozenset(
    {
        Reason.SOURCE_UNAVAILABLE,
        Reason.HTTP_ERROR,
        Reason.RETRIES_EXHAUSTED,
        Reason.BAD_RANGE_RESPONSE,
        Reason.BAD_REDIRECT,
        Reason.SOURCE_CHANGED,
        Reason.TLS_VERIFICATION_FAILED,
        Reason.UNAUTHORIZED,
        Reason.NAME_UNKNOWN,
        Reason.MANIFEST_UNKNOWN,
        Reason.BLOB_UNKNOWN,
        Reason.NOT_A_MANIFEST,
        Reason.INVALID_MANIFEST,
        Reason.PLATFORM_NOT_FOUND,
    }
)
#: The error family (so the exit code) each reason comes with on the server, for the client
#: to exit as `imagestream stream` would have.
_FAMILY_REASONS: tuple[tuple[type[ImageStreamError], frozenset[Reason]], ...] = (
    (Cancelled, frozenset({Reason.CANCELLED})),
    (
        UsageError,
        frozenset(
            {
                Reason.INVALID_REQUEST,
                Reason.HASH_REQUIRED,
                Reason.AMBIGUOUS_LAYER,
                Reason.LAYER_NOT_FOUND,
            }
        ),
    ),
    (TargetError, _TARGET_REASONS),
    (IntegrityError, _INTEGRITY_REASONS),
    (SourceError, _SOURCE_REASONS),
)


def now() -> Timestamp:
    """The current time as a protobuf Timestamp."""
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def started() -> pb.ServicingResponse:
    """The first message of every stream."""
    return pb.ServicingResponse(timestamp=now(), started=pb.Started())


def log(
    message: str, level: pb.LogLevel.ValueType = pb.LOG_LEVEL_INFO, target: str = "servicing"
) -> pb.ServicingResponse:
    """A `Log` record from the service module; `target` says which part of the servicing."""
    return pb.ServicingResponse(
        timestamp=now(),
        log=pb.Log(level=level, message=message, module="imagestream.service", target=target),
    )


def completed_success(sha384: str, reboot: pb.RebootStatus.ValueType) -> pb.ServicingResponse:
    """The final message of a servicing that verified `sha384`."""
    return pb.ServicingResponse(
        timestamp=now(),
        completed=pb.Completed(
            status=pb.STATUS_CODE_SUCCESS,
            reboot_status=reboot,
            image_hash=_HASH_PREFIX + sha384,
            servicing_kind=pb.SERVICING_KIND_CLEAN_INSTALL,
        ),
    )


def completed_failure(error: ImageStreamError) -> pb.ServicingResponse:
    """The final message of a servicing that failed: never a reboot."""
    return pb.ServicingResponse(
        timestamp=now(),
        completed=pb.Completed(
            status=pb.STATUS_CODE_FAILURE,
            error=trident_error(error),
            reboot_status=pb.REBOOT_NOT_REQUIRED,
            servicing_kind=pb.SERVICING_KIND_CLEAN_INSTALL,
        ),
    )


# -- progress as a readable line, and back ---------------------------------------------------

#: The target of the Log records that carry progress; the client reads these back.
PROGRESS_TARGET = "progress"
_PROGRESS_LINE = re.compile(
    r"progress (?P<percent>[0-9.]+|\?)% (?P<written>[0-9.]+) (?P<wunit>[KMGT]?i?B)"
    r"(?: of (?P<total>[0-9.]+) (?P<tunit>[KMGT]?i?B))? written, "
    r"(?P<rate>[0-9.]+) MB/s(?:, partition (?P<partition>[0-9]+) of (?P<partitions>[0-9]+))?, "
    r"(?P<resumes>[0-9]+) resumes?"
)
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def progress_line(progress: Progress, output_size: int | None) -> str:
    """`progress 42.1% 1.20 GiB of 2.85 GiB written, 410 MB/s, partition 2 of 3, 1 resume`.

    The percentage is of the fetched bytes (the only total known for every image); "of" shows
    the output size when it is known (a raw image, a zstd frame that declares it).
    """
    fraction = progress.fraction
    percent = f"{fraction * 100:.1f}" if fraction is not None else "?"
    written = _size(progress.bytes_written)
    of = f" of {_size(output_size)}" if output_size else ""
    resumes = f"{progress.resumes} resume" + ("" if progress.resumes == 1 else "s")
    rate = progress.bytes_per_second / 1e6
    partition = (
        f", partition {progress.partition} of {progress.partitions}"
        if progress.partition is not None and progress.partitions is not None
        else ""
    )
    return f"progress {percent}% {written}{of} written, {rate:.0f} MB/s{partition}, {resumes}"


def progress_from_line(line: str, elapsed: float) -> Progress | None:
    """The `Progress` a `progress_line` describes, to the precision it was printed with, or
    None for any other text. A client sees only what was written (and of how much), so that
    is what the snapshot counts as both fetched and written."""
    match = _PROGRESS_LINE.match(line)
    if match is None:
        return None
    written = int(float(match["written"]) * _UNITS[match["wunit"]])
    total = int(float(match["total"]) * _UNITS[match["tunit"]]) if match["total"] else None
    return Progress(
        phase="Running",
        bytes_fetched=written,
        bytes_total=total,
        bytes_written=written,
        bytes_per_second=float(match["rate"]) * 1e6,
        resumes=int(match["resumes"]),
        elapsed=elapsed,
        partition=int(match["partition"]) if match["partition"] else None,
        partitions=int(match["partitions"]) if match["partitions"] else None,
    )


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
