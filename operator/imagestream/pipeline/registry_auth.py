"""Registry authentication: the distribution spec's token flow as an `httpx.Auth`.

A registry answers an unauthenticated request with 401 and a challenge,
`WWW-Authenticate: Bearer realm="...",service="...",scope="repository:NAME:pull"`. The client
asks the realm for a token (anonymously, with Basic credentials, or by trading an identity token
in an OAuth2 POST) and repeats the request with it. Tokens are cached per scope and fetched again
when they expire or a request is refused with 401, so a transfer whose token runs out between two
ranged requests goes on from the same byte. A `Basic` challenge gets the credentials directly.

httpx runs the flow around each request, redirects included: a redirect to another host (object
storage) is followed by httpx without the Authorization header, and a 401 from that other host
is not answered with registry credentials.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import httpx

from imagestream import __version__
from imagestream.errors import SourceError
from imagestream.pipeline.credentials import RegistryLogin, basic_header
from imagestream.pipeline.range_reader import RetryableError
from imagestream.pipeline.redact import redact_url
from imagestream.reasons import Reason

# A token without `expires_in` lives 60 s (distribution's token spec); refresh a little early.
_DEFAULT_TOKEN_LIFETIME = 60.0
_EXPIRY_MARGIN = 5.0
_TOKEN_BODY_LIMIT = 1 << 20
_CLIENT_ID = "imagestream"
_REPOSITORY_PATH = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags|referrers)/")
_TOKEN = r"[\w!#$%&'*+.^`|~-]+"
_CHALLENGE_ITEM = re.compile(
    rf'\s*(?:(?P<key>{_TOKEN})\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^\s,]*)'
    rf"|(?P<scheme>{_TOKEN})|(?P<comma>,))"
)


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: its scheme (lower case) and parameters."""

    scheme: str
    params: Mapping[str, str]

    @property
    def realm(self) -> str:
        """Where tokens come from (Bearer) or the protection space's name (Basic)."""
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        """The service the token is for."""
        return self.params.get("service", "")

    @property
    def scope(self) -> str:
        """The access asked for, e.g. `repository:os/image:pull`."""
        return self.params.get("scope", "")

    def describe(self) -> str:
        """Realm, service and scope for an error message (never a credential)."""
        parts = [f"realm {redact_url(self.realm)!r}"] if self.realm else []
        parts += [f"{k} {v!r}" for k, v in (("service", self.service), ("scope", self.scope)) if v]
        return f"{self.scheme.capitalize()} " + ", ".join(parts) if parts else self.scheme


def parse_challenges(headers: httpx.Headers) -> list[Challenge]:
    """Every challenge in the response's `WWW-Authenticate` headers, in order."""
    challenges: list[Challenge] = []
    for header in headers.get_list("www-authenticate"):
        scheme: str | None = None
        params: dict[str, str] = {}
        for item in _CHALLENGE_ITEM.finditer(header):
            if item.group("scheme"):
                if scheme is not None:
                    challenges.append(Challenge(scheme, MappingProxyType(params)))
                scheme, params = item.group("scheme").lower(), {}
            elif item.group("key") and scheme is not None:
                params[item.group("key").lower()] = _unquote(item.group("value"))
        if scheme is not None:
            challenges.append(Challenge(scheme, MappingProxyType(params)))
    return challenges


def _unquote(value: str) -> str:
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def preferred_challenge(headers: httpx.Headers) -> Challenge | None:
    """The challenge to answer: Bearer if offered, else Basic, else None."""
    by_scheme = {c.scheme: c for c in reversed(parse_challenges(headers))}
    return by_scheme.get("bearer") or by_scheme.get("basic")


@dataclass(frozen=True)
class _Grant:
    """What to send for one scope, and how long it holds."""

    challenge: Challenge
    authorization: str
    expires_at: float | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


_Flow = Generator[httpx.Request, httpx.Response, None]


class RegistryAuth(httpx.Auth):
    """Answers a registry's Bearer or Basic challenges; for sync `httpx.Client`s.

    `login` is this registry's login (None: anonymous). `registry` is the registry's base URL:
    only 401s from its host and port are answered.
    """

    def __init__(
        self,
        login: RegistryLogin | None,
        registry: httpx.URL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._login = login
        self._registry = registry
        self._clock = clock
        self._grants: dict[str, _Grant] = {}

    def auth_flow(self, request: httpx.Request) -> _Flow:
        """Send with the cached grant; on the registry's 401 get a new one and send again."""
        key = _scope_key(request.url)
        grant = self._grants.get(key)
        if grant is not None and grant.expired(self._clock()):
            grant = yield from self._renew(grant.challenge, key)
        self._authorize(request, grant)
        response = yield request
        if response.status_code != 401 or not self._is_registry(response.request.url):
            return
        challenge = preferred_challenge(response.headers)
        if challenge is None:
            return
        grant = yield from self._renew(challenge, key)
        if grant is None:
            return  # nothing to answer the challenge with: the caller reports the 401
        self._authorize(request, grant)
        yield request

    def _is_registry(self, url: httpx.URL) -> bool:
        return (url.host, url.port) == (self._registry.host, self._registry.port)

    def _authorize(self, request: httpx.Request, grant: _Grant | None) -> None:
        if grant is not None:
            request.headers["Authorization"] = grant.authorization
        elif self._login is not None and self._login.registry_token:
            request.headers["Authorization"] = f"Bearer {self._login.registry_token}"

    def _renew(
        self, challenge: Challenge, key: str
    ) -> Generator[httpx.Request, httpx.Response, _Grant | None]:
        """A fresh grant for the challenge, cached under `key`; None when there is none."""
        if challenge.scheme == "basic":
            login = self._login
            if login is None or not login.has_password:
                return None
            grant = _Grant(challenge, basic_header(login.username, login.password), None)
        else:
            response = yield self._token_request(challenge)
            grant = self._grant_from(challenge, response)
        self._grants[key] = grant
        return grant

    def _token_request(self, challenge: Challenge) -> httpx.Request:
        """GET the realm (anonymous or Basic), or POST a refresh-token grant (identity token)."""
        if not challenge.realm.startswith(("https://", "http://")):
            raise SourceError(
                f"the registry {self._registry.netloc.decode()} sent a Bearer challenge "
                f"without a usable realm ({challenge.describe()})",
                reason=Reason.UNAUTHORIZED,
            )
        scopes = challenge.scope.split()
        headers = {"User-Agent": f"imagestream/{__version__}", "Accept": "application/json"}
        login = self._login
        if login is not None and login.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": login.identity_token,
                "service": challenge.service,
                "scope": " ".join(scopes),
                "client_id": _CLIENT_ID,
            }
            return httpx.Request("POST", challenge.realm, data=form, headers=headers)
        # Repeated `scope` parameters, one per scope, as docker and distribution do.
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", scope) for scope in scopes
        ]
        if challenge.service:
            params.insert(0, ("service", challenge.service))
        if login is not None and login.has_password:
            headers["Authorization"] = basic_header(login.username, login.password)
        return httpx.Request("GET", challenge.realm, params=params, headers=headers)

    def _grant_from(self, challenge: Challenge, response: httpx.Response) -> _Grant:
        status = response.status_code
        body = self._read_token_body(response, challenge)
        if status in (408, 429) or status >= 500:
            raise RetryableError.from_response(
                f"the token service at {redact_url(challenge.realm)} answered HTTP {status}",
                response,
            )
        if status in (401, 403):
            raise SourceError(
                f"unauthorized: the token service refused {self._who()} "
                f"({challenge.describe()}, HTTP {status}); check the credentials "
                "(--auth-file or the Secret) and their access to the repository",
                reason=Reason.UNAUTHORIZED,
            )
        token, lifetime = _parse_token(body) if status == 200 else (None, 0.0)
        if token is None:
            raise SourceError(
                f"the token service at {redact_url(challenge.realm)} answered HTTP {status} "
                "without a token",
                reason=Reason.UNAUTHORIZED,
            )
        expires_at = self._clock() + max(0.0, lifetime - _EXPIRY_MARGIN)
        return _Grant(challenge, f"Bearer {token}", expires_at)

    @staticmethod
    def _read_token_body(response: httpx.Response, challenge: Challenge) -> bytes:
        """The whole body: httpx reads it again before the next request of the flow.

        A declared length over the limit is refused unread; bodies that declare none are small
        JSON in every token service there is.
        """
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > _TOKEN_BODY_LIMIT:
            raise SourceError(
                f"the token service at {redact_url(challenge.realm)} sent a {declared}-byte "
                "answer; a token is never that large",
                reason=Reason.UNAUTHORIZED,
            )
        return response.read()

    def _who(self) -> str:
        login = self._login
        if login is None:
            return "anonymous access"
        if login.identity_token:
            return "the identity token"
        if login.has_password:
            return "the username and password"
        return "the registry token"


def _parse_token(body: bytes) -> tuple[str | None, float]:
    """`token` (or OAuth2's `access_token`) and its lifetime in seconds."""
    try:
        answer = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, 0.0
    if not isinstance(answer, dict):
        return None, 0.0
    token = answer.get("token") or answer.get("access_token")
    lifetime = answer.get("expires_in")
    if not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = _DEFAULT_TOKEN_LIFETIME
    return (token if isinstance(token, str) and token else None), float(lifetime)


def _scope_key(url: httpx.URL) -> str:
    """The cache key of a request: its repository, which is what a registry scopes tokens by."""
    match = _REPOSITORY_PATH.match(url.path)
    return f"repository:{match.group(1)}" if match else url.path
