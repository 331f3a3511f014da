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
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from rich.console import Console

from imagestream import __version__, defaults
from imagestream.agent.contract import AgentInstructions, env_name
from imagestream.errors import Cancelled, ImageStreamError, UsageError
from imagestream.pipeline.credentials import load_auth_file
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.oci_refs import OCI_SCHEME, parse_platform
from imagestream.pipeline.pipeline import StreamRequest
from imagestream.pipeline.range_reader import RetryPolicy
from imagestream.pipeline.redact import redact_url
from imagestream.pipeline.sources import SourceOptions, check_location
from imagestream.progress_display import (
    RunFacts,
    log_handler,
    make_display,
    report_failure,
    report_success,
    stream_header,
)
from imagestream.reasons import Reason
from imagestream.service.arguments import add_service_parsers
from imagestream.signals import cancel_on_signals
from imagestream.targets import target_from_argument
from imagestream.targets.stream import stream_target

EXIT_INTERNAL = 70
_UNSAFE_FLAG = "--skip-verification-unsafe"
# Linux's limits (linux/limits.h): longer names fail every system call with ENAMETOOLONG.
_NAME_MAX = 255
_PATH_MAX = 4096
_MAX_DEMO_MIB = 1 << 20

log = logging.getLogger(__name__)

PROGRESS_MODES = ("auto", "bar", "plain", "json")
_PROGRESS_HELP = (
    "auto: a bar on a terminal, plain lines otherwise; json: JSON lines on stdout, the last "
    "one the result"
)


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


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help line, unless the line already names it or the
    default is "off" (a flag, an unset option)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "default" in text or _off(default) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _off(default: object) -> bool:
    """A default that means "not given": no help line needs to show it (0 is a value)."""
    return default is None or default is False or default in ([], argparse.SUPPRESS)


_EXIT_CODES = (
    "Exit codes: 0 ok, 2 usage, 3 source/network, 4 integrity, 5 target/safety, "
    "70 internal error (a bug), 130 cancelled (SIGTERM, SIGINT, SIGHUP)."
)


def _verbose_option(default: object) -> argparse.ArgumentParser:
    """`-v`, accepted before and after the subcommand alike.

    Each parser gets its own: parents share their action objects, defaults included.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log more detail: addresses connected to, range support, frame parameters, "
        "per-stage timings, and the trace of an internal error",
    )
    return parent


def _agent_environment() -> str:
    """`agent --help`'s list of the IMAGESTREAM_* variables, from the contract's fields."""
    lines = ["environment (written by the controller into the agent Job):"]
    for spec in fields(AgentInstructions):
        required = spec.default is MISSING
        default = "required" if required else f"default: {_env_value(spec.default)}"
        lines.append(f"  {env_name(spec.name):34} {default}")
    return "\n".join(lines)


def _env_value(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="imagestream",
        description="Stream compressed OS images onto disks, verified and resumable.",
        epilog=_EXIT_CODES,
        parents=[_verbose_option(False)],
        formatter_class=_HelpFormatter,
    )
    # SUPPRESS: a subcommand's parser leaves the value alone unless -v is given after it.
    verbose = _verbose_option(argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"imagestream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    sub: dict[str, Any] = {"parents": [verbose], "formatter_class": _HelpFormatter}

    stream = commands.add_parser(
        "stream", help="stream SOURCE onto TARGET and verify it", epilog=_EXIT_CODES, **sub
    )
    stream.add_argument(
        "source",
        metavar="SOURCE",
        help=f"http(s):// URL, {OCI_SCHEME}HOST[:PORT]/REPO[:TAG|@DIGEST] or a local file path",
    )
    stream.add_argument(
        "target",
        metavar="TARGET",
        help="block device, partition or file path (never -: stdout is no target), "
        "sysext:NAME or confext:NAME (an extension image under --host-root), ab:DEV_A,DEV_B "
        "(the inactive volume of an A/B pair), or disk:DEV (a whole-disk COSI image)",
    )
    add_stream_options(stream)

    demo = commands.add_parser("demo", help="stream a generated image from a local server", **sub)
    demo.add_argument(
        "--size-mib", type=int, default=256, metavar="MIB", help="raw image size in MiB"
    )
    demo.add_argument("--faults", action="store_true", help="cut the connection a few times")
    demo.add_argument("--progress", choices=PROGRESS_MODES, default="auto", help=_PROGRESS_HELP)
    demo.add_argument(
        "--keep", type=Path, metavar="FILE", help="write the image here instead of a temp file"
    )
    demo.add_argument(
        "--rate",
        type=float,
        metavar="MIB_S",
        help="serve at most this many MiB/s, slow enough to watch the bar and the resumes of "
        "--faults (default: as fast as it goes)",
    )

    commands.add_parser(
        "agent",
        help="run one stream inside an agent Pod (instructions from IMAGESTREAM_* env)",
        description="Run the one stream the controller's Job describes, report its progress "
        "to the ImageStream's status and its result to the termination log.",
        epilog=_agent_environment(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[verbose],
    )
    add_controller_parser(commands, sub)
    add_service_parsers(commands)
    return parser


def add_controller_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], sub: dict[str, Any]
) -> None:
    """`imagestream controller`: the kopf operator, scoped like `kopf run`."""
    controller = commands.add_parser("controller", help="run the ImageStream controller", **sub)
    scope = controller.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    controller.add_argument(
        "--standalone", action="store_true", help="no peering with other controller instances"
    )
    controller.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        metavar="PORT",
        help="Prometheus metrics port (0: disabled)",
    )
    controller.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        metavar="ADDRESS",
        help="address the metrics port binds to",
    )
    controller.add_argument(
        "--health-port",
        type=int,
        default=0,
        metavar="PORT",
        help="liveness endpoint port, serving /healthz on --metrics-address (0: disabled)",
    )
    controller.add_argument(
        "--agent-image",
        default="imagestream-operator:latest",
        metavar="IMAGE",
        help="container image of the agent Jobs",
    )
    controller.add_argument(
        "--agent-service-account",
        default="imagestream-agent",
        metavar="NAME",
        help="ServiceAccount of the agent Pods (may only patch imagestreams/status)",
    )
    controller.add_argument(
        "--job-ttl-seconds",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="how long a finished agent Job (and its logs) is kept, in seconds",
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
    parser.add_argument(
        "--sha384",
        metavar="HEX",
        help="expected SHA-384 (96 hex digits) of the fetched bytes; required",
    )
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
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="extra CA bundle, added to the system's (default: the system's only)",
    )
    parser.add_argument(
        "--auth-file",
        type=Path,
        metavar="FILE",
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
        help="the layer whose org.opencontainers.image.title is TITLE (default: the only "
        "layer; needed with several)",
    )
    oci.add_argument(
        "--plain-http",
        action="store_true",
        help="talk HTTP to the registry (default: HTTPS; loopback registries without TLS "
        "need no flag)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=float(defaults.STALL_TIMEOUT_SECONDS),
        metavar="S",
        help="seconds without data before a read is given up and resumed",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=defaults.MAX_RETRIES,
        metavar="N",
        help="failed attempts in a row without progress before the stream fails",
    )
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
    parser.add_argument(
        "--verify-after-write",
        action="store_true",
        help="read the target back (past the page cache) and compare before the commit",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="skip the mount-table, swap and holder checks (the kernel's exclusive open and the "
        "writer lock still apply)",
    )
    parser.add_argument(
        "--host-root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="where the host's filesystem and proc/1/mountinfo are seen (default: /)",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="after writing a sysext:/confext: image, run systemd-sysext/-confext refresh "
        "(default: off)",
    )
    parser.add_argument(
        "--allowed-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="confine file targets to DIR (repeatable; default: anywhere)",
    )
    parser.add_argument(
        "--no-direct-io",
        action="store_true",
        help="write through the page cache (default: O_DIRECT where the target accepts it)",
    )
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="auto", help=_PROGRESS_HELP)


def request_from_args(args: argparse.Namespace, cancel: threading.Event) -> StreamRequest:
    """Turn parsed `stream` arguments into a `StreamRequest` (reading the auth file)."""
    policy = RetryPolicy(
        max_retries=args.max_retries,
        backoff_base=args.retry_backoff,
        stall_timeout=args.stall_timeout,
    )
    return StreamRequest(
        source=args.source,
        target=target_from_argument(
            args.target,
            host_root=args.host_root,
            force=args.force,
            direct_io=not args.no_direct_io,
            allowed_dirs=tuple(args.allowed_dir),
            refresh=args.refresh,
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


def stream_command(args: argparse.Namespace, console: Console, facts: RunFacts) -> int:
    """Run `imagestream stream`: progress while it runs, a summary or a clear error at the end."""
    cancel = cancel_on_signals()
    display = make_display(args.progress, console, stream_header(args.source, args.target))
    try:
        with display:
            outcome = stream_target(request_from_args(args, cancel), facts.watch(display.update))
    except ImageStreamError as exc:
        return report_failure(exc, args.progress, console, facts)
    report_success(
        outcome.result,
        args.progress,
        console,
        facts,
        headline=outcome.headline,
        notes=outcome.notes,
        fields=outcome.fields,
    )
    return 0


class InternalError(ImageStreamError):
    """An exception nobody raised on purpose: a bug (sysexits' EX_SOFTWARE)."""

    exit_code = EXIT_INTERNAL
    default_reason = Reason.INTERNAL_ERROR


def run_facts(args: argparse.Namespace) -> RunFacts:
    """What the JSON result repeats of the request: the source (redacted), target and hash."""
    source = getattr(args, "source", None)
    try:
        redacted = redact_url(source) if source is not None else None
    except ValueError:
        redacted = None  # malformed (the failure reported), and it may hold credentials
    target = getattr(args, "target", None)
    expected = (getattr(args, "sha384", None) or "").strip().lower()
    return RunFacts(
        source=redacted,
        target=str(target) if target is not None else None,
        # A malformed hash is the failure the result reports, not a hash to repeat.
        expected_sha384=expected if defaults.SHA384.fullmatch(expected) else None,
    )


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
    facts = run_facts(args)
    try:
        return run_command(args, console, facts)
    except ImageStreamError as exc:
        # A bad value, refused before the command's own reporting started.
        return report_failure(exc, mode, console, facts)
    except KeyboardInterrupt:
        # A second Ctrl-C outside the stream (which turns its own into a cancel).
        stopped = Cancelled("the command was stopped at once (interrupted again)")
        return report_failure(stopped, mode, console, facts)
    except Exception as exc:  # a bug: say so in words, keep the trace for -v
        log.info("internal error", exc_info=exc)
        return report_failure(
            InternalError(
                f"internal error: {type(exc).__name__}: {exc}; please report this bug with "
                "the output of -v"
            ),
            mode,
            console,
            facts,
        )


def run_command(args: argparse.Namespace, console: Console, facts: RunFacts) -> int:
    """Run the parsed subcommand; return its exit code."""
    if args.command == "agent":
        # Imported here: the Kubernetes client costs start-up time every plain stream would pay.
        from imagestream.agent.main import agent_command  # noqa: PLC0415

        return agent_command()
    if args.command == "controller":
        from imagestream.controller.main import controller_command  # noqa: PLC0415

        return controller_command(args)
    if args.command == "serve":
        # Imported here: grpc costs start-up time every plain stream would pay.
        from imagestream.service.server import serve_command  # noqa: PLC0415

        return serve_command(args)
    if args.command == "stream-disk":
        from imagestream.service.client import stream_disk_command  # noqa: PLC0415

        return stream_disk_command(args, console)
    if args.command == "demo":
        validate_demo_args(args)
        # Imported here: the demo's generator and server cost 0.1 s of start-up on every stream.
        from imagestream.demo.run import demo_command  # noqa: PLC0415

        return demo_command(args, console)
    if args.sha384 is None and not args.unverified:
        raise UsageError(f"--sha384 is required (or {_UNSAFE_FLAG} to write unverified)")
    validate_stream_args(args)
    return stream_command(args, console, facts)
