"""`imagestream agent`: one stream inside the agent Pod, instructions from IMAGESTREAM_* env.

The termination message is the authoritative result: it is written whatever happens (bad
instructions included), while status progress is best effort and skipped, with a warning, when
no API configuration is available.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from imagestream.agent.contract import AgentInstructions
from imagestream.agent.kube_status import StatusUnavailable, connect
from imagestream.agent.reporter import ProgressReporter
from imagestream.agent.runner import (
    AgentRun,
    instructions_failure,
    run_agent,
    termination_log_path,
    write_termination_log,
)
from imagestream.errors import UsageError
from imagestream.pipeline.progress import ProgressCallback
from imagestream.signals import cancel_on_signals

log = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def agent_command() -> int:
    """Run the agent; the exit code is the outcome's family (0 on success)."""
    _configure_logging()
    # Before anything slow: a SIGTERM during start-up must also end in a clean stop.
    cancel = cancel_on_signals()
    # From the environment, not the instructions: the verdict of unusable ones goes there too.
    verdict_path = termination_log_path(os.environ)
    try:
        instr = AgentInstructions.from_env(os.environ)
    except UsageError as exc:
        run = instructions_failure(exc, os.environ)
        _conclude(verdict_path, run)
        return run.exit_code
    log.info(
        "streaming %s/%s generation %d onto %s",
        instr.namespace,
        instr.name,
        instr.generation,
        instr.target,
    )
    with _progress_reporting(instr) as on_progress:
        run = run_agent(instr, cancel, on_progress)
        # The verdict before the final progress patch, which may wait on a slow API server.
        _conclude(verdict_path, run)
    _exit_without_teardown(run.exit_code)


@contextmanager
def _progress_reporting(instr: AgentInstructions) -> Iterator[ProgressCallback | None]:
    """The reporter's callback while the stream runs, or None without an API configuration."""
    try:
        writer = connect(instr.namespace, instr.name, instr.uid)
    except StatusUnavailable as exc:
        log.warning("%s; streaming without status progress updates", exc)
        yield None
        return
    reporter = ProgressReporter(writer.patch_progress, instr.report_interval)
    try:
        yield reporter.update
    finally:
        reporter.close()
        writer.close()


def _conclude(termination_log: Path, run: AgentRun) -> None:
    result = run.result
    if result.outcome == "Succeeded":
        log.info("Succeeded: %s", result.message)
    else:
        log.error("Failed (%s): %s", result.reason, result.message)
    write_termination_log(termination_log, result)


def _exit_without_teardown(code: int) -> NoReturn:
    """Leave now: the verdict is written and the target closed.

    The interpreter's own teardown can't be trusted with what may still be running: a status
    request hanging in the reporter's thread makes it abort (SIGABRT), and it restores the
    default SIGTERM action, so a Pod deletion racing the end of the stream kills it with 143.
    Either would turn a verified stream into a crash in the Pod's status.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _configure_logging() -> None:
    # Plain timestamped lines for `kubectl logs`, at INFO: the agent's log is its only story.
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT, force=True)
    # urllib3 would log each failed status request; the reporter logs them rate-limited.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
