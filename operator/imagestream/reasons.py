"""Every `reason` the product reports, in one vocabulary with one meaning each.

The same word appears in the CLI's JSON result, the agent's termination message, an
ImageStream's `status.reason` and conditions, its Events and the outcome metric's labels, so a
script or a dashboard can branch on it. The README's troubleshooting table lists each one (a
test checks that). Being a `StrEnum`, a member is its own string everywhere it is serialised.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Machine-readable causes of an outcome or a wait."""

    # -- success and progress (the controller's phases) --
    SUCCEEDED = "Succeeded"
    UNVERIFIED = "Unverified"
    JOB_CREATED = "JobCreated"
    AGENT_STARTING = "AgentStarting"
    STREAMING = "Streaming"
    VERIFYING = "Verifying"
    CANCELLING = "Cancelling"
    CANCELLING_PREVIOUS = "CancellingPrevious"
    TARGET_BUSY = "TargetBusy"

    # -- the request --
    INVALID_REQUEST = "InvalidRequest"
    INVALID_SPEC = "InvalidSpec"
    TARGET_KIND_UNSUPPORTED = "TargetKindUnsupported"
    HASH_REQUIRED = "HashRequired"
    SERVICING_IN_PROGRESS = "ServicingInProgress"
    NO_API_CONFIG = "NoApiConfig"

    # -- the source --
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    HTTP_ERROR = "HTTPError"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    BAD_RANGE_RESPONSE = "BadRangeResponse"
    BAD_REDIRECT = "BadRedirect"
    SOURCE_CHANGED = "SourceChanged"
    TLS_VERIFICATION_FAILED = "TLSVerificationFailed"
    UNAUTHORIZED = "Unauthorized"
    NAME_UNKNOWN = "NameUnknown"
    MANIFEST_UNKNOWN = "ManifestUnknown"
    BLOB_UNKNOWN = "BlobUnknown"
    NOT_A_MANIFEST = "NotAManifest"
    INVALID_MANIFEST = "InvalidManifest"
    PLATFORM_NOT_FOUND = "PlatformNotFound"
    AMBIGUOUS_LAYER = "AmbiguousLayer"
    LAYER_NOT_FOUND = "LayerNotFound"

    # -- integrity --
    INTEGRITY_CHECK_FAILED = "IntegrityCheckFailed"
    HASH_MISMATCH = "HashMismatch"
    DIGEST_MISMATCH = "DigestMismatch"
    SIZE_MISMATCH = "SizeMismatch"
    TRUNCATED_STREAM = "TruncatedStream"
    CORRUPT_STREAM = "CorruptStream"
    WINDOW_TOO_LARGE = "WindowTooLarge"
    READ_BACK_MISMATCH = "ReadBackMismatch"
    COSI_INVALID = "CosiInvalid"
    COSI_UNSUPPORTED = "CosiUnsupported"
    RESULT_UNVERIFIED = "ResultUnverified"

    # -- the target --
    TARGET_UNSAFE = "TargetUnsafe"
    TARGET_NOT_FOUND = "TargetNotFound"
    TARGET_INVALID = "TargetInvalid"
    TARGET_NOT_ALLOWED = "TargetNotAllowed"
    TARGET_MOUNTED = "TargetMounted"
    TARGET_IN_USE = "TargetInUse"
    TARGET_LOCKED = "TargetLocked"
    TARGET_CHECK_FAILED = "TargetCheckFailed"
    TARGET_TOO_SMALL = "TargetTooSmall"
    SECTOR_SIZE_MISMATCH = "SectorSizeMismatch"
    ACTIVE_VOLUME_UNKNOWN = "ActiveVolumeUnknown"
    NO_DISK_FITS = "NoDiskFits"
    WRITE_FAILED = "WriteFailed"
    EXTENSION_REFRESH_FAILED = "ExtensionRefreshFailed"

    # -- the agent and its Job --
    AGENT_FAILED = "AgentFailed"
    AGENT_CRASHED = "AgentCrashed"
    AGENT_OOM_KILLED = "AgentOOMKilled"
    AGENT_LOST = "AgentLost"
    AGENT_ERROR = "AgentError"
    JOB_REJECTED = "JobRejected"
    AGENT_POD_REJECTED = "AgentPodRejected"
    DEADLINE_EXCEEDED = "DeadlineExceeded"

    # -- stopping --
    CANCELLED = "Cancelled"
    INTERNAL_ERROR = "InternalError"
