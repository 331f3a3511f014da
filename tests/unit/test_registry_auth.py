"""`RegistryAuth`: the distribution spec's token flow, against `httpx.MockTransport`.

The stand-in registry and token service answer as distribution and its token server do
(401 + `WWW-Authenticate: Bearer realm,service,scope`; a JSON token with `expires_in`). A real
registry with a real token server is exercised by the integration tests; these pin the protocol
decisions: which request goes where with which credentials, when a token is reused, refreshed
or refused, and what a refusal says.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest

from imagestream.errors import SourceError
from imagestream.pipeline.credentials import RegistryLogin, basic_header
from imagestream.pipeline.range_reader import RetryableError
from imagestream.pipeline.registry_auth import (
    RegistryAuth,
    parse_challenges,
    preferred_challenge,
)

REGISTRY = "https://registry.example"
REALM = "https://auth.example/token"
SERVICE = "registry.example"
MANIFEST = f"{REGISTRY}/v2/os/node/manifests/v1"
BLOB = f"{REGISTRY}/v2/os/node/blobs/sha256:{'a' * 64}"
PASSWORD = "pa55-w0rd"


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TokenRegistry:
    """A registry that wants bearer tokens, and the token service that issues them."""

    def __init__(self, password: str | None = None, lifetime: int | None = 300) -> None:
        self.password = password
        self.lifetime = lifetime
        self.valid: set[str] = set()
        self.refuse_all = False
        self.token_requests: list[httpx.Request] = []
        # (path, Authorization) as sent: the auth flow re-sends the same request object.
        self.registry_requests: list[tuple[str, str | None]] = []

    def challenge(self, scope: str) -> str:
        return f'Bearer realm="{REALM}",service="{SERVICE}",scope="{scope}"'

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return self.token(request)
        authorization = request.headers.get("authorization")
        self.registry_requests.append((request.url.path, authorization))
        repository = request.url.path.split("/")[2:4]
        scope = f"repository:{'/'.join(repository)}:pull"
        token = (authorization or "").removeprefix("Bearer ")
        if self.refuse_all or token not in self.valid:
            return httpx.Response(401, headers={"WWW-Authenticate": self.challenge(scope)})
        return httpx.Response(200, content=b"ok")

    def token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if self.password is not None:
            expected = basic_header("alice", self.password)
            if request.headers.get("authorization") != expected:
                return token_answer(401, {"details": "incorrect username or password"})
        token = f"token-{len(self.token_requests)}"
        self.valid.add(token)
        answer: dict[str, object] = {"token": token}
        if self.lifetime is not None:
            answer["expires_in"] = self.lifetime
        return token_answer(200, answer)


def token_answer(
    status: int, answer: object, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A token service's answer with a streamed body, as from a socket.

    (`json=` would hand httpx a body it has already read, hiding how the flow treats a real one.)
    """
    body = json.dumps(answer).encode()
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def client_for(
    handler: Callable[[httpx.Request], httpx.Response],
    login: RegistryLogin | None = None,
    clock: Callable[[], float] | None = None,
) -> httpx.Client:
    auth = RegistryAuth(login, httpx.URL(REGISTRY), **({"clock": clock} if clock else {}))
    return httpx.Client(transport=httpx.MockTransport(handler), auth=auth, follow_redirects=True)


# -- challenges -------------------------------------------------------------------------------


def test_a_bearer_challenge_is_parsed() -> None:
    headers = httpx.Headers(
        {"WWW-Authenticate": f'Bearer realm="{REALM}",service="{SERVICE}",scope="a:b:pull"'}
    )

    (challenge,) = parse_challenges(headers)

    assert challenge.scheme == "bearer"
    assert (challenge.realm, challenge.service, challenge.scope) == (REALM, SERVICE, "a:b:pull")


def test_several_challenges_quoted_commas_and_escapes() -> None:
    headers = httpx.Headers(
        [
            ("WWW-Authenticate", 'Basic realm="a, \\"b\\"", Bearer realm="x",scope="p q"'),
            ("WWW-Authenticate", "Negotiate"),
        ]
    )

    challenges = parse_challenges(headers)

    assert [c.scheme for c in challenges] == ["basic", "bearer", "negotiate"]
    assert challenges[0].realm == 'a, "b"'
    assert challenges[1].scope == "p q"
    assert preferred_challenge(headers) == challenges[1]


def test_no_challenge_at_all() -> None:
    assert preferred_challenge(httpx.Headers()) is None


# -- the token flow ---------------------------------------------------------------------------


def test_anonymous_pull_gets_a_token_once_per_repository() -> None:
    registry = TokenRegistry()
    client = client_for(registry)

    assert client.get(MANIFEST).status_code == 200
    assert client.get(BLOB).status_code == 200

    (token_request,) = registry.token_requests
    assert token_request.method == "GET"
    assert "authorization" not in token_request.headers
    query = parse_qs(token_request.url.query.decode())
    assert query == {"service": [SERVICE], "scope": ["repository:os/node:pull"]}
    # The manifest went twice (401, then with the token); the blob once, with the cached token.
    assert [(path.split("/")[4], auth) for path, auth in registry.registry_requests] == [
        ("manifests", None),
        ("manifests", "Bearer token-1"),
        ("blobs", "Bearer token-1"),
    ]


def test_another_repository_gets_its_own_token() -> None:
    registry = TokenRegistry()
    client = client_for(registry)

    client.get(MANIFEST)
    client.get(f"{REGISTRY}/v2/other/repo/manifests/v1")

    scopes = [parse_qs(r.url.query.decode())["scope"] for r in registry.token_requests]
    assert scopes == [["repository:os/node:pull"], ["repository:other/repo:pull"]]


def test_a_password_goes_to_the_token_realm_as_basic() -> None:
    registry = TokenRegistry(password=PASSWORD)
    client = client_for(registry, RegistryLogin("alice", PASSWORD))

    assert client.get(MANIFEST).status_code == 200

    assert registry.token_requests[0].headers["authorization"] == basic_header("alice", PASSWORD)
    # The registry itself only ever sees the token.
    assert [auth for _, auth in registry.registry_requests] == [None, "Bearer token-1"]


def test_a_refused_password_names_realm_service_and_scope_but_no_secret() -> None:
    registry = TokenRegistry(password=PASSWORD)
    client = client_for(registry, RegistryLogin("alice", "wrong-password"))

    with pytest.raises(SourceError) as caught:
        client.get(MANIFEST)

    message = caught.value.message
    assert caught.value.reason == "Unauthorized"
    assert REALM in message
    assert SERVICE in message
    assert "repository:os/node:pull" in message
    assert "wrong-password" not in message
    assert "alice" not in message


def test_an_identity_token_is_traded_in_an_oauth2_post() -> None:
    registry = TokenRegistry()
    client = client_for(registry, RegistryLogin(username="<token>", identity_token="refresh-1"))

    assert client.get(MANIFEST).status_code == 200

    (token_request,) = registry.token_requests
    assert token_request.method == "POST"
    form = parse_qs(token_request.content.decode())
    assert form == {
        "grant_type": ["refresh_token"],
        "refresh_token": ["refresh-1"],
        "service": [SERVICE],
        "scope": ["repository:os/node:pull"],
        "client_id": ["imagestream"],
    }


def test_an_oauth2_access_token_answer_is_understood() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return token_answer(200, {"access_token": "at-1"})
        if request.headers.get("authorization") == "Bearer at-1":
            return httpx.Response(200)
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})

    assert client_for(handler).get(MANIFEST).status_code == 200


def test_an_expired_token_is_renewed_before_the_request() -> None:
    registry = TokenRegistry(lifetime=60)
    clock = Clock()
    client = client_for(registry, clock=clock)
    client.get(MANIFEST)

    clock.now += 61
    assert client.get(BLOB).status_code == 200

    assert len(registry.token_requests) == 2
    # Renewed up front: the blob request went once, with the new token, and met no 401.
    assert registry.registry_requests[-1] == (httpx.URL(BLOB).path, "Bearer token-2")
    assert len(registry.registry_requests) == 3


def test_a_token_without_expires_in_lives_sixty_seconds() -> None:
    registry = TokenRegistry(lifetime=None)
    clock = Clock()
    client = client_for(registry, clock=clock)
    client.get(MANIFEST)

    clock.now += 30
    client.get(BLOB)
    clock.now += 31
    client.get(BLOB)

    assert len(registry.token_requests) == 2


def test_a_token_revoked_early_is_refreshed_on_the_401() -> None:
    registry = TokenRegistry()
    client = client_for(registry)
    client.get(MANIFEST)

    registry.valid.clear()  # the registry no longer takes token-1
    response = client.get(BLOB)

    assert response.status_code == 200
    assert len(registry.token_requests) == 2
    assert [auth for _, auth in registry.registry_requests[-2:]] == [
        "Bearer token-1",
        "Bearer token-2",
    ]


def test_a_registry_that_refuses_every_token_gets_one_retry_only() -> None:
    registry = TokenRegistry()
    registry.refuse_all = True

    response = client_for(registry).get(MANIFEST)

    assert response.status_code == 401
    assert len(registry.token_requests) == 1
    assert len(registry.registry_requests) == 2


@pytest.mark.parametrize("status", [429, 503])
def test_a_throttled_token_service_is_retryable(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return token_answer(status, {}, {"Retry-After": "3"})
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})

    with pytest.raises(RetryableError) as caught:
        client_for(handler).get(MANIFEST)

    assert caught.value.retry_after == 3.0


def test_a_token_answer_without_a_token_is_unauthorized() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return token_answer(200, {"nothing": "here"})
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})

    with pytest.raises(SourceError, match="without a token") as caught:
        client_for(handler).get(MANIFEST)

    assert caught.value.reason == "Unauthorized"


def test_a_challenge_without_a_realm_is_unauthorized() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer service="x"'})

    with pytest.raises(SourceError, match="without a usable realm"):
        client_for(handler).get(MANIFEST)


# -- Basic challenges and fixed tokens --------------------------------------------------------


def basic_registry(sent: list[str | None]) -> Callable[[httpx.Request], httpx.Response]:
    """A registry with Basic auth; `sent` records each request's Authorization header."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        if sent[-1] == basic_header("alice", PASSWORD):
            return httpx.Response(200)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})

    return handler


def test_a_basic_challenge_gets_the_password_and_keeps_it() -> None:
    sent: list[str | None] = []
    client = client_for(basic_registry(sent), RegistryLogin("alice", PASSWORD))

    assert client.get(MANIFEST).status_code == 200
    assert client.get(BLOB).status_code == 200

    basic = basic_header("alice", PASSWORD)
    assert sent == [None, basic, basic]


def test_a_basic_challenge_without_credentials_leaves_the_401() -> None:
    sent: list[str | None] = []

    response = client_for(basic_registry(sent)).get(MANIFEST)

    assert response.status_code == 401
    assert sent == [None]


def test_a_registry_token_is_sent_as_is() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200)

    client_for(handler, RegistryLogin(registry_token="reg-1")).get(MANIFEST)

    assert seen == ["Bearer reg-1"]


# -- redirects --------------------------------------------------------------------------------


def test_a_redirect_to_storage_keeps_range_and_drops_authorization() -> None:
    registry = TokenRegistry()
    storage: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.example":
            storage.append(request)
            return httpx.Response(206, headers={"Content-Range": "bytes 5-9/10"}, content=b"56789")
        response = registry(request)
        if response.status_code == 200 and "/blobs/" in request.url.path:
            location = "https://storage.example/blob?X-Amz-Signature=sig"
            return httpx.Response(307, headers={"Location": location})
        return response

    response = client_for(handler).get(BLOB, headers={"Range": "bytes=5-"})

    assert response.status_code == 206
    (request,) = storage
    assert request.headers["range"] == "bytes=5-"
    assert "authorization" not in request.headers


def test_a_401_from_another_host_is_not_answered_with_registry_credentials() -> None:
    token_requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            token_requests.append(request)
            return token_answer(200, {"token": "t"})
        if request.url.host == "storage.example":
            challenge = f'Bearer realm="{REALM}",scope="storage"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(307, headers={"Location": "https://storage.example/blob"})

    response = client_for(handler, RegistryLogin("alice", PASSWORD)).get(BLOB)

    assert response.status_code == 401
    assert token_requests == []


def test_an_oversized_token_answer_is_refused_unread() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return token_answer(200, {"token": "t"}, {"Content-Length": str(64 << 20)})
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})

    with pytest.raises(SourceError, match="never that large"):
        client_for(handler).get(MANIFEST)


def test_basic_credentials_are_not_leaked_in_the_token_request_body() -> None:
    registry = TokenRegistry(password=PASSWORD)
    client_for(registry, RegistryLogin("alice", PASSWORD)).get(MANIFEST)

    request = registry.token_requests[0]
    assert PASSWORD not in str(request.url)
    decoded = base64.b64decode(request.headers["authorization"].split()[1]).decode()
    assert decoded == f"alice:{PASSWORD}"
    assert json.dumps(dict(request.headers)).count(PASSWORD) == 0
