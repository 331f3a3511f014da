"""Fixtures for OCI registry sources: real ``docker-registry`` servers, a token server, a proxy.

Every registry is a real ``docker-registry`` (distribution 2.8) process on ``127.0.0.1:<free
port>`` with its storage under the test's tmp dir, started per test (about 50 ms) and stopped at
teardown; artifacts are pushed with the ``oras`` client (:class:`~tests.support.oci_push.
OciPusher`). Variants:

* ``registry`` — no authentication, plain HTTP;
* ``registry_basic`` — HTTP Basic against a bcrypt htpasswd file made by Apache's ``htpasswd``;
* ``registry_token`` — Bearer tokens from ``token_server`` (a test server, the one stand-in:
  Docker Hub, Harbor or GitLab run their own; the protocol and JWT format are the same);
* ``registry_tls`` — HTTPS with a trustme certificate for 127.0.0.1 and localhost;
* ``redirecting_registry`` — blob GETs are redirected (307, the registry's own ``redirect``
  storage middleware) to an nginx on ``localhost:<port>`` serving the registry's storage, which
  refuses any request carrying ``Authorization`` (as S3 refuses a presigned URL with one);
* ``fault_proxy`` / ``fault_proxy_factory`` — :class:`~tests.support.fault_proxy.FaultProxy`
  in front of a registry.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tests.support.fault_proxy import FaultProxy, FaultProxyFactory
from tests.support.nginx import NginxFactory
from tests.support.oci_push import LiveRegistry, OciPusher, RedirectingRegistry
from tests.support.range_server import Fault
from tests.support.registry import (
    TEST_USER,
    HtpasswdAuth,
    Registry,
    TokenAuth,
    issue_tls_files,
    write_htpasswd,
)
from tests.support.token_server import TokenServer, TokenSigner

from imagestream.demo.image import SampleImage, write_sample_image

MIB = 1 << 20


@pytest.fixture(scope="session")
def registry_password() -> str:
    """The password of :data:`TEST_USER` (random per session: nothing may depend on its value)."""
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="session")
def token_signer(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TokenSigner:
    """The key and certificate the token server signs with; the registry trusts ``tls_ca``."""
    return TokenSigner.issue(tls_ca, tmp_path_factory.mktemp("token-signer"))


@pytest.fixture
def sample_image(tmp_path: Path) -> SampleImage:
    """A 4 MiB (raw) zstd image, about 2 MB compressed."""
    return write_sample_image(tmp_path / "root.raw.zst", 4 * MIB, seed=11)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LiveRegistry]:
    """A real registry without authentication, over plain HTTP."""
    with Registry(tmp_path / "registry") as server:
        yield LiveRegistry(server, OciPusher(server))


@pytest.fixture
def registry_basic(tmp_path: Path, registry_password: str) -> Iterator[LiveRegistry]:
    """A real registry with HTTP Basic authentication (user ``TEST_USER``)."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {TEST_USER: registry_password})
    credentials = (TEST_USER, registry_password)
    with Registry(tmp_path / "registry-basic", auth=HtpasswdAuth(htpasswd)) as server:
        yield LiveRegistry(server, OciPusher(server, credentials=credentials), credentials)


@pytest.fixture(scope="session")
def identity_token() -> str:
    """An OAuth2 refresh token of ``TEST_USER`` (a Docker config's ``identitytoken``)."""
    return secrets.token_urlsafe(24)


@pytest.fixture
def token_server(
    token_signer: TokenSigner, registry_password: str, identity_token: str
) -> Iterator[TokenServer]:
    """A token server that knows ``TEST_USER`` (password or identity token).

    Anonymous requests get tokens that grant nothing.
    """
    users = {TEST_USER: registry_password}
    with TokenServer(token_signer, users, refresh_tokens={identity_token: TEST_USER}) as server:
        yield server


@pytest.fixture
def registry_token(
    tmp_path: Path, token_server: TokenServer, token_signer: TokenSigner, registry_password: str
) -> Iterator[LiveRegistry]:
    """A real registry with token authentication through ``token_server``."""
    auth = TokenAuth(
        realm=token_server.realm,
        service=token_server.service,
        issuer=token_server.issuer,
        root_bundle=token_signer.root_bundle,
    )
    credentials = (TEST_USER, registry_password)
    with Registry(tmp_path / "registry-token", auth=auth) as server:
        pusher = OciPusher(server, credentials=credentials)
        yield LiveRegistry(server, pusher, credentials, token_server=token_server)


@pytest.fixture
def registry_tls(tmp_path: Path, tls_ca: trustme.CA) -> Iterator[LiveRegistry]:
    """A real registry over HTTPS; ``ca_file`` is the CA bundle that verifies it."""
    files, ca_file = issue_tls_files(tls_ca, tmp_path / "registry-tls-certs")
    with Registry(tmp_path / "registry-tls", tls=files) as server:
        yield LiveRegistry(server, OciPusher(server, ca_file=ca_file), ca_file=ca_file)


@pytest.fixture
def redirecting_registry(
    tmp_path: Path, nginx_factory: NginxFactory, registry_password: str
) -> Iterator[RedirectingRegistry]:
    """A real registry (Basic auth) that redirects blob GETs to nginx on ``localhost``.

    ``localhost`` is another origin than ``127.0.0.1``, so a client must not send the
    registry's credentials there. nginx serves the registry's storage directory, so the
    redirect target holds the very bytes; it answers 403 to any request with an
    ``Authorization`` header, and its access log records each request's ``Range``.
    """
    workdir = tmp_path / "registry-redirect"
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    blob_host = nginx_factory(
        storage, extra_server_config='if ($http_authorization != "") { return 403; }'
    )
    base_url = f"http://localhost:{blob_host.port}/"
    htpasswd = write_htpasswd(tmp_path / "htpasswd-redirect", {TEST_USER: registry_password})
    credentials = (TEST_USER, registry_password)
    auth = HtpasswdAuth(htpasswd)
    with Registry(workdir, auth=auth, redirect_base_url=base_url) as server:
        live = LiveRegistry(server, OciPusher(server, credentials=credentials), credentials)
        yield RedirectingRegistry(live, blob_host)


@pytest.fixture
def fault_proxy_factory() -> Iterator[FaultProxyFactory]:
    """``fault_proxy_factory(registry, *faults)``: a started proxy in front of ``registry``."""
    proxies: list[FaultProxy] = []

    def start(registry: Registry, *faults: Fault) -> FaultProxy:
        proxy = FaultProxy(registry.base_url, faults).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in reversed(proxies):
        proxy.stop()


@pytest.fixture
def fault_proxy(fault_proxy_factory: FaultProxyFactory, registry: LiveRegistry) -> FaultProxy:
    """A :class:`FaultProxy` (no faults planned yet: ``add`` them) in front of ``registry``."""
    return fault_proxy_factory(registry.registry)
