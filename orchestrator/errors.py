"""Errors of the orchestration layer (user-facing ones derive from workers' BnnctlError)."""
from __future__ import annotations

from bnnctl.workers.errors import BnnctlError


class SpecError(BnnctlError):
    """A study spec is invalid. The message names the file, the YAML path and line, and what is allowed."""

    def __init__(self, file: str, path: str, message: str, line: int | None = None) -> None:
        self.file, self.path, self.line = file, path, line
        where = f"{file}" + (f", line {line}" if line else "") + (f", {path}" if path else "")
        super().__init__(f"{where}: {message}")


class StoreError(BnnctlError):
    """The state database cannot be used (unreachable, locked past the timeout, newer schema)."""


class LeaseHeld(StoreError):
    """Another driver runs this study or tuning now; the message names it (host, pid, since when)."""

    def __init__(self, lease, timeout_s: float) -> None:
        self.lease = lease
        age = (_now() - _aware(lease.heartbeat_at)).total_seconds()
        super().__init__(
            f"{lease.name!r} is being run by another driver: {lease.holder}, since "
            f"{_aware(lease.acquired_at):%Y-%m-%d %H:%M:%S} UTC (last heartbeat {age:.0f} s ago). Nothing was "
            f"changed. Wait for it, stop it (`bnnctl study cancel {lease.name}`), or, if that driver is gone, "
            f"run again after {timeout_s:.0f} s without heartbeat or with --takeover")


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _aware(t):
    from datetime import UTC

    return t if t.tzinfo else t.replace(tzinfo=UTC)  # sqlite hands datetimes back naive (they are UTC)
