"""The arguments of `imagestream serve` and `imagestream stream-disk`.

Kept apart from the server and the client so that building the CLI's parser never imports
grpc (every `imagestream stream` would pay for it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imagestream import defaults


def add_service_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`imagestream serve` and `imagestream stream-disk`."""
    serve = commands.add_parser(
        "serve", help="serve Trident's gRPC StreamingService (StreamDisk) and VersionService"
    )
    serve.add_argument(
        "--listen",
        default=defaults.SERVICE_LISTEN,
        metavar="ADDRESS",
        help="unix:///PATH (a 0600 socket; default %(default)s) or tcp://HOST:PORT (mutual "
        "TLS only: needs --tls-cert, --tls-key and --client-ca)",
    )
    serve.add_argument("--tls-cert", type=Path, metavar="F", help="server certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, metavar="F", help="server private key (PEM)")
    serve.add_argument(
        "--client-ca", type=Path, metavar="F", help="CA whose client certificates are accepted"
    )
    serve.add_argument(
        "--disk",
        type=Path,
        action="append",
        required=True,
        metavar="DEV",
        help="a disk StreamDisk may write (repeatable: the smallest that fits is chosen)",
    )
    serve.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept StreamDisk requests without an image_hash (refused by default)",
    )
    serve.add_argument(
        "--reboot-command",
        default=defaults.REBOOT_COMMAND,
        metavar="CMD",
        help="run after a success unless the caller handles the reboot (default %(default)s)",
    )

    client = commands.add_parser(
        "stream-disk", help="ask an `imagestream serve` to stream URL onto its disk"
    )
    client.add_argument("url", metavar="URL", help="http(s):// or oci:// image the server fetches")
    client.add_argument(
        "--sha384", help="expected SHA-384 (96 hex digits): of metadata.json for a COSI image"
    )
    client.add_argument(
        "--server",
        default=defaults.SERVICE_LISTEN,
        metavar="ADDRESS",
        help="unix:///PATH or tcp://HOST:PORT (default %(default)s)",
    )
    client.add_argument(
        "--caller-handles-reboot",
        action="store_true",
        help="do not let the server reboot after a success (the result says REBOOT_REQUIRED)",
    )
    client.add_argument("--tls-cert", type=Path, metavar="F", help="client certificate (tcp://)")
    client.add_argument("--tls-key", type=Path, metavar="F", help="client private key (tcp://)")
    client.add_argument(
        "--server-ca", type=Path, metavar="F", help="CA of the server's certificate (tcp://)"
    )
    client.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "json"),
        default="auto",
        help="a bar on a terminal, plain lines otherwise, or JSON lines (default: auto)",
    )
