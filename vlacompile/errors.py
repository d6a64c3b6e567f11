"""Errors a user can act on.

Every failure caused by the user's input (a file, a recipe, a target, a budget) is a
``VlaCompileError``: it names the input and ends with a hint saying what to do. The CLI turns it
into a message and a distinct exit code, never a traceback.
"""
from __future__ import annotations

from pathlib import Path

# Exit codes of `vlacompile` (documented in the README).
EXIT_OK = 0
EXIT_GATE_FAILED = 1  # built, but a measured budget or accuracy gate failed
EXIT_INPUT_ERROR = 2  # bad input: checkpoint, episodes, recipe, target, output path
EXIT_UNVERIFIED = 3  # built, accuracy gates passed, latency only estimated (target is not the host)


class VlaCompileError(Exception):
    """A problem with the user's input. ``source`` names the file or setting; ``hint`` says what to do."""

    exit_code = EXIT_INPUT_ERROR

    def __init__(self, message: str, *, source: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.source = str(source) if source is not None else None
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        text = f"{self.source}: {self.message}" if self.source else self.message
        if self.hint:
            text += f"\nHint: {self.hint}"
        return text


class CheckpointError(VlaCompileError):
    """A checkpoint directory that is missing, truncated, mismatched or unsafe to load."""


class EpisodeError(VlaCompileError):
    """Episodes that are missing columns, hold NaNs, or do not match the policy."""


class ConfigError(VlaCompileError):
    """A target profile or recipe that is malformed or illegal for the target."""


class OutputError(VlaCompileError):
    """An output directory that cannot be written."""


class TrainingError(VlaCompileError):
    """Distillation or recovery training that cannot go on (a non-finite loss or teacher target)."""


class MissingDependencyError(VlaCompileError):
    """An optional backend (TensorRT, a simulator) that is not installed."""
