"""The family seam: everything architecture-specific, behind one protocol the stages call.

A family (``vlacompile/families/<name>/``: configuration, modeling, processor, family) says how
its checkpoints load and save, what its module reads (``PolicySpec``) and how observations become
those inputs (``Preprocessor``), how it splits into System 2 and System 1 (``SplitPlan``), what
structured pruning may remove (``PruneGroup``), how a smaller student of it is shaped and
initialised from the teacher's layers, where distillation may tap features, which layers stay in
higher precision by default, and what one call costs (FLOPs). Stages, training, export, runners
and verify use only these hooks; none of them names a family's attributes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from vlacompile_runtime.processors import Preprocessor, camera_feeds  # noqa: F401  (re-exported)

from vlacompile.errors import ConfigError
from vlacompile.policy import Policy, PolicySpec

if TYPE_CHECKING:
    import torch
    from torch import nn


# ---------------------------------------------------------------------------------------------
# Observations -> model inputs


# ``Preprocessor`` and ``camera_feeds`` are the runtime's (``vlacompile_runtime.processors``), re-exported
# here: a family's ``preprocessor`` returns one of the runtime's classes, which the runtime picks by
# ``spec.family`` without importing the family.


# ---------------------------------------------------------------------------------------------
# Structured pruning


@dataclass(frozen=True)
class Probe:
    """Where one unit's importance is read (forward hooks, on calibration episodes).

    ``stat``: "abs" mean |activation| per channel of the hooked tensor; "head_norm" mean L2 norm
    of each head's slice (``heads`` x ``head_dim`` on the last axis); "influence" 1 - cos(block
    input, block output) averaged over tokens (the block's importance as a whole)."""

    member: str  # "mlp", "attn", "cross" or "block"
    module: str  # qualified module name
    hook: str  # "output" (forward hook) or "input" (first positional input, pre-hook)
    stat: str  # "abs", "head_norm" or "influence"
    heads: int = 0
    head_dim: int = 0


@dataclass(frozen=True)
class PruneGroup:
    """Units removed together: MLP channels or attention heads of one layer, or the blocks of a part.

    The members of a "heads" group (self- and cross-attention of one block) are cut to the same
    count, each ranked by its own probe."""

    kind: str  # "mlp", "heads" or "layer"
    part: str
    layer: int  # the layer's index in the measured model; -1 for kind "layer"
    units: int
    probes: tuple[Probe, ...]


# ---------------------------------------------------------------------------------------------
# Distillation


@dataclass(frozen=True)
class FeatureTap:
    """A module whose output carries features the student can be trained to match (prefix features)."""

    module: str
    extract: Callable[[Any], tuple["torch.Tensor", "torch.Tensor"]]  # hook output -> (features [B, n, w], valid [B, n])
    tokens: int
    width: int


# ---------------------------------------------------------------------------------------------
# System 2 / System 1


@dataclass
class SplitPlan:
    """What the split export writes and one generic runner executes (``vlacompile.backends.split``).

    ``derived``: transforms the runner applies to the policy's inputs first, each
    ``{"input", "output", "ops"}`` with elementwise ``ops`` ({"op": "sub" | "add" | "mul" | "div",
    "value": float or list}); ``integrator``: ``{"kind": "euler", "init", "x", "t", "velocity",
    "times": [t_k], "update": {"op": "mul" | "div", "value"}}`` (x += v * value, or v / value);
    ``post``: ops on the integrated x ({"op": "slice", "stop"} and the elementwise ones) giving
    physical actions. All in float32, in the order torch computes them."""

    system2: "nn.Module"
    system2_inputs: tuple[str, ...]
    system2_outputs: tuple[str, ...]
    system1: "nn.Module"
    system1_inputs: tuple[str, ...]
    integrator: dict[str, Any]
    derived: list[dict[str, Any]] = field(default_factory=list)
    post: list[dict[str, Any]] = field(default_factory=list)
    system1_outputs: tuple[str, ...] = ("velocity",)


def apply_ops(x, ops: list[dict[str, Any]]):
    """A split plan's elementwise ops on a torch tensor or numpy array, in float32, in order."""
    import torch

    for op in ops:
        if op["op"] == "slice":
            x = x[..., : op["stop"]]
            continue
        v = op["value"]
        v = torch.tensor(v, dtype=torch.float32, device=x.device) if isinstance(x, torch.Tensor) else np.asarray(v, dtype=np.float32)
        x = {"add": lambda a: a + v, "sub": lambda a: a - v, "mul": lambda a: a * v, "div": lambda a: a / v}[op["op"]](x)
    return x


def invert_ops(x: "torch.Tensor", ops: list[dict[str, Any]], width: int) -> "torch.Tensor":
    """The inverse of ``apply_ops(., ops)``: physical actions -> the integrator's x space, a slice
    undone by zero padding to ``width`` (the padded dimensions a flow head is trained on as 0)."""
    import torch
    import torch.nn.functional as F

    inverse = {"add": "sub", "sub": "add", "mul": "div", "div": "mul"}
    for op in reversed(ops):
        if op["op"] == "slice":
            x = F.pad(x, (0, width - x.shape[-1]))
            continue
        v = torch.tensor(op["value"], dtype=torch.float32, device=x.device)
        x = {"add": lambda a: a + v, "sub": lambda a: a - v, "mul": lambda a: a * v, "div": lambda a: a / v}[inverse[op["op"]]](x)
    return x


# ---------------------------------------------------------------------------------------------
# The protocol


class Family(ABC):
    """One policy architecture. Subclasses live in ``vlacompile/families/<name>/family.py``."""

    name: str  # the ``model_type`` / registry name
    label: str  # what users call it ("LeRobot SmolVLA")
    parts: tuple[str, ...]  # layer groups a recipe's student shape may name
    config_cls: type

    # -- checkpoints ------------------------------------------------------------------------

    @abstractmethod
    def matches(self, config_json: dict[str, Any]) -> bool:
        """Whether ``config.json`` is one of this family's checkpoints."""

    @abstractmethod
    def load(self, ckpt: Path, *, allow_pickle: bool = False, tokenizer: Path | None = None,
             allow_unnormalized: bool = False) -> Policy:
        """A checkpoint directory -> a Policy in eval mode (FP32 compute)."""

    @abstractmethod
    def save(self, policy: Policy, out: Path) -> Path:
        """Write a directory ``load`` reads back to the same policy."""

    @abstractmethod
    def build(self, config) -> "nn.Module":
        """A freshly initialised module for ``config``."""

    @abstractmethod
    def spec_of(self, module: "nn.Module") -> PolicySpec:
        """What ``module`` reads and writes."""

    @abstractmethod
    def preprocessor(self, spec: PolicySpec) -> Preprocessor:
        """Observations -> this family's inputs for ``spec``."""

    def new_policy(self, config) -> Policy:
        module = self.build(config)
        module.eval()
        return Policy(module=module, config=config, spec=self.spec_of(module), family=self.name)

    def format_info(self, policy: Policy) -> dict[str, Any]:
        """What the report says about the checkpoint's family and format."""
        return {"family": self.name, "label": self.label, "format": policy.meta.get("format", "vlacompile")}

    # -- students ---------------------------------------------------------------------------

    @abstractmethod
    def depths(self, config) -> dict[str, int]:
        """Layers per part."""

    @abstractmethod
    def mlp_widths(self, config) -> dict[str, list[int]]:
        """MLP channels per layer, per part."""

    def resolve_layers(self, config, request: dict[str, Any], source: str) -> dict[str, list[int]]:
        """A recipe's layer request per part (a fraction of the teacher's layers, or indices) ->
        the teacher layers the student keeps. The default keeps evenly spaced layers, first and
        last included; families with layer constraints override it."""
        depths = self.depths(config)
        unknown = sorted(set(request) - set(depths))
        if unknown:
            raise ConfigError(
                f"distill.layers names parts {unknown}; the {self.label} family has {sorted(depths)}",
                source=source, hint=f"name the parts {', '.join(sorted(depths))}",
            )
        return {part: layers_from_request(request.get(part), depth, f"distill.layers.{part}", source)
                for part, depth in depths.items()}

    @abstractmethod
    def student_config(self, config, layers: dict[str, list[int]], mlp: dict[str, list[int]], flow_steps: int | None):
        """The config of a student keeping ``layers`` (teacher indices per part) with ``mlp``
        channels per kept layer and ``flow_steps`` (None keeps the teacher's)."""

    def new_student(self, teacher: Policy, shape: dict[str, Any], stats: dict[str, dict[str, np.ndarray]], source: str) -> Policy:
        """A freshly initialised policy of THIS family that reads ``teacher``'s cameras and state and
        emits its actions (the recipe's ``distill.student``, for a teacher of any family, its own
        included): ``shape`` is ``distill.student`` less ``family``, ``stats`` the training
        episodes' statistics (physical units)."""
        self.check_student_shape(shape, teacher.spec, source)
        raise AssertionError("a family that passes check_student_shape implements new_student")

    def check_student_shape(self, shape: dict[str, Any], teacher_spec: PolicySpec | None, source: str) -> None:
        """Check ``distill.student`` (less ``family``) before any work, naming the key: with
        ``teacher_spec`` None (the recipe alone) its values, else also against the teacher. A family
        that cannot build a freshly initialised student refuses here."""
        raise ConfigError(f"distill.student.family is {self.name!r}: the {self.label} family cannot be built as a freshly "
                          "initialised student", source=source,
                          hint="use family = \"vlacompile-reference\", or leave distill.student out to slice the student from "
                               "the teacher's own layers (distill.layers, mlp_ratio, flow_steps)")

    def describe(self, config) -> str:
        """A short shape description for logs ("3+3+2 layers, 2 flow steps")."""
        d = self.depths(config)
        return "+".join(str(d[p]) for p in self.parts) + " layers"

    # -- pruning ----------------------------------------------------------------------------

    @abstractmethod
    def prune_groups(self, policy: Policy, parts: tuple[str, ...], what: tuple[str, ...]) -> list[PruneGroup]:
        """Groups of ``what`` ("mlp", "heads", "layers") in ``parts``."""

    @abstractmethod
    def pruned_config(self, config, layers: dict[str, list[int]], heads: dict[str, list[int]], mlp: dict[str, list[int]]):
        """The config after keeping ``layers`` and ``heads`` / ``mlp`` units per kept layer (parts not named keep theirs)."""

    @abstractmethod
    def restructure(self, source: Policy, config, layers: dict[str, list[int]] | None = None,
                    keep: dict[tuple[str, int], dict[str, "torch.Tensor"]] | None = None) -> Policy:
        """A new policy with ``config`` whose weights are sliced from ``source``: ``layers[part]``
        lists the source layers kept; ``keep[(part, new layer)]`` maps a member ("attn", "cross",
        "mlp") to the kept unit indices. Everything kept is copied from the source."""

    # -- training, quantisation, cost -------------------------------------------------------

    def feature_tap(self, module: "nn.Module") -> FeatureTap | None:
        return None

    @abstractmethod
    def action_scale(self, policy: Policy) -> "torch.Tensor":
        """Per-dimension scale of the actions in physical units (distillation's loss weights)."""

    def state_scale(self, policy: Policy) -> np.ndarray | None:
        """Per-dimension scale of the state (for state-jitter copies); None: the episodes' std."""
        return None

    @abstractmethod
    def default_quant_excludes(self, config) -> tuple[str, ...]:
        """Modules kept in higher precision unless a recipe says otherwise."""

    @abstractmethod
    def flops(self, config) -> dict[str, float]:
        """{"system2", "system1_per_step", "system1"}: FLOPs of one get_action call per part."""

    @abstractmethod
    def split_plan(self, policy: Policy) -> SplitPlan:
        """System 2 (once per chunk) and one System 1 step, and the glue between them."""


def layers_from_request(value: Any, depth: int, where: str, source: str) -> list[int]:
    """None: all; a fraction in (0, 1]: round(fraction x depth) layers (at least one), evenly spaced with
    the first and last kept; a list: those indices, checked against the depth."""
    if value is None:
        return list(range(depth))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value <= 1:
            raise ConfigError(f"{where} is {value}; a fraction of the teacher's layers must be in (0, 1]", source=source,
                              hint="e.g. 0.5 keeps half the layers, or list the indices to keep")
        return evenly_spaced(depth, max(1, round(value * depth)))
    idx = [int(i) for i in value]
    bad = [i for i in idx if not 0 <= i < depth]
    if bad:
        part = where.rsplit(".", 1)[-1]
        raise ConfigError(f"{where}={idx} names layer {bad[0]}, but the teacher has {depth} {part} layers (indices 0..{depth - 1})",
                          source=source, hint=f"pick {part} layers from 0 to {depth - 1}, or give a fraction")
    if not idx or any(b <= a for a, b in zip(idx, idx[1:])):
        raise ConfigError(f"{where}={idx}: list at least one teacher layer index, in increasing order", source=source)
    return idx


def evenly_spaced(depth: int, k: int) -> list[int]:
    """``k`` of ``depth`` layers, evenly spaced, first and last included (round half to even)."""
    k = min(max(1, k), depth)
    if k == 1:
        return [0]
    return sorted({int(round(x)) for x in np.linspace(0, depth - 1, k)})


def part_module(module: "nn.Module", method: str) -> "nn.Module":
    """A module of ``module``'s class, sharing its children and plain (non-tensor) attributes, whose
    forward is ``module.<method>``: exported node names stay ``/vision/...``, ``/expert/...`` as in
    the single graph (quantiser excludes and reports name nodes the same way). The method may call
    the class's other methods and use its children; tensors it needs live in children."""
    import torch

    cls = type(module)

    class Part(cls):
        def forward(self, *args):
            return getattr(cls, method)(self, *args)

    part = Part.__new__(Part)
    torch.nn.Module.__init__(part)
    for name, child in module.named_children():
        part.add_module(name, child)
    for name, value in vars(module).items():
        if not name.startswith("_") and name != "training" and not isinstance(value, (torch.nn.Module, torch.Tensor)):
            setattr(part, name, value)
    return part.eval()
