"""Ctrl-C while an `oci://` source resolves: a registry or a token service that never answers.

The manifest resolution and the token requests happen before the stream's stages start, in the
CLI's main thread; a cancel must end them as promptly as a stalled blob read (exit 130 within
two seconds, nothing written, the target unchanged), not after the 30 s stall timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.cli import imagestream_process
from tests.support.interrupts import assert_cancelled, interrupted
from tests.support.registry import Registry, TokenAuth
from tests.support.silent_server import SilentServer
from tests.support.targets import assert_file_target_invalid
from tests.support.token_server import TokenSigner

from imagestream.demo.image import SampleImage

pytestmark = pytest.mark.timeout(90)

UNCHANGED = "nothing was written, the target is unchanged"


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out / "disk.raw"


def stream_args(reference: str, target: Path, image: SampleImage, *extra: str) -> list[str]:
    return [
        "stream",
        reference,
        str(target),
        "--sha384",
        image.sha384,
        "--progress",
        "json",
        "--stall-timeout",
        "30",
        *extra,
    ]


def wait_for_connection(server: SilentServer) -> None:
    """Until the CLI connected to `server`, and a moment more so that it waits on it."""
    deadline = time.monotonic() + 20
    while not server.accepted:
        assert time.monotonic() < deadline, "the CLI never connected"
        time.sleep(0.02)
    time.sleep(0.5)


@pytest.mark.parametrize(
    "extra",
    [(), ("--plain-http",)],
    ids=["tls-handshake", "manifest-request"],
)
def test_ctrl_c_while_the_registry_does_not_answer(
    silent: SilentServer, sample_image: SampleImage, target: Path, extra: tuple[str, ...]
) -> None:
    # A loopback registry is first asked over TLS: without --plain-http the CLI waits in the
    # handshake, with it for the answer to its manifest request.
    reference = f"oci://{silent.address}/fleet/os:v1"
    with imagestream_process(*stream_args(reference, target, sample_image, *extra)) as process:
        wait_for_connection(silent)
        seconds, stdout, stderr = interrupted(process)

    assert_cancelled(process, seconds, stdout, stderr, "while opening the source", UNCHANGED)
    assert_file_target_invalid(target)


def test_ctrl_c_during_a_token_request(
    silent: SilentServer,
    token_signer: TokenSigner,
    sample_image: SampleImage,
    target: Path,
    tmp_path: Path,
) -> None:
    # A real registry whose Bearer challenge sends the CLI to a token service that hangs.
    auth = TokenAuth(
        realm=f"http://{silent.address}/token",
        service="imagestream-test-registry",
        issuer="imagestream-test-token-server",
        root_bundle=token_signer.root_bundle,
    )
    with Registry(tmp_path / "registry", auth=auth) as registry:
        reference = registry.reference("fleet/os", tag="v1")
        with imagestream_process(*stream_args(reference, target, sample_image)) as process:
            wait_for_connection(silent)
            seconds, stdout, stderr = interrupted(process)

    assert_cancelled(process, seconds, stdout, stderr, "while opening the source", UNCHANGED)
    assert_file_target_invalid(target)
