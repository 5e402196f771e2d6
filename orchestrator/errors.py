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
