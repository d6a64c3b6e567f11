"""Errors a user can act on, shared by the runtime and the compiler (which re-exports them from
``vlacompile.errors`` and adds its own).

Every failure caused by the user's input (a file, an observation, a recipe, a target) is a
``VlaCompileError``: it names the input and ends with a hint saying what to do. The compiler's CLI
turns it into a message and a distinct exit code, never a traceback.
"""
from __future__ import annotations

from pathlib import Path

# Exit codes of `vlacompile` (documented in the README).
EXIT_OK = 0
EXIT_GATE_FAILED = 1  # built, but a measured budget or accuracy gate failed
EXIT_INPUT_ERROR = 2  # bad input: checkpoint, episodes, recipe, target, output path
EXIT_UNVERIFIED = 3  # built, accuracy gates passed, latency only estimated (target is not the host)


class VlaCompileError(Exception):
    """A problem with the user's input. ``source`` names the file or setting; ``hint`` says what to do.

    Every message ends with a hint: a raise without one gets its class's ``default_hint``, so no
    error reaches the user without a next step (the site's own hint is always the better one)."""

    exit_code = EXIT_INPUT_ERROR
    default_hint = "correct the input named above and run the command again"

    def __init__(self, message: str, *, source: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.source = str(source) if source is not None else None
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        text = f"{self.source}: {self.message}" if self.source else self.message
        return text + f"\nHint: {self.hint or self.default_hint}"


class CheckpointError(VlaCompileError):
    """A checkpoint directory that is missing, truncated, mismatched or unsafe to load."""

    default_hint = ("pass --checkpoint with the whole directory its framework saved (config.json, the weights and, for "
                    "LeRobot policies, the processor files), unmodified")


class EpisodeError(VlaCompileError):
    """Episodes that are missing columns, hold NaNs, or do not match the policy."""

    default_hint = "pass --episodes with a LeRobotDataset v3 directory recorded for this policy, unmodified"


class ConfigError(VlaCompileError):
    """A target profile or recipe that is malformed or illegal for the target."""

    default_hint = ("correct that key in the file named above; the shipped recipes/*.toml and targets/*.toml show every "
                    "key with a legal value (`vlacompile targets` lists the profiles)")


class ArtifactError(VlaCompileError):
    """A built artifact (its graphs, student_spec.json, manifest.json, report.json, target.json) that is
    missing, incomplete, damaged or of another format, given to the runtime, verify, engine, report or
    --baseline."""

    default_hint = "pass a directory written whole by `vlacompile build` (rebuild it if its files were edited or truncated)"


class MissingDependencyError(VlaCompileError):
    """An optional backend (TensorRT, a simulator) that is not installed."""

    default_hint = "install the extra that provides it (see the README's quick start)"


class ObservationError(ConfigError):
    """An observation (or noise) handed to a policy that it cannot run on: a missing camera or key, a
    frame of another size or dtype, a state of another length or with NaNs. ``source`` is the key."""

    default_hint = ("pass the observation as the robot hands it, in LeRobot's keys: observation.images.<camera> uint8 "
                    "[H, W, 3] at the policy's resolution, observation.state float [state_dim] in physical units, task str "
                    "(policy.spec lists the cameras, sizes and names)")
