"""One home for each default and each pattern the product checks input against.

The CLI, the agent's contract, the controller's spec parsing and the pipeline all read these;
the CRD (`crds/`) repeats the defaults in its schema, and a test holds the two equal.
"""

from __future__ import annotations

import re

#: Seconds without a byte before a read counts as stalled and is resumed.
STALL_TIMEOUT_SECONDS = 30
#: Attempts in a row without progress before a stream gives up.
MAX_RETRIES = 8
#: First backoff delay in seconds; it doubles per failed attempt, with jitter.
RETRY_BACKOFF_SECONDS = 0.5
#: The longest a single backoff (or an honoured Retry-After) may be, in seconds.
RETRY_BACKOFF_MAX_SECONDS = 30.0
#: Retries of a connection that cannot succeed soon (refused on loopback, a name that does not
#: resolve), at most this far apart: a typo fails in about a second, not after minutes.
QUICK_FAIL_RETRIES = 2
QUICK_FAIL_BACKOFF_SECONDS = 0.25
#: The largest zstd window the CLI accepts, as a power of two (`zstd --long=31`).
CLI_MAX_WINDOW_LOG = 31
#: The largest zstd window an ImageStream accepts by default (zstd's own default limit).
SPEC_MAX_WINDOW_LOG = 27
#: The range of window logs zstd defines.
MIN_WINDOW_LOG = 10
MAX_WINDOW_LOG = 31
#: How long an agent may run before its Job is stopped.
ACTIVE_DEADLINE_SECONDS = 7200

#: SHA-384 as 96 lower-case hex digits (input is lower-cased first).
SHA384 = re.compile(r"[0-9a-f]{96}", re.ASCII)
#: An OCI content digest this product verifies.
DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", re.ASCII)

#: A systemd extension's name (the image is NAME.raw): a subset of what systemd accepts for an
#: image name (a plain file name, no control characters), kept to characters that need no
#: quoting anywhere; the CRD's schema has the same pattern and bound.
EXTENSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
EXTENSION_NAME_MAX = 128
#: How long `systemd-sysext refresh` / `systemd-confext refresh` may take before it counts as
#: failed (it merges overlays: seconds, not minutes).
EXTENSION_REFRESH_TIMEOUT_SECONDS = 120
#: Where `imagestream serve` listens, and where `imagestream stream-disk` connects, by default.
SERVICE_LISTEN = "unix:///run/imagestream/imagestream.sock"
#: What `imagestream serve` runs after a success when it handles the reboot.
REBOOT_COMMAND = "systemctl reboot"
