"""Exception types. Leaf module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration file, located to line and column (both 1-based)."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class NikaError(Exception):
    """Base class of this package's errors."""


class ConfigError(NikaError):
    """The configuration is invalid. Carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class SpawnError(NikaError):
    """vLLM could not be started at all (bad interpreter path, exec failure)."""
