"""Compression stages. One module per stage, each with a ``Params`` dataclass and

    run(artifact: Artifact, params: Params, ctx: BuildContext) -> Artifact

registered here by name. A stage consumes and produces either a torch policy ("torch") or an
exported ONNX graph ("onnx"); a recipe is a chain of stages whose kinds line up, checked against
the target before any work starts (``vlacompile.recipes``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from vlacompile.policy import Policy

Kind = Literal["torch", "onnx"]


@dataclass
class Artifact:
    """What flows between stages: the (student) torch policy and, once exported, its ONNX graphs."""

    policy: Policy
    onnx_path: Path | None = None  # the single graph (the one verify runs)
    precision: str = "fp32"  # the lowest precision applied so far
    quantized_torch: bool = False  # the torch module carries modelopt fake-quant (exports with dynamo=False)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per stage: name, params, metrics, seconds
    # Files exported beside the single graph that belong to the artifact (the split graphs and
    # split.json): stored and restored with it, so a cached build comes back whole.
    extra_files: tuple[Path, ...] = ()

    @property
    def kind(self) -> Kind:
        return "onnx" if self.onnx_path is not None else "torch"

    @property
    def files(self) -> list[Path]:
        """Every exported file: the single graph (+ external data) and the extra files."""
        from vlacompile.artifact import onnx_files

        return [*(onnx_files(self.onnx_path) if self.onnx_path is not None else []), *self.extra_files]


@dataclass
class BuildContext:
    target: Any  # TargetProfile
    workdir: Path  # the build's temporary directory; stage outputs go under it
    teacher: Policy
    train: Any = None  # EpisodeSet used for distillation / recovery
    calibration: Any = None  # EpisodeSet used for pruning importance and quantisation calibration
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = print
    cache: Any = None  # the StageCache, for results a stage may reuse across builds (the teacher's targets)


@dataclass(frozen=True)
class StageDef:
    name: str
    module: str  # vlacompile.stages.<module>, imported lazily
    reads_target: bool  # whether its output depends on the target profile (then the target is in its cache key)

    def load(self):
        return importlib.import_module(f"vlacompile.stages.{self.module}")


STAGES: dict[str, StageDef] = {
    "distill": StageDef("distill", "distill", reads_target=False),
    "prune": StageDef("prune", "prune", reads_target=False),
    "quantize": StageDef("quantize", "quantize", reads_target=True),  # the method and symmetry follow the runtime
    "export": StageDef("export", "export", reads_target=False),
}
