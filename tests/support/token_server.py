"""A small token server for the registry's token authentication (Docker Registry v2), for tests.

The registry (``docker-registry`` with ``auth.token``) answers an unauthenticated request with
``401`` and ``WWW-Authenticate: Bearer realm="<this server>/token",service="...",scope="..."``.
The client then asks this server ``GET /token?service=...&scope=...`` (with HTTP Basic
credentials, or none: anonymous) and retries with ``Authorization: Bearer <token>``.

What the registry (distribution 2.8) requires of a token, found by reading its
``registry/auth/token`` package and checked against the real binary by the fixture tests:

* a JWS signed with ES256/RS256 whose header carries an ``x5c`` certificate chain that verifies
  against the ``rootcertbundle`` PEM file (a ``kid`` naming the libtrust key ID of a certificate
  in that bundle also works; ``x5c`` is what the token spec describes, so that is used here);
* claims ``iss`` equal to the configured issuer, ``aud`` equal to the configured service,
  ``exp``/``nbf``/``iat`` and an ``access`` list of ``{"type", "name", "actions"}``;
* the registry tolerates 60 s of clock skew on ``exp`` and ``nbf`` (:data:`REGISTRY_LEEWAY`).
  To make a token really expire ``ttl`` seconds after it was issued, ``exp`` is set that much
  earlier: a test of "the token expired mid-stream" must not wait a minute.

Clients authenticate with HTTP Basic on ``GET /token``, or with an OAuth2 refresh token on
``POST /token`` (``grant_type=refresh_token``: what Docker clients do with an identity token).
Authenticated users get every action they ask for on any repository; anonymous requests get a
token that grants nothing (as Docker Hub does for a private repository), so the registry still
answers ``401`` with ``error="insufficient_scope"``. Wrong credentials get ``401`` here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar, cast
from urllib.parse import parse_qs, urlsplit

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .threaded_server import ThreadedHttpServer

#: Seconds of clock skew distribution 2.8 allows past ``exp`` (and before ``nbf``).
REGISTRY_LEEWAY = 60

#: The ``service`` the registry names in its challenge (``auth.token.service``).
DEFAULT_SERVICE = "imagestream-test-registry"
#: The ``iss`` claim the registry expects (``auth.token.issuer``).
DEFAULT_ISSUER = "imagestream-test-token-server"

_P256_COORDINATE_BYTES = 32


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class TokenSigner:
    """The ES256 key that signs tokens, its certificate chain, and the bundle the registry trusts.

    ``root_bundle`` is the PEM file to configure as the registry's ``rootcertbundle``: the
    certificate of the CA that issued the signing certificate.
    """

    private_key: ec.EllipticCurvePrivateKey
    chain_der: tuple[bytes, ...]
    root_bundle: Path

    @classmethod
    def issue(cls, ca: trustme.CA, directory: Path) -> TokenSigner:
        """Issue a signing certificate from ``ca``; write the CA bundle into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        leaf = ca.issue_cert("token-signer.imagestream.test", key_type=trustme.KeyType.ECDSA)
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"expected an EC signing key, got {type(key).__name__}")
        chain = tuple(
            x509.load_pem_x509_certificate(pem.bytes()).public_bytes(serialization.Encoding.DER)
            for pem in leaf.cert_chain_pems
        )
        bundle = directory / "token-root.pem"
        ca.cert_pem.write_to_path(str(bundle))
        return cls(private_key=key, chain_der=chain, root_bundle=bundle)

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Return the compact JWS (``header.payload.signature``) of ``claims``."""
        header = {
            "typ": "JWT",
            "alg": "ES256",
            # x5c is standard base64 (not base64url), leaf first (RFC 7515 §4.1.6).
            "x5c": [base64.b64encode(der).decode("ascii") for der in self.chain_der],
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        der_signature = self.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        # JWS wants the raw r || s, not the DER structure cryptography returns.
        r, s = decode_dss_signature(der_signature)
        raw = r.to_bytes(_P256_COORDINATE_BYTES, "big") + s.to_bytes(_P256_COORDINATE_BYTES, "big")
        return f"{signing_input}.{_b64url(raw)}"


@dataclass(frozen=True)
class Access:
    """One entry of a token's ``access`` claim: what it allows on which resource."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse_scope(cls, scope: str) -> Access:
        """Parse ``repository:NAME:pull,push`` (the name may not contain ``:``)."""
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    def as_claim(self) -> dict[str, object]:
        """The JSON form in the token."""
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    account: str | None  # the authenticated user; None for an anonymous request
    service: str
    scopes: tuple[str, ...]
    status: int  # 200: a token was issued; 401: bad credentials
    granted: tuple[Access, ...]  # what the token allows (empty for anonymous)
    expires_in: int
    issued_at: float  # time.time()
    token: str | None  # the token issued (None when refused)


class TokenServer(ThreadedHttpServer):
    """A Docker-Registry-v2 token server on ``127.0.0.1:<free port>``, in a background thread.

    ``users`` maps user names to passwords, ``refresh_tokens`` OAuth2 refresh tokens (what a
    Docker config calls an ``identitytoken``) to user names. ``ttl`` (seconds, at least 2,
    settable while running) is how long a token is honoured by the registry; see the module
    docstring for the leeway. Use as a context manager; :attr:`realm` is the URL for the
    registry's config.
    """

    #: The shortest lifetime that still lets one request succeed with a fresh token.
    min_ttl: ClassVar[int] = 2

    def __init__(
        self,
        signer: TokenSigner,
        users: Mapping[str, str],
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        refresh_tokens: Mapping[str, str] | None = None,
        ttl: int = 300,
    ) -> None:
        self.signer = signer
        self.users = dict(users)
        self.refresh_tokens = dict(refresh_tokens or {})
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self._requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        super().__init__(_TokenHandler, name="token-server")

    @property
    def ttl(self) -> int:
        """Seconds a newly issued token stays valid at the registry."""
        return self._ttl

    @ttl.setter
    def ttl(self, seconds: int) -> None:
        if seconds < self.min_ttl:
            raise ValueError(f"ttl must be at least {self.min_ttl} s, got {seconds}")
        self._ttl = seconds

    @property
    def realm(self) -> str:
        """``http://127.0.0.1:PORT/token``: the registry's ``auth.token.realm``."""
        return f"{self.url}/token"

    @property
    def requests(self) -> list[TokenRequest]:
        """Every request answered so far, oldest first."""
        with self._lock:
            return list(self._requests)

    # -- serving ----------------------------------------------------------------------------

    def answer_get(
        self, authorization: str | None, query: Mapping[str, list[str]]
    ) -> tuple[int, bytes]:
        """``GET /token?service=&scope=`` with Basic credentials or none: status and JSON body."""
        valid, user = self._authenticate(authorization)
        return self._issue(valid, user, query)

    def answer_post(self, form: Mapping[str, list[str]]) -> tuple[int, bytes]:
        """``POST /token``: the OAuth2 refresh-token grant (a Docker config's identity token)."""
        user = None
        if form.get("grant_type") == ["refresh_token"]:
            user = self.refresh_tokens.get(form.get("refresh_token", [""])[0])
        return self._issue(user is not None, user, form)

    def _issue(
        self, valid: bool, user: str | None, params: Mapping[str, list[str]]
    ) -> tuple[int, bytes]:
        service = params.get("service", [""])[0]
        # GET repeats `scope`; the OAuth2 form separates scopes with spaces.
        scopes = tuple(scope for value in params.get("scope", []) for scope in value.split())
        now = time.time()
        if not valid:
            self._record(TokenRequest(None, service, scopes, 401, (), 0, now, None))
            return 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
        granted = tuple(Access.parse_scope(s) for s in scopes) if user is not None else ()
        ttl = self.ttl
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service,
            # See the module docstring: the registry adds REGISTRY_LEEWAY to exp.
            "exp": math.ceil(now + ttl) - REGISTRY_LEEWAY,
            "nbf": math.floor(now),
            "iat": math.floor(now),
            "jti": secrets.token_hex(8),
            "access": [access.as_claim() for access in granted],
        }
        token = self.signer.sign(claims)
        self._record(TokenRequest(user, service, scopes, 200, granted, ttl, now, token))
        body = {"token": token, "access_token": token, "expires_in": ttl, "issued_at": _iso(now)}
        return 200, json.dumps(body).encode()

    def _authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """(credentials acceptable, user name): (True, None) is an anonymous request."""
        if authorization is None:
            return True, None
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        if user in self.users and secrets.compare_digest(self.users[user], password):
            return True, user
        return False, None

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/token":
            self._send(404, b'{"errors":[{"code":"NOT_FOUND"}]}')
            return
        status, body = self.owner.answer_get(self.headers.get("Authorization"), parse_qs(url.query))
        self._send(status, body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        if urlsplit(self.path).path != "/token":
            self._send(404, b'{"errors":[{"code":"NOT_FOUND"}]}')
            return
        self._send(*self.owner.answer_post(form))

    @property
    def owner(self) -> TokenServer:
        return cast(TokenServer, cast(Any, self.server).owner)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="imagestream-test-token-server"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Quiet: tests read TokenServer.requests instead.
        return
