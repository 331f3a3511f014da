"""`imagestream serve` as a real process, called by real grpcio clients, writing loop disks.

Images come from a real nginx; the disks are loop devices filled with a pattern first, so
"the image is there", "first MiB zeros" (never valid) and "untouched" each mean something.
The server listens on a Unix socket in the test's temp dir or on loopback TCP with trustme
mutual-TLS certificates.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc
from tests.support.blockdev import LoopDeviceFactory, mounted_ext4
from tests.support.blockdev import run as run_command
from tests.support.cli import run_imagestream
from tests.support.cosi import build_cosi
from tests.support.grpc_service import (
    ServeProcess,
    channel_to,
    completed_of,
    disk_request,
    issue_client,
    log_lines,
    mutual_tls,
    responses,
    stream_disk,
)
from tests.support.nginx import NginxFactory
from tests.support.targets import MIB, PATTERN, fill_pattern, read_device
from tests.support.tools import require_tool

from imagestream import __version__
from imagestream.demo.image import SampleImage, write_raw_image, write_sample_image
from imagestream.service.proto import streaming_pb2 as pb
from imagestream.service.proto import version_pb2, version_pb2_grpc

pytestmark = pytest.mark.usefixtures("require_root")

IMAGE_SIZE = 8 * MIB
DISK_SIZE = 16 * MIB
#: nginx's per-connection rate for the tests that act while a stream runs (about 4 s).
SLOW = "limit_rate 2m;"


class Served:
    """An image in an nginx docroot."""

    def __init__(self, image: SampleImage, url: str) -> None:
        self.image = image
        self.url = url


def serve_image(
    nginx_factory: NginxFactory,
    tmp_path: Path,
    *,
    compressed: bool = False,
    slow: bool = False,
    size: int = IMAGE_SIZE,
) -> Served:
    docroot = tmp_path / "docroot"
    docroot.mkdir(exist_ok=True)
    name = "image.raw.zst" if compressed else "image.raw"
    write = write_sample_image if compressed else write_raw_image
    image = write(docroot / name, size)
    server = nginx_factory(docroot, extra_server_config=SLOW if slow else "")
    return Served(image, server.url_for(name))


def reboot_script(tmp_path: Path, *, succeeds: bool = True) -> tuple[str, Path]:
    """A reboot command that records each run in a file."""
    record = tmp_path / "rebooted"
    script = tmp_path / "reboot.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {record}\nexit {0 if succeeds else 1}\n")
    script.chmod(0o755)
    return str(script), record


def socket_of(tmp_path: Path) -> str:
    return f"unix://{tmp_path}/run/imagestream/imagestream.sock"


@pytest.fixture
def disk(loop_device_factory: LoopDeviceFactory) -> Path:
    dev = loop_device_factory(DISK_SIZE)
    fill_pattern(dev, DISK_SIZE)
    return dev


def assert_image_on(dev: Path, image: SampleImage) -> None:
    raw = read_device(dev, image.raw_size)
    assert hashlib.sha384(raw).hexdigest() == image.raw_sha384


def assert_invalid(dev: Path) -> None:
    assert read_device(dev, MIB) == bytes(MIB), "a failed disk must have its first MiB zeroed"


# -- success on a Unix socket, and the socket itself ------------------------------------------


def test_raw_image_to_a_disk_over_the_unix_socket(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    command, record = reboot_script(tmp_path)
    with ServeProcess(
        "--listen", socket_of(tmp_path), "--disk", disk, "--reboot-command", command
    ) as server:
        socket_path = Path(server.address.removeprefix("unix://"))
        status = socket_path.stat()
        assert stat.S_ISSOCK(status.st_mode)
        assert stat.S_IMODE(status.st_mode) == 0o600
        assert (status.st_uid, status.st_gid) == (0, 0)
        with channel_to(server.address) as channel:
            messages = stream_disk(channel, disk_request(served.url, served.image.sha384))
    completed = completed_of(messages)
    assert completed.status == pb.STATUS_CODE_SUCCESS
    assert completed.image_hash == f"sha384:{served.image.sha384}"
    assert completed.servicing_kind == pb.SERVICING_KIND_CLEAN_INSTALL
    assert completed.reboot_status == pb.REBOOT_REQUIRED
    assert not completed.HasField("error")
    assert not record.exists(), "CALLER_HANDLES_REBOOT must not run the reboot command"
    lines = log_lines(messages)
    resolved = f"resolved source {served.url}, {served.image.compressed_size} bytes, raw"
    assert resolved in lines
    assert any(line.startswith(f"chose {disk}") for line in lines), lines
    assert any(line.startswith("progress 100.0% 8.00 MiB of 8.00 MiB written") for line in lines)
    assert all(m.log.level == pb.LOG_LEVEL_INFO for m in messages if m.HasField("log"))
    assert_image_on(disk, served.image)
    assert not socket_path.exists(), "the server removes its socket when it stops"


def test_a_stale_socket_is_replaced_a_live_one_refused(tmp_path: Path, disk: Path) -> None:
    address = socket_of(tmp_path)
    path = Path(address.removeprefix("unix://"))
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening, closed: what a crashed server leaves
    with ServeProcess("--listen", address, "--disk", disk) as server:
        assert server.address == address
        second = run_imagestream("serve", "--listen", address, "--disk", disk, timeout=30)
        assert second.code == 2, second.text
        assert f"another server is listening on {path}" in second.text
        with channel_to(server.address) as channel:  # the first one still serves
            version = version_pb2_grpc.VersionServiceStub(channel).Version(
                version_pb2.VersionRequest(), timeout=10
            )
        assert version.version == __version__


def test_a_socket_that_cannot_be_created_is_a_usage_error(tmp_path: Path, disk: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the socket's directory should be
    run = run_imagestream("serve", "--listen", f"unix://{blocker}/s.sock", "--disk", disk)
    assert run.code == 2, run.text
    assert f"cannot listen on unix://{blocker}/s.sock" in run.text
    assert "Traceback" not in run.text
    taken = tmp_path / "not-a-socket"
    taken.write_text("")
    run = run_imagestream("serve", "--listen", f"unix://{taken}", "--disk", disk)
    assert run.code == 2, run.text
    assert "exists and is not a socket" in run.text
    assert taken.read_text() == ""


# -- TCP with mutual TLS: zstd image, Version, health, reflection, refused certificates --------


def test_zstd_image_over_mutual_tls_with_version_health_and_reflection(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path, compressed=True)
    tls = mutual_tls(tmp_path / "tls")
    with ServeProcess("--listen", "tcp://127.0.0.1:0", *tls.serve_args(), "--disk", disk) as server:
        assert server.address.startswith("tcp://127.0.0.1:")
        with channel_to(server.address, tls.client) as channel:
            version = version_pb2_grpc.VersionServiceStub(channel).Version(
                version_pb2.VersionRequest(), timeout=10
            )
            # The health stub's typing stubs lack its methods.
            health: Any = health_pb2_grpc.HealthStub(channel)
            for service in ("", "trident.v1.StreamingService", "trident.v1.VersionService"):
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
            reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed = list(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
            )
            names = {s.name for s in listed[0].list_services_response.service}
            messages = stream_disk(
                channel, disk_request(served.url, served.image.sha384, pb.CALLER_HANDLES_REBOOT)
            )
        client_files = tmp_path / "client"
        client_files.mkdir()
        for name, pem in (
            ("cert.pem", tls.client.cert_chain),
            ("key.pem", tls.client.key),
            ("ca.pem", tls.client.server_ca),
        ):
            (client_files / name).write_bytes(pem)
        fill_pattern(disk, DISK_SIZE)
        by_cli = run_imagestream(
            "stream-disk",
            served.url,
            "--sha384",
            served.image.sha384,
            "--server",
            server.address,
            "--caller-handles-reboot",
            "--progress",
            "json",
            "--tls-cert",
            client_files / "cert.pem",
            "--tls-key",
            client_files / "key.pem",
            "--server-ca",
            client_files / "ca.pem",
        )
    assert by_cli.code == 0, by_cli.text
    assert by_cli.result()["imageHash"] == f"sha384:{served.image.sha384}"
    assert by_cli.result()["rebootStatus"] == "REBOOT_REQUIRED"
    assert version.version == __version__
    assert {"trident.v1.StreamingService", "trident.v1.VersionService"} <= names
    assert "grpc.health.v1.Health" in names
    completed = completed_of(messages)
    assert completed.status == pb.STATUS_CODE_SUCCESS, completed
    assert_image_on(disk, served.image)


def test_wrong_or_missing_client_certificate_is_refused(tmp_path: Path, disk: Path) -> None:
    tls = mutual_tls(tmp_path / "tls")
    # Signed by a CA the server does not trust, for a client that trusts the server.
    stranger = issue_client(trustme.CA(), tls.client.server_ca)
    with ServeProcess("--listen", "tcp://127.0.0.1:0", *tls.serve_args(), "--disk", disk) as server:
        trusted_ca = tls.client.server_ca
        with channel_to(server.address, stranger) as channel, pytest.raises(grpc.RpcError) as err:
            version_pb2_grpc.VersionServiceStub(channel).Version(
                version_pb2.VersionRequest(), timeout=5
            )
        assert isinstance(err.value, grpc.Call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        address = server.address.removeprefix("tcp://")
        no_cert = grpc.ssl_channel_credentials(root_certificates=trusted_ca)
        with grpc.secure_channel(address, no_cert) as channel, pytest.raises(grpc.RpcError):
            version_pb2_grpc.VersionServiceStub(channel).Version(
                version_pb2.VersionRequest(), timeout=5
            )
        plain = run_imagestream(
            "serve", "--listen", "tcp://127.0.0.1:0", "--disk", disk, timeout=30
        )
    assert plain.code == 2
    assert "there is no plaintext TCP" in plain.text


# -- refusals and failures ---------------------------------------------------------------------


def test_hash_mismatch_fails_leaves_the_disk_invalid_and_never_reboots(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    command, record = reboot_script(tmp_path)
    with (
        ServeProcess(
            "--listen", socket_of(tmp_path), "--disk", disk, "--reboot-command", command
        ) as server,
        channel_to(server.address) as channel,
    ):
        messages = stream_disk(
            channel, disk_request(served.url, "0" * 96, pb.TRIDENT_HANDLES_REBOOT)
        )
    completed = completed_of(messages)
    assert completed.status == pb.STATUS_CODE_FAILURE
    assert completed.error.kind == pb.SERVICING_ERROR
    assert completed.error.subkind == "HashMismatch"
    assert "SHA-384 mismatch" in completed.error.message
    assert completed.reboot_status == pb.REBOOT_NOT_REQUIRED
    assert not completed.HasField("image_hash")
    assert any(m.log.level == pb.LOG_LEVEL_ERROR for m in messages if m.HasField("log"))
    assert not record.exists()
    assert_invalid(disk)


def test_missing_or_malformed_hash_is_refused_before_anything_is_fetched(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    with (
        ServeProcess("--listen", socket_of(tmp_path), "--disk", disk) as server,
        channel_to(server.address) as channel,
    ):
        missing = completed_of(stream_disk(channel, disk_request(served.url, None)))
        sha256 = completed_of(stream_disk(channel, disk_request(served.url, "sha256:" + "a" * 64)))
        short = completed_of(stream_disk(channel, disk_request(served.url, "sha384:abc")))
    assert missing.error.kind == pb.INVALID_INPUT_ERROR
    assert missing.error.subkind == "HashRequired"
    for refused in (sha256, short):
        assert refused.status == pb.STATUS_CODE_FAILURE
        assert refused.error.kind == pb.INVALID_INPUT_ERROR
        assert refused.error.subkind == "InvalidRequest"
    assert read_device(disk, MIB) == PATTERN * (MIB // len(PATTERN)), "the disk was touched"


def test_allow_unverified_accepts_a_request_without_a_hash(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    with (
        ServeProcess(
            "--listen", socket_of(tmp_path), "--disk", disk, "--allow-unverified"
        ) as server,
        channel_to(server.address) as channel,
    ):
        messages = stream_disk(channel, disk_request(served.url, None))
    completed = completed_of(messages)
    warnings = [m.log.message for m in messages if m.log.level == pb.LOG_LEVEL_WARN]
    assert warnings == ["no image_hash was given: the image was written UNVERIFIED"]
    assert completed.status == pb.STATUS_CODE_SUCCESS
    assert completed.image_hash == f"sha384:{served.image.sha384}"
    assert_image_on(disk, served.image)


# -- one servicing at a time, a client that goes away, SIGTERM -------------------------------


def _first_progress(stream: Iterator[pb.ServicingResponse]) -> list[pb.ServicingResponse]:
    """The messages up to the first progress line that says bytes were written."""
    seen = []
    for message in stream:
        seen.append(message)
        text = message.log.message
        if text.startswith("progress") and " 0 B written" not in text and " 0 B of" not in text:
            return seen
    raise AssertionError(f"the stream ended before any progress: {seen}")


def test_a_second_request_while_one_runs_is_refused_at_once(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path, slow=True)
    with (
        ServeProcess("--listen", socket_of(tmp_path), "--disk", disk) as server,
        channel_to(server.address) as channel,
    ):
        first = responses(channel, disk_request(served.url, served.image.sha384))
        _first_progress(first)
        started = time.monotonic()
        second = completed_of(stream_disk(channel, disk_request(served.url, served.image.sha384)))
        refused_in = time.monotonic() - started
        rest = list(first)
    assert refused_in < 2
    assert second.status == pb.STATUS_CODE_FAILURE
    assert second.error.kind == pb.SERVICING_ERROR
    assert second.error.subkind == "ServicingInProgress"
    assert served.url in second.error.message
    assert rest[-1].completed.status == pb.STATUS_CODE_SUCCESS
    assert_image_on(disk, served.image)


def test_a_client_that_disconnects_does_not_abort_the_stream(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path, slow=True)
    with ServeProcess("--listen", socket_of(tmp_path), "--disk", disk) as server:
        with channel_to(server.address) as channel:
            call = responses(channel, disk_request(served.url, served.image.sha384))
            _first_progress(call)
            call.cancel()  # type: ignore[attr-defined]
        server.wait_output("verified", timeout=60)
        assert_image_on(disk, served.image)
        with channel_to(server.address) as channel:  # and the next servicing may start
            again = completed_of(
                stream_disk(channel, disk_request(served.url, served.image.sha384))
            )
        assert again.status == pb.STATUS_CODE_SUCCESS


def test_sigterm_mid_stream_cancels_it_and_leaves_the_disk_invalid(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path, slow=True)
    command, record = reboot_script(tmp_path)
    server = ServeProcess(
        "--listen", socket_of(tmp_path), "--disk", disk, "--reboot-command", command
    ).start()
    try:
        with channel_to(server.address) as channel:
            call = responses(
                channel, disk_request(served.url, served.image.sha384, pb.TRIDENT_HANDLES_REBOOT)
            )
            seen = _first_progress(call)
            server.process.send_signal(15)
            seen.extend(call)
            code = server.process.wait(timeout=30)
    finally:
        server.stop()
    completed = completed_of(seen)
    assert completed.status == pb.STATUS_CODE_FAILURE
    assert completed.error.subkind == "Cancelled"
    assert completed.error.kind == pb.SERVICING_ERROR
    assert "left invalid" in completed.error.message
    assert code == 0
    assert not record.exists()
    assert_invalid(disk)


# -- several disks -----------------------------------------------------------------------------


def test_the_smallest_disk_that_fits_is_chosen_and_the_others_explained(
    nginx_factory: NginxFactory, tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    small = loop_device_factory(4 * MIB)
    large = loop_device_factory(64 * MIB)
    fitting = loop_device_factory(12 * MIB)
    mounted = loop_device_factory(32 * MIB)
    read_only = loop_device_factory(10 * MIB)
    for dev in (small, large, fitting):
        fill_pattern(dev, 4 * MIB)
    disks = (large, small, mounted, read_only, fitting)
    with (
        read_only_device(read_only),
        mounted_ext4(mounted, tmp_path / "mnt"),
        ServeProcess(
            "--listen", socket_of(tmp_path), *(a for dev in disks for a in ("--disk", str(dev)))
        ) as server,
        channel_to(server.address) as channel,
    ):
        messages = stream_disk(channel, disk_request(served.url, served.image.sha384))
    completed = completed_of(messages)
    assert completed.status == pb.STATUS_CODE_SUCCESS, completed
    lines = log_lines(messages)
    assert (
        f"chose {fitting}: the smallest disk that fits ({12 * MIB} bytes for {IMAGE_SIZE})" in lines
    )
    assert f"not chosen: {small}: too small ({4 * MIB} bytes for {IMAGE_SIZE})" in lines
    assert f"not chosen: {large}: larger ({64 * MIB} bytes)" in lines
    assert any(line.startswith(f"not chosen: {mounted}: is mounted at") for line in lines), lines
    assert f"not chosen: {read_only}: read-only" in lines
    assert_image_on(fitting, served.image)
    assert read_device(large, MIB) == PATTERN * (MIB // len(PATTERN))


def test_no_disk_fits_and_a_missing_image_are_failures_with_their_reasons(
    nginx_factory: NginxFactory, tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    small, smaller = loop_device_factory(6 * MIB), loop_device_factory(4 * MIB)
    with (
        ServeProcess("--listen", socket_of(tmp_path), "--disk", small, "--disk", smaller) as server,
        channel_to(server.address) as channel,
    ):
        too_big = completed_of(stream_disk(channel, disk_request(served.url, served.image.sha384)))
        missing_url = served.url.replace("image.raw", "missing.raw")
        missing = completed_of(stream_disk(channel, disk_request(missing_url, "0" * 96)))
    assert too_big.error.kind == pb.UNSUPPORTED_CONFIGURATION_ERROR
    assert too_big.error.subkind == "NoDiskFits"
    assert f"{small}: too small ({6 * MIB} bytes for {IMAGE_SIZE})" in too_big.error.message
    assert f"{smaller}: too small ({4 * MIB} bytes for {IMAGE_SIZE})" in too_big.error.message
    assert missing.error.kind == pb.SERVICING_ERROR
    assert missing.error.subkind == "HTTPError"
    assert "404" in missing.error.message


@contextlib.contextmanager
def read_only_device(dev: Path) -> Iterator[None]:
    """`blockdev --setro` for the block, `--setrw` after (the kernel's read-only flag)."""
    blockdev = require_tool("blockdev")
    run_command([blockdev, "--setro", dev])
    try:
        yield
    finally:
        run_command([blockdev, "--setrw", dev])


# -- the reboot ----------------------------------------------------------------------------------


@pytest.mark.parametrize("succeeds", [True, False], ids=["reboot-started", "reboot-failed"])
def test_trident_handles_reboot_runs_the_command_after_a_success(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path, succeeds: bool
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    command, record = reboot_script(tmp_path, succeeds=succeeds)
    with (
        ServeProcess(
            "--listen", socket_of(tmp_path), "--disk", disk, "--reboot-command", command
        ) as server,
        channel_to(server.address) as channel,
    ):
        messages = stream_disk(
            channel, disk_request(served.url, served.image.sha384, pb.TRIDENT_HANDLES_REBOOT)
        )
    completed = completed_of(messages)
    assert completed.status == pb.STATUS_CODE_SUCCESS
    assert record.read_text() == "ran\n"
    if succeeds:
        assert completed.reboot_status == pb.REBOOT_STARTED
    else:
        assert completed.reboot_status == pb.REBOOT_REQUIRED
        warnings = [
            m.log.message
            for m in messages
            if m.HasField("log") and m.log.level == pb.LOG_LEVEL_WARN
        ]
        assert any("reboot command" in w and "failed" in w for w in warnings), warnings


# -- the client: imagestream stream-disk, and one built from the .proto files alone ------------


def test_stream_disk_client_exit_codes(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    served = serve_image(nginx_factory, tmp_path)
    with ServeProcess("--listen", socket_of(tmp_path), "--disk", disk) as server:
        base = ("stream-disk", served.url, "--server", server.address, "--progress", "plain")
        ok = run_imagestream(*base, "--sha384", served.image.sha384, "--caller-handles-reboot")
        mismatch = run_imagestream(*base, "--sha384", "1" * 96, "--caller-handles-reboot")
        missing = run_imagestream(*base)
    bad = run_imagestream("stream-disk", served.url, "--sha384", "xyz", "--server", "unix:///x")
    assert ok.code == 0, ok.text
    assert f"sha384:{served.image.sha384}" in ok.stdout
    assert "reboot required" in ok.stdout
    assert "written" in ok.stderr  # the progress display
    assert mismatch.code == 4, mismatch.text
    assert "(HashMismatch)" in mismatch.text
    assert missing.code == 2, missing.text
    assert "(HashRequired)" in missing.text
    assert bad.code == 2, bad.text
    assert "--sha384 must be 96 hexadecimal digits" in bad.text


_FOREIGN_CLIENT = textwrap.dedent(
    """
    import sys
    import grpc
    from trident.v1 import streaming_pb2, streaming_pb2_grpc
    address, url, digest = sys.argv[1:]
    with grpc.insecure_channel(address) as channel:
        stub = streaming_pb2_grpc.StreamingServiceStub(channel)
        request = streaming_pb2.StreamDiskRequest(
            image_url=url,
            image_hash="sha384:" + digest,
            reboot=streaming_pb2.RebootManagement(
                handling=streaming_pb2.CALLER_HANDLES_REBOOT
            ),
        )
        kinds = []
        for response in stub.StreamDisk(request):
            kinds.append(response.WhichOneof("response"))
            if response.HasField("completed"):
                done = response.completed
    print(kinds[0], kinds[-1], streaming_pb2.StatusCode.Name(done.status), done.image_hash)
    """
)


def _foreign_client(tmp_path: Path) -> Path:
    """The .proto laid out as Trident's (trident/v1/), compiled afresh: no module of ours."""
    proto_root = tmp_path / "protos"
    (proto_root / "trident/v1").mkdir(parents=True)
    source = Path(__file__).resolve().parents[2] / "operator/imagestream/service/proto"
    (proto_root / "trident/v1/streaming.proto").write_text((source / "streaming.proto").read_text())
    out = tmp_path / "client"
    out.mkdir()
    include = importlib.resources.files("grpc_tools") / "_proto"
    argv = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}"]
    argv += [f"--grpc_python_out={out}", "trident/v1/streaming.proto"]
    assert protoc.main(argv) == 0
    return out


def _run_foreign_client(client: Path, address: str, url: str, digest: str) -> list[str]:
    socket_address = f"unix:{address.removeprefix('unix://')}"
    run = subprocess.run(
        [sys.executable, "-c", _FOREIGN_CLIENT, socket_address, url, digest],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(client)},
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_a_client_built_from_the_proto_files_alone(
    nginx_factory: NginxFactory, tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    """A raw image, then a COSI image (its hash that of metadata.json), both to loop disks."""
    client = _foreign_client(tmp_path)
    served = serve_image(nginx_factory, tmp_path)
    cosi = build_cosi(tmp_path / "cosi")
    os.link(cosi.path, tmp_path / "docroot" / "image.cosi")
    cosi_url = served.url.replace("image.raw", "image.cosi")
    raw_disk = loop_device_factory(DISK_SIZE)
    cosi_disk = loop_device_factory(cosi.disk_size)
    for disk, url, digest in (
        (raw_disk, served.url, served.image.sha384),
        (cosi_disk, cosi_url, cosi.metadata_sha384),
    ):
        with ServeProcess("--listen", socket_of(tmp_path), "--disk", disk) as server:
            said = _run_foreign_client(client, server.address, url, digest)
        assert said == ["started", "completed", "STATUS_CODE_SUCCESS", f"sha384:{digest}"]
    assert_image_on(raw_disk, served.image)
    for part in cosi.partitions:
        raw = part.raw.read_bytes()
        assert read_device(cosi_disk, len(raw), part.offset) == raw, f"partition {part.number}"
    assert "No problems found" in run_command([require_tool("sgdisk"), "-v", cosi_disk])


# -- systemd socket activation and the shipped units ------------------------------------------

UNITS = Path(__file__).resolve().parents[2] / "packaging/systemd"


def test_socket_activation_serves_connections_on_the_socket_it_was_passed(
    nginx_factory: NginxFactory, tmp_path: Path, disk: Path
) -> None:
    """As systemd does it: the socket bound and listening before the server runs, on fd 3,
    with LISTEN_FDS=1 and LISTEN_PID naming the server's own pid."""
    served = serve_image(nginx_factory, tmp_path)
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen()
    # The launcher puts the socket on fd 3 and names its own pid, which the exec'ed server keeps.
    launcher = textwrap.dedent(
        f"""
        import os, sys
        os.dup2({listener.fileno()}, 3)
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
        os.execv(sys.argv[1], sys.argv[1:])
        """
    )
    imagestream = str(Path(sys.executable).with_name("imagestream"))
    with subprocess.Popen(
        [sys.executable, "-c", launcher, imagestream, "serve", "--disk", str(disk)],
        pass_fds=(listener.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        listener.close()  # the server holds it now, as systemd's would
        assert process.stdout is not None
        first = process.stdout.readline()  # the server is up (though connections queue anyway)
        try:
            with channel_to(f"unix://{path}") as channel:
                messages = stream_disk(channel, disk_request(served.url, served.image.sha384))
            process.terminate()
            rest, _ = process.communicate(timeout=30)
            output = first + rest
        finally:
            if process.poll() is None:
                process.kill()
    assert f"listening on unix://{path}" in output, output
    assert completed_of(messages).status == pb.STATUS_CODE_SUCCESS
    assert_image_on(disk, served.image)
    assert path.exists(), "the socket is systemd's: the server leaves it in place"
    assert process.returncode == 0, output


def test_the_units_are_tridentd_style_socket_activation() -> None:
    socket_unit = (UNITS / "imagestream.socket").read_text()
    service_unit = (UNITS / "imagestream.service").read_text()
    assert "ListenStream=/run/imagestream/imagestream.sock\n" in socket_unit
    assert "SocketMode=0600\n" in socket_unit
    assert "Accept=no\n" in socket_unit
    assert "Requires=imagestream.socket\n" in service_unit
    assert "ExecStart=/usr/local/bin/imagestream serve $IMAGESTREAM_SERVE_ARGS\n" in service_unit
    from imagestream import defaults  # noqa: PLC0415

    assert defaults.SERVICE_LISTEN == "unix:///run/imagestream/imagestream.sock"


def test_a_cosi_image_through_the_whole_disk_target_with_a_trident_style_request(
    nginx_factory: NginxFactory, tmp_path: Path, loop_device_factory: LoopDeviceFactory
) -> None:
    """The issue's done-when: a COSI image streamed to a disk through StreamDisk (the hash that
    of metadata.json), the disk checked by sgdisk, byte comparisons and fsck; a second, smaller
    disk that cannot take `disk.size` is passed over."""
    image = build_cosi(tmp_path / "cosi")
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    os.link(image.path, docroot / "image.cosi")
    url = nginx_factory(docroot).url_for("image.cosi")
    dev = loop_device_factory(image.disk_size + 8 * MIB)
    too_small = loop_device_factory(image.disk_size - 4 * MIB)
    fill_pattern(dev, 4 * MIB)
    try:
        with (
            ServeProcess(
                "--listen", socket_of(tmp_path), "--disk", too_small, "--disk", dev
            ) as server,
            channel_to(server.address) as channel,
        ):
            messages = stream_disk(channel, disk_request(url, image.metadata_sha384))
        completed = completed_of(messages)
        assert completed.status == pb.STATUS_CODE_SUCCESS, completed
        assert completed.image_hash == f"sha384:{image.metadata_sha384}"
        assert completed.servicing_kind == pb.SERVICING_KIND_CLEAN_INSTALL
        lines = log_lines(messages)
        needed = image.disk_size
        assert (
            f"chose {dev}: the smallest disk that fits ({dev_size(dev)} bytes for {needed})"
            in lines
        )
        count = len(image.partitions)
        for number in range(1, count + 1):
            assert f"writing partition {number} of {count}" in lines, lines
            assert f"partition {number} of {count} verified" in lines, lines
        assert any(
            f"partition {count} of {count}" in line for line in lines if line.startswith("progress")
        )
        assert "No problems found" in run_command([require_tool("sgdisk"), "-v", dev])
        for part in image.partitions:
            raw = part.raw.read_bytes()
            assert read_device(dev, len(raw), part.offset) == raw, f"partition {part.number}"
        run_command([require_tool("partx"), "-a", dev])
        nodes = sorted(Path("/dev").glob(f"{dev.name}p*"))
        for part, node in zip(image.partitions, nodes, strict=True):
            run_command([require_tool(f"fsck.{part.spec.fs}"), "-n", node])
    finally:
        if sorted(Path("/dev").glob(f"{dev.name}p*")):
            run_command([require_tool("partx"), "-d", dev])
    assert read_device(too_small, MIB) == bytes(MIB)  # a sparse new disk, never written


def dev_size(dev: Path) -> int:
    return int(run_command([require_tool("blockdev"), "--getsize64", dev]))
