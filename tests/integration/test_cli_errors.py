"""The CLI never crashes and never misreads: bad values, library errors, user text with markup.

Every run is the real `imagestream` in a subprocess. A bad value is exit 2 with one `error:`
line naming the argument and what it accepts, before any connection: the source URL points at
a real listening socket, which must not have been connected to. An error from a library
(a redirect loop from nginx, a corrupt zstd stream, a read error) is a reasoned error with its
family's exit code; paths and URLs with `[` in them print exactly as given.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.cli import CliRun, assert_exited, imagestream_env, one_line, run_imagestream
from tests.support.nginx import NginxFactory
from tests.support.targets import sha384_of
from tests.support.tools import require_tool

from imagestream.demo.image import SampleImage, write_raw_image, write_sample_image

pytestmark = pytest.mark.timeout(60)

SHA384 = "0" * 96


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A real listening socket: a run that connects anywhere near its URL is caught."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def url_of(server: socket.socket, path: str = "image.zst") -> str:
    host, port = server.getsockname()
    return f"http://{host}:{port}/{path}"


def assert_not_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


def usage_run(*args: str | Path) -> CliRun:
    """`imagestream ARGS... --progress json`: a usage error gets a JSON result too."""
    return run_imagestream(*args, "--progress", "json")


def assert_usage_error(run: CliRun, *phrases: str) -> None:
    """Exit 2, one `error` line on stderr with each phrase, the JSON result, no traceback."""
    assert_exited(run, 2, *phrases)
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith("error (InvalidRequest): "), run.stderr
    assert run.result()["reason"] == "InvalidRequest"


@pytest.fixture
def image(tmp_path: Path) -> SampleImage:
    return write_sample_image(tmp_path / "image.zst", 2 << 20, seed=3)


# -- bad values: exit 2 before any connection --------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "accepted"),
    [
        ("--max-window-log", "9", "an integer from 10 to 31, got 9"),
        ("--max-window-log", "32", "an integer from 10 to 31, got 32"),
        ("--stall-timeout", "-1", "a number of seconds greater than 0, got -1"),
        ("--stall-timeout", "nan", "a number of seconds greater than 0, got nan"),
        ("--stall-timeout", "inf", "a number of seconds greater than 0, got inf"),
        ("--stall-timeout", "0", "a number of seconds greater than 0, got 0"),
        ("--retry-backoff", "-0.5", "a number of seconds at least 0, got -0.5"),
        ("--retry-backoff", "NaN", "a number of seconds at least 0, got nan"),
        ("--max-retries", "-1", "an integer of at least 0, got -1"),
    ],
)
def test_a_bad_number_is_a_usage_error_naming_the_flag_and_range(
    option: str, value: str, accepted: str, listener: socket.socket, tmp_path: Path
) -> None:
    target = tmp_path / "out.img"

    run = usage_run("stream", url_of(listener), target, "--sha384", SHA384, option, value)

    assert_usage_error(run, f"{option} must be {accepted}")
    assert_not_connected(listener)
    assert not target.exists()


@pytest.mark.parametrize(("option", "value"), [("--max-window-log", "x"), ("--max-retries", "1.5")])
def test_a_value_that_is_no_number_is_an_argument_error(
    option: str, value: str, listener: socket.socket
) -> None:
    run = run_imagestream("stream", url_of(listener), "out.img", "--sha384", SHA384, option, value)

    assert_exited(run, 2, f"argument {option}: invalid int value: '{value}'")
    assert_not_connected(listener)


@pytest.mark.parametrize(
    ("source", "phrases"),
    [
        ("http:///x", ["SOURCE: invalid source URL http:///x: it names no host"]),
        ("https:///image.zst", ["SOURCE: invalid source URL", "names no host"]),
        ("http://[::1/x", ["SOURCE: invalid source URL: Invalid IPv6 URL"]),
        ("http://127.0.0.1:99999/x", ["SOURCE: invalid source URL", "Port out of range"]),
        ("ftp://h/x", ["SOURCE: unsupported source scheme ftp://"]),
        (
            "oci://fleet/os:v1",
            [
                "SOURCE: invalid OCI reference",
                "'fleet' is not a registry host",
                "e.g. oci://registry.example/fleet/os:v1",
            ],
        ),
        ("oci://fleet", ["SOURCE: invalid OCI reference"]),
    ],
)
def test_a_malformed_source_is_a_usage_error(
    source: str, phrases: list[str], tmp_path: Path
) -> None:
    target = tmp_path / "out.img"

    run = usage_run("stream", source, target, "--sha384", SHA384)

    assert_usage_error(run, *phrases)
    assert not target.exists()


def test_a_registry_host_with_a_dot_a_port_or_localhost_is_accepted_as_such() -> None:
    # Parsing alone: each reaches the network step (a refused connection, not a usage error).
    for source in ("oci://localhost/os:v1", "oci://127.0.0.1:1/os:v1"):
        run = run_imagestream(
            "stream", source, "/nonexistent/out.img", "--sha384", SHA384, "--max-retries", "0"
        )
        assert run.code != 2, run.text


def test_a_platform_without_arch_is_a_usage_error_before_the_registry_is_asked(
    listener: socket.socket, tmp_path: Path
) -> None:
    host, port = listener.getsockname()
    target = tmp_path / "out.img"

    run = usage_run(
        "stream", f"oci://{host}:{port}/os:v1", target, "--sha384", SHA384, "--platform", "linux"
    )

    # The message has "[/VARIANT]" in it, which rich used to take for a closing tag and crash.
    assert_usage_error(run, "--platform: invalid platform 'linux': expected OS/ARCH[/VARIANT]")
    assert_not_connected(listener)
    assert not target.exists()


def test_dash_is_refused_as_a_target(image: SampleImage) -> None:
    run = usage_run("stream", image.path, "-", "--sha384", image.sha384)

    assert_usage_error(run, "TARGET '-' is refused", "never to stdout")


@pytest.mark.parametrize("where", ["TARGET", "SOURCE", "--ca-file", "--allowed-dir"])
@pytest.mark.parametrize(
    ("make_path", "phrase"),
    [
        (lambda base: base / ("n" * 256), "has a file name 256 bytes long; the longest is 255"),
        (
            lambda base: base.joinpath(*(["d" * 200] * 21)),
            "bytes long; the longest path is 4095 bytes",
        ),
    ],
    ids=["name-too-long", "path-too-long"],
)
def test_a_path_too_long_is_a_usage_error(
    where: str,
    make_path: Callable[[Path], Path],
    phrase: str,
    image: SampleImage,
    tmp_path: Path,
) -> None:
    long_path = make_path(tmp_path)
    source, target = (long_path, tmp_path / "o") if where == "SOURCE" else (image.path, long_path)
    options: list[str | Path] = []
    if where.startswith("--"):
        target = tmp_path / "o"
        options = [where, long_path]

    run = usage_run("stream", source, target, "--sha384", image.sha384, *options)

    assert_usage_error(run, where, phrase)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.zst"]


@pytest.mark.parametrize("size", ["-5", "0"])
def test_demo_size_must_be_positive(size: str) -> None:
    run = usage_run("demo", "--size-mib", size)

    assert_usage_error(run, f"--size-mib must be an integer from 1 to 1048576, got {size}")


# -- errors from libraries: a reason and the family's exit code, never a traceback -------------


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("/loop", "redirects in a loop"),
        ("ftp://127.0.0.1/image.zst", "redirects to a URL that is not http:// or https://"),
    ],
    ids=["loop", "to-ftp"],
)
def test_a_bad_redirect_is_a_source_error_at_once(
    location: str, message: str, nginx_factory: NginxFactory, nginx_docroot: Path, tmp_path: Path
) -> None:
    server = nginx_factory(
        nginx_docroot, extra_server_config=f"location /loop {{ return 302 {location}; }}"
    )
    target = tmp_path / "out.img"

    run = run_imagestream(
        "stream", server.url_for("loop"), target, "--sha384", SHA384, "--progress", "json"
    )

    assert_exited(run, 3, "BadRedirect", message)
    assert "Traceback" not in run.stderr
    assert run.result()["reason"] == "BadRedirect"
    assert "resuming" not in run.stderr  # not retried: no retry changes the answer
    assert not target.exists()


def test_a_corrupt_zstd_stream_is_an_integrity_error(tmp_path: Path) -> None:
    raw = write_raw_image(tmp_path / "image.raw", 2 << 20, seed=3)
    # The real zstd tool writes a content checksum, so any flipped byte is caught by libzstd.
    compressed = tmp_path / "checked.zst"
    subprocess.run(
        [require_tool("zstd"), "-q", "-3", "-o", compressed, raw.path],
        check=True,
    )
    data = bytearray(compressed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    compressed.write_bytes(bytes(data))
    target = tmp_path / "out.img"

    run = run_imagestream("stream", compressed, target, "--sha384", sha384_of(compressed))

    assert_exited(run, 4, "CorruptStream", "zstd")
    assert "Traceback" not in run.stderr
    assert not target.exists()


def test_a_read_error_on_a_source_file_is_a_source_error(tmp_path: Path) -> None:
    # Reading /proc/self/mem at offset 0 fails with EIO: a real OSError in the middle of reading.
    target = tmp_path / "out.img"

    run = run_imagestream("stream", "/proc/self/mem", target, "--skip-verification-unsafe")

    assert_exited(run, 3, "SourceUnavailable", "cannot read source file /proc/self/mem")
    assert "Traceback" not in run.stderr
    assert not target.exists()


# -- user text is never markup -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["q[/x]", "[red]x", "[bold]a[/bold]"])
def test_paths_with_brackets_print_verbatim(name: str, image: SampleImage, tmp_path: Path) -> None:
    out = tmp_path / "out"
    target = out / name
    target.parent.mkdir(parents=True)

    run = run_imagestream(
        "stream", image.path, target, "--sha384", image.sha384, "--progress", "plain"
    )

    assert run.code == 0, run.text
    assert f"Wrote {target}: verified" in one_line(run.stdout)
    assert sha384_of(target) == image.raw_sha384


def test_a_missing_source_with_brackets_is_reported_verbatim(tmp_path: Path) -> None:
    missing = tmp_path / "[red]missing[/red]"

    run = run_imagestream("stream", missing, tmp_path / "out.img", "--sha384", SHA384)

    assert_exited(run, 3, f"cannot open source file {missing}")


def test_a_url_with_brackets_is_reported_verbatim(
    nginx_factory: NginxFactory, nginx_docroot: Path, tmp_path: Path
) -> None:
    server = nginx_factory(nginx_docroot)
    url = f"{server.base_url}/[red]x[/]"

    run = run_imagestream("stream", url, tmp_path / "out.img", "--sha384", SHA384)

    assert_exited(run, 3, "HTTPError", f"{url} answered HTTP 404")


# -- a bug: exit 70, in words ------------------------------------------------------------------

# The CLI's own main(), in its own process, with a bug planted where the stream would run.
_WITH_A_BUG = """
import sys
import imagestream.cli as cli

def stream_target(*args, **kwargs):
    raise KeyError("[bold]no such key")

cli.stream_target = stream_target
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_an_unexpected_exception_is_an_internal_error(
    verbose: bool, image: SampleImage, tmp_path: Path
) -> None:
    args = ["-v"] if verbose else []
    args += ["stream", str(image.path), str(tmp_path / "o.img"), "--sha384", image.sha384]
    proc = subprocess.run(
        [sys.executable, "-c", _WITH_A_BUG, *args],
        capture_output=True,
        text=True,
        env=imagestream_env(),
        timeout=30,
        check=False,
    )

    assert proc.returncode == 70, proc.stderr
    message = one_line(proc.stderr)
    assert "error (InternalError): internal error: KeyError: '[bold]no such key'" in message
    assert "please report this bug with the output of -v" in message
    # The trace only on request, for the bug report.
    assert ("Traceback" in proc.stderr) is verbose, proc.stderr
