"""The user-facing error hierarchy shared by every layer of bnnctl.

Everything a user can cause (a bad config value, an unknown name, a missing file) raises a subclass
of :class:`BnnctlError`; the CLI prints its message as one paragraph and exits with code 1. Internal
invariants use ``assert``.
"""
from __future__ import annotations


class BnnctlError(Exception):
    """Base class of every error whose message is meant for the user."""


class ConfigError(BnnctlError, ValueError):
    """A configuration value is invalid. ``path`` names the field (dotted, e.g. ``model.block``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class UnknownNameError(ConfigError, KeyError):
    """A name (activation, block, model, ...) is not registered; the message lists the valid ones."""

    def __init__(self, kind: str, name: object, valid: list[str], path: str = "") -> None:
        self.kind = kind
        self.name = name
        self.valid = list(valid)
        super().__init__(path, f"unknown {kind} {name!r}; valid names: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return ConfigError.__str__(self)


class DataError(BnnctlError):
    """A dataset is missing or malformed; the message names the file (and record) and the expected layout."""


class TrainingError(BnnctlError):
    """A run cannot continue (non-finite loss, a missing checkpoint); ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
