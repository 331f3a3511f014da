"""Resumable HTTP reads: ranged GETs that survive resets, stalls, short bodies and throttling.

The reader yields the object's bytes in order, exactly once each, however many requests that
takes. Every 206 is checked against the offset asked for, `If-Range` pins the object so a change
between requests is caught, and a server that ignores ranges is handled by re-reading from the
start and skipping what was already delivered (RFC 9110 §13.1.5, §14).
"""

from __future__ import annotations

import email.utils
import errno
import ipaddress
import logging
import random
import re
import socket
import ssl
import time
import urllib.request
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
# re.ASCII: `\d` would match "²" or "٣" too, which `int()` then refuses or misreads.
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE | re.ASCII)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE | re.ASCII)
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
        self._proxy = proxy_for(url)
        #: Failed attempts over the whole read (resumes count only those after an answer).
        self._failed = 0
        self._expected_size = size
        self._hooks = hooks or ReadHooks()
        self._interrupt = interrupt or Interrupt()

    def chunks(self) -> Iterator[bytes]:
        """Yield the object's bytes in order; raises `SourceError` when it cannot go on.

        A failed attempt is retried up to the policy's `max_retries` in a row without progress;
        one that cannot succeed soon (`_quick_to_fail`) only `QUICK_FAIL_RETRIES` times, briefly.
        Only a retry after the server answered is a resume (and counted in `resumes`): before
        that the connection or the request is retried.
        """
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
                # A cancel cut this attempt: it ends here, without a word about retrying.
                self._interrupt.check()
                _refuse_hopeless(exc, self._name, self._proxy)
                if offset > delivered_before:
                    failures = 0
                failures += 1
                started = self._validators is not None
                what = self._describe(exc, started)
                # Before the budget check, so a caller with no retries still gets its look.
                self._failed += 1
                self._hooks.before_retry(exc, self._failed)
                budget = self._policy.max_retries
                if not started and _quick_to_fail(exc, self.url):
                    budget = min(budget, defaults.QUICK_FAIL_RETRIES)
                if failures > budget:
                    raise SourceError(
                        f"giving up on {self._name} after {failures} attempts without progress "
                        f"at byte {offset}: {what}",
                        reason=Reason.RETRIES_EXHAUSTED,
                    ) from exc
                delay = self._delay(failures, exc, quick=budget < self._policy.max_retries)
                if started:
                    again = f"resuming at byte {offset}"
                elif isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                    again = "retrying the connection"
                else:
                    again = "retrying the request"
                log.warning(
                    "%s: %s; %s in %.1fs (attempt %d of %d failed)",
                    self._name,
                    what,
                    again,
                    delay,
                    failures,
                    budget + 1,
                )
                self._interrupt.sleep(delay)
                if started:
                    self.resumes += 1

    def _describe(self, exc: httpx.TransportError | RetryableError, started: bool) -> str:
        if isinstance(exc, RetryableError):
            return exc.what
        what = _describe_transport(exc)
        if self._proxy is not None and not started and isinstance(exc, httpx.ConnectError):
            return f"cannot connect to the proxy {self._proxy}: {what}"
        return what

    def _delay(self, failures: int, exc: Exception, *, quick: bool = False) -> float:
        retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
        if retry_after is not None:
            return min(retry_after, self._policy.max_retry_after)
        delay = self._policy.backoff(failures)
        return min(delay, defaults.QUICK_FAIL_BACKOFF_SECONDS) if quick else delay

    def _attempt(self, offset: int) -> Iterator[bytes]:
        """One request from `offset`: validate the answer, then stream its body."""
        headers = {**self._headers, "Range": f"bytes={offset}-", "Accept-Encoding": "identity"}
        if offset and self._validators and (validator := self._validators.if_range()):
            headers["If-Range"] = validator
        request = self._client.build_request("GET", self.url, headers=headers)
        try:
            response = self._client.send(request, stream=True)
        except httpx.TooManyRedirects as exc:
            # Not a TransportError, and no retry would end a redirect loop.
            raise SourceError(
                f"{self._name} redirects in a loop (or more than {self._client.max_redirects} "
                "times); check the URL and the server's redirect rules",
                reason=Reason.BAD_REDIRECT,
            ) from exc
        except httpx.UnsupportedProtocol as exc:
            # The URL itself was checked to be http(s): a redirect led elsewhere, every time.
            raise SourceError(
                f"{self._name} redirects to a URL that is not http:// or https:// ({exc})",
                reason=Reason.BAD_REDIRECT,
            ) from exc
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
        match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        stated = int(match.group(1)) if match else None
        known = self.total if self.total is not None else stated
        if known is None or offset < known:
            return False
        return stated is None or stated == known

    def _check_partial(self, response: httpx.Response, offset: int) -> None:
        header = response.headers.get("content-range", "")
        start, last, total = _content_range(header, self._name)
        if start != offset:
            raise SourceError(
                f"{self._name} answered a range starting at byte {start}, but byte {offset} "
                "was asked for; refusing to splice the wrong bytes into the image",
                reason=Reason.BAD_RANGE_RESPONSE,
            )
        # Every request asks for `bytes=N-`: the answer must run to the object's last byte.
        if last < start or (total is not None and last != total - 1):
            raise SourceError(
                f"{self._name} answered 206 with Content-Range {header!r}, which does not run "
                "from the byte asked for to the end of the object",
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
            _log_first_answer(self._name, response, total)
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


def _log_first_answer(name: str, response: httpx.Response, total: int | None) -> None:
    """For -v: where the bytes come from and whether a break can be resumed."""
    if not log.isEnabledFor(logging.INFO):
        return
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    address = f"{peer[0]} port {peer[1]}" if peer else "an unknown address"
    if response.status_code == 206:
        ranges = "ranges supported (206)"
    elif response.headers.get("accept-ranges", "").lower() == "bytes":
        ranges = "ranges announced (Accept-Ranges: bytes)"
    else:
        ranges = "no range support announced: a break re-reads from the start"
    validator = response.headers.get("etag") or response.headers.get("last-modified") or "none"
    log.info(
        "%s: connected to %s, HTTP %d, %s bytes, %s, validator %s",
        name,
        address,
        response.status_code,
        total if total is not None else "an unknown number of",
        ranges,
        validator,
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


def _content_range(header: str, name: str) -> tuple[int, int, int | None]:
    """FIRST, LAST and TOTAL (None for `*`) of `Content-Range: bytes FIRST-LAST/TOTAL`.

    The whole header must be that form: anything around it is not an answer to one range.
    """
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match:
        raise SourceError(
            f"{name} answered 206 without a valid Content-Range header ({header!r})",
            reason=Reason.BAD_RANGE_RESPONSE,
        )
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def _ascii_digits(value: str) -> bool:
    # str.isdigit() is true for "²" and "٣", which int() refuses or float() misreads.
    return value.isascii() and value.isdigit()


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "").strip()
    return int(value) if _ascii_digits(value) else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if _ascii_digits(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: fall back to our own backoff
    return max(0.0, when.timestamp() - time.time())


def _status_message(name: str, response: httpx.Response) -> str:
    status = response.status_code
    sent = "authorization" in response.request.headers
    hint = {
        401: "the server refused the credentials given"
        if sent
        else "the server wants credentials and none were sent (--auth-file)",
        403: "the credentials given lack access"
        if sent
        else "access denied, and no credentials were sent (--auth-file, if it needs them)",
        404: "check the URL",
        407: "the proxy wants credentials (user:password@ in HTTP_PROXY / HTTPS_PROXY)",
    }.get(status)
    text = f"{name} answered HTTP {status} {response.reason_phrase}"
    proxy = proxy_for(str(response.request.url))
    if proxy is not None and status in (403, 407):
        # Through a proxy, a refusal may be the proxy's own, not the server's.
        text += f" (through the proxy {proxy}; the answer may be the proxy's)"
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


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and _IP_ADDRESS_MISMATCH: the certificate is
#: valid, but for another name or address.
_NAME_MISMATCH = (62, 64)


def _refuse_hopeless(exc: Exception, name: str, proxy: str | None) -> None:
    """Fail at once on what no retry fixes: a certificate that does not verify, TLS spoken to
    a port that does not speak it, a proxy that refuses the tunnel."""
    untrusted = cause_of(exc, ssl.SSLCertVerificationError)
    if untrusted is not None:
        if getattr(untrusted, "verify_code", None) in _NAME_MISMATCH:
            hint = (
                "the certificate is valid but issued for another name, which --ca-file does not "
                "change; use the host name the certificate names"
            )
        else:
            hint = "pass the issuing CA with --ca-file"
        raise SourceError(
            f"TLS certificate verify failed for {name} ({untrusted.verify_message}); {hint}",
            reason=Reason.TLS_VERIFICATION_FAILED,
        ) from exc
    garbled = cause_of(exc, ssl.SSLError)
    if garbled is not None and "WRONG_VERSION_NUMBER" in str(garbled):
        raise SourceError(
            f"TLS handshake with {name} failed: the server does not speak TLS on that port (a "
            "plain-HTTP port? then use http://, or --plain-http for a registry)",
            reason=Reason.SOURCE_UNAVAILABLE,
        ) from exc
    if isinstance(exc, httpx.ProxyError):
        raise SourceError(
            f"the proxy {proxy or '(from the environment)'} refused the connection to {name}: "
            f"{exc}; check HTTPS_PROXY, NO_PROXY and the proxy's rules",
            reason=Reason.SOURCE_UNAVAILABLE,
        ) from exc


def _quick_to_fail(exc: Exception, url: str) -> bool:
    """A failure more retries will not fix soon: a name that does not resolve, or a port
    refused on this very machine (nothing listens there)."""
    if cause_of(exc, socket.gaierror) is not None:
        return True
    # httpcore re-raises a refused connect without its cause: its text keeps the errno.
    refused = cause_of(exc, ConnectionRefusedError) is not None or (
        isinstance(exc, httpx.ConnectError) and f"[Errno {errno.ECONNREFUSED}]" in str(exc)
    )
    if not refused:
        return False
    host = httpx.URL(url).host
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_for(url: str) -> str | None:
    """The proxy the environment sends `url` through (as httpx's trust_env does), redacted."""
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy is None:
        return None
    for entry in proxies.get("no", "").split(","):
        # NO_PROXY as httpx reads it: "*", a host, or a domain with or without its dot.
        domain = entry.strip().lower().lstrip(".")
        if domain == "*" or (
            domain and (parsed.host == domain or parsed.host.endswith(f".{domain}"))
        ):
            return None
    return redact_url(proxy)


def _describe_transport(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no data for too long ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
