"""`--help` of every subcommand, through the real CLI: a line for every option, every default.

The options come from the parser itself, so an option added without help (or a default left
out of its help) fails here. `agent --help` lists the IMAGESTREAM_* variables of the agent's
contract, and `-v` is accepted after the subcommand as before it.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from tests.support.cli import one_line, run_imagestream
from tests.support.nginx import Nginx
from tests.support.targets import MIB

from imagestream.agent.contract import AgentInstructions, env_name
from imagestream.cli import build_parser
from imagestream.demo.image import write_sample_image


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def help_text(*command: str) -> str:
    run = run_imagestream(*command, "--help")
    assert run.code == 0, run.text
    assert run.stderr == ""
    return one_line(run.stdout)


@pytest.mark.parametrize("command", sorted(subparsers()))
def test_every_option_has_a_help_line_with_its_default(command: str) -> None:
    text = help_text(command)
    for action in subparsers()[command]._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        for option in action.option_strings:
            assert option in text, option
        default = action.default
        if not (default is None or default is False or default in ([], argparse.SUPPRESS)):
            assert "default" in one_line(action.help) or f"(default: {default})" in text, (
                f"{command} {action.option_strings[-1]}: default {default!r} not shown"
            )


def test_stream_help_shows_the_defaults_and_no_direct_io() -> None:
    text = help_text("stream")
    for shown in (
        "--no-direct-io",
        "(default: 30.0)",  # --stall-timeout
        "(default: 8)",  # --max-retries
        "default 31",  # --max-window-log
        "(default: auto)",  # --progress
        "130 cancelled (SIGTERM, SIGINT, SIGHUP)",
    ):
        assert shown in text, shown


def test_agent_help_lists_every_imagestream_variable() -> None:
    text = help_text("agent")
    for spec in fields(AgentInstructions):
        assert env_name(spec.name) in text, spec.name
    required = [f for f in fields(AgentInstructions) if f.default is MISSING]
    assert required
    for spec in required:
        assert f"{env_name(spec.name)} required" in text


@pytest.mark.parametrize("args", [("-v", "stream"), ("stream", "-v")], ids=["before", "after"])
def test_verbose_is_accepted_before_and_after_the_subcommand(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    run = run_imagestream(*args, tmp_path / "missing.zst", tmp_path / "x", "--sha384", "ab" * 48)
    assert run.code == 3, run.text
    assert "unrecognized arguments" not in run.text


def test_verbose_says_where_the_bytes_came_from_and_where_the_time_went(
    nginx: Nginx, tmp_path: Path
) -> None:
    image = write_sample_image(nginx.docroot / "image.zst", 4 * MIB, seed=71)
    url = nginx.url_for("image.zst")
    run = run_imagestream("stream", url, tmp_path / "o", "--sha384", image.sha384, "-v")
    assert run.code == 0, run.text
    text = one_line(run.stderr)
    assert f"connected to 127.0.0.1 port {nginx.port}" in text
    assert "ranges supported (206)" in text
    assert "zstd frame 1: window" in text
    assert f"content size {image.raw_size}" in text
    assert re.search(r"CPU per stage: fetch [\d.]+ s, hash [\d.]+ s, decompress", text)

    quiet = run_imagestream("stream", url, tmp_path / "q", "--sha384", image.sha384)
    assert "CPU per stage" not in quiet.stderr
