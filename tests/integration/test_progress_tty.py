"""The progress display as people see it: `imagestream` on a real pseudo-terminal, its screen read
back through a terminal emulator (pyte); and off a terminal, the plain lines a log keeps."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyte
import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.cli import imagestream_command, imagestream_env, run_imagestream
from tests.support.throttle import read_throttle

from imagestream.demo.image import SampleImage, write_sample_image
from imagestream.demo.range_server import RangeServer

COLUMNS, LINES = 200, 60
MiB = 1 << 20
SPINNER = re.compile("[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]")
WRONG_SHA384 = "ab" * 48


@dataclass
class TtyRun:
    """One process run on a pseudo-terminal: its exit code and the screens it left."""

    code: int
    screen: list[str]  # the terminal's lines at the end, trailing blanks cut
    seen: list[str]  # the screen when `until` first matched (empty without it)

    def line(self, prefix: str) -> str:
        """The last screen line starting with `prefix`."""
        matches = [line for line in self.screen if line.startswith(prefix)]
        assert matches, f"no line starting with {prefix!r}:\n" + "\n".join(self.screen)
        return matches[-1]

    def below(self, prefix: str, count: int) -> list[str]:
        """The `count` lines under the last line starting with `prefix` (a bar's details)."""
        index = len(self.screen) - 1 - self.screen[::-1].index(self.line(prefix))
        return self.screen[index + 1 : index + 1 + count]


def run_on_tty(
    *args: str | os.PathLike[str],
    until: Callable[[list[str]], bool] | None = None,
    then: Callable[[subprocess.Popen[bytes]], None] | None = None,
    started: Callable[[int], None] | None = None,
    timeout: float = 90,
) -> TtyRun:
    """Run `imagestream ARGS...` with stdin, stdout and stderr on a new pseudo-terminal.

    `started(pid)` runs as soon as the process exists. When `until(screen)` first holds, the
    screen is kept in `seen` and `then(process)` runs.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = imagestream_env(TERM="xterm-256color")
    for variable in ("COLUMNS", "LINES", "NO_COLOR"):
        env.pop(variable, None)
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    seen: list[str] = []
    with subprocess.Popen(
        imagestream_command(*args), stdin=slave, stdout=slave, stderr=slave, env=env
    ) as process:
        os.close(slave)
        if started is not None:
            started(process.pid)
        deadline = time.monotonic() + timeout
        try:
            for data in _read_until_closed(master, deadline):
                stream.feed(data)
                if until is not None and not seen and until(_lines(screen)):
                    seen = _lines(screen)
                    if then is not None:
                        then(process)
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            os.close(master)
            if process.poll() is None:
                process.kill()
    return TtyRun(code, _lines(screen), seen)


def _read_until_closed(master: int, deadline: float) -> Iterator[bytes]:
    while time.monotonic() < deadline:
        if not select.select([master], [], [], 0.05)[0]:
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal closed it
            return
        if not data:
            return
        yield data
    raise AssertionError("the process did not finish in time")


def _lines(screen: pyte.Screen) -> list[str]:
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _shows(*texts: str) -> Callable[[list[str]], bool]:
    """A screen predicate: every text is on some line."""
    return lambda lines: all(any(text in line for line in lines) for text in texts)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    path = tmp_path_factory.mktemp("tty") / "root.img.zst"
    return write_sample_image(path, 32 * MiB, seed=11)


def test_the_bar_shows_header_percent_units_read_back_and_ends_succeeded(
    image: SampleImage, tmp_path: Path
) -> None:
    target = tmp_path / "out.img"
    with RangeServer(image.path, rate=4 * MiB) as server:
        run = run_on_tty(
            "stream",
            server.url,
            target,
            "--sha384",
            image.sha384,
            "--verify-after-write",
            until=_shows("Streaming", "%", "ETA"),
        )
        header = f"{server.url} -> {target}"
    assert run.code == 0, "\n".join(run.screen)
    assert run.screen[0] == header
    streaming = run.seen[run.seen.index(header) + 1]
    assert re.fullmatch(r"Streaming [━╸╺ ]+ \d+\.\d%", streaming), streaming
    details = "\n".join(run.seen)
    assert re.search(
        r"fetched [\d.]+ MiB of [\d.]+ MiB · written [\d.]+ [KM]?i?B of 32\.0 MiB", details
    )
    assert re.search(r"[\d.]+ MiB/s · ETA 0:00:\d\d · elapsed 0:00:\d\d · resumes 0", details)

    assert re.fullmatch(r"Succeeded ━+ 100\.0%", run.line("Succeeded"))
    size = f"{image.compressed_size / MiB:.1f} MiB"
    sizes, timing = run.below("Succeeded", 2)
    assert sizes == f"  fetched {size} of {size} · written 32.0 MiB of 32.0 MiB"
    assert re.fullmatch(r"  [\d.]+ MiB/s average · elapsed 0:00:\d\d · resumes 0", timing)
    assert re.fullmatch(r"Read back ━+ 100\.0%", run.line("Read back"))
    (read_back,) = run.below("Read back", 1)
    assert re.fullmatch(r"  read back 32\.0 MiB of 32\.0 MiB · [\d.]+ [KMG]iB/s average", read_back)
    assert not any(word in line for line in run.screen for word in ("Streaming", "Running"))
    assert not any(re.search(r"\d (kB|MB|GB)", line) for line in run.screen)
    assert "verified" in run.line("Wrote")


def test_the_read_back_has_its_own_bar_while_it_runs(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    dev = loop_device_factory(32 * MiB)
    img = write_sample_image(tmp_path / "image.zst", 32 * MiB, seed=12)
    with read_throttle(dev, 8 * MiB) as admit:  # a read-back of about 4 s
        run = run_on_tty(
            "stream",
            img.path,
            dev,
            "--sha384",
            img.sha384,
            "--verify-after-write",
            started=admit,
            until=lambda lines: any(line.startswith("Verifying") and "%" in line for line in lines),
        )
    assert run.code == 0, "\n".join(run.screen)
    seen = TtyRun(run.code, run.seen, [])
    assert re.fullmatch(r"Streamed  ━+ 100\.0%", seen.line("Streamed"))
    assert re.fullmatch(r"Verifying [━╸╺ ]+ \d+\.\d%", seen.line("Verifying"))
    (detail,) = seen.below("Verifying", 1)
    assert re.fullmatch(
        r"  read back [\d.]+ [KM]?i?B of 32\.0 MiB( · [\d.]+ MiB/s · ETA 0:00:0\d)?", detail
    )
    assert re.fullmatch(r"Read back ━+ 100\.0%", run.line("Read back"))
    assert "Verifying" not in "\n".join(run.screen)


def test_a_hash_mismatch_ends_the_bar_failed_with_its_reason(
    image: SampleImage, tmp_path: Path
) -> None:
    run = run_on_tty("stream", image.path, tmp_path / "out.img", "--sha384", WRONG_SHA384)
    assert run.code == 4
    assert run.screen[0] == f"{image.path} -> {tmp_path / 'out.img'}"
    assert re.fullmatch(r"Failed \(HashMismatch\) ━+ 100\.0%", run.line("Failed"))
    assert not any(word in line for line in run.screen for word in ("Streaming", "Succeeded"))
    assert run.line("error").startswith("error (HashMismatch): SHA-384 mismatch")


def test_ctrl_c_ends_the_bar_cancelled(image: SampleImage, tmp_path: Path) -> None:
    with RangeServer(image.path, rate=1 * MiB) as server:
        run = run_on_tty(
            "stream",
            server.url,
            tmp_path / "out.img",
            "--sha384",
            image.sha384,
            until=_shows("Streaming", "%"),
            then=lambda process: process.send_signal(signal.SIGINT),
        )
    assert run.code == 130, "\n".join(run.screen)
    cancelled = run.line("Cancelled")
    assert re.fullmatch(r"Cancelled [━╸╺ ]+ \d+\.\d%", cancelled), cancelled
    assert "100.0%" not in cancelled
    assert not any(word in line for line in run.screen for word in ("Streaming", "Succeeded"))


def test_a_pipe_source_shows_a_spinner_with_bytes_and_rate(
    image: SampleImage, tmp_path: Path
) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    data = image.path.read_bytes()

    def feed() -> None:
        # Slowly: the screen must show the stream while it runs.
        with fifo.open("wb") as pipe:
            for offset in range(0, len(data), 256 << 10):
                pipe.write(data[offset : offset + (256 << 10)])
                pipe.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    run = run_on_tty(
        "stream",
        fifo,
        tmp_path / "out.img",
        "--sha384",
        image.sha384,
        until=_shows("Streaming", "MiB/s"),
    )
    writer.join(10)
    assert run.code == 0, "\n".join(run.screen)
    seen = TtyRun(run.code, run.seen, [])
    streaming = seen.line("Streaming")
    assert re.fullmatch(
        rf"Streaming {SPINNER.pattern} fetched [\d.]+ MiB · written [\d.]+ [KM]?i?B of 32\.0 MiB",
        streaming,
    ), streaming
    (timing,) = seen.below("Streaming", 1)
    assert re.fullmatch(r"  [\d.]+ MiB/s · elapsed 0:00:\d\d · resumes 0", timing), timing
    assert not any("━" in line or "%" in line for line in run.seen)
    succeeded = run.line("Succeeded")
    assert "%" not in succeeded
    assert not SPINNER.search(succeeded)
    assert re.search(r"fetched [\d.]+ MiB · written 32\.0 MiB of 32\.0 MiB", succeeded)


def test_the_demo_rate_lets_a_person_watch_the_resumes(tmp_path: Path) -> None:
    run = run_on_tty(
        "demo",
        "--size-mib",
        "24",
        "--faults",
        "--rate",
        "4",
        "--keep",
        tmp_path / "kept.img",
        until=_shows("Streaming", "resumes 1"),
    )
    assert run.code == 0, "\n".join(run.screen)
    assert any("resumes 1" in line for line in run.seen)  # drawn while it ran, between resets
    assert "The server sends at most 4.0 MiB/s." in run.screen
    assert re.fullmatch(r"Succeeded ━+ 100\.0%", run.line("Succeeded"))
    assert run.below("Succeeded", 2)[1].endswith("resumes 3")


def test_off_a_terminal_lines_are_plain_unpadded_and_never_0_b_per_s() -> None:
    # COLUMNS=80: rich would wrap and pad the warnings (they are longer) on a "console".
    run = run_imagestream("demo", "--size-mib", "24", "--faults", env=imagestream_env(COLUMNS="80"))
    assert run.code == 0, run.stderr
    lines = run.stderr.splitlines()
    assert all(line == line.rstrip() for line in lines)
    warnings = [line for line in lines if line.startswith("WARNING: ")]
    assert len(warnings) == 3
    assert all("resuming at byte" in line and line.endswith(")") for line in warnings)
    assert not any("0 B/s" in line for line in lines)
    assert any(re.fullmatch(r"http://127\.0\.0\.1:\d+/demo\.img\.zst -> \S+", x) for x in lines)
    final = [line for line in lines if line.startswith("Succeeded: ")]
    assert len(final) == 1
    assert re.fullmatch(
        r"Succeeded: 100\.0% fetched [\d.]+ MiB of [\d.]+ MiB, written 24\.0 MiB of 24\.0 MiB, "
        r"[\d.]+ MiB/s average, elapsed 0:00:\d\d, resumes 3",
        final[0],
    ), final[0]


def test_the_demo_rate_really_throttles_the_stream() -> None:
    run = run_imagestream("demo", "--size-mib", "16", "--rate", "4", "--progress", "json")
    assert run.code == 0, run.stderr
    fetched = run.result()["bytesFetched"]
    seconds = run.result()["seconds"]
    expected = fetched / (4 * MiB)
    assert expected / 1.5 <= seconds <= expected * 2, (seconds, expected)


def test_ctrl_c_stops_the_demo_cleanly_too(tmp_path: Path) -> None:
    run = run_on_tty(
        "demo",
        "--size-mib",
        "32",
        "--rate",
        "2",
        "--keep",
        tmp_path / "kept.img",
        until=_shows("Streaming", "%"),
        then=lambda process: process.send_signal(signal.SIGINT),
    )
    assert run.code == 130, "\n".join(run.screen)
    assert re.fullmatch(r"Cancelled [━╸╺ ]+ \d+\.\d%", run.line("Cancelled"))
    # One Ctrl-C is a clean stop, not the "at once" of a second one.
    assert "the stream was cancelled while streaming" in " ".join(run.screen)


@pytest.mark.parametrize("rate", ["0", "-1", "nan", "inf"])
def test_the_demo_refuses_a_rate_that_is_not_a_positive_number(rate: str) -> None:
    run = run_imagestream("demo", "--rate", rate)
    assert run.code == 2
    assert run.stderr.strip() == (
        f"error (InvalidRequest): --rate must be a number of MiB/s greater than 0, got {rate}"
    )
