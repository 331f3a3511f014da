"""`imagestream stream` against real HTTP servers: nginx (HTTP, HTTPS, basic auth) and tinyproxy.

Every test runs the real CLI as a subprocess with a clean environment (no proxy or CA variables
inherited from the developer's shell), checks the exit code, and checks the output against the
raw image: the SHA-384 of the written bytes, never only the tool's own report. Failures must
leave the target invalid: for a file target, neither the file nor its `.NAME.partial` staging
file exists; for a device, the first MiB is zeros.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import socket
import time
from pathlib import Path

import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.cli import (
    CliRun,
    assert_failed,
    assert_succeeded,
    imagestream_env,
    run_imagestream,
    stream_fast_retries,
)
from tests.support.nginx import AccessLogEntry, Nginx, NginxFactory, TLSNginx
from tests.support.targets import MIB, assert_file_target_invalid, sha384_of, staging_path
from tests.support.tinyproxy import Tinyproxy

from imagestream.demo.image import SampleImage, write_sample_image

pytestmark = pytest.mark.timeout(60)

RAW_SIZE = 3 << 20  # 3 MiB raw, ~1.6 MiB compressed: two frames, more than the held-back MiB


#: `imagestream stream SOURCE TARGET EXTRA...` with the image's hash and fast, bounded retries.
stream = functools.partial(stream_fast_retries, stall_timeout=2, timeout=45)


def settled_access_log(server: Nginx, min_entries: int) -> list[AccessLogEntry]:
    """The access log once at least `min_entries` are there and no more arrive for a moment."""
    entries = server.access_log(min_entries=min_entries)
    time.sleep(0.3)
    later = server.access_log()
    assert len(later) == len(entries), later
    return later


def log_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The complete lines of a log nginx writes, once there are `count` (nginx logs late)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


@pytest.fixture
def image(nginx_docroot: Path) -> SampleImage:
    """A two-frame zstd image in the served directory."""
    return write_sample_image(nginx_docroot / "image.zst", RAW_SIZE, seed=7, frames=2)


# -- plain HTTP -------------------------------------------------------------------------------


def test_plain_http_streams_the_image(nginx: Nginx, image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "out" / "disk.raw"
    target.parent.mkdir()

    run = stream(nginx.url_for("image.zst"), target, image)

    result = assert_succeeded(run, target, image)
    assert result["resumes"] == 0
    assert result["compression"] == "zstd"
    log = settled_access_log(nginx, 1)
    assert [(e.method, e.uri, e.status, e.range) for e in log] == [
        ("GET", "/image.zst", 206, "bytes=0-")
    ]
    assert log[0].body_bytes_sent == image.compressed_size
    assert log[0].user_agent.startswith("imagestream/")


def test_plain_http_onto_a_loop_device(
    nginx: Nginx, image: SampleImage, loop_device_factory: LoopDeviceFactory
) -> None:
    device = loop_device_factory(8 * MIB)
    # Old content everywhere the image goes, so a header left zero or stale would show.
    with device.open("r+b") as fh:
        fh.write(b"\xaa" * (4 * MIB))

    run = stream(nginx.url_for("image.zst"), device, image)

    assert run.code == 0, run.text
    assert run.result()["verified"] is True
    assert sha384_of(device, image.raw_size) == image.raw_sha384


# -- HTTPS ------------------------------------------------------------------------------------


def test_https_with_ca_file(nginx_tls: TLSNginx, image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"

    run = stream(
        nginx_tls.url_for("image.zst"), target, image, "--ca-file", str(nginx_tls.ca_bundle)
    )

    assert_succeeded(run, target, image)
    log = settled_access_log(nginx_tls.server, 1)
    assert [(e.protocol, e.status, e.range) for e in log] == [("HTTP/1.1", 206, "bytes=0-")]


def test_https_without_the_ca_fails_certificate_verification(
    nginx_tls: TLSNginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"

    run = stream(nginx_tls.url_for("image.zst"), target, image, "--max-retries", "1")

    assert_failed(run, 3, "certificate verify failed", nginx_tls.base_url)
    assert_file_target_invalid(target)
    # The handshake failed, so nginx never saw an HTTP request.
    assert nginx_tls.server.access_log() == []


def test_https_certificate_failure_is_not_retried(
    nginx_tls: TLSNginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"

    run = stream(nginx_tls.url_for("image.zst"), target, image, "--max-retries", "3")

    assert_failed(run, 3, "certificate verify failed")
    assert "resuming at byte" not in run.text, "a certificate failure was retried"
    assert_file_target_invalid(target)


def test_ca_file_that_is_not_a_certificate_is_a_usage_error(
    nginx_tls: TLSNginx, image: SampleImage, tmp_path: Path
) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    target = tmp_path / "disk.raw"

    run = stream(nginx_tls.url_for("image.zst"), target, image, "--ca-file", str(bogus))

    assert_failed(run, 2, "CA bundle", str(bogus))
    assert_file_target_invalid(target)
    assert nginx_tls.server.access_log() == []


# -- proxies ----------------------------------------------------------------------------------


def test_http_proxy_from_the_environment_carries_the_request(
    nginx: Nginx, tinyproxy: Tinyproxy, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"
    url = nginx.url_for("image.zst")

    run = stream(url, target, image, env=imagestream_env(HTTP_PROXY=tinyproxy.url, NO_PROXY=""))

    assert_succeeded(run, target, image)
    assert tinyproxy.requests_seen() == [f"GET {url} HTTP/1.1"]
    log = settled_access_log(nginx, 1)
    # The origin saw the request arrive through the proxy, still as a range request.
    assert [(e.status, e.range) for e in log] == [(206, "bytes=0-")]
    assert "tinyproxy" in log[0].via


def test_https_proxy_tunnels_with_connect(
    nginx_tls: TLSNginx, tinyproxy: Tinyproxy, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"
    env = imagestream_env(HTTPS_PROXY=tinyproxy.url, NO_PROXY="")

    run = stream(
        nginx_tls.url_for("image.zst"),
        target,
        image,
        "--ca-file",
        str(nginx_tls.ca_bundle),
        env=env,
    )

    assert_succeeded(run, target, image)
    port = nginx_tls.server.port
    assert tinyproxy.requests_seen() == [f"CONNECT 127.0.0.1:{port} HTTP/1.1"]


def test_no_proxy_bypasses_the_proxy(
    nginx: Nginx, tinyproxy: Tinyproxy, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"
    env = imagestream_env(HTTP_PROXY=tinyproxy.url, NO_PROXY="127.0.0.1")

    run = stream(nginx.url_for("image.zst"), target, image, env=env)

    assert_succeeded(run, target, image)
    assert tinyproxy.requests_seen() == []
    log = settled_access_log(nginx, 1)
    assert [(e.status, e.via) for e in log] == [(206, "")]


# -- authentication ---------------------------------------------------------------------------

USER = "imaging"
PASSWORD = "s3cret:with-colon"  # a colon in the password: only the first one separates
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture
def auth_nginx(nginx_factory: NginxFactory, nginx_docroot: Path, tmp_path: Path) -> Nginx:
    """nginx requiring HTTP basic auth for everything, with an `{SSHA}` htpasswd entry."""
    salt = os.urandom(8)
    digest = hashlib.sha1(PASSWORD.encode() + salt).digest()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{USER}:{{SSHA}}{base64.b64encode(digest + salt).decode()}\n")
    return nginx_factory(
        nginx_docroot,
        extra_server_config=f'auth_basic "imagestream";\nauth_basic_user_file {htpasswd};\n',
    )


def stream_with_auth_file(
    url: str, image: SampleImage, tmp_path: Path, credentials: str
) -> tuple[CliRun, Path]:
    """`stream` URL into a new target, with `--auth-file` holding `credentials`: run, target."""
    auth = tmp_path / "auth"
    auth.write_text(f"{credentials}\n")
    target = tmp_path / "disk.raw"
    return stream(url, target, image, "--auth-file", str(auth)), target


@pytest.mark.parametrize(
    "credentials", [f"{USER}:{PASSWORD}", BASIC], ids=["user-password", "verbatim-header"]
)
def test_basic_auth_with_an_auth_file(
    auth_nginx: Nginx, image: SampleImage, tmp_path: Path, credentials: str
) -> None:
    run, target = stream_with_auth_file(
        auth_nginx.url_for("image.zst"), image, tmp_path, credentials
    )

    assert_succeeded(run, target, image)
    assert PASSWORD not in run.stdout + run.stderr
    log = settled_access_log(auth_nginx, 1)
    assert [e.status for e in log] == [206]


def test_wrong_password_fails_at_once_with_401(
    auth_nginx: Nginx, image: SampleImage, tmp_path: Path
) -> None:
    url = auth_nginx.url_for("image.zst")
    run, target = stream_with_auth_file(url, image, tmp_path, f"{USER}:not-the-password")

    assert_failed(run, 3, "401")
    assert run.result()["reason"] == "HTTPError"
    assert "not-the-password" not in run.stdout + run.stderr
    assert_file_target_invalid(target)
    assert [e.status for e in settled_access_log(auth_nginx, 1)] == [401]


def test_missing_credentials_fail_with_401_and_a_hint(
    auth_nginx: Nginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"

    run = stream(auth_nginx.url_for("image.zst"), target, image)

    assert_failed(run, 3, "401", "--auth-file")
    assert_file_target_invalid(target)
    assert [e.status for e in settled_access_log(auth_nginx, 1)] == [401]


def test_missing_auth_file_is_a_usage_error(
    auth_nginx: Nginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"
    missing = tmp_path / "no-such-auth"

    run = stream(auth_nginx.url_for("image.zst"), target, image, "--auth-file", str(missing))

    assert_failed(run, 2, "auth file", str(missing))
    assert_file_target_invalid(target)
    assert auth_nginx.access_log() == []


def test_credentials_are_not_forwarded_on_a_cross_origin_redirect(
    nginx_factory: NginxFactory, nginx_docroot: Path, image: SampleImage, tmp_path: Path
) -> None:
    # Two real nginx servers; each also logs the Authorization header it received.
    def auth_log(name: str) -> tuple[Path, str, str]:
        path = tmp_path / f"{name}-authorization.log"
        http = f"log_format {name}_auth '$http_authorization|$status';"
        return path, http, f"access_log {path} {name}_auth;"

    b_log, b_http, b_server = auth_log("b")
    other = nginx_factory(nginx_docroot, extra_http_config=b_http, extra_server_config=b_server)
    a_log, a_http, a_server = auth_log("a")
    redirect = f"location = /moved.zst {{ return 302 {other.url_for('image.zst')}; }}"
    first = nginx_factory(
        nginx_docroot, extra_http_config=a_http, extra_server_config=f"{a_server}\n{redirect}"
    )

    run, target = stream_with_auth_file(
        first.url_for("moved.zst"), image, tmp_path, f"{USER}:{PASSWORD}"
    )

    assert_succeeded(run, target, image)
    assert log_lines(a_log, 1) == [f"{BASIC}|302"]
    # Another origin (another port) must not get the credentials.
    assert log_lines(b_log, 1) == ["-|206"]


# -- HTTP errors and redaction ----------------------------------------------------------------


def test_404_fails_at_once_with_one_request(
    nginx: Nginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"

    run = stream(nginx.url_for("missing.zst"), target, image)

    assert_failed(run, 3, "404", "/missing.zst")
    assert run.result()["reason"] == "HTTPError"
    assert_file_target_invalid(target)
    log = settled_access_log(nginx, 1)
    assert [(e.uri, e.status) for e in log] == [("/missing.zst", 404)]


def test_404_keeps_an_existing_target_untouched(
    nginx: Nginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"
    target.write_bytes(b"previous image")

    run = stream(nginx.url_for("missing.zst"), target, image)

    assert_failed(run, 3, "404")
    assert target.read_bytes() == b"previous image"
    assert not staging_path(target).exists()


SECRETS = ("hunter2-password", "tok3n-value-4711", "frag-secret")


def _secret_url(server: Nginx, path: str) -> str:
    base = server.base_url.replace("http://", f"http://admin:{SECRETS[0]}@")
    return f"{base}/{path}?token={SECRETS[1]}&x=1#{SECRETS[2]}"


def _assert_no_secret(run: CliRun) -> None:
    everything = run.stdout + run.stderr
    squeezed = "".join(everything.split())  # also catch a secret split by a line wrap
    for secret in (*SECRETS, "admin:"):
        assert secret not in everything, f"{secret!r} leaked:\n{everything}"
        assert secret not in squeezed, f"{secret!r} leaked across a line break:\n{everything}"


@pytest.mark.parametrize("progress", ["json", "plain"])
def test_credentials_in_the_url_are_redacted_on_404(
    nginx: Nginx, image: SampleImage, tmp_path: Path, progress: str
) -> None:
    target = tmp_path / "disk.raw"

    run = stream(_secret_url(nginx, "missing.zst"), target, image, "--progress", progress)

    assert run.code == 3, run.text
    assert "404" in run.text
    # The redacted URL still says where: host, port and path.
    assert f"{nginx.base_url}/missing.zst" in run.text
    _assert_no_secret(run)
    assert_file_target_invalid(target)
    # The request itself did carry the query (redaction is for output only).
    log = settled_access_log(nginx, 1)
    assert log[0].uri == f"/missing.zst?token={SECRETS[1]}&x=1"


def test_credentials_in_the_url_are_redacted_in_retry_warnings(
    image: SampleImage, tmp_path: Path
) -> None:
    # Nothing listens on this port: every attempt fails, and each retry logs a warning.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://admin:{SECRETS[0]}@127.0.0.1:{port}/image.zst?token={SECRETS[1]}#{SECRETS[2]}"
    target = tmp_path / "disk.raw"

    run = stream(url, target, image, "--max-retries", "2")

    assert_failed(run, 3, "giving up", f"127.0.0.1:{port}/image.zst")
    assert run.text.count("retrying the connection") == 2
    _assert_no_secret(run)
    assert_file_target_invalid(target)


def test_credentials_in_the_url_are_redacted_in_verbose_logs(
    nginx: Nginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"

    run = run_imagestream(
        "-v",
        "stream",
        _secret_url(nginx, "missing.zst"),
        str(target),
        "--sha384",
        image.sha384,
        "--progress",
        "plain",
        timeout=45,
    )

    assert run.code == 3, run.text
    _assert_no_secret(run)


def test_credentials_in_the_url_are_used_and_redacted_on_success(
    auth_nginx: Nginx, image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"
    url = auth_nginx.base_url.replace("http://", f"http://{USER}:{PASSWORD}@")

    run = stream(f"{url}/image.zst?token={SECRETS[1]}", target, image, "--progress", "plain")

    assert run.code == 0, run.text
    assert sha384_of(target) == image.raw_sha384
    for secret in (PASSWORD, SECRETS[1]):
        assert secret not in run.stdout + run.stderr


def test_url_with_an_invalid_port_is_a_usage_error(image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    url = f"http://admin:{SECRETS[0]}@127.0.0.1:99999/image.zst?token={SECRETS[1]}"

    run = stream(url, target, image)

    assert_failed(run, 2, "port")
    _assert_no_secret(run)
    assert_file_target_invalid(target)


# -- local sources ----------------------------------------------------------------------------


def test_local_file_path(image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"

    run = stream(str(image.path), target, image)

    assert_succeeded(run, target, image)


def test_file_url(image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"

    run = stream(image.path.as_uri(), target, image)

    assert_succeeded(run, target, image)


def test_missing_local_file_is_a_source_error(image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    missing = tmp_path / "missing.zst"

    run = stream(str(missing), target, image)

    assert_failed(run, 3, str(missing))
    assert_file_target_invalid(target)


def test_unsupported_scheme_is_a_usage_error(image: SampleImage, tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"

    run = stream("ftp://127.0.0.1/image.zst", target, image)

    assert_failed(run, 2, "ftp://")
    assert_file_target_invalid(target)
