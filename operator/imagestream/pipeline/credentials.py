"""Credentials for sources: an auth file given on the command line, or a mounted Secret.

Three shapes are understood, detected by content so one `--auth-file` flag serves them all:

- a verbatim header (`Basic ...`, `Bearer ...`), `user:password` (Basic) or a bare token
  (Bearer), sent to whatever host the source names;
- a Docker config JSON (`{"auths": {"host:port": {...}}}`, what `docker login`, `oras login` and
  Kubernetes `dockerconfigjson` Secrets hold), whose entries apply to their own registry only.

No secret value ever appears in a message, a log line or a `repr`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imagestream.errors import UsageError

# Docker Hub's credentials are stored under the v1 index URL; its registry has other names.
_DOCKER_HUB_KEY = "index.docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "registry-1.docker.io", "registry.hub.docker.com"})


@dataclass(frozen=True)
class RegistryLogin:
    """One registry's credentials: a user and password, an identity token or a registry token.

    `identity_token` is an OAuth2 refresh token (what `docker login` stores as `identitytoken`),
    exchanged at the token realm; `registry_token` is a bearer token sent to the registry as is.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @property
    def has_password(self) -> bool:
        """Whether a username and password are present (Basic auth, password grant)."""
        return bool(self.username and self.password)

    def authorization(self) -> str | None:
        """The header to send straight to a server that takes Basic or Bearer itself."""
        if self.registry_token:
            return f"Bearer {self.registry_token}"
        if self.has_password:
            return basic_header(self.username, self.password)
        return None


@dataclass(frozen=True)
class Credentials:
    """What a source may authenticate with: one login for every host, or logins per registry.

    `login` applies to any host (the plain auth-file forms, a basic-auth or token Secret);
    `auths` maps normalised registry hosts (`host[:port]`) to their own logins.
    """

    login: RegistryLogin | None = None
    auths: Mapping[str, RegistryLogin] = field(default_factory=lambda: MappingProxyType({}))

    def login_for(self, host: str) -> RegistryLogin | None:
        """The login to use with `host` (`host[:port]`), or None to go anonymous."""
        key = normalise_registry(host)
        found = self.auths.get(key)
        if found is None and key in _DOCKER_HUB_ALIASES:
            found = self.auths.get(_DOCKER_HUB_KEY)
        return found if found is not None else self.login

    def authorization_for(self, host: str) -> str | None:
        """The Authorization header for a plain HTTP(S) source on `host`, if any."""
        login = self.login_for(host)
        return login.authorization() if login else None


def basic_header(username: str, password: str) -> str:
    """`Basic base64(user:password)`."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def normalise_registry(key: str) -> str:
    """`https://Host:5000/v1/` -> `host:5000`: docker config keys come in all these spellings."""
    text = key.strip().lower()
    text = text.split("://", 1)[1] if "://" in text else text
    return text.split("/", 1)[0]


def load_auth_file(path: Path) -> Credentials:
    """Credentials from `--auth-file`: a Docker config JSON, or a header, user:password, token."""
    text = _read(path, f"auth file {path}")
    if text.startswith("{"):
        return _docker_config(text, f"auth file {path}")
    return Credentials(login=_parse_plain(text))


def load_secret_dir(directory: Path) -> Credentials:
    """Credentials from a mounted Kubernetes Secret.

    Understood, in this order: `.dockerconfigjson` (type `kubernetes.io/dockerconfigjson`),
    `.dockercfg` (the legacy `kubernetes.io/dockercfg`, the `auths` map alone), `username` and
    `password` (type `kubernetes.io/basic-auth`), `token` (a bearer token).
    """
    where = f"secret directory {directory}"
    if not directory.is_dir():
        raise UsageError(f"{where} does not exist or is not a directory")
    config = directory / ".dockerconfigjson"
    if config.exists():
        return _docker_config(_read(config, f"{where}: .dockerconfigjson"), where)
    legacy = directory / ".dockercfg"
    if legacy.exists():
        auths = _json_object(_read(legacy, f"{where}: .dockercfg"), where)
        return Credentials(auths=_logins(auths, where))
    username, password = directory / "username", directory / "password"
    if username.exists() and password.exists():
        login = RegistryLogin(
            username=_read(username, f"{where}: username"),
            password=_read(password, f"{where}: password"),
        )
        return Credentials(login=login)
    token = directory / "token"
    if token.exists():
        return Credentials(login=RegistryLogin(registry_token=_read(token, f"{where}: token")))
    raise UsageError(
        f"{where} holds none of .dockerconfigjson, .dockercfg, username+password or token"
    )


def _read(path: Path, what: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read {what}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text") from exc
    if not text:
        raise UsageError(f"{what} is empty")
    return text


def _parse_plain(text: str) -> RegistryLogin:
    """A verbatim `Basic`/`Bearer` header, `user:password`, or a bare token."""
    scheme, _, value = text.partition(" ")
    if scheme.lower() == "bearer" and value:
        return RegistryLogin(registry_token=value.strip())
    if scheme.lower() == "basic" and value:
        # Decoded so the same login also works at a registry's token realm.
        return _decode_basic(value.strip(), "the Basic header in the auth file")
    if ":" in text:
        username, _, password = text.partition(":")
        return RegistryLogin(username=username, password=password)
    return RegistryLogin(registry_token=text)


def _decode_basic(encoded: str, what: str) -> RegistryLogin:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} is not valid base64 of user:password") from exc
    username, sep, password = decoded.partition(":")
    if not sep:
        raise UsageError(f"{what} does not decode to user:password")
    return RegistryLogin(username=username, password=password)


def _docker_config(text: str, where: str) -> Credentials:
    config = _json_object(text, where)
    auths = config.get("auths")
    if not isinstance(auths, dict):
        helpers = " (credential helpers are not supported)" if "credsStore" in config else ""
        raise UsageError(f"{where}: the Docker config has no 'auths' object{helpers}")
    return Credentials(auths=_logins(auths, where))


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # The position only: the text itself may be a secret.
        raise UsageError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{where}: the Docker config must be a JSON object")
    return value


def _logins(auths: dict[str, Any], where: str) -> Mapping[str, RegistryLogin]:
    logins: dict[str, RegistryLogin] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: the entry for {key!r} is not an object")
        logins[normalise_registry(key)] = _login(entry, f"{where}: the entry for {key!r}")
    return MappingProxyType(logins)


def _login(entry: dict[str, Any], what: str) -> RegistryLogin:
    """One `auths` entry: `auth` (base64 user:password) or `username`/`password`, plus tokens."""
    text = {k: v for k, v in entry.items() if isinstance(v, str)}
    login = RegistryLogin(
        username=text.get("username", ""),
        password=text.get("password", ""),
        identity_token=text.get("identitytoken", ""),
        registry_token=text.get("registrytoken", ""),
    )
    if text.get("auth") and not login.has_password:
        decoded = _decode_basic(text["auth"], f"{what}: 'auth'")
        # With an identity token, `auth` holds "<token>:" and only the user name matters.
        login = replace(login, username=decoded.username, password=decoded.password)
    if not (login.has_password or login.identity_token or login.registry_token):
        raise UsageError(
            f"{what} has no credentials (auth, username+password, identitytoken or registrytoken)"
        )
    return login
