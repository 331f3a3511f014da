"""`imagestream stream-disk`: call a server's StreamDisk and show it as `imagestream stream`
shows a stream, with the same exit codes.

Progress arrives as readable Log lines (Trident's messages have no progress fields); the
client reads them back into the same progress display. Every other Log record is printed.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from rich.console import Console
from rich.text import Text

from imagestream import defaults
from imagestream.errors import Cancelled, ImageStreamError, SourceError, UsageError
from imagestream.pipeline.progress import ProgressCallback
from imagestream.progress_display import emit_json, make_display, report_failure
from imagestream.reasons import Reason
from imagestream.service import wire
from imagestream.service.listen import TCP_PREFIX, UNIX_PREFIX
from imagestream.service.proto import streaming_pb2 as pb
from imagestream.service.proto import streaming_pb2_grpc

#: Exit code of a failure the server calls internal (as the CLI's own bugs).
EXIT_INTERNAL = 70
_LEVELS = {
    pb.LOG_LEVEL_ERROR: "error",
    pb.LOG_LEVEL_WARN: "warning",
    pb.LOG_LEVEL_INFO: "info",
    pb.LOG_LEVEL_DEBUG: "debug",
    pb.LOG_LEVEL_TRACE: "trace",
}
_REBOOT = {
    pb.REBOOT_NOT_REQUIRED: "no reboot required",
    pb.REBOOT_REQUIRED: "reboot required",
    pb.REBOOT_STARTED: "reboot started",
}


def build_request(args: argparse.Namespace) -> pb.StreamDiskRequest:
    """The StreamDisk request of the arguments; a bad hash is a usage error (exit 2)."""
    request = pb.StreamDiskRequest(image_url=args.url)
    wire.check_image_url(args.url)
    if args.sha384 is not None:
        digest = args.sha384.strip().lower().removeprefix("sha384:")
        if not defaults.SHA384.fullmatch(digest):
            raise UsageError(
                f"--sha384 must be 96 hexadecimal digits, got {len(digest)} characters"
            )
        request.image_hash = f"sha384:{digest}"
    handling = pb.CALLER_HANDLES_REBOOT if args.caller_handles_reboot else pb.TRIDENT_HANDLES_REBOOT
    request.reboot.handling = handling
    return request


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to `--server`: a Unix socket, or TCP with the client's certificate."""
    server: str = args.server
    if server.startswith(UNIX_PREFIX):
        return grpc.insecure_channel(f"unix:{server.removeprefix(UNIX_PREFIX)}")
    if not server.startswith(TCP_PREFIX):
        raise UsageError(f"--server {server}: expected unix:///PATH or tcp://HOST:PORT")
    files = (args.tls_cert, args.tls_key, args.server_ca)
    if any(item is None for item in files):
        raise UsageError("a tcp:// server needs --tls-cert, --tls-key and --server-ca")
    try:
        cert, key, ca = (path.read_bytes() for path in files)
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(server.removeprefix(TCP_PREFIX), credentials)


def stream_disk_command(args: argparse.Namespace, console: Console) -> int:
    """Run `imagestream stream-disk`; the exit code of the outcome."""
    request = build_request(args)
    display = make_display(args.progress, console)
    started = time.monotonic()
    completed: pb.Completed | None = None
    try:
        with open_channel(args) as channel, display:
            stub = streaming_pb2_grpc.StreamingServiceStub(channel)
            for response in stub.StreamDisk(request, wait_for_ready=False):
                kind = response.WhichOneof("response")
                if kind == "log":
                    _show_log(response.log, display.update, started, console, args.progress)
                elif kind == "completed":
                    completed = response.completed
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        error: ImageStreamError = SourceError(
            f"the server {args.server} did not complete the call ({code}: {details})",
            reason=Reason.SOURCE_UNAVAILABLE,
        )
        return report_failure(error, args.progress, console)
    except KeyboardInterrupt:
        error = Cancelled(
            "interrupted: this client stopped reading; the server finishes the servicing "
            "(its outcome is in the server's log)"
        )
        return report_failure(error, args.progress, console)
    if completed is None:
        return report_failure(
            SourceError(f"the server {args.server} ended the stream without a result"),
            args.progress,
            console,
        )
    if completed.status != pb.STATUS_CODE_SUCCESS:
        failure = wire.error_from_completed(completed)
        code = report_failure(failure, args.progress, console)
        return EXIT_INTERNAL if failure.reason is Reason.INTERNAL_ERROR else code
    _report_success(completed, args, time.monotonic() - started)
    return 0


def _show_log(
    record: pb.Log,
    update: ProgressCallback,
    started: float,
    console: Console,
    mode: str,
) -> None:
    if record.target == wire.PROGRESS_TARGET:
        progress = wire.progress_from_line(record.message, time.monotonic() - started)
        if progress is not None:
            update(progress)
            return
    level = _LEVELS.get(record.level, "info")
    if mode == "json":
        emit_json(sys.stdout, {"event": "log", "level": level, "message": record.message})
        return
    console.print(Text(f"{level}: {record.message}"), highlight=False)


def _report_success(completed: pb.Completed, args: argparse.Namespace, seconds: float) -> None:
    reboot = _REBOOT.get(completed.reboot_status, "reboot status unknown")
    if args.progress == "json":
        emit_json(
            sys.stdout,
            {
                "event": "result",
                "ok": True,
                "verified": completed.HasField("image_hash"),
                "imageHash": completed.image_hash,
                "rebootStatus": pb.RebootStatus.Name(completed.reboot_status),
                "seconds": round(seconds, 3),
            },
        )
        return
    out = Console(file=sys.stdout, highlight=False, soft_wrap=True, markup=False)
    out.print(Text(f"Streamed {args.url} through {args.server}: verified", style="green"))
    out.print(f"  hash     {completed.image_hash}")
    out.print(f"  reboot   {reboot}")
    out.print(f"  time     {seconds:.2f} s")
