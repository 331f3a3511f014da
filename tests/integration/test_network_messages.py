"""What the CLI says about the network, against real servers: nginx, tinyproxy, trustme TLS.

A connection that never succeeded is retried as a connection (not "resumed at byte 0", not
counted in `resumes`), and one that cannot succeed soon (refused on loopback, a name that does
not resolve) only a few times, quickly. The warnings and the final error count the same
attempts; nothing is printed after a cancel. A proxy that refuses is named as the proxy, TLS
hints fit the failure, and a 403 says whether credentials were sent.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import trustme
from tests.support.cli import CliRun, imagestream_env, imagestream_process, run_imagestream
from tests.support.nginx import Nginx, NginxFactory, TLSNginx
from tests.support.range_server import Fault, FaultPlan, RangeServer
from tests.support.targets import MIB
from tests.support.tinyproxy import Tinyproxy
from tests.support.tools import wait_until

from imagestream import defaults
from imagestream.demo.image import SampleImage, write_sample_image

HASH = "ab" * 48


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    return write_sample_image(tmp_path_factory.mktemp("img") / "image.zst", 8 * MIB, seed=61)


def stream(url: str, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> CliRun:
    return run_imagestream(
        "stream", url, tmp_path / "out.img", "--sha384", HASH, "--progress", "json", *extra, env=env
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def warnings(run: CliRun) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("WARNING")]


# -- retries ---------------------------------------------------------------------------------


def test_a_refused_loopback_connection_is_retried_briefly_as_a_connection(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/image.zst"
    run = stream(url, tmp_path)  # the default --max-retries (8) and backoff
    result = run.result()
    assert (run.code, result["reason"]) == (3, "RetriesExhausted")
    assert run.seconds < 5, "a refused loopback port was retried for long"
    lines = warnings(run)
    assert len(lines) == defaults.QUICK_FAIL_RETRIES
    assert all("retrying the connection" in line for line in lines)
    assert "resuming" not in run.stderr
    attempts = defaults.QUICK_FAIL_RETRIES + 1
    # The warnings and the final error count the same attempts.
    assert f"(attempt {attempts - 1} of {attempts} failed)" in lines[-1]
    assert f"after {attempts} attempts" in result["message"]
    assert result["resumes"] == 0


def test_a_name_that_does_not_resolve_is_retried_briefly(tmp_path: Path) -> None:
    run = stream("http://imagestream-test.invalid/image.zst", tmp_path)
    assert (run.code, run.result()["reason"]) == (3, "RetriesExhausted")
    assert run.seconds < 5
    assert len(warnings(run)) == defaults.QUICK_FAIL_RETRIES
    assert run.result()["resumes"] == 0


def test_a_reset_after_the_answer_is_a_resume(image: SampleImage, tmp_path: Path) -> None:
    plan = FaultPlan([Fault.reset(2 * MIB + 17)])
    with RangeServer(image.path, faults=plan) as server:
        run = run_imagestream(
            "stream", server.url, tmp_path / "o", "--sha384", image.sha384, "--progress", "json"
        )
    assert run.code == 0, run.text
    assert re.search(r"resuming at byte \d+", run.stderr)
    assert run.result()["resumes"] == 1


def test_nothing_is_printed_after_a_cancel(image: SampleImage, tmp_path: Path) -> None:
    plan = FaultPlan([Fault.stall(2 * MIB, seconds=60)])
    with RangeServer(image.path, faults=plan) as server:
        args = ("stream", server.url, tmp_path / "o", "--sha384", image.sha384)
        with imagestream_process(*args, "--progress", "json", "--stall-timeout", "30") as process:
            wait_until(lambda: bool(server.requests), 20, what="a request")
            time.sleep(1.0)  # inside the stall
            process.send_signal(2)
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    signalled = next(i for i, line in enumerate(lines) if "SIGINT" in line)
    # After the signal's own line: only the final error, no retry or resume warning.
    after = lines[signalled + 1 :]
    assert len(after) == 1, stderr
    assert after[0].startswith("error (Cancelled)"), stderr


# -- proxies ---------------------------------------------------------------------------------


def test_a_proxy_that_refuses_the_tunnel_is_named(
    nginx_tls: TLSNginx, image: SampleImage, tmp_path: Path
) -> None:
    (nginx_tls.server.docroot / "image.zst").write_bytes(image.path.read_bytes())
    with Tinyproxy(tmp_path / "proxy", extra_config="ConnectPort 443\n") as proxy:
        env = imagestream_env(HTTPS_PROXY=proxy.url)
        ca = str(nginx_tls.ca_bundle)
        run = stream(nginx_tls.url_for("image.zst"), tmp_path, "--ca-file", ca, env=env)
    assert run.code == 3, run.text
    assert f"the proxy {proxy.url} refused the connection" in run.result()["message"]
    assert warnings(run) == [], "a refusing proxy was retried"


def test_a_plain_http_proxy_that_refuses_is_named(tmp_path: Path) -> None:
    rules = tmp_path / "filter"
    rules.write_text("nothing-matches-this\n")
    config = f'FilterDefaultDeny Yes\nFilter "{rules}"\n'
    with Tinyproxy(tmp_path / "proxy", extra_config=config) as proxy:
        env = imagestream_env(HTTP_PROXY=proxy.url)
        run = stream(f"http://127.0.0.1:{free_port()}/image.zst", tmp_path, env=env)
    message = run.result()["message"]
    assert (run.code, run.result()["reason"]) == (3, "HTTPError")
    assert f"HTTP 403 Filtered (through the proxy {proxy.url}" in message


def test_a_proxy_that_does_not_listen_is_named(nginx: Nginx, tmp_path: Path) -> None:
    proxy = f"http://127.0.0.1:{free_port()}"
    run = stream(nginx.url_for("image.zst"), tmp_path, env=imagestream_env(HTTP_PROXY=proxy))
    assert run.code == 3, run.text
    assert f"cannot connect to the proxy {proxy}" in run.result()["message"]


# -- TLS -------------------------------------------------------------------------------------


def test_a_name_mismatch_does_not_suggest_a_ca_file(
    nginx_factory: NginxFactory, nginx_docroot: Path, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    cert = tls_ca.issue_cert("images.example")
    chain, key, ca = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    tls_ca.cert_pem.write_to_path(str(ca))
    server = nginx_factory(nginx_docroot, cert_file=chain, key_file=key)
    run = stream(server.url_for("image.zst"), tmp_path, "--ca-file", str(ca))
    message = run.result()["message"]
    assert (run.code, run.result()["reason"]) == (3, "TLSVerificationFailed")
    assert "issued for another name" in message
    assert "pass the issuing CA" not in message


def test_https_against_a_plain_http_port_says_so(nginx: Nginx, tmp_path: Path) -> None:
    url = nginx.url_for("image.zst").replace("http://", "https://")
    run = stream(url, tmp_path)
    assert run.code == 3, run.text
    assert "does not speak TLS on that port" in run.result()["message"]
    assert warnings(run) == []


# -- refusals --------------------------------------------------------------------------------


def test_a_403_without_credentials_says_none_were_sent(
    nginx_factory: NginxFactory, nginx_docroot: Path, image: SampleImage, tmp_path: Path
) -> None:
    (nginx_docroot / "image.zst").write_bytes(image.path.read_bytes())
    server = nginx_factory(nginx_docroot, extra_server_config="location = /image.zst { deny all; }")
    run = stream(server.url_for("image.zst"), tmp_path)
    assert (run.code, run.result()["reason"]) == (3, "HTTPError")
    assert "HTTP 403" in run.result()["message"]
    assert "no credentials were sent" in run.result()["message"]

    auth = tmp_path / "auth"
    auth.write_text("user:password\n")
    run = stream(server.url_for("image.zst"), tmp_path, "--auth-file", str(auth))
    assert "the credentials given lack access" in run.result()["message"]
