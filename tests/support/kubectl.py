"""Run the real ``kubectl`` against a given kubeconfig (the API stand-in, or a real cluster)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

#: Subcommands that validate against the server's OpenAPI documents, which the stand-in lacks.
VALIDATING_COMMANDS = frozenset({"apply", "create", "replace"})


class KubectlError(AssertionError):
    """``kubectl`` exited non-zero where the test expected success (its output attached)."""


class Kubectl:
    """``kubectl(*args, check=True, input=None) -> CompletedProcess[str]``.

    Every call gets ``--kubeconfig`` (and ``KUBECONFIG``) and a private discovery cache (ports
    are reused between tests, and a cache of another server's resources would mislead
    kubectl); ``apply``/``create``/``replace`` get ``--validate=false`` unless ``validate``.
    """

    def __init__(
        self, binary: str, kubeconfig: Path, cache_dir: Path, *, validate: bool = False
    ) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir
        self.validate = validate

    def command(self, *args: str) -> list[str]:
        """The full command line for ``kubectl args...``."""
        extra = [f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}"]
        if args and args[0] in VALIDATING_COMMANDS and not self.validate:
            extra.append("--validate=false")
        return [self.binary, *args, *extra]

    def __call__(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl args...``; raise :class:`KubectlError` on failure when ``check``."""
        command = self.command(*args)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run(
            command,
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def json(self, *args: str) -> Any:
        """Run ``kubectl args... -o json`` and return the parsed output."""
        return json.loads(self(*args, "-o", "json").stdout)
