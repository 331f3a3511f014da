"""Shared fixtures: real nginx (HTTP and HTTPS), tinyproxy, loop devices, root check.

Fixtures that start servers are function-scoped (each test gets its own server, docroot and
logs, startup takes a few tens of milliseconds); nothing here is autouse. Build other servers
with :func:`nginx_factory` when a test needs a variant (extra config, a second server, ...).
"""

import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trustme

# Make `tests.support` importable (here and in test modules). pytest's default "prepend" import
# mode puts `tests/` itself, not the repo root, on sys.path because `tests/` has no __init__.py;
# mypy, run from the repo root, names these modules `tests.support.*`, so that is how everything
# imports them. Appended, not prepended, so the repo root can never shadow anything (the stdlib
# `operator` in particular). Removable once pytest gets `pythonpath = ["."]` in pyproject.toml.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from tests.support.blockdev import LoopDeviceFactory, loop_device
from tests.support.nginx import Nginx, NginxFactory, TLSNginx
from tests.support.tinyproxy import Tinyproxy
from tests.support.tools import fail_or_skip


@pytest.fixture(scope="session")
def require_root() -> None:
    """Require root (loop devices, mounts): fail under CI=true, skip otherwise."""
    if os.geteuid() != 0:
        fail_or_skip("this test needs root (loop devices / mounts)")


@pytest.fixture
def nginx_docroot(tmp_path: Path) -> Path:
    """An empty directory that ``nginx`` and ``nginx_tls`` serve; put test files here."""
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    return docroot


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """Factory for nginx servers: ``nginx_factory(docroot, *, cert_file=, key_file=, ...)``.

    Each call starts a new server with its own work directory (config, logs) under the test's
    tmp dir; all of them are stopped at teardown.
    """
    with ExitStack() as stack:
        counter = 0

        def start(
            docroot: Path,
            *,
            cert_file: Path | None = None,
            key_file: Path | None = None,
            extra_server_config: str = "",
            extra_http_config: str = "",
            worker_processes: int = 1,
        ) -> Nginx:
            nonlocal counter
            counter += 1
            server = Nginx(
                docroot,
                tmp_path / f"nginx-{counter}",
                cert_file=cert_file,
                key_file=key_file,
                extra_server_config=extra_server_config,
                extra_http_config=extra_http_config,
                worker_processes=worker_processes,
            )
            return stack.enter_context(server)

        yield start


@pytest.fixture
def nginx(nginx_factory: NginxFactory, nginx_docroot: Path) -> Nginx:
    """A real nginx serving ``nginx_docroot`` over HTTP on 127.0.0.1 (``nginx.base_url``)."""
    return nginx_factory(nginx_docroot)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority (trustme) for the test session."""
    return trustme.CA()


@pytest.fixture
def nginx_tls(
    nginx_factory: NginxFactory, nginx_docroot: Path, tls_ca: trustme.CA, tmp_path: Path
) -> TLSNginx:
    """A real nginx serving ``nginx_docroot`` over HTTPS on 127.0.0.1.

    Its certificate is issued by ``tls_ca`` for ``127.0.0.1`` and ``localhost``; the returned
    object's ``ca_bundle`` is a PEM file with the CA certificate (``verify=`` for clients).
    Shares the docroot with the ``nginx`` fixture when a test uses both.
    """
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir(exist_ok=True)
    cert = tls_ca.issue_cert("127.0.0.1", "localhost")
    cert_file = tls_dir / "server-chain.pem"
    key_file = tls_dir / "server-key.pem"
    ca_bundle = tls_dir / "ca.pem"
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_ca.cert_pem.write_to_path(str(ca_bundle))
    server = nginx_factory(nginx_docroot, cert_file=cert_file, key_file=key_file)
    return TLSNginx(server=server, ca_bundle=ca_bundle)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    """A real tinyproxy on 127.0.0.1 (``tinyproxy.url``); ``requests_seen()`` reads its log."""
    with Tinyproxy(tmp_path / "tinyproxy") as proxy:
        yield proxy


@pytest.fixture
def loop_device_factory(require_root: None, tmp_path: Path) -> Iterator[LoopDeviceFactory]:
    """Factory for loop devices: ``loop_device_factory(size_in_bytes)`` -> ``/dev/loopN``.

    Each device is backed by a sparse file; all are detached (and their files removed) at
    teardown, in reverse order of creation.
    """
    directory = tmp_path / "loop"
    directory.mkdir()
    with ExitStack() as stack:

        def create(size: int) -> Path:
            return stack.enter_context(loop_device(size, directory))

        yield create
