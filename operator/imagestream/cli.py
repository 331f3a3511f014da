"""`imagestream`: stream an image onto a target from a shell, or run the demo.

Exit codes: 0 ok, 2 usage, 3 source/network, 4 integrity, 5 target/safety, 70 internal error
(a bug), 130 cancelled.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from imagestream import __version__, defaults
from imagestream.errors import ImageStreamError, UsageError
from imagestream.pipeline.credentials import load_auth_file
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.oci_refs import OCI_SCHEME, parse_platform
from imagestream.pipeline.pipeline import StreamRequest, run_stream
from imagestream.pipeline.range_reader import RetryPolicy
from imagestream.pipeline.safety import HostView
from imagestream.pipeline.sources import SourceOptions, check_location
from imagestream.progress_display import (
    log_handler,
    make_display,
    report_failure,
    report_success,
    stream_header,
)
from imagestream.reasons import Reason
from imagestream.signals import cancel_on_signals
from imagestream.targets import target_from_argument

EXIT_USAGE = 2
#: An exception nobody raised on purpose: a bug (sysexits' EX_SOFTWARE).
EXIT_INTERNAL = 70
_UNSAFE_FLAG = "--skip-verification-unsafe"
# Linux's limits (linux/limits.h): longer names fail every system call with ENAMETOOLONG.
_NAME_MAX = 255
_PATH_MAX = 4096
_MAX_DEMO_MIB = 1 << 20

log = logging.getLogger(__name__)


# -- checks of the values: each refuses a bad one before anything is opened or connected -----


def _check_integer(option: str, value: int, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        accepted = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise UsageError(f"{option} must be an integer {accepted}, got {value}")


def _check_seconds(option: str, value: float, *, zero_ok: bool) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        accepted = "at least 0" if zero_ok else "greater than 0"
        raise UsageError(f"{option} must be a number of seconds {accepted}, got {value:g}")


def _check_name_length(what: str, path: str | os.PathLike[str]) -> None:
    """Refuse a path the kernel would refuse with ENAMETOOLONG."""
    encoded = os.fsencode(path)
    if len(encoded) >= _PATH_MAX:
        raise UsageError(
            f"{what} is {len(encoded)} bytes long; the longest path is {_PATH_MAX - 1} bytes"
        )
    longest = max(len(part) for part in encoded.split(b"/"))
    if longest > _NAME_MAX:
        raise UsageError(
            f"{what} has a file name {longest} bytes long; the longest is {_NAME_MAX} bytes"
        )


def validate_stream_args(args: argparse.Namespace) -> None:
    """Refuse bad `stream` values with a `UsageError` naming the argument and what it accepts."""
    source: str = args.source
    try:
        check_location(source)
    except UsageError as exc:
        raise UsageError(f"SOURCE: {exc.message}") from exc
    if "://" not in source or source.startswith("file://"):
        _check_name_length("SOURCE", source.removeprefix("file://"))
    if str(args.target) == "-":
        raise UsageError(
            "TARGET '-' is refused: imagestream writes to a block device or a file, never to stdout"
        )
    _check_name_length("TARGET", args.target)
    for option, path in (
        ("--ca-file", args.ca_file),
        ("--auth-file", args.auth_file),
        ("--host-root", args.host_root),
        *(("--allowed-dir", allowed) for allowed in args.allowed_dir),
    ):
        if path is not None:
            _check_name_length(option, path)
    if args.platform is not None:
        try:
            parse_platform(args.platform)
        except UsageError as exc:
            raise UsageError(f"--platform: {exc.message}") from exc
    _check_integer(
        "--max-window-log", args.max_window_log, defaults.MIN_WINDOW_LOG, defaults.MAX_WINDOW_LOG
    )
    _check_integer("--max-retries", args.max_retries, 0)
    _check_seconds("--stall-timeout", args.stall_timeout, zero_ok=False)
    _check_seconds("--retry-backoff", args.retry_backoff, zero_ok=True)


def validate_demo_args(args: argparse.Namespace) -> None:
    """Refuse bad `demo` values with a `UsageError`."""
    _check_integer("--size-mib", args.size_mib, 1, _MAX_DEMO_MIB)
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        raise UsageError(f"--rate must be a number of MiB/s greater than 0, got {args.rate:g}")
    if args.keep is not None:
        _check_name_length("--keep", args.keep)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="imagestream",
        description="Stream compressed OS images onto disks, verified and resumable.",
        epilog="Exit codes: 0 ok, 2 usage, 3 source/network, 4 integrity, 5 target/safety, "
        "70 internal error (a bug), 130 cancelled.",
    )
    parser.add_argument("--version", action="version", version=f"imagestream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    commands = parser.add_subparsers(dest="command", required=True)

    stream = commands.add_parser("stream", help="stream SOURCE onto TARGET and verify it")
    stream.add_argument(
        "source",
        metavar="SOURCE",
        help=f"http(s):// URL, {OCI_SCHEME}HOST[:PORT]/REPO[:TAG|@DIGEST] or a local file path",
    )
    stream.add_argument(
        "target",
        metavar="TARGET",
        type=Path,
        help="block device, partition or file path (never -: stdout is no target); "
        "disk:DEV writes a whole-disk COSI image onto the whole disk DEV",
    )
    add_stream_options(stream)

    demo = commands.add_parser("demo", help="stream a generated image from a local server")
    demo.add_argument("--size-mib", type=int, default=256, help="raw image size (default 256)")
    demo.add_argument("--faults", action="store_true", help="cut the connection a few times")
    demo.add_argument("--progress", choices=("auto", "bar", "plain", "json"), default="auto")
    demo.add_argument("--keep", type=Path, help="write the image here instead of a temp file")
    demo.add_argument(
        "--rate",
        type=float,
        metavar="MIB_S",
        help="serve at most this many MiB/s, slow enough to watch the bar and the resumes of "
        "--faults (default: as fast as it goes)",
    )

    commands.add_parser(
        "agent", help="run one stream inside an agent Pod (instructions from IMAGESTREAM_* env)"
    )
    add_controller_parser(commands)
    return parser


def add_controller_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`imagestream controller`: the kopf operator, scoped like `kopf run`."""
    controller = commands.add_parser("controller", help="run the ImageStream controller")
    scope = controller.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    controller.add_argument(
        "--standalone", action="store_true", help="no peering with other controller instances"
    )
    controller.add_argument(
        "--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: disabled)"
    )
    controller.add_argument(
        "--metrics-address", default="0.0.0.0", help="address the metrics port binds to"
    )
    controller.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="liveness endpoint port, serving /healthz on --metrics-address (0: disabled)",
    )
    controller.add_argument(
        "--agent-image",
        default="imagestream-operator:latest",
        help="container image of the agent Jobs",
    )
    controller.add_argument(
        "--agent-service-account",
        default="imagestream-agent",
        help="ServiceAccount of the agent Pods (may only patch imagestreams/status)",
    )
    controller.add_argument(
        "--job-ttl-seconds",
        type=int,
        default=3600,
        help="how long a finished agent Job (and its logs) is kept (default 3600)",
    )
    controller.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as plain text or one JSON object each (default text)",
    )
    controller.add_argument(
        "--agent-image-pull-policy",
        choices=("Always", "IfNotPresent", "Never"),
        default="IfNotPresent",
        help="imagePullPolicy of the agent Jobs (default IfNotPresent)",
    )
    controller.add_argument(
        "--agent-env",
        action="append",
        default=[],
        type=agent_env,
        metavar="NAME=VALUE",
        help="an environment variable of the agent containers, e.g. HTTPS_PROXY (repeatable)",
    )


def agent_env(text: str) -> tuple[str, str]:
    """`NAME=VALUE` of --agent-env; the IMAGESTREAM_* names are the controller's contract."""
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if name.startswith("IMAGESTREAM_"):
        raise argparse.ArgumentTypeError(f"{name}: IMAGESTREAM_* variables are set per stream")
    return name, value


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    """Options of `imagestream stream`."""
    parser.add_argument("--sha384", help="expected SHA-384 (96 hex digits) of the fetched bytes")
    parser.add_argument(
        _UNSAFE_FLAG,
        dest="unverified",
        action="store_true",
        help="write without an expected hash; the result is reported UNVERIFIED",
    )
    parser.add_argument(
        "--compression",
        choices=[c.value for c in Compression],
        default=Compression.AUTO.value,
        help="what the fetched bytes are; auto (the default) tells by the magic bytes and "
        "writes unknown data as it is",
    )
    parser.add_argument("--ca-file", type=Path, help="extra CA bundle, added to the system's")
    parser.add_argument(
        "--auth-file",
        type=Path,
        help="file holding 'Basic ...', 'Bearer ...', user:password, a bare token, or a Docker "
        'config JSON ({"auths": ...}, as docker/oras login write it)',
    )
    oci = parser.add_argument_group("oci:// sources")
    oci.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the index entry to take (default: this machine's, e.g. linux/amd64)",
    )
    oci.add_argument(
        "--layer",
        metavar="TITLE",
        help="the layer whose org.opencontainers.image.title is TITLE (needed with several)",
    )
    oci.add_argument(
        "--plain-http",
        action="store_true",
        help="talk HTTP to the registry (loopback registries without TLS need no flag)",
    )
    parser.add_argument(
        "--stall-timeout", type=float, default=float(defaults.STALL_TIMEOUT_SECONDS), metavar="S"
    )
    parser.add_argument("--max-retries", type=int, default=defaults.MAX_RETRIES, metavar="N")
    parser.add_argument(
        "--retry-backoff",
        type=float,
        default=defaults.RETRY_BACKOFF_SECONDS,
        metavar="S",
        help="first backoff delay; doubles per failed attempt, with jitter (default %(default)s)",
    )
    parser.add_argument(
        "--max-window-log",
        type=int,
        default=defaults.CLI_MAX_WINDOW_LOG,
        metavar="N",
        help="largest zstd window (and xz dictionary) accepted, as a power of two "
        f"({defaults.MIN_WINDOW_LOG} to {defaults.MAX_WINDOW_LOG}; default %(default)s, as "
        "zstd --long=31)",
    )
    parser.add_argument("--verify-after-write", action="store_true", help="read back and compare")
    parser.add_argument(
        "--force",
        action="store_true",
        help="skip the mount-table, swap and holder checks (the kernel's exclusive open and the "
        "writer lock still apply)",
    )
    parser.add_argument("--host-root", type=Path, help="where the host's / is mounted (agent)")
    parser.add_argument(
        "--allowed-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="confine file targets to DIR (repeatable; default: anywhere)",
    )
    parser.add_argument("--no-direct-io", action="store_true", help="write through the cache")
    parser.add_argument("--progress", choices=("auto", "bar", "plain", "json"), default="auto")


def request_from_args(args: argparse.Namespace, cancel: threading.Event) -> StreamRequest:
    """Turn parsed `stream` arguments into a `StreamRequest` (reading the auth file)."""
    host = HostView.from_host_root(args.host_root) if args.host_root else HostView()
    policy = RetryPolicy(
        max_retries=args.max_retries,
        backoff_base=args.retry_backoff,
        stall_timeout=args.stall_timeout,
    )
    return StreamRequest(
        source=args.source,
        target=target_from_argument(
            args.target,
            host=host,
            force=args.force,
            direct_io=not args.no_direct_io,
            allowed_dirs=tuple(args.allowed_dir),
        ),
        sha384=args.sha384,
        compression=Compression(args.compression),
        source_options=SourceOptions(
            ca_file=args.ca_file,
            credentials=load_auth_file(args.auth_file) if args.auth_file else None,
            policy=policy,
            platform=args.platform,
            layer=args.layer,
            plain_http=args.plain_http,
        ),
        verify_after_write=args.verify_after_write,
        allow_unverified=args.unverified,
        max_window_log=args.max_window_log,
        cancel=cancel,
    )


def stream_command(args: argparse.Namespace, console: Console) -> int:
    """Run `imagestream stream`: progress while it runs, a summary or a clear error at the end."""
    cancel = cancel_on_signals()
    display = make_display(args.progress, console, stream_header(args.source, args.target))
    try:
        with display:
            result = run_stream(request_from_args(args, cancel), display.update)
    except ImageStreamError as exc:
        return report_failure(exc, args.progress, console)
    report_success(result, args.progress, console)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imagestream` command."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    # markup=False: paths, URLs and server messages are printed as they are, "[" included.
    console = Console(stderr=True, soft_wrap=True, markup=False)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[log_handler(console)],
    )
    # httpx logs every request URL at INFO, credentials and query tokens included.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mode = getattr(args, "progress", "plain")
    try:
        return run_command(args, console)
    except ImageStreamError as exc:
        # A bad value, refused before the command's own reporting started.
        return report_failure(exc, mode, console)
    except Exception as exc:  # a bug: say so in words, keep the trace for -v
        log.info("internal error", exc_info=exc)
        report_failure(
            ImageStreamError(
                f"internal error: {type(exc).__name__}: {exc}; please report this bug with "
                "the output of -v",
                reason=Reason.INTERNAL_ERROR,
            ),
            mode,
            console,
        )
        return EXIT_INTERNAL


def run_command(args: argparse.Namespace, console: Console) -> int:
    """Run the parsed subcommand; return its exit code."""
    if args.command == "agent":
        # Imported here: the Kubernetes client costs start-up time every plain stream would pay.
        from imagestream.agent.main import agent_command  # noqa: PLC0415

        return agent_command()
    if args.command == "controller":
        from imagestream.controller.main import controller_command  # noqa: PLC0415

        return controller_command(args)
    if args.command == "demo":
        validate_demo_args(args)
        # Imported here: the demo's generator and server cost 0.1 s of start-up on every stream.
        from imagestream.demo.run import demo_command  # noqa: PLC0415

        return demo_command(args, console)
    if args.sha384 is None and not args.unverified:
        console.print(f"error: --sha384 is required (or {_UNSAFE_FLAG} to write unverified)")
        return EXIT_USAGE
    validate_stream_args(args)
    return stream_command(args, console)
