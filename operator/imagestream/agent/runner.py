"""From instructions to a verdict: build the stream request, run it, judge the outcome.

No Kubernetes here: progress goes to whatever callback the caller passes, and the verdict is an
`AgentResult` (plus the process exit code) that the caller writes to the termination log.
Every way a stream can end maps to a result; `Succeeded` only ever with a verified hash.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imagestream import defaults
from imagestream.agent.contract import (
    TERMINATION_LOG,
    AgentInstructions,
    AgentResult,
    env_name,
)
from imagestream.errors import ImageStreamError, IntegrityError, UsageError
from imagestream.pipeline.credentials import Credentials, load_secret_dir
from imagestream.pipeline.decompress import Compression
from imagestream.pipeline.pipeline import StreamRequest, run_stream, validate_sha384
from imagestream.pipeline.progress import Progress, ProgressCallback
from imagestream.pipeline.range_reader import RetryPolicy
from imagestream.pipeline.safety import HostView
from imagestream.pipeline.sources import SourceOptions
from imagestream.pipeline.zstd_frames import WindowTooLarge
from imagestream.reasons import Reason
from imagestream.targets import TargetKind, TargetPlan, TargetRequest, ab, extension, plan_target
from imagestream.targets.stream import StreamFunction, TargetOutcome, stream_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentRun:
    """The verdict for the termination log and the exit code of the agent process."""

    result: AgentResult
    exit_code: int


def request_from_instructions(instr: AgentInstructions, cancel: threading.Event) -> StreamRequest:
    """The pipeline request for `instr`; a UsageError names the offending variable."""
    try:
        validate_sha384(instr.sha384, allow_unverified=False)
    except UsageError as exc:
        raise UsageError(f"{env_name('sha384')}: {exc.message}") from None
    try:
        compression = Compression(instr.compression)
    except ValueError:
        choices = ", ".join(c.value for c in Compression)
        raise UsageError(
            f"{env_name('compression')}={instr.compression!r} is not one of {choices}"
        ) from None
    if not defaults.MIN_WINDOW_LOG <= instr.max_window_log <= defaults.MAX_WINDOW_LOG:
        raise UsageError(
            f"{env_name('max_window_log')}={instr.max_window_log} is outside "
            f"{defaults.MIN_WINDOW_LOG}..{defaults.MAX_WINDOW_LOG}"
        )
    return StreamRequest(
        source=instr.source,
        target=_target_plan(instr),
        sha384=instr.sha384,
        compression=compression,
        source_options=SourceOptions(
            ca_file=Path(instr.ca_file) if instr.ca_file else None,
            credentials=_credentials(instr.auth_dir),
            policy=RetryPolicy(max_retries=instr.max_retries, stall_timeout=instr.stall_timeout),
            platform=instr.platform,
            layer=instr.layer,
        ),
        verify_after_write=instr.verify_after_write,
        max_window_log=instr.max_window_log,
        cancel=cancel,
    )


#: The kinds `plan_target` plans as they are named; A/B pairs and extensions have planners of
#: their own.
_PLAIN_KINDS: dict[str, TargetKind] = {"device": "device", "disk": "disk", "file": "file"}
_TARGET_KINDS = (*_PLAIN_KINDS, "abUpdate", "sysext", "confext")


def _target_plan(instr: AgentInstructions) -> TargetPlan:
    """The controller said which kind of target this is; the agent never guesses it."""
    if instr.target_kind not in _TARGET_KINDS:
        raise UsageError(
            f"{env_name('target_kind')}={instr.target_kind!r} is not one of "
            f"{', '.join(_TARGET_KINDS)}"
        )
    host_proc = Path(instr.host_proc)
    # PID 1's mounts: the node's own table, not this container's.
    host = HostView(
        mountinfo=host_proc / "1/mountinfo", swaps=host_proc / "swaps", sysfs=Path("/sys")
    )
    if instr.target_kind == "abUpdate":
        volumes = [
            ab.Volume(Path(path), host_path(path, instr.host_prefix)) for path in _ab_volumes(instr)
        ]
        return ab.plan(volumes, force=instr.force, host=host)
    if instr.target_kind in ("sysext", "confext"):
        if not instr.allowed_dir:
            raise UsageError(
                f"{env_name('allowed_dir')} must name the mounted extension directory for "
                f"{env_name('target_kind')}={instr.target_kind}"
            )
        return extension.plan(
            extension.extension_type(instr.target_kind, env_name("target_kind")),
            instr.target,
            # Only the extension directory of the host is mounted into the Pod.
            directory=Path(instr.allowed_dir),
            where=env_name("target"),
            refresh=instr.refresh,
            # Inside its Pod the agent reaches the node's mount namespace through its /proc.
            mount_namespace=host_proc / "1/ns/mnt" if instr.host_prefix else None,
            host=host,
        )
    return plan_target(
        TargetRequest(
            kind=_PLAIN_KINDS[instr.target_kind],
            path=Path(instr.target),
            name=host_path(instr.target, instr.host_prefix),
            allowed_dirs=(Path(instr.allowed_dir),) if instr.allowed_dir else (),
            force=instr.force,
            host=host,
        )
    )


def _ab_volumes(instr: AgentInstructions) -> tuple[str, str]:
    if not instr.target_b:
        raise UsageError(
            f"{env_name('target_b')} is not set: an abUpdate target needs its second volume"
        )
    return instr.target, instr.target_b


def reported_target(instr: AgentInstructions, written: Path | None = None) -> str:
    """The target as the host knows it: an extension by its image's host path (its directory
    is the host's, mounted), anything else by the path `written` (or the instructions') with
    the host prefix cut."""
    if instr.target_kind in ("sysext", "confext"):
        kind = extension.extension_type(instr.target_kind, env_name("target_kind"))
        try:
            return extension.host_file(kind, extension.validate_name(instr.target, "target"))
        except UsageError:
            return instr.target  # no path to speak of: the name as the controller sent it
    return reported_path(written or instr.target, instr.host_prefix)


def _credentials(auth_dir: str | None) -> Credentials | None:
    if not auth_dir:
        return None
    try:
        return load_secret_dir(Path(auth_dir))
    except UsageError as exc:
        raise UsageError(f"{env_name('auth_dir')}: {exc.message}") from None


def run_agent(
    instr: AgentInstructions,
    cancel: threading.Event,
    on_progress: ProgressCallback | None = None,
    *,
    stream: StreamFunction = run_stream,
) -> AgentRun:
    """Run the stream `instr` describes and judge it; never raises."""
    started = time.monotonic()
    last: list[Progress] = []

    def track(progress: Progress) -> None:
        last[:] = [progress]
        if on_progress is not None:
            on_progress(progress)

    def failed(exc: ImageStreamError, reason: str | None = None) -> AgentRun:
        seen = last[0] if last else None
        result = AgentResult(
            outcome="Failed",
            reason=reason or exc.reason,
            message=exc.message,
            target=_failed_target(instr, planned[0] if planned else None),
            bytes_fetched=seen.bytes_fetched if seen else 0,
            bytes_written=seen.bytes_written if seen else 0,
            resumes=seen.resumes if seen else 0,
            seconds=round(time.monotonic() - started, 3),
        )
        return AgentRun(result, exc.exit_code)

    planned: list[TargetPlan] = []
    try:
        request = request_from_instructions(instr, cancel)
        planned.append(request.target)
        outcome = stream_target(request, track, stream=stream)
    except WindowTooLarge as exc:
        return failed(window_refusal(exc))
    except ImageStreamError as exc:
        return failed(exc)
    except Exception as exc:
        # A bug, not a stream outcome. The trace goes to the log; the status gets the type only
        # (an unexpected message may carry a URL with a token).
        log.exception("the agent failed unexpectedly")
        bug = ImageStreamError(
            f"the agent failed unexpectedly ({type(exc).__name__}); see the agent Pod's log"
        )
        return failed(bug, reason=Reason.AGENT_ERROR)
    result = outcome.result
    if not (result.verified and result.sha384 == instr.sha384.strip().lower()):
        refused = IntegrityError(
            f"the stream ended without a verified SHA-384 match (computed {result.sha384}, "
            f"expected {instr.sha384}); not reporting success",
            reason=Reason.UNVERIFIED,
        )
        return failed(refused)
    return AgentRun(succeeded(instr, outcome), 0)


def _failed_target(instr: AgentInstructions, plan: TargetPlan | None) -> str:
    """What a failed stream names as its target: the device planned, or (planning failed) the
    one the instructions name; an A/B pair whose volume was never chosen names none."""
    if plan is None and instr.target_kind == "abUpdate":
        return ""
    return reported_target(instr, plan.path if plan is not None else None)


def window_refusal(exc: WindowTooLarge) -> IntegrityError:
    """The refusal worded for an ImageStream: its knob, not the CLI's flag."""
    return IntegrityError(
        f"{exc.detail}; set spec.source.maxWindowLog: {exc.needed_log} if the image is trusted "
        "(the agent's memory limit is sized from it)",
        reason=exc.reason,
    )


def succeeded(instr: AgentInstructions, outcome: TargetOutcome) -> AgentResult:
    """The result of a verified stream."""
    result = outcome.result
    target = reported_target(instr, result.target)
    checks = "SHA-384 verified" + (", read back" if result.read_back_verified else "")
    written = target
    if instr.target_kind == "abUpdate":
        active = [path for path in _ab_volumes(instr) if Path(path) != result.target]
        running = ", ".join(reported_path(path, instr.host_prefix) for path in active)
        written = f"{target}, the inactive A/B volume ({running} runs the node)"
    done = (
        f"{target} is already current, not rewritten"
        if outcome.already_current
        else (f"wrote {written}")
    )
    return AgentResult(
        outcome="Succeeded",
        reason=Reason.SUCCEEDED,
        message="; ".join([f"{done}: {checks}", *outcome.notes]),
        target=target,
        sha384=result.sha384,
        digest=result.digest,
        bytes_fetched=result.bytes_fetched,
        bytes_written=result.bytes_written,
        resumes=result.resumes,
        seconds=round(result.seconds, 3),
    )


def instructions_failure(exc: UsageError, env: Mapping[str, str]) -> AgentRun:
    """The verdict when the instructions themselves are unusable (missing or malformed)."""
    result = AgentResult(
        outcome="Failed",
        reason=exc.reason,
        message=exc.message,
        target=env.get(env_name("target"), ""),
    )
    return AgentRun(result, exc.exit_code)


def termination_log_path(env: Mapping[str, str]) -> Path:
    """Where the verdict goes, even when the rest of the instructions could not be read."""
    return Path(env.get(env_name("termination_log"), TERMINATION_LOG))


def reported_path(path: Path | str, host_prefix: str) -> str:
    """The path as the host knows it: symlinks resolved, `host_prefix` cut from the front.

    `/host/dev/disk/by-partlabel/root-b` -> `/host/dev/nvme0n1p5` -> `/dev/nvme0n1p5`. A path
    outside the prefix (or with no prefix) is reported resolved but otherwise as is.
    """
    real = Path(os.path.realpath(path))
    if host_prefix:
        prefix = Path(os.path.realpath(host_prefix))
        if real.is_relative_to(prefix) and prefix != Path("/"):
            return str(Path("/") / real.relative_to(prefix))
    return str(real)


def host_path(path: str, host_prefix: str) -> str:
    """`path` as the host names it: `host_prefix` cut from the front, nothing resolved (the
    path may not exist: a missing device is reported by the name the user wrote)."""
    prefix = host_prefix.rstrip("/")
    if prefix and path.startswith(prefix + "/"):
        return path[len(prefix) :]
    return path


def write_termination_log(path: Path, result: AgentResult) -> None:
    """Write the verdict for the kubelet; a failure to do so is logged (nothing else can)."""
    try:
        path.write_text(result.to_json())
    except OSError as exc:
        log.error("cannot write the result to %s: %s", path, exc.strerror)
