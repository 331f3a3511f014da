"""`imagestream demo`: the whole data path on one machine, with nothing to set up.

A generated filesystem-like image is served by the in-process range server and streamed to a
temporary file exactly as `imagestream stream` would, then the decompressed output is compared
with the generated data, so the demo proves the result rather than asserting it.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

from rich.console import Console
from rich.text import Text

from imagestream.demo.image import SampleImage, write_sample_image
from imagestream.demo.range_server import RangeServer
from imagestream.errors import ImageStreamError
from imagestream.pipeline.pipeline import StreamRequest, run_stream
from imagestream.pipeline.range_reader import RetryPolicy
from imagestream.pipeline.sources import SourceOptions
from imagestream.progress_display import (
    format_bytes,
    format_rate,
    make_display,
    report_failure,
    report_success,
    stream_header,
)
from imagestream.signals import cancel_on_signals
from imagestream.targets import TargetRequest, plan_target

_FAULTS = 3


def demo_command(args: argparse.Namespace, console: Console) -> int:
    """Generate, serve, stream, verify; return the exit code."""
    # Ctrl-C asks the stream to stop cleanly, as in `imagestream stream`; a second one stops it.
    cancel = cancel_on_signals()
    with tempfile.TemporaryDirectory(prefix="imagestream-demo-") as tmp:
        workdir = Path(tmp)
        console.print(f"Generating a {args.size_mib} MiB filesystem-like image (zstd)...")
        image = write_sample_image(workdir / "demo.img.zst", args.size_mib << 20, seed=7)
        console.print(
            f"  {format_bytes(image.compressed_size)} compressed, SHA-384 {image.sha384[:16]}..."
        )
        target = args.keep or workdir / "demo-target.img"
        rate = args.rate * 2**20 if args.rate else None
        with RangeServer(image.path, _reset_offsets(image, args.faults), rate) as server:
            if args.faults:
                console.print(f"The server will reset the connection {_FAULTS} times.")
            if rate is not None:
                console.print(f"The server sends at most {format_rate(rate)}.")
            request = StreamRequest(
                source=server.url,
                target=plan_target(TargetRequest(kind="file", path=target)),
                sha384=image.sha384,
                source_options=SourceOptions(policy=RetryPolicy(backoff_base=0.2)),
                cancel=cancel,
            )
            try:
                header = stream_header(server.url, target)
                with make_display(args.progress, console, header) as display:
                    result = run_stream(request, display.update)
            except ImageStreamError as exc:
                return report_failure(exc, args.progress, console)
        report_success(result, args.progress, console)
        if _sha384_of(result.target) != image.raw_sha384:
            console.print(
                Text("the written output differs from the generated data", style="bold red")
            )
            return 4
        console.print(
            Text("The written output matches the generated data byte for byte.", style="green")
        )
        return 0


def _reset_offsets(image: SampleImage, enabled: bool) -> list[int]:
    if not enabled:
        return []
    step = image.compressed_size // (_FAULTS + 1)
    return [step * k for k in range(1, _FAULTS + 1)]


def _sha384_of(path: Path) -> str:
    digest = hashlib.sha384()
    with path.open("rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()
