"""constraints.txt is the lock of pyproject.toml: ``scripts/lock.py --check`` says when it is stale.

The check is offline (no resolver run): the lock's header records a SHA-256 of pyproject's
dependency lists, and every requirement must be pinned to a version its specifier admits. The
negative tests run the same check on a changed copy of pyproject.toml or of the lock.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LOCK = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"


def check(pyproject: Path = PYPROJECT, lock: Path = LOCK) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock.py"), "--check",
         "--pyproject", str(pyproject), "--lock", str(lock)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_lock_is_current() -> None:
    result = check()
    assert result.returncode == 0, result.stderr


def test_a_changed_dependency_list_makes_it_stale(tmp_path: Path) -> None:
    changed = tmp_path / "pyproject.toml"
    text = PYPROJECT.read_text(encoding="utf-8")
    changed.write_text(text.replace('"httpx>=0.27,<1",', '"httpx>=0.27,<1",\n    "idna",', 1))
    assert changed.read_text(encoding="utf-8") != text

    result = check(pyproject=changed)

    assert result.returncode == 1
    assert "dependency lists changed" in result.stderr
    assert "scripts/lock.py" in result.stderr


def test_a_pin_outside_the_specifier_makes_it_stale(tmp_path: Path) -> None:
    lock = tmp_path / "constraints.txt"
    text = LOCK.read_text(encoding="utf-8")
    lock.write_text(re.sub(r"^httpx==.*$", "httpx==0.20.0", text, flags=re.M), encoding="utf-8")

    result = check(lock=lock)

    assert result.returncode == 1
    assert "httpx==0.20.0 does not satisfy httpx<1,>=0.27" in result.stderr


def test_a_missing_pin_makes_it_stale(tmp_path: Path) -> None:
    lock = tmp_path / "constraints.txt"
    text = LOCK.read_text(encoding="utf-8")
    lock.write_text(re.sub(r"^kopf==.*\n", "", text, flags=re.M), encoding="utf-8")

    result = check(lock=lock)

    assert result.returncode == 1
    assert "kopf is not pinned" in result.stderr


def test_run_installs_under_the_lock() -> None:
    # ./run's setup_venv is the only place the development venv is made: it must pass the lock.
    run = (ROOT / "run").read_text(encoding="utf-8")
    assert re.search(r"pip install .*-c constraints\.txt", run)
