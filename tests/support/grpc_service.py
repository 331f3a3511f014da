"""A real `imagestream serve` process for tests, and a grpcio client of its services.

:class:`ServeProcess` starts the server (its own session, so a stop reaches it alone), waits
for the "listening on ADDRESS" line it prints and keeps its output. :func:`stream_disk`
calls StreamDisk over a real channel and collects the responses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import trustme

from imagestream.service.proto import streaming_pb2 as pb
from imagestream.service.proto import streaming_pb2_grpc

from .cli import imagestream_command, imagestream_env
from .tools import die_with_parent, stop_process, wait_until

_LISTENING = "imagestream serve: listening on "


class ServeProcess:
    """`imagestream serve ARGS...`; `address` is what it bound (the real port for :0)."""

    def __init__(self, *args: str | os.PathLike[str]) -> None:
        self.args = [os.fspath(arg) for arg in args]
        self.address = ""
        self._lines: list[str] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def process(self) -> subprocess.Popen[str]:
        """The running server."""
        assert self._process is not None, "not started"
        return self._process

    @property
    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return "".join(self._lines)

    def start(self, timeout: float = 20.0) -> ServeProcess:
        """Start the server and wait until it listens (or fail with its output)."""
        self._process = subprocess.Popen(
            die_with_parent(imagestream_command("serve", *self.args)),
            env=imagestream_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

        def listening() -> bool:
            if self.process.poll() is not None and not self.address:
                raise AssertionError(f"imagestream serve exited early:\n{self.output}")
            return bool(self.address)

        wait_until(listening, timeout, what="imagestream serve to listen")
        return self

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append(line)
            if line.startswith(_LISTENING):
                self.address = line.removeprefix(_LISTENING).strip()

    def wait_output(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the server's output contains `text`."""
        wait_until(lambda: text in self.output, timeout, what=f"server output {text!r}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit status once it stopped."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def stop(self) -> None:
        """Stop the server if it still runs (SIGTERM, then SIGKILL)."""
        if self._process is not None:
            stop_process(self._process)  # type: ignore[arg-type]
            if self._reader is not None:
                self._reader.join(10)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class ClientTls:
    """A client's certificate and key, and the CA of the server's certificate (PEM bytes)."""

    cert_chain: bytes
    key: bytes
    server_ca: bytes


@dataclass
class MutualTls:
    """Files for a server (`--tls-cert/--tls-key/--client-ca`) and a client's credentials."""

    server_cert: Path
    server_key: Path
    client_ca: Path
    client: ClientTls
    extra: dict[str, ClientTls] = field(default_factory=dict)

    def serve_args(self) -> list[str]:
        """The server's TLS arguments."""
        return [
            "--tls-cert",
            str(self.server_cert),
            "--tls-key",
            str(self.server_key),
            "--client-ca",
            str(self.client_ca),
        ]


def issue_client(ca: trustme.CA, server_ca: bytes) -> ClientTls:
    """A client certificate from `ca`, trusting the server CA's certificate `server_ca`."""
    cert = ca.issue_cert("client@imagestream.test")
    return ClientTls(
        cert_chain=b"".join(pem.bytes() for pem in cert.cert_chain_pems),
        key=cert.private_key_pem.bytes(),
        server_ca=server_ca,
    )


def mutual_tls(directory: Path) -> MutualTls:
    """A server CA, a client CA, a server certificate for 127.0.0.1 and a client's."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    files = MutualTls(
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_ca=directory / "client-ca.pem",
        client=issue_client(client_ca, server_ca.cert_pem.bytes()),
    )
    files.server_cert.write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(files.server_key))
    client_ca.cert_pem.write_to_path(str(files.client_ca))
    return files


def channel_to(address: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A real channel to a server's bound address."""
    if address.startswith("unix://"):
        return grpc.insecure_channel(f"unix:{address.removeprefix('unix://')}")
    assert tls is not None, "tcp:// needs client TLS"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.server_ca, private_key=tls.key, certificate_chain=tls.cert_chain
    )
    return grpc.secure_channel(address.removeprefix("tcp://"), credentials)


def disk_request(
    url: str,
    sha384: str | None,
    handling: pb.RebootHandling.ValueType = pb.CALLER_HANDLES_REBOOT,
) -> pb.StreamDiskRequest:
    """A StreamDisk request as Trident's callers make it (`sha384:<hex>`)."""
    request = pb.StreamDiskRequest(image_url=url)
    if sha384 is not None:
        request.image_hash = sha384 if ":" in sha384 else f"sha384:{sha384}"
    request.reboot.handling = handling
    return request


def responses(
    channel: grpc.Channel, request: pb.StreamDiskRequest
) -> Iterator[pb.ServicingResponse]:
    """The stream StreamDisk answers."""
    stub = streaming_pb2_grpc.StreamingServiceStub(channel)
    return stub.StreamDisk(request, timeout=120)


def stream_disk(channel: grpc.Channel, request: pb.StreamDiskRequest) -> list[pb.ServicingResponse]:
    """Every response of one StreamDisk, in order."""
    return list(responses(channel, request))


def completed_of(messages: Sequence[pb.ServicingResponse]) -> pb.Completed:
    """The one Completed, which must be the last message, after a first Started."""
    kinds = [message.WhichOneof("response") for message in messages]
    assert kinds[0] == "started", kinds
    assert kinds.count("completed") == 1, kinds
    assert kinds[-1] == "completed", kinds
    assert set(kinds[1:-1]) <= {"log"}, kinds
    return messages[-1].completed


def log_lines(messages: Sequence[pb.ServicingResponse]) -> list[str]:
    """The Log messages' texts."""
    return [m.log.message for m in messages if m.WhichOneof("response") == "log"]
