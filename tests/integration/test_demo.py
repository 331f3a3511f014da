"""`imagestream demo`: the README's first command, end to end (a small image to keep it quick)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.cli import IMAGESTREAM, one_line, run_imagestream
from tests.support.tools import require_tool


def test_demo_with_faults_resumes_and_verifies() -> None:
    run = run_imagestream("demo", "--size-mib", "24", "--faults", "--progress", "json")
    assert run.code == 0, run.stderr
    result = run.result()  # the last JSON line, which is the result
    assert result["ok"] is True
    assert result["verified"] is True
    assert result["bytesWritten"] == 24 << 20
    assert result["resumes"] == 3
    assert "matches the generated data byte for byte" in one_line(run.stderr)


def test_demo_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    script = require_tool("script")  # util-linux: runs the demo on a pseudo-terminal
    target = tmp_path / "kept.img"
    run = subprocess.run(
        [script, "-qec", f"{IMAGESTREAM} demo --size-mib 16 --keep {target}", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"COLUMNS": "160", "TERM": "xterm", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stdout
    screen = run.stdout
    assert "━" in screen  # rich's bar glyphs: the auto mode chose the bar on a terminal
    assert "Succeeded" in screen
    assert "verified" in screen
    assert target.stat().st_size == 16 << 20
