"""What a compiled policy reads and writes (``PolicySpec``), as ``student_spec.json`` holds it.

Every policy graph is called with its named inputs, in the order ``spec.inputs`` lists them,

    graph(*[feeds[name] for name in spec.input_names]) -> actions f32 [B, chunk, action_dim] (physical units)

with pre-processing (image scaling and resizing, state normalisation and padding) and
post-processing (action un-normalisation, unpadding) inside the graph. One input is always
``noise``, the initial sample of the flow-matching integration in the family's own shape
(``spec.noise_shape``). What turns a robot observation into those inputs (tokenizer, image layout)
is the preprocessor ``spec.family`` names with the settings in ``spec.processor``
(``vlacompile_runtime.processors``). The compiler (``vlacompile.policy``) uses the same classes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Roles of a policy input: what a preprocessor fills it from.
ROLES = ("images", "image", "state", "tokens", "token_mask", "noise")


@dataclass(frozen=True)
class CameraSpec:
    name: str
    height: int  # the resolution this camera's frames arrive at (each camera its own)
    width: int


@dataclass(frozen=True)
class InputSpec:
    """One named input of the policy graph."""

    name: str
    shape: tuple[int, ...]  # without the batch dimension
    dtype: str  # numpy dtype name: uint8, float32, int64, bool
    role: str  # one of ROLES
    camera: str | None = None  # role "image": the camera it shows
    low: int = 0  # integer inputs: the range example inputs are drawn from, [low, high)
    high: int = 0


@dataclass(frozen=True)
class FlowHead:
    """The action head: Euler integration of a velocity field from t_start to t_end in ``steps``."""

    steps: int
    t_start: float  # 0.0: noise at t=0, actions at t=1 (reference family); 1.0: the openpi/lerobot direction
    t_end: float
    noise_shape: tuple[int, int]  # (chunk, padded action dim): the family's own noise shape


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
    # Which submodules (qualified names) are the slow "System 2" (once per chunk) and the fast "System 1" (K times).
    system2: tuple[str, ...] = ("vision", "backbone")
    system1: tuple[str, ...] = ("expert",)
    inputs: tuple[InputSpec, ...] = ()  # empty: the reference family's four inputs (see reference_inputs)
    head: FlowHead | None = None  # None: Euler from 0 to 1 in flow_steps, noise [chunk, action_dim]
    processor: tuple[tuple[str, Any], ...] = ()  # the family preprocessor's settings (JSON-able items)
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            object.__setattr__(self, "inputs", reference_inputs(self))
        if self.head is None:
            object.__setattr__(self, "head", FlowHead(self.flow_steps, 0.0, 1.0, (self.chunk_size, self.action_dim)))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def noise_shape(self) -> tuple[int, int]:
        return tuple(self.head.noise_shape)

    @property
    def processor_settings(self) -> dict[str, Any]:
        return dict(self.processor)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["processor"] = dict(self.processor)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PolicySpec":
        d = dict(d)
        d["cameras"] = tuple(CameraSpec(**c) for c in d["cameras"])
        d["inputs"] = tuple(InputSpec(**{**i, "shape": tuple(i["shape"])}) for i in d.get("inputs", ()))
        d["head"] = FlowHead(**{**d["head"], "noise_shape": tuple(d["head"]["noise_shape"])}) if d.get("head") else None
        d["processor"] = tuple(sorted((d.get("processor") or {}).items()))
        for k in ("action_mean", "action_std", "system2", "system1"):
            d[k] = tuple(d[k])
        for k in ("state_names", "action_names"):
            d[k] = tuple(d[k]) if d.get(k) is not None else None
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def input_shapes(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        return {i.name: (batch, *i.shape) for i in self.inputs}

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, "torch.Tensor"]:
        """Random inputs of the right shapes and dtypes (drawn in input order from one seeded generator),
        as torch tensors: the compiler's (export and calibration); torch is imported only here."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out = {}
        for i in self.inputs:
            shape = (batch, *i.shape)
            if i.dtype == "uint8":
                out[i.name] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            elif i.dtype == "int64":
                out[i.name] = torch.randint(i.low, i.high, shape, generator=g, dtype=torch.int64)
            elif i.dtype == "bool":
                out[i.name] = torch.ones(shape, dtype=torch.bool)
            else:
                out[i.name] = torch.randn(shape, generator=g)
        return out


def reference_inputs(spec: PolicySpec) -> tuple[InputSpec, ...]:
    """The reference family's layout: every camera stacked in one uint8 tensor (one resolution)."""
    cam = spec.cameras[0]
    return (
        InputSpec("images", (len(spec.cameras), 3, cam.height, cam.width), "uint8", "images"),
        InputSpec("state", (spec.state_dim,), "float32", "state"),
        InputSpec("tokens", (spec.max_tokens,), "int64", "tokens", low=3, high=200),
        InputSpec("noise", (spec.chunk_size, spec.action_dim), "float32", "noise"),
    )


OUTPUT_NAMES = ("actions",)
