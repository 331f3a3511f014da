"""The agent's runner: instructions -> stream request, and every outcome -> a termination result.

Successes and real failures run the real pipeline on files; the error-family mapping uses a
stand-in for `run_stream` that raises each family (the real pipeline raises the same types,
from network, hash, device and signal conditions the integration tests create for real).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from imagestream.agent.contract import AgentInstructions, AgentResult
from imagestream.agent.runner import (
    instructions_failure,
    reported_path,
    request_from_instructions,
    run_agent,
    termination_log_path,
    write_termination_log,
)
from imagestream.demo.image import SampleImage, write_sample_image
from imagestream.errors import (
    Cancelled,
    ImageStreamError,
    IntegrityError,
    SourceError,
    TargetError,
    UsageError,
)
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamRequest, StreamResult
from imagestream.pipeline.progress import Progress, ProgressCallback
from imagestream.pipeline.safety import HostView
from imagestream.pipeline.target_plan import TargetPlan
from imagestream.reasons import Reason
from imagestream.targets.stream import StreamFunction

MIB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> SampleImage:
    return write_sample_image(tmp_path / "image.zst", 2 * MIB, seed=5)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A stand-in host root: `host/var/lib/extensions` is where file targets may go."""
    allowed = tmp_path / "host/var/lib/extensions"
    allowed.mkdir(parents=True)
    return tmp_path / "host"


def instructions(image: SampleImage, host: Path, **overrides: object) -> AgentInstructions:
    base = AgentInstructions(
        name="node-7-tools",
        namespace="imagestream-system",
        uid="uid-1",
        generation=1,
        source=str(image.path),
        sha384=image.sha384,
        target=str(host / "var/lib/extensions/tools.raw"),
        target_kind="file",
        allowed_dir=str(host / "var/lib/extensions"),
        host_proc="/proc",
        host_prefix=str(host),
        termination_log=str(host.parent / "termination-log"),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def raising(exc: BaseException, *, after: Progress | None = None) -> StreamFunction:
    """A `run_stream` stand-in that reports `after` (if given), then raises `exc`."""

    def stream(request: StreamRequest, on_progress: ProgressCallback | None) -> StreamResult:
        if after is not None and on_progress is not None:
            on_progress(after)
        raise exc

    return stream


def returning(result: StreamResult) -> StreamFunction:
    def stream(request: StreamRequest, on_progress: ProgressCallback | None) -> StreamResult:
        return result

    return stream


SNAPSHOT = Progress(
    phase="Running",
    bytes_fetched=3 * MIB,
    bytes_total=10 * MIB,
    bytes_written=4 * MIB,
    bytes_per_second=1e6,
    resumes=2,
    elapsed=3.0,
)


# -- the request ------------------------------------------------------------------------------


def test_request_from_instructions(image: SampleImage, host: Path) -> None:
    cancel = threading.Event()
    instr = instructions(
        image,
        host,
        host_proc="/host/proc",
        compression="zstd",
        ca_file="/etc/imagestream/ca/ca.crt",
        max_retries=3,
        stall_timeout=7.5,
        verify_after_write=True,
        force=True,
        max_window_log=30,
    )

    request = request_from_instructions(instr, cancel)

    assert request.source == instr.source
    assert request.target == TargetPlan(
        kind="file",
        path=Path(instr.target),
        name="/var/lib/extensions/tools.raw",
        allowed_dirs=(host / "var/lib/extensions",),
        direct_io=True,
        host=HostView(
            mountinfo=Path("/host/proc/1/mountinfo"),
            swaps=Path("/host/proc/swaps"),
            sysfs=Path("/sys"),
        ),
    )
    assert request.sha384 == image.sha384
    assert request.compression is Compression.ZSTD
    assert request.verify_after_write is True
    assert request.allow_unverified is False
    assert request.cancel is cancel
    assert request.source_options.ca_file == Path("/etc/imagestream/ca/ca.crt")
    assert request.source_options.policy.max_retries == 3
    assert request.source_options.policy.stall_timeout == 7.5
    assert request.max_window_log == 30


def test_oci_options_and_the_mounted_secret(image: SampleImage, host: Path) -> None:
    secret = host.parent / "secret"
    secret.mkdir()
    (secret / "username").write_text("robot\n")
    (secret / "password").write_text("pa55")
    instr = instructions(
        image, host, auth_dir=str(secret), platform="linux/arm64/v8", layer="root.raw.zst"
    )

    options = request_from_instructions(instr, threading.Event()).source_options

    assert options.platform == "linux/arm64/v8"
    assert options.layer == "root.raw.zst"
    assert options.credentials is not None
    login = options.credentials.login_for("registry.example.com")
    assert login is not None
    assert (login.username, login.password) == ("robot", "pa55")


def test_unusable_secret_fails_naming_the_variable(image: SampleImage, host: Path) -> None:
    instr = instructions(image, host, auth_dir=str(host.parent / "no-such-secret"))

    run = run_agent(instr, threading.Event())

    assert run.exit_code == 2
    assert run.result.reason == "InvalidRequest"
    assert "IMAGESTREAM_AUTH_DIR" in run.result.message
    assert not (host / "var/lib/extensions/tools.raw").exists()


def test_defaults_keep_the_safety_checks(image: SampleImage, host: Path) -> None:
    request = request_from_instructions(
        instructions(image, host, force=False, allowed_dir=None), threading.Event()
    )
    assert request.target.usage_checks is True
    assert request.target.allowed_dirs == ()
    assert request.source_options.ca_file is None
    assert request.source_options.credentials is None


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("compression", "lz4", "IMAGESTREAM_COMPRESSION"),
        ("sha384", "abc123", "IMAGESTREAM_SHA384"),
        ("max_window_log", 9, "IMAGESTREAM_MAX_WINDOW_LOG=9 is outside 10..31"),
        ("max_window_log", 32, "IMAGESTREAM_MAX_WINDOW_LOG=32 is outside 10..31"),
        ("target_kind", "partition", "IMAGESTREAM_TARGET_KIND"),
    ],
)
def test_bad_instruction_values_fail_naming_the_variable(
    field: str, value: object, variable: str, image: SampleImage, host: Path
) -> None:
    instr = instructions(image, host, **{field: value})

    run = run_agent(instr, threading.Event())

    assert run.exit_code == 2
    assert (run.result.outcome, run.result.reason) == ("Failed", "InvalidRequest")
    assert variable in run.result.message


# -- outcomes of the real pipeline ------------------------------------------------------------


def test_success_reports_the_host_path_and_the_verified_hash(
    image: SampleImage, host: Path
) -> None:
    seen: list[Progress] = []
    instr = instructions(image, host, sha384=image.sha384.upper())

    run = run_agent(instr, threading.Event(), seen.append)

    assert run.exit_code == 0
    result = run.result
    assert (result.outcome, result.reason) == ("Succeeded", "Succeeded")
    assert result.sha384 == image.sha384
    assert result.target == "/var/lib/extensions/tools.raw"  # the host prefix cut off
    assert result.bytes_fetched == image.compressed_size
    assert result.bytes_written == image.raw_size
    assert hashlib.sha384(Path(instr.target).read_bytes()).hexdigest() == image.raw_sha384
    assert seen, "progress reaches the callback"


def test_real_hash_mismatch_is_an_integrity_failure(image: SampleImage, host: Path) -> None:
    wrong = hashlib.sha384(b"not the image").hexdigest()

    run = run_agent(instructions(image, host, sha384=wrong), threading.Event())

    assert run.exit_code == 4
    assert (run.result.outcome, run.result.reason) == ("Failed", "HashMismatch")
    assert run.result.sha384 is None
    assert run.result.target == "/var/lib/extensions/tools.raw"
    assert run.result.bytes_fetched == image.compressed_size
    assert not (host / "var/lib/extensions/tools.raw").exists()


def test_a_window_beyond_the_limit_is_refused_naming_the_spec_field(
    host: Path, tmp_path: Path
) -> None:
    """The agent words the pipeline's refusal for an ImageStream: the field and the value."""
    image = write_sample_image(
        tmp_path / "long.zst", 2 * MIB, seed=6, content_size=False, long_window_log=21
    )
    instr = instructions(image, host, source=str(image.path), max_window_log=20)

    run = run_agent(instr, threading.Event())

    assert run.exit_code == 4
    assert (run.result.outcome, run.result.reason) == ("Failed", "WindowTooLarge")
    assert "needs 2^21), more than the allowed 2^20" in run.result.message
    assert "set spec.source.maxWindowLog: 21 " in run.result.message
    assert "--max-window-log" not in run.result.message
    assert run.result.bytes_written == 0
    assert not (host / "var/lib/extensions/tools.raw").exists()
    assert list((host / "var/lib/extensions").iterdir()) == []  # no staging file left
    # The same image with the limit it needs.
    assert run_agent(replace(instr, max_window_log=21), threading.Event()).exit_code == 0


def test_file_target_outside_the_allowed_dir_is_refused(image: SampleImage, host: Path) -> None:
    instr = instructions(image, host, target=str(host / "etc/shadow"))
    (host / "etc").mkdir()

    run = run_agent(instr, threading.Event())

    assert run.exit_code == 5
    assert run.result.reason == "TargetNotAllowed"
    assert run.result.target == "/etc/shadow"
    assert not (host / "etc/shadow").exists()


# -- the mapping of every error family --------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason", "code"),
    [
        (UsageError("bad URL"), "InvalidRequest", 2),
        (SourceError("404 from the server", reason=Reason.HTTP_ERROR), "HTTPError", 3),
        (SourceError("retries spent"), "SourceUnavailable", 3),
        (IntegrityError("truncated", reason=Reason.TRUNCATED_STREAM), "TruncatedStream", 4),
        (TargetError("mounted", reason=Reason.TARGET_MOUNTED), "TargetMounted", 5),
        (Cancelled("the stream was cancelled"), "Cancelled", 130),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_each_error_family_becomes_a_failed_result(
    error: ImageStreamError, reason: str, code: int, image: SampleImage, host: Path
) -> None:
    stream = raising(error, after=SNAPSHOT)
    run = run_agent(instructions(image, host), threading.Event(), stream=stream)

    assert run.exit_code == code
    assert run.result.outcome == "Failed"
    assert run.result.reason == reason
    assert run.result.message == error.message
    assert run.result.sha384 is None
    # The last numbers the stream reported, so the status shows how far it got.
    assert (run.result.bytes_fetched, run.result.bytes_written, run.result.resumes) == (
        3 * MIB,
        4 * MIB,
        2,
    )


def test_unexpected_exception_is_an_agent_error_without_its_message(
    image: SampleImage, host: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bug = KeyError("https://user:hunter2@images.example.com/root.img?token=abc")

    run = run_agent(instructions(image, host), threading.Event(), stream=raising(bug))

    assert run.exit_code == 1
    assert (run.result.outcome, run.result.reason) == ("Failed", "AgentError")
    assert "KeyError" in run.result.message
    assert "hunter2" not in run.result.to_json()
    assert "the agent failed unexpectedly" in caplog.text  # the trace is in the log


@pytest.mark.parametrize("case", ["unverified", "other-hash"])
def test_success_without_a_verified_matching_hash_is_refused(
    case: str, image: SampleImage, host: Path
) -> None:
    result = StreamResult(
        target=host / "var/lib/extensions/tools.raw",
        sha384=image.sha384 if case == "unverified" else hashlib.sha384(b"x").hexdigest(),
        verified=case != "unverified",
        compression=Compression.ZSTD,
        bytes_fetched=image.compressed_size,
        bytes_written=image.raw_size,
        resumes=0,
        seconds=1.0,
        read_back_verified=False,
    )

    run = run_agent(instructions(image, host), threading.Event(), stream=returning(result))

    assert run.exit_code == 4
    assert (run.result.outcome, run.result.reason) == ("Failed", "Unverified")
    assert run.result.sha384 is None


# -- paths as the host knows them -------------------------------------------------------------


def test_reported_path_resolves_symlinks_then_cuts_the_prefix(tmp_path: Path) -> None:
    dev = tmp_path / "host/dev"
    (dev / "disk/by-partlabel").mkdir(parents=True)
    (dev / "nvme0n1p5").touch()
    # udev's links are relative, so they resolve inside the mount too.
    (dev / "disk/by-partlabel/root-b").symlink_to("../../nvme0n1p5")

    link = dev / "disk/by-partlabel/root-b"
    assert reported_path(link, str(tmp_path / "host")) == "/dev/nvme0n1p5"
    assert reported_path(link, "") == str(dev / "nvme0n1p5")
    # A prefix is cut at a path boundary only: /hostile is not under /host.
    assert reported_path("/hostile/dev/sda", "/host") == "/hostile/dev/sda"
    assert reported_path("/host/dev/sda", "/host/") == "/dev/sda"


# -- unusable instructions --------------------------------------------------------------------


def test_missing_instructions_give_a_failed_result_in_the_termination_log(
    image: SampleImage, host: Path
) -> None:
    env = instructions(image, host).to_env()
    del env["IMAGESTREAM_NAMESPACE"], env["IMAGESTREAM_SOURCE"]
    with pytest.raises(UsageError) as raised:
        AgentInstructions.from_env(env)

    run = instructions_failure(raised.value, env)
    path = termination_log_path(env)
    write_termination_log(path, run.result)

    assert path == host.parent / "termination-log"
    assert run.exit_code == 2
    written = AgentResult.from_json(path.read_text())
    assert (written.outcome, written.reason) == ("Failed", "InvalidRequest")
    assert "IMAGESTREAM_NAMESPACE" in written.message
    assert "IMAGESTREAM_SOURCE" in written.message
    assert written.target == env["IMAGESTREAM_TARGET"]


def test_malformed_instruction_is_named(image: SampleImage, host: Path) -> None:
    env = {**instructions(image, host).to_env(), "IMAGESTREAM_GENERATION": "three"}
    with pytest.raises(UsageError) as raised:
        AgentInstructions.from_env(env)

    run = instructions_failure(raised.value, env)

    assert "IMAGESTREAM_GENERATION" in run.result.message
    assert run.exit_code == 2


def test_termination_log_defaults_to_the_kubelet_path() -> None:
    assert termination_log_path({}) == Path("/dev/termination-log")
