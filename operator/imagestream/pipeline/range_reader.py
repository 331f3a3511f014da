"""Resumable HTTP reads: ranged GETs that survive resets, stalls, short bodies and throttling.

The reader yields the object's bytes in order, exactly once each, however many requests that
takes. Every 206 is checked against the offset asked for, `If-Range` pins the object so a change
between requests is caught, and a server that ignores ranges is handled by re-reading from the
start and skipping what was already delivered (RFC 9110 §13.1.5, §14).
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx

from imagestream import defaults
from imagestream.errors import ImageStreamError, IntegrityError, SourceError
from imagestream.pipeline.interrupt import Interrupt
from imagestream.pipeline.redact import redact_url
from imagestream.reasons import Reason

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)
_E = TypeVar("_E", bound=BaseException)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. `max_retries` counts consecutive attempts that delivered no byte."""

    max_retries: int = defaults.MAX_RETRIES
    backoff_base: float = defaults.RETRY_BACKOFF_SECONDS
    backoff_max: float = defaults.RETRY_BACKOFF_MAX_SECONDS
    stall_timeout: float = float(defaults.STALL_TIMEOUT_SECONDS)
    connect_timeout: float = 15.0
    max_retry_after: float = 300.0

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter, so a fleet does not retry in lockstep."""
        exponent = min(max(0, attempt - 1), 32)  # past that the cap rules anyway
        ceiling = min(self.backoff_max, self.backoff_base * 2**exponent)
        return random.uniform(ceiling / 2, ceiling)


class SourceChangedError(SourceError):
    """The object behind the URL is not the one the earlier requests read."""

    default_reason = Reason.SOURCE_CHANGED


class RetryableError(Exception):
    """An attempt failed in a way another request may fix.

    Raised inside a request (by the reader, or by an `httpx.Auth` flow whose token service is
    throttled or down) to have the reader back off and resume from the same byte.
    """

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, what: str, response: httpx.Response) -> RetryableError:
        """A throttled or failing answer, waiting as long as its `Retry-After` asks."""
        return cls(what, _retry_after(response))


@dataclass
class _Validators:
    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def of(cls, response: httpx.Response) -> _Validators:
        return cls(response.headers.get("etag"), response.headers.get("last-modified"))

    def if_range(self) -> str | None:
        # Weak ETags may not be used in If-Range (RFC 9110 §13.1.5).
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def differs_from(self, other: _Validators) -> bool:
        if self.etag and other.etag:
            return self.etag != other.etag
        if self.last_modified and other.last_modified:
            return self.last_modified != other.last_modified
        return False


class ReadHooks:
    """How a caller of `HttpRangeReader` takes part in failed attempts; by default it does not.

    A subclass may explain a final error answer in its own terms (a registry's error codes), or
    look into a retryable failure (a registry's 5xx may have a cause no retry will fix) and stop
    the read there, without changing how the reader counts and paces its attempts.
    """

    def refusal(self, name: str, response: httpx.Response) -> ImageStreamError:
        """The error to raise for a final (not retryable) error answer from `name`.

        May read the body. By default, the status with a hint.
        """
        return SourceError(_status_message(name, response), reason=Reason.HTTP_ERROR)

    def before_retry(self, error: Exception, attempt: int) -> None:
        """See a retryable failure and its number (from 1, over the whole read).

        Called before the reader backs off or gives up; may raise an `ImageStreamError` to stop
        the read there. By default, nothing.
        """


class HttpRangeReader:
    """Reads one URL from the first to the last byte with ranged, resumable GETs.

    `size`, when the caller knows it in advance (an OCI descriptor), is held against what the
    server says. `hooks` let the caller explain and vet failed attempts (see `ReadHooks`).
    `interrupt` ends the read with `Cancelled`, during a request or a backoff (a `Retry-After`
    of minutes too).
    """

    def __init__(
        self,
        url: str,
        client: httpx.Client,
        policy: RetryPolicy,
        headers: dict[str, str] | None = None,
        *,
        size: int | None = None,
        hooks: ReadHooks | None = None,
        interrupt: Interrupt | None = None,
    ) -> None:
        self.url = url
        self.total: int | None = size
        self.content_type: str | None = None
        self.resumes = 0
        self._client = client
        self._policy = policy
        self._headers = dict(headers or {})
        self._validators: _Validators | None = None
        self._name = redact_url(url)
        self._expected_size = size
        self._hooks = hooks or ReadHooks()
        self._interrupt = interrupt or Interrupt()

    def chunks(self) -> Iterator[bytes]:
        """Yield the object's bytes in order; raises `SourceError` when it cannot go on."""
        offset = 0
        failures = 0
        while True:
            delivered_before = offset
            self._interrupt.check()
            try:
                for chunk in self._attempt(offset):
                    offset += len(chunk)
                    if self.total is not None and offset > self.total:
                        raise SourceError(
                            f"{self._name} sent more than the {self.total} bytes it announced",
                            reason=Reason.BAD_RANGE_RESPONSE,
                        )
                    yield chunk
                if self.total is None or offset >= self.total:
                    return
                raise RetryableError(f"body ended at byte {offset} of {self.total}")
            except (httpx.TransportError, RetryableError) as exc:
                _refuse_untrusted(exc, self._name)
                if offset > delivered_before:
                    failures = 0
                failures += 1
                what = exc.what if isinstance(exc, RetryableError) else _describe_transport(exc)
                # Before the budget check, so a caller with no retries still gets its look.
                self._hooks.before_retry(exc, self.resumes + 1)
                if failures > self._policy.max_retries:
                    raise SourceError(
                        f"giving up on {self._name} after {failures} attempts without progress "
                        f"at byte {offset}: {what}",
                        reason=Reason.RETRIES_EXHAUSTED,
                    ) from exc
                delay = self._delay(failures, exc)
                log.warning(
                    "%s: %s; resuming at byte %d in %.1fs (attempt %d of %d)",
                    self._name,
                    what,
                    offset,
                    delay,
                    failures,
                    self._policy.max_retries,
                )
                self._interrupt.sleep(delay)
                self.resumes += 1

    def _delay(self, failures: int, exc: Exception) -> float:
        retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
        if retry_after is not None:
            return min(retry_after, self._policy.max_retry_after)
        return self._policy.backoff(failures)

    def _attempt(self, offset: int) -> Iterator[bytes]:
        """One request from `offset`: validate the answer, then stream its body."""
        headers = {**self._headers, "Range": f"bytes={offset}-", "Accept-Encoding": "identity"}
        if offset and self._validators and (validator := self._validators.if_range()):
            headers["If-Range"] = validator
        request = self._client.build_request("GET", self.url, headers=headers)
        response = self._client.send(request, stream=True)
        try:
            skip = self._check_response(response, offset)
            if skip is None:
                return
            for chunk in _coalesce(response.iter_raw()):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                yield chunk[skip:] if skip else chunk
                skip = 0
        finally:
            response.close()

    def _check_response(self, response: httpx.Response, offset: int) -> int | None:
        """Decide what the answer means: bytes to skip, None for "nothing left", or raise."""
        status = response.status_code
        if status == 206:
            self._check_partial(response, offset)
            return 0
        if status == 200:
            return self._check_full(response, offset)
        if status == 416:
            if self._past_the_end(response, offset):
                return None
            raise SourceError(
                f"{self._name} refused the range from byte {offset} (HTTP 416)",
                reason=Reason.BAD_RANGE_RESPONSE,
            )
        if status in (408, 429) or status >= 500:
            raise RetryableError.from_response(f"HTTP {status} {response.reason_phrase}", response)
        raise self._hooks.refusal(self._name, response)

    def _past_the_end(self, response: httpx.Response, offset: int) -> bool:
        """Whether a 416 only says that every byte was already received.

        The size comes from `Content-Range: bytes */SIZE` or from what is already known; some
        registries send a 416 without Content-Range, or with the Content-Length of the whole
        blob over an error body, so neither the body nor its Content-Length is ever read.
        """
        match = _UNSATISFIED_RANGE.search(response.headers.get("content-range", ""))
        stated = int(match.group(1)) if match else None
        known = self.total if self.total is not None else stated
        if known is None or offset < known:
            return False
        return stated is None or stated == known

    def _check_partial(self, response: httpx.Response, offset: int) -> None:
        match = _CONTENT_RANGE.search(response.headers.get("content-range", ""))
        if not match:
            raise SourceError(
                f"{self._name} answered 206 without a valid Content-Range header",
                reason=Reason.BAD_RANGE_RESPONSE,
            )
        start = int(match.group(1))
        total = None if match.group(3) == "*" else int(match.group(3))
        if start != offset:
            raise SourceError(
                f"{self._name} answered a range starting at byte {start}, but byte {offset} "
                "was asked for; refusing to splice the wrong bytes into the image",
                reason=Reason.BAD_RANGE_RESPONSE,
            )
        self._pin(response, total)

    def _check_full(self, response: httpx.Response, offset: int) -> int:
        total = _content_length(response)
        self._pin(response, total)
        if offset:
            log.warning(
                "%s ignored the range request; re-reading from byte 0 and skipping %d bytes "
                "already received",
                self._name,
                offset,
            )
        return offset

    def _check_expected_size(self, total: int | None) -> None:
        if self._expected_size is not None and total is not None and total != self._expected_size:
            raise IntegrityError(
                f"{self._name} has {total} bytes, but {self._expected_size} were expected",
                reason=Reason.SIZE_MISMATCH,
            )

    def _pin(self, response: httpx.Response, total: int | None) -> None:
        """Remember the object's identity on the first answer; compare it on every later one."""
        seen = _Validators.of(response)
        if self._validators is None:
            self._validators = seen
            self.content_type = response.headers.get("content-type")
            self._check_expected_size(total)
            self.total = total if total is not None else self._expected_size
            return
        if seen.differs_from(self._validators) or (
            total is not None and self.total is not None and total != self.total
        ):
            raise SourceChangedError(
                f"source changed: {self._name} is no longer the object the transfer started on "
                f"(ETag {self._validators.etag} -> {seen.etag}, size {self.total} -> {total}); "
                "start again once the image is stable"
            )


def _coalesce(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Join the network's small reads into ~1 MiB chunks without ever holding bytes back.

    httpx's own chunk_size buffers internally and loses what it holds when the connection
    breaks; here a failure first hands over what arrived, so the resume starts at the next byte.
    """
    held: list[bytes] = []
    size = 0
    try:
        for piece in pieces:
            held.append(piece)
            size += len(piece)
            if size >= CHUNK_SIZE:
                yield b"".join(held)
                held, size = [], 0
    except httpx.TransportError:
        if held:
            yield b"".join(held)
        raise
    if held:
        yield b"".join(held)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: fall back to our own backoff
    return max(0.0, when.timestamp() - time.time())


def _status_message(name: str, response: httpx.Response) -> str:
    status = response.status_code
    hint = {
        401: "the server wants credentials (--auth-file) or refused the ones given",
        403: "the credentials were refused or lack access",
        404: "check the URL",
    }.get(status)
    text = f"{name} answered HTTP {status} {response.reason_phrase}"
    return f"{text}: {hint}" if hint else text


def cause_of(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of `kind` in `exc`'s chain: itself, then its causes or contexts.

    httpx wraps the ssl and socket errors that tell what really went wrong.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, kind):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _refuse_untrusted(exc: Exception, name: str) -> None:
    """A certificate that does not verify will not verify on a retry either: fail at once."""
    untrusted = cause_of(exc, ssl.SSLCertVerificationError)
    if untrusted is not None:
        raise SourceError(
            f"TLS certificate verify failed for {name} ({untrusted.verify_message}); "
            "pass the issuing CA with --ca-file",
            reason=Reason.TLS_VERIFICATION_FAILED,
        ) from exc


def _describe_transport(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no data for too long ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
