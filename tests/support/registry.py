"""A real OCI registry (Debian's ``docker-registry``, CNCF distribution 2.8) on loopback, for tests.

``docker-registry serve CONFIG`` runs in the foreground with a configuration written into a
private work directory: filesystem storage in ``<workdir>/storage``, ``http.addr`` on
``127.0.0.1:<free port>``, logs on stderr (captured in ``output.log``). Nothing of the Debian
service is used: not ``/etc/docker/registry``, not ``/var/lib/docker-registry``, not systemd.

Variants, each one configuration block:

* authentication: none, :class:`HtpasswdAuth` (HTTP Basic against a bcrypt htpasswd file, made
  with Apache's ``htpasswd -B``; the registry reads it once at startup), or :class:`TokenAuth`
  (Bearer tokens from a token server; see :mod:`tests.support.token_server`);
* TLS (:class:`TLSFiles`), certificates from trustme;
* ``redirect_base_url``: the registry's own ``redirect`` storage middleware, which answers blob
  GET/HEAD with ``307`` to ``<base>/docker/registry/v2/blobs/sha256/XX/HEX/data`` — what a
  registry backed by S3 or a CDN does. Serve :attr:`Registry.storage_dir` under that base URL
  (nginx) to complete the picture.

The registry keeps no cache of blob contents (no ``storage.cache`` here), so a test may
overwrite a blob file under :meth:`Registry.blob_path` and the registry serves the new bytes.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import trustme
import yaml

from .process import ServerProcess
from .tools import require_tool, wait_until

#: The one user every authenticating test registry (and the token server) knows.
TEST_USER = "imagestream"

_DIGEST_RE = re.compile(r"^sha256:(?P<hex>[0-9a-f]{64})$")


@dataclass(frozen=True)
class HtpasswdAuth:
    """HTTP Basic authentication against ``path`` (a bcrypt htpasswd file)."""

    path: Path
    realm: str = "imagestream-test-registry"

    def config(self) -> dict[str, object]:
        """The ``auth`` block of the registry configuration."""
        return {"htpasswd": {"realm": self.realm, "path": str(self.path)}}


@dataclass(frozen=True)
class TokenAuth:
    """Bearer-token authentication: tokens from ``realm``, signed by a cert in ``root_bundle``."""

    realm: str
    service: str
    issuer: str
    root_bundle: Path

    def config(self) -> dict[str, object]:
        """The ``auth`` block of the registry configuration."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.root_bundle),
            }
        }


@dataclass(frozen=True)
class TLSFiles:
    """A PEM certificate (chain) and its key, for serving HTTPS."""

    cert_file: Path
    key_file: Path


def issue_tls_files(ca: trustme.CA, directory: Path) -> tuple[TLSFiles, Path]:
    """A certificate from ``ca`` for 127.0.0.1 and localhost in ``directory``; and the CA file."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TLSFiles(directory / "chain.pem", directory / "key.pem")
    files.cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(files.key_file))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return files, ca_file


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """Write a bcrypt htpasswd file for ``users`` (name -> password) with Apache's ``htpasswd``.

    The registry only honours bcrypt entries; ``htpasswd -B`` is the real tool that makes them.
    """
    htpasswd = require_tool("htpasswd")
    lines = []
    for user, password in users.items():
        done = subprocess.run(
            [htpasswd, "-B", "-b", "-n", user, password],
            capture_output=True,
            text=True,
            check=True,
        )
        lines.append(done.stdout.strip())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


#: How a Docker config file spells a login: ``auth`` (base64 ``user:password``, what
#: ``docker login`` writes), separate ``username``/``password`` fields, or an
#: ``identitytoken`` (then ``password`` is an OAuth2 refresh token for the token server).
DockerConfigForm = Literal["auth", "username_password", "identitytoken"]


def write_docker_config(
    path: Path,
    registry: str,
    username: str,
    password: str,
    *,
    form: DockerConfigForm = "auth",
) -> Path:
    """Write a Docker ``config.json`` with one login for ``registry`` (``HOST:PORT``)."""
    entry: dict[str, str]
    if form == "auth":
        entry = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode("ascii")}
    elif form == "username_password":
        entry = {"username": username, "password": password}
    else:
        entry = {"username": username, "identitytoken": password}
    path.write_text(json.dumps({"auths": {registry: entry}}, indent=2), encoding="utf-8")
    path.chmod(0o600)
    return path


class Registry(ServerProcess):
    """A real ``docker-registry`` serving ``127.0.0.1:<free port>``; use as a context manager."""

    name: ClassVar[str] = "docker-registry"

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        auth: HtpasswdAuth | TokenAuth | None = None,
        tls: TLSFiles | None = None,
        redirect_base_url: str | None = None,
        startup_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        super().__init__(workdir, startup_timeout=startup_timeout, binary=binary)
        self.auth = auth
        self.tls = tls
        self.redirect_base_url = redirect_base_url
        self.storage_dir = self.workdir / "storage"
        self.config_file = self.workdir / "config.yml"

    # -- addresses --------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: the registry part of a reference; valid once started."""
        if self.port == 0:
            raise RuntimeError("the registry is not started")
        return f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        """``https`` when serving TLS, else ``http``."""
        return "https" if self.tls is not None else "http"

    @property
    def base_url(self) -> str:
        """``scheme://127.0.0.1:PORT`` (the API is under ``/v2/``)."""
        return f"{self.scheme}://{self.address}"

    def reference(self, repository: str, tag: str | None = None, digest: str | None = None) -> str:
        """``oci://127.0.0.1:PORT/REPO`` with ``:TAG`` or ``@DIGEST`` (exactly one)."""
        if (tag is None) == (digest is None):
            raise ValueError("give exactly one of tag and digest")
        suffix = f":{tag}" if tag is not None else f"@{digest}"
        return f"oci://{self.address}/{repository}{suffix}"

    def blob_path(self, digest: str) -> Path:
        """The file in the registry's storage that holds blob ``digest`` (``sha256:HEX``)."""
        match = _DIGEST_RE.match(digest)
        if match is None:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        hex_digest = match.group("hex")
        return self.blobs_root / "sha256" / hex_digest[:2] / hex_digest / "data"

    @property
    def blobs_root(self) -> Path:
        """``<storage>/docker/registry/v2/blobs``: where blob files live."""
        return self.storage_dir / "docker" / "registry" / "v2" / "blobs"

    # -- lifecycle --------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        http: dict[str, Any] = {
            "addr": self.address,
            # Uploads carry state signed with this secret; a fixed one avoids the warning and
            # keeps the registry quiet about load balancers.
            "secret": "imagestream-tests",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls is not None:
            http["tls"] = {
                "certificate": str(self.tls.cert_file),
                "key": str(self.tls.key_file),
            }
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.auth is not None:
            config["auth"] = self.auth.config()
        if self.redirect_base_url is not None:
            config["middleware"] = {
                "storage": [{"name": "redirect", "options": {"baseurl": self.redirect_base_url}}]
            }
        return config

    def _prepare(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self._config()), encoding="utf-8")

    def _command(self) -> list[str]:
        return [self.binary, "serve", str(self.config_file)]

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # The registry logs this right after listen() succeeded (before serving), so the port
        # is ours; a bare port probe could be answered by whoever won a race for it.
        marker = f'msg="listening on {self.address}'
        wait_until(
            lambda: marker in self.output_text(),
            self.startup_timeout,
            what=f"docker-registry to listen on {self.address}",
            process=process,
        )

    def _diagnostics(self) -> str:
        return self.output_text()

    def _lost_port_race(self, error: str) -> bool:
        return "address already in use" in error

    def __repr__(self) -> str:
        where = self.base_url if self.port else "not started"
        return f"<Registry {where} auth={type(self.auth).__name__}>"
