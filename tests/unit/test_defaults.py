"""Each default lives in `imagestream.defaults`; the CRD's schema repeats it and must agree."""

from __future__ import annotations

from typing import Any

from tests.support.crd import CRD_PATH, load_yaml_documents

from imagestream import defaults
from imagestream.agent.contract import AgentInstructions
from imagestream.cli import build_parser
from imagestream.controller.spec import SourceSpec, StreamOptions
from imagestream.pipeline.range_reader import RetryPolicy


def _spec_schema() -> dict[str, Any]:
    (crd,) = load_yaml_documents(CRD_PATH)
    version = crd["spec"]["versions"][0]
    spec: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def test_the_crd_defaults_are_the_code_defaults() -> None:
    knobs = _spec_schema()["properties"]
    options = StreamOptions()
    assert knobs["stallTimeoutSeconds"]["default"] == defaults.STALL_TIMEOUT_SECONDS
    assert knobs["stallTimeoutSeconds"]["default"] == options.stall_timeout_seconds
    assert knobs["maxRetries"]["default"] == defaults.MAX_RETRIES == options.max_retries
    assert knobs["activeDeadlineSeconds"]["default"] == options.active_deadline_seconds


def test_the_crd_window_log_is_the_code_window_log() -> None:
    """The CRD's default and bounds of maxWindowLog, the spec's and the agent's default agree."""
    window = _spec_schema()["properties"]["source"]["properties"]["maxWindowLog"]
    source = SourceSpec(url="u", sha384="h")
    agent = AgentInstructions(
        name="n", namespace="ns", uid="u", generation=1, source="s", sha384="h", target="t"
    )
    assert window["default"] == defaults.SPEC_MAX_WINDOW_LOG
    assert window["default"] == source.max_window_log == agent.max_window_log
    assert (window["minimum"], window["maximum"]) == (
        defaults.MIN_WINDOW_LOG,
        defaults.MAX_WINDOW_LOG,
    )


def test_cli_agent_and_pipeline_share_the_defaults() -> None:
    args = build_parser().parse_args(["stream", "src", "dst"])
    policy = RetryPolicy()
    agent = AgentInstructions(
        name="n", namespace="ns", uid="u", generation=1, source="s", sha384="h", target="t"
    )
    assert args.stall_timeout == policy.stall_timeout == agent.stall_timeout
    assert args.max_retries == policy.max_retries == agent.max_retries
    assert args.retry_backoff == policy.backoff_base
    assert args.max_window_log == defaults.CLI_MAX_WINDOW_LOG


def test_the_crd_hash_pattern_is_the_code_pattern() -> None:
    source = _spec_schema()["properties"]["source"]["properties"]
    assert source["sha384"]["pattern"] in (
        f"^{defaults.SHA384.pattern}$",
        "^[0-9a-fA-F]{96}$",  # the CRD also admits upper case; the code lower-cases first
    )
