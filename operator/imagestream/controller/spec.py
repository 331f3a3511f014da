"""An ImageStream's spec as frozen dataclasses, with its target resolved for the agent's Pod.

The CRD's schema and CEL rules reject bad input at apply time, but the controller cannot rely on
them (an older CRD, a stand-in without validation, a field added later), so parsing checks what
the Job builder depends on and raises `UsageError` with a machine-readable reason:
`InvalidSpec` for malformed input (every target kind the CRD accepts is written). It ends the
stream `Failed` without creating a Job.

Two streams must not write one node's disk at once: `held_keys` says what a stream holds while
it runs (the (node, host path) of every device it may write: an A/B pair holds both volumes) and
`blocking_keys` which holders make it wait. A whole disk (`disk`) holds every target on its
node, since which devices lie on it is known only on the node (by-id, by-partlabel links).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from imagestream import defaults
from imagestream.errors import UsageError
from imagestream.pipeline.target_plan import ExtensionPlan
from imagestream.reasons import Reason
from imagestream.targets import extension as extensions

#: Where the agent's container sees the host's filesystem (the contract's `host_prefix`).
HOST_PREFIX = "/host"
#: The `held_keys` path every stream of a node holds; a whole-disk stream waits for all of them.
ANY_TARGET = "*"
#: The `held_keys` path of whole-disk streams, which every stream of their node waits for.
WHOLE_DISK = "disk:*"

_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_COMPRESSIONS = ("auto", "zstd", "gzip", "xz", "bzip2", "none")
_SCHEMES = ("http://", "https://", "oci://")

TargetKind = Literal["device", "extension", "abUpdate", "disk"]


@dataclass(frozen=True)
class SourceSpec:
    """`spec.source`: where the image comes from and what it must hash to."""

    url: str
    sha384: str
    compression: str = "auto"
    #: The largest zstd window accepted, as a power of two; sizes the agent's memory.
    max_window_log: int = defaults.SPEC_MAX_WINDOW_LOG
    auth_secret: str | None = None
    ca_config_map: str | None = None
    ca_key: str = "ca.crt"
    platform: str | None = None
    layer: str | None = None


@dataclass(frozen=True)
class TargetSpec:
    """`spec.target`, resolved: the path on the host and the path the agent opens.

    `host_dir` is set for file targets: the host directory mounted into the agent's container
    (at `HOST_PREFIX + host_dir`), which is also the agent's `allowed_dir`. An A/B pair has
    both `volumes`; `host_path` is then the first, and the agent writes whichever of them the
    node is not running from. `extension` is set for an extension image, which the agent plans
    itself from its type and name in that directory, as the CLI does for `sysext:NAME`.
    """

    kind: TargetKind
    host_path: str
    host_dir: str | None = None
    volumes: tuple[str, ...] = ()
    extension: ExtensionPlan | None = None

    @property
    def agent_kind(self) -> str:
        """What the agent writes: an existing `device`, a whole `disk` written from a COSI
        image, the inactive volume of an `abUpdate` pair, or an extension (`sysext`,
        `confext`)."""
        if self.kind in ("device", "disk", "abUpdate"):
            return self.kind
        return self.extension.type if self.extension is not None else "file"

    @property
    def agent_volumes(self) -> tuple[str, ...]:
        """The A/B volumes as the agent's container sees them (none for other kinds)."""
        return tuple(HOST_PREFIX + volume for volume in self.volumes)

    @property
    def held_paths(self) -> tuple[str, ...]:
        """Every host path this stream may write: both volumes of an A/B pair."""
        return self.volumes or (self.host_path,)

    @property
    def description(self) -> str:
        """The target in messages, before the agent has said what it wrote."""
        if self.volumes:
            return f"the A/B pair {', '.join(self.volumes)}"
        return self.host_path

    @property
    def known_path(self) -> str | None:
        """The host path `status.target` shows before the agent's result: none for an A/B
        pair, whose volume only the agent can choose."""
        return None if self.volumes else self.host_path

    @property
    def agent_path(self) -> str:
        """The target as the agent is told it: a device's path in its container, or an
        extension's name."""
        if self.extension is not None:
            return self.extension.name
        return HOST_PREFIX + self.host_path

    @property
    def refresh(self) -> bool:
        """Whether the agent refreshes the host's extensions after writing."""
        return self.extension is not None and self.extension.refresh

    @property
    def agent_dir(self) -> str | None:
        """The mounted host directory as the agent's container sees it."""
        return None if self.host_dir is None else HOST_PREFIX + self.host_dir


@dataclass(frozen=True)
class StreamOptions:
    """The optional knobs of `spec`, with the CRD's defaults."""

    stall_timeout_seconds: int = defaults.STALL_TIMEOUT_SECONDS
    max_retries: int = defaults.MAX_RETRIES
    active_deadline_seconds: int = defaults.ACTIVE_DEADLINE_SECONDS
    verify_after_write: bool = False
    force: bool = False


@dataclass(frozen=True)
class StreamSpec:
    """One generation of one ImageStream: its identity and what to write where."""

    name: str
    namespace: str
    uid: str
    generation: int
    node_name: str
    source: SourceSpec
    target: TargetSpec
    options: StreamOptions

    @property
    def target_keys(self) -> tuple[tuple[str, str], ...]:
        """(node, host path) of every device this stream may write: two active streams that
        share a key would write the same disk at once."""
        return tuple((self.node_name, path) for path in self.target.held_paths)

    def held_keys(self) -> tuple[tuple[str, str], ...]:
        """The keys this stream holds while it is active (see the module docstring)."""
        node = self.node_name
        held = (*self.target_keys, (node, ANY_TARGET))
        return (*held, (node, WHOLE_DISK)) if self.target.kind == "disk" else held

    def blocking_keys(self) -> tuple[tuple[str, str], ...]:
        """The keys whose holders this stream must wait for."""
        if self.target.kind == "disk":
            return ((self.node_name, ANY_TARGET),)
        return (*self.target_keys, (self.node_name, WHOLE_DISK))


def parse_stream(body: Mapping[str, Any]) -> StreamSpec:
    """Parse an ImageStream body; `UsageError` (reason InvalidSpec) when it is malformed."""
    metadata = _mapping(body.get("metadata"), "metadata")
    spec = _mapping(body.get("spec"), "spec")
    node_name = _string(spec, "nodeName", "spec")
    if not _NODE_NAME.fullmatch(node_name):
        raise _invalid(f"spec.nodeName {node_name!r} is not a node name")
    return StreamSpec(
        name=_string(metadata, "name", "metadata"),
        namespace=_string(metadata, "namespace", "metadata"),
        uid=_string(metadata, "uid", "metadata"),
        generation=generation_of(body),
        node_name=node_name,
        source=parse_source(_mapping(spec.get("source"), "spec.source")),
        target=resolve_target(_mapping(spec.get("target"), "spec.target")),
        options=parse_options(spec),
    )


def generation_of(body: Mapping[str, Any]) -> int:
    """`metadata.generation` of a body; 1 where the server has not set it (yet)."""
    return int((body.get("metadata") or {}).get("generation") or 1)


def held_keys_of(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The keys a body's stream holds (`StreamSpec.held_keys`); none when it does not parse."""
    try:
        return parse_stream(body).held_keys()
    except UsageError:
        return ()


def blocking_keys_of(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The keys whose holders a body's stream waits for; none when it does not parse."""
    try:
        return parse_stream(body).blocking_keys()
    except UsageError:
        return ()


def parse_source(source: Mapping[str, Any]) -> SourceSpec:
    """`spec.source`; the URL must have a supported scheme and the hash 96 hex digits."""
    url = _string(source, "url", "spec.source")
    if not url.startswith(_SCHEMES):
        raise _invalid("spec.source.url must start with http://, https:// or oci://")
    sha384 = _string(source, "sha384", "spec.source")
    if not defaults.SHA384.fullmatch(sha384.lower()):
        raise _invalid("spec.source.sha384 must be 96 hexadecimal digits")
    compression = str(source.get("compression") or "auto")
    if compression not in _COMPRESSIONS:
        raise _invalid(f"spec.source.compression must be one of {', '.join(_COMPRESSIONS)}")
    max_window_log = source.get("maxWindowLog", defaults.SPEC_MAX_WINDOW_LOG)
    if (
        isinstance(max_window_log, bool)
        or not isinstance(max_window_log, int)
        or not defaults.MIN_WINDOW_LOG <= max_window_log <= defaults.MAX_WINDOW_LOG
    ):
        raise _invalid(
            f"spec.source.maxWindowLog must be an integer from {defaults.MIN_WINDOW_LOG} "
            f"to {defaults.MAX_WINDOW_LOG}"
        )
    auth = _optional_mapping(source.get("authSecretRef"), "spec.source.authSecretRef")
    ca = _optional_mapping(source.get("caConfigMapRef"), "spec.source.caConfigMapRef")
    return SourceSpec(
        url=url,
        sha384=sha384.lower(),
        compression=compression,
        max_window_log=max_window_log,
        auth_secret=_string(auth, "name", "spec.source.authSecretRef") if auth else None,
        ca_config_map=_string(ca, "name", "spec.source.caConfigMapRef") if ca else None,
        ca_key=str(ca.get("key") or "ca.crt") if ca else "ca.crt",
        platform=_optional_string(source.get("platform")),
        layer=_optional_string(source.get("layer")),
    )


def resolve_target(target: Mapping[str, Any]) -> TargetSpec:
    """Exactly one target kind; device, extension and A/B targets resolve to host paths."""
    kinds = [kind for kind in ("device", "abUpdate", "extension", "disk") if target.get(kind)]
    if len(kinds) != 1:
        raise _invalid("spec.target must set exactly one of device, abUpdate, extension, disk")
    kind = kinds[0]
    if kind == "device":
        return TargetSpec(kind="device", host_path=_device_path(target["device"]))
    if kind == "disk":
        return TargetSpec(kind="disk", host_path=_device_path(target["disk"], "spec.target.disk"))
    if kind == "extension":
        return _extension_target(_mapping(target["extension"], "spec.target.extension"))
    return _ab_target(_mapping(target["abUpdate"], "spec.target.abUpdate"))


def parse_options(spec: Mapping[str, Any]) -> StreamOptions:
    """The knobs at the top level of `spec`; absent ones take the CRD's defaults."""
    defaults = StreamOptions()
    return StreamOptions(
        stall_timeout_seconds=_int(spec, "stallTimeoutSeconds", defaults.stall_timeout_seconds),
        max_retries=_int(spec, "maxRetries", defaults.max_retries),
        active_deadline_seconds=_int(
            spec, "activeDeadlineSeconds", defaults.active_deadline_seconds
        ),
        verify_after_write=bool(spec.get("verifyAfterWrite", defaults.verify_after_write)),
        force=bool(spec.get("force", defaults.force)),
    )


def _device_path(value: object, where: str = "spec.target.device") -> str:
    path = str(value)
    # The agent opens HOST_PREFIX + path: a `..` segment would leave the host's /dev mount.
    if not path.startswith("/dev/") or posixpath.normpath(path) != path:
        raise _invalid(f"{where} {path!r} must be a normalized path under /dev/")
    return path


def _ab_target(ab_update: Mapping[str, Any]) -> TargetSpec:
    volumes = ab_update.get("volumes")
    where = "spec.target.abUpdate.volumes"
    if not isinstance(volumes, list) or len(volumes) != 2:
        raise _invalid(f"{where} must list two devices")
    paths = tuple(_device_path(volume, f"{where}[{index}]") for index, volume in enumerate(volumes))
    if paths[0] == paths[1]:
        raise _invalid(f"{where} names {paths[0]} twice")
    return TargetSpec(kind="abUpdate", host_path=paths[0], volumes=paths)


def _extension_target(extension: Mapping[str, Any]) -> TargetSpec:
    """The same rules and paths as the CLI's `sysext:NAME` (`imagestream.targets.extension`)."""
    where = "spec.target.extension"
    name = _string(extension, "name", where)
    refresh = extension.get("refresh", False)
    if not isinstance(refresh, bool):
        raise _invalid(f"{where}.refresh must be true or false")
    try:
        kind = extensions.extension_type(_string(extension, "type", where), f"{where}.type")
        extensions.validate_name(name, f"{where}.name")
    except UsageError as exc:
        raise _invalid(exc.message) from None
    return TargetSpec(
        kind="extension",
        host_path=extensions.host_file(kind, name),
        host_dir=extensions.host_directory(kind),
        extension=ExtensionPlan(type=kind, name=name, refresh=refresh),
    )


def _invalid(message: str) -> UsageError:
    return UsageError(message, reason=Reason.INVALID_SPEC)


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _invalid(f"{where} is missing or not an object")
    return value


def _optional_mapping(value: object, where: str) -> Mapping[str, Any] | None:
    return None if value is None else _mapping(value, where)


def _string(mapping: Mapping[str, Any], key: str, where: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value:
        raise _invalid(f"{where}.{key} is required")
    return value


def _optional_string(value: object) -> str | None:
    return str(value) if value else None


def _int(mapping: Mapping[str, Any], key: str, default: int) -> int:
    value = mapping.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(f"spec.{key} must be a non-negative integer")
    return value
