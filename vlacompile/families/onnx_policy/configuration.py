"""The ONNX policy manifest (``config.json`` beside the graph), resolved against the graph itself.

    {
      "model_type": "onnx-policy",
      "graph": "policy.onnx",                       # relative to the directory
      "inputs": {                                   # LeRobot key -> the graph's input name
        "observation.images.top": "image_top",      #   uint8 or float [B, 3, H, W] (or NHWC, "image_layout")
        "observation.state": "state",               #   float [B, state_dim], physical units
        "task": "tokens",                           #   int [B, L] ids from "tokenizer" (optional)
        "noise": "noise"                            #   float [B, chunk, D] initial noise (optional)
      },
      "token_mask": "token_mask",                   # the graph's attention-mask input, if it has one
      "tokenizer": "tokenizer",                     # a directory with tokenizer.json (when "task" is an input)
      "prompt": "{task}\\n",                         # what is tokenised (default "{task}")
      "output": "actions",                          # float [B, chunk, action_dim], physical units
      "action_names": ["x", "y", ...],              # optional; students match actions by name
      "chunk_size": 50,                             # checked against the output's shape
      "control_hz": 30
    }

Shapes, dtypes and the batch dimension (static or dynamic) come from the graph.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FAMILY = "onnx-policy"
IMAGE_PREFIX = "observation.images."


@dataclass(frozen=True)
class GraphInput:
    key: str  # the LeRobot key ("observation.images.top", "observation.state", "task", "noise") or "token_mask"
    name: str  # the graph's input name
    dtype: str  # numpy dtype the graph takes
    shape: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class OnnxPolicyConfig:
    graph: str
    inputs: tuple[GraphInput, ...]
    output: str
    chunk_size: int
    action_dim: int
    state_dim: int
    image_layout: str  # "NCHW" | "NHWC"
    static_batch: int | None  # the graph's fixed batch size, or None when dynamic
    action_names: tuple[str, ...] | None = None
    state_names: tuple[str, ...] | None = None
    tokenizer: str | None = None
    max_length: int = 0
    padding_side: str = "right"
    prompt: str = "{task}"
    control_hz: float = 0.0
    parameters: int = 0  # initializer elements in the graph
    weight_bytes: int = 0
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def input(self, key: str) -> GraphInput | None:
        return next((i for i in self.inputs if i.key == key), None)

    @property
    def cameras(self) -> tuple[GraphInput, ...]:
        return tuple(i for i in self.inputs if i.key.startswith(IMAGE_PREFIX))

    def camera_hw(self, cam: GraphInput) -> tuple[int, int]:
        return (cam.shape[1], cam.shape[2]) if self.image_layout == "NCHW" else (cam.shape[0], cam.shape[1])

    @property
    def noise_shape(self) -> tuple[int, int]:
        n = self.input("noise")
        return tuple(n.shape) if n is not None else (self.chunk_size, self.action_dim)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return {"model_type": FAMILY, **d}
