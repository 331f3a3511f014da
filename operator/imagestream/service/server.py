"""`imagestream serve`: the gRPC server, its standard health and reflection services, and
its stop on SIGTERM (the running servicing is cancelled and its Completed delivered first)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagestream import __version__
from imagestream.errors import Cancelled, UsageError
from imagestream.pipeline.safety import HostView
from imagestream.service import activation, listen
from imagestream.service.proto import (
    streaming_pb2,
    streaming_pb2_grpc,
    version_pb2,
    version_pb2_grpc,
)
from imagestream.service.servicing import ServiceConfig, StreamingService
from imagestream.signals import cancel_on_signals

log = logging.getLogger(__name__)

STREAMING_SERVICE = streaming_pb2.DESCRIPTOR.services_by_name["StreamingService"].full_name
VERSION_SERVICE = version_pb2.DESCRIPTOR.services_by_name["VersionService"].full_name
#: Seconds the last messages get to reach the client once the server stops.
_STOP_GRACE = 5.0
_WORKERS = 8


class VersionService(version_pb2_grpc.VersionServiceServicer):
    """`trident.v1.VersionService`: this program's version."""

    def Version(
        self, request: version_pb2.VersionRequest, context: grpc.ServicerContext
    ) -> version_pb2.VersionResponse:
        """The version of imagestream serving."""
        return version_pb2.VersionResponse(version=__version__)


def _tls_files(args: argparse.Namespace) -> listen.TlsFiles | None:
    given = [args.tls_cert, args.tls_key, args.client_ca]
    if all(item is None for item in given):
        return None
    if any(item is None for item in given):
        raise UsageError("--tls-cert, --tls-key and --client-ca go together")
    return listen.TlsFiles(cert=args.tls_cert, key=args.tls_key, client_ca=args.client_ca)


def serve_command(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM or SIGINT; 0 after a clean stop."""
    tls = _tls_files(args)
    activated = activation.activated_socket(os.environ, os.getpid())
    if activated is None:
        listen.parse_listen(args.listen, tls)
    elif activated.family != socket.AF_UNIX and tls is None:
        raise UsageError(
            "systemd passed a TCP socket: give --tls-cert, --tls-key and --client-ca "
            "(there is no plaintext TCP)"
        )
    for disk in args.disk:
        if not disk.is_absolute():
            raise UsageError(f"--disk {disk} must be an absolute path")
    logging.getLogger("imagestream.service").setLevel(logging.INFO)
    cancel = cancel_on_signals()
    config = ServiceConfig(
        disks=tuple(args.disk),
        allow_unverified=args.allow_unverified,
        reboot_command=args.reboot_command,
        host=HostView(),
    )
    streaming = StreamingService(config, cancel)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=_WORKERS))
    health_servicer = _add_services(server, streaming)
    relay: activation.Relay | None = None
    if activated is None:
        bound = listen.bind(server, args.listen, tls)
    else:
        relay = activation.Relay(activated)
        listen.bind_private(server, relay.backend, tls)
        bound = activation.describe(activated)
    server.start()
    if relay is not None:
        relay.start()
    for name in ("", STREAMING_SERVICE, VERSION_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # A plain line on stderr, whatever the log level: scripts and tests read the address.
    print(f"imagestream serve: listening on {bound}", file=sys.stderr, flush=True)
    try:
        _wait(cancel)
        log.warning("stopping: cancelling the running servicing, if any")
        health_servicer.enter_graceful_shutdown()
        streaming.wait_idle()
        server.stop(_STOP_GRACE).wait()
    except KeyboardInterrupt:
        # Ctrl-C again while the servicing winds down: stop now. The stream's target is
        # invalid already (its header is zeros until the commit).
        log.warning("stopped at once; a servicing that was running did not send its Completed")
        server.stop(0).wait()
        return Cancelled.exit_code
    finally:
        if relay is None:
            listen.remove_socket(bound)
        else:
            relay.stop()  # the socket itself is systemd's and stays
    return 0


def _add_services(server: grpc.Server, streaming: StreamingService) -> health.HealthServicer:
    """Trident's two services, the standard health service and reflection of all four."""
    streaming_pb2_grpc.add_StreamingServiceServicer_to_server(streaming, server)
    version_pb2_grpc.add_VersionServiceServicer_to_server(VersionService(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            STREAMING_SERVICE,
            VERSION_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return health_servicer


def _wait(cancel: threading.Event) -> None:
    # A timed wait, so the main thread keeps running Python code and sees signals promptly.
    while not cancel.wait(0.5):
        pass
