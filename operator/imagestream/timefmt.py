"""Timestamps as Kubernetes writes them, for the agent's progress and the controller's status."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(epoch: float) -> str:
    """`2026-11-26T14:00:00Z`: whole seconds in UTC, as Kubernetes timestamps are written."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
