"""What the controller tells the agent, and what the agent tells back.

Both directions cross a process (and, in a cluster, a container) boundary, so they are plain
data: the instructions travel as environment variables of the agent's container (visible in
`kubectl describe pod`, no API access needed to read them), the result as a JSON termination
message that the kubelet copies into the Pod status, where the controller reads it even if the
agent's ImageStream patches never arrived. The controller's Job builder and the agent both use
this module, so the two sides can't drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

from imagestream import defaults
from imagestream.errors import UsageError

ENV_PREFIX = "IMAGESTREAM_"
TERMINATION_LOG = "/dev/termination-log"
#: The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096

Outcome = Literal["Succeeded", "Failed"]


@dataclass(frozen=True)
class AgentInstructions:
    """One stream, as the controller built it for one generation of one ImageStream.

    Paths are as the agent's container sees them. The host's /dev is mounted at `/host/dev`,
    not over the container's own /dev (where the kubelet puts the termination-log file), so a
    device target reads `/host/dev/disk/by-partlabel/root-b`; udev's relative symlinks still
    resolve inside that mount. `target_kind` says what the target is: `device` (it must exist;
    never created), `disk` (a whole disk written from a COSI image), `file` (created under
    `allowed_dir`, also a host mount), `abUpdate` (an A/B pair: `target` and `target_b` are its
    volumes, and the agent writes the one the host's mount table and sysfs holders show the
    node is not running from), or `sysext` / `confext`, whose `target` is the extension's name,
    planned like the CLI's `sysext:NAME` in `allowed_dir`, the mount of the host's extension
    directory; `refresh` then runs `systemd-sysext refresh` (or -confext) in the host's mount
    namespace afterwards.
    `auth_dir` is a mounted Secret, `ca_file` a file of a mounted ConfigMap, and `host_proc` the
    host's /proc, whose `1/mountinfo` and `swaps` the safety checks read. `host_prefix` is cut
    from the paths the agent reports, so the status names the device as the host knows it.
    """

    name: str
    namespace: str
    uid: str
    generation: int
    source: str
    sha384: str
    target: str
    target_kind: str = "device"
    target_b: str | None = None
    compression: str = "auto"
    #: The largest zstd window accepted, as a power of two; the Job's memory is sized for it.
    max_window_log: int = defaults.SPEC_MAX_WINDOW_LOG
    allowed_dir: str | None = None
    platform: str | None = None
    layer: str | None = None
    auth_dir: str | None = None
    ca_file: str | None = None
    host_proc: str = "/host/proc"
    host_prefix: str = "/host"
    termination_log: str = TERMINATION_LOG
    stall_timeout: float = float(defaults.STALL_TIMEOUT_SECONDS)
    max_retries: int = defaults.MAX_RETRIES
    verify_after_write: bool = False
    force: bool = False
    refresh: bool = False
    report_interval: float = 1.0

    def to_env(self) -> dict[str, str]:
        """The instructions as environment variables; unset optional fields are left out."""
        env: dict[str, str] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None:
                continue
            env[env_name(spec.name)] = _format(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AgentInstructions:
        """Read the instructions back; a missing or malformed variable is a UsageError."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = env.get(env_name(spec.name))
            if raw is None:
                continue
            values[spec.name] = _parse(spec.name, str(spec.type), raw)
        missing = [
            env_name(spec.name)
            for spec in fields(cls)
            if spec.name not in values and spec.default is MISSING
        ]
        if missing:
            raise UsageError(f"agent instructions incomplete: {', '.join(missing)} not set")
        return cls(**values)


@dataclass(frozen=True)
class AgentResult:
    """The agent's verdict, written as JSON to the termination-message file."""

    outcome: Outcome
    reason: str
    message: str
    target: str
    sha384: str | None = None
    digest: str | None = None
    bytes_fetched: int = 0
    bytes_written: int = 0
    resumes: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        """Compact JSON that fits the kubelet's 4096-byte limit (the message is cut if not)."""
        record = {_camel(spec.name): getattr(self, spec.name) for spec in fields(self)}
        text = json.dumps(record, separators=(",", ":"))
        overflow = len(text.encode()) - TERMINATION_MESSAGE_LIMIT
        if overflow > 0:
            record["message"] = _truncate(self.message, overflow + 3) + "..."
            text = json.dumps(record, separators=(",", ":"))
        return text

    @classmethod
    def from_json(cls, text: str) -> AgentResult:
        """Parse a termination message; ValueError when it is not one of ours."""
        record = json.loads(text)
        if not isinstance(record, dict) or record.get("outcome") not in ("Succeeded", "Failed"):
            raise ValueError("not an agent result")
        known = {_camel(spec.name): spec.name for spec in fields(cls)}
        return cls(**{known[key]: value for key, value in record.items() if key in known})


def env_name(field_name: str) -> str:
    """`stall_timeout` -> `IMAGESTREAM_STALL_TIMEOUT`."""
    return ENV_PREFIX + field_name.upper()


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(name: str, annotation: str, raw: str) -> object:
    try:
        if annotation == "bool":
            if raw not in ("true", "false"):
                raise ValueError(raw)
            return raw == "true"
        if annotation == "int":
            return int(raw)
        if annotation == "float":
            return float(raw)
    except ValueError as exc:
        message = f"agent instruction {env_name(name)}={raw!r} is not a {annotation}"
        raise UsageError(message) from exc
    return raw


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _truncate(text: str, cut_bytes: int) -> str:
    encoded = text.encode()
    return encoded[: max(0, len(encoded) - cut_bytes)].decode(errors="ignore")
