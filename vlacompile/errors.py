"""Errors a user can act on: the runtime's (``vlacompile_runtime.errors``, their one owner), and the
compiler's own (output paths, training).

Every failure caused by the user's input (a file, a recipe, a target, a budget) is a
``VlaCompileError``: it names the input and ends with a hint saying what to do. The CLI turns it
into a message and a distinct exit code, never a traceback.
"""
from __future__ import annotations

from vlacompile_runtime.errors import (  # noqa: F401  (re-exported: the compiler's code and tests import them from here)
    EXIT_GATE_FAILED,
    EXIT_INPUT_ERROR,
    EXIT_OK,
    EXIT_UNVERIFIED,
    ArtifactError,
    CheckpointError,
    ConfigError,
    EpisodeError,
    MissingDependencyError,
    ObservationError,
    VlaCompileError,
)


class OutputError(VlaCompileError):
    """An output path that cannot or must not be written (read-only, a file in the way, an input)."""

    default_hint = "pass an output path of its own: a new directory (or file) outside every input"


class TrainingError(VlaCompileError):
    """Distillation or recovery training that cannot go on (a non-finite loss or teacher target)."""

    default_hint = "lower distill.lr in the recipe, or check the teacher and episodes for non-finite values"
