"""Strip credentials from URLs before they reach a log line, a message or a status field."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Drop userinfo, query and fragment: tokens hide in all three."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    # Everything after the last "@" is host[:port]; parts.port would raise on a bad port.
    netloc = parts.netloc.rpartition("@")[2].lower()
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
