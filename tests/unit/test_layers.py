"""What the import contracts (`[tool.importlinter]`, checked by `lint-imports`) cannot see.

import-linter reads the import statements; this test runs them, in a fresh interpreter, so an
import that only happens at run time (a package `__init__`, a plugin hook) counts too.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: The controller's pure core: spec parsing, builders and decisions, unit-tested by the
#: thousand and imported by every controller start; they must not drag the data path in.
PURE_CORE = (
    "imagestream.controller.spec",
    "imagestream.controller.builders",
    "imagestream.controller.decisions",
)
#: The data path's heavy libraries (the HTTP client, the decompressor).
HEAVY = ("httpx", "zstandard")


def _loaded_after_import(module: str) -> list[str]:
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def test_the_pure_controller_core_loads_no_http_client_nor_decompressor() -> None:
    for module in PURE_CORE:
        assert _loaded_after_import(module) == [], module


def test_the_probe_sees_heavy_imports() -> None:
    # The agent's runner drives the pipeline: the same probe must notice that.
    assert "httpx" in _loaded_after_import("imagestream.agent.runner")
