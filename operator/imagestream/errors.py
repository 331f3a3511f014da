"""The error hierarchy: every failure carries a machine-readable reason and an exit code.

The four families map onto the CLI's documented exit codes and, later, onto the
`status.reason` of an ImageStream, so a user can act on the cause without reading a trace.
"""

from __future__ import annotations

from imagestream.reasons import Reason


class ImageStreamError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code = 1
    default_reason = Reason.INTERNAL_ERROR

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class UsageError(ImageStreamError):
    """The request itself is malformed (bad argument, bad hash syntax)."""

    exit_code = 2
    default_reason = Reason.INVALID_REQUEST


class SourceError(ImageStreamError):
    """The image could not be fetched: network, HTTP status, changed object, retries spent."""

    exit_code = 3
    default_reason = Reason.SOURCE_UNAVAILABLE


class IntegrityError(ImageStreamError):
    """The bytes are not the expected ones: hash mismatch, truncated or corrupt stream, size."""

    exit_code = 4
    default_reason = Reason.INTEGRITY_CHECK_FAILED


class TargetError(ImageStreamError):
    """The target may not or could not be written: missing, mounted, held, too small, locked."""

    exit_code = 5
    default_reason = Reason.TARGET_UNSAFE


class Cancelled(ImageStreamError):
    """The stream was stopped on request (SIGTERM, a newer generation); the target is invalid."""

    exit_code = 130
    default_reason = Reason.CANCELLED
