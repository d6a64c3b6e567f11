"""The one data type that flows through every stage: a policy module and its spec.

Every family's module has the canonical signature

    forward(images uint8 [B, n_cams, 3, H, W], state f32 [B, S], tokens i64 [B, L], noise f32 [B, chunk, A])
        -> actions f32 [B, chunk, A]   (physical units)

with pre-processing (image scaling, state normalisation) and post-processing (action
un-normalisation) inside the graph, so an exported model is the whole policy. ``noise`` is the
initial sample of the flow-matching integration: passing it in makes teacher and student
comparable call by call and keeps exported graphs free of random ops.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only where a module runs, so specs and runners stay light
    import torch


@dataclass(frozen=True)
class CameraSpec:
    name: str
    height: int
    width: int


@dataclass(frozen=True)
class PolicySpec:
    family: str
    cameras: tuple[CameraSpec, ...]
    state_dim: int
    action_dim: int
    chunk_size: int  # H: actions emitted per inference
    flow_steps: int  # K: integration steps of the action expert per chunk
    max_tokens: int  # instruction length (padded)
    control_hz: float  # the rate the demonstrations were recorded at
    action_mean: tuple[float, ...]
    action_std: tuple[float, ...]
    # Which submodules are the slow "System 2" (once per chunk) and the fast "System 1" (K times).
    system2: tuple[str, ...] = ("vision", "backbone")
    system1: tuple[str, ...] = ("expert",)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def input_shapes(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        cam = self.cameras[0]
        return {
            "images": (batch, len(self.cameras), 3, cam.height, cam.width),
            "state": (batch, self.state_dim),
            "tokens": (batch, self.max_tokens),
            "noise": (batch, self.chunk_size, self.action_dim),
        }

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, "torch.Tensor"]:
        import torch

        g = torch.Generator().manual_seed(seed)
        shapes = self.input_shapes(batch)
        return {
            "images": torch.randint(0, 256, shapes["images"], generator=g, dtype=torch.uint8),
            "state": torch.randn(shapes["state"], generator=g),
            "tokens": torch.randint(3, 200, shapes["tokens"], generator=g, dtype=torch.int64),
            "noise": torch.randn(shapes["noise"], generator=g),
        }


INPUT_NAMES = ("images", "state", "tokens", "noise")
OUTPUT_NAMES = ("actions",)


@dataclass
class Policy:
    """A torch policy of some family, its config (the family's dataclass) and its spec."""

    module: "torch.nn.Module"
    config: Any
    spec: PolicySpec
    family: str
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: source path, sha256 of weights

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def __call__(self, images, state, tokens, noise) -> "torch.Tensor":
        import torch

        with torch.no_grad():
            return self.module(images, state, tokens, noise)
