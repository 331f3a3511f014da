"""What the CLI prints for a result: user text verbatim, never read as rich markup."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from imagestream.errors import SourceError
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamResult
from imagestream.progress_display import report_failure, report_success

# Each would be a style, a closing tag without an opening one (rich raises), or a link.
MARKUP_LOOKALIKES = ["q[/x]", "[red]x", "[bold]a[/bold]", "[/VARIANT]", "[link=x.html]y"]


def result(target: str, compression: Compression) -> StreamResult:
    return StreamResult(
        target=Path(target),
        sha384="0" * 96,
        verified=True,
        compression=compression,
        bytes_fetched=10,
        bytes_written=20,
        resumes=0,
        seconds=1.0,
        read_back_verified=False,
    )


@pytest.mark.parametrize("text", MARKUP_LOOKALIKES)
def test_a_failure_message_prints_verbatim(text: str) -> None:
    out = io.StringIO()
    # A console with markup on, the default: the message must not depend on the caller's setting.
    console = Console(file=out, width=200)

    code = report_failure(SourceError(f"cannot open source file /tmp/{text}"), "plain", console)

    assert code == 3
    assert out.getvalue() == f"error (SourceUnavailable): cannot open source file /tmp/{text}\n"


@pytest.mark.parametrize("text", MARKUP_LOOKALIKES)
def test_a_target_prints_verbatim_in_the_summary(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report_success(result(f"/out/{text}", Compression.ZSTD), "plain", Console(file=io.StringIO()))

    assert capsys.readouterr().out.splitlines()[0] == f"Wrote /out/{text}: verified"


@pytest.mark.parametrize(
    ("compression", "named"),
    [
        (Compression.ZSTD, "(zstd, decompressed)"),
        (Compression.GZIP, "(gzip, decompressed)"),
        (Compression.XZ, "(xz, decompressed)"),
        (Compression.BZIP2, "(bzip2, decompressed)"),
        (Compression.NONE, "(uncompressed, written as is)"),
    ],
)
def test_the_summary_names_the_format(
    compression: Compression, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report_success(result("/out/x", compression), "plain", Console(file=io.StringIO()))

    assert f"fetched  10 bytes {named}, written 20 bytes" in capsys.readouterr().out
