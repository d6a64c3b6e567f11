"""The one data type for "a policy and its spec": a torch module of some family and what it reads
and writes. Stages pass it along inside an ``Artifact`` (``vlacompile.stages``).

Every family's module is called with its named inputs, in the order ``spec.inputs`` lists them,

    module(*[feeds[name] for name in spec.input_names]) -> actions f32 [B, chunk, action_dim] (physical units)

with pre-processing (image scaling and resizing, state normalisation and padding) and
post-processing (action un-normalisation, unpadding) inside the graph, so an exported model is
the whole policy. One input is always ``noise``, the initial sample of the flow-matching
integration in the family's own shape (``spec.noise_shape``; SmolVLA pads actions to 32): passing
it in makes teacher and student comparable call by call and keeps exported graphs free of random
ops. What turns a robot observation into those inputs (tokenizer, image layout) is the family's
``Preprocessor`` (``vlacompile.families``), described by ``spec.processor``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only where a module runs, so specs and runners stay light
    import numpy as np
    import torch

from vlacompile_runtime.spec import (  # noqa: F401  (the spec is the runtime's; re-exported for the compiler)
    OUTPUT_NAMES,
    ROLES,
    CameraSpec,
    FlowHead,
    InputSpec,
    PolicySpec,
    reference_inputs,
)


@dataclass
class Policy:
    """A torch policy of some family, its config (the family's dataclass) and its spec."""

    module: "torch.nn.Module"
    config: Any
    spec: PolicySpec
    family: str
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: source path, sha256 of weights, format read
    _preprocessor: Any = field(default=None, init=False, repr=False, compare=False)  # predict_chunk's, made once

    def num_parameters(self) -> int:
        opaque = getattr(self.module, "opaque_parameters", None)  # a graph run as it is (an ONNX teacher)
        return opaque if opaque is not None else sum(p.numel() for p in self.module.parameters())

    def weight_bytes(self) -> int:
        opaque = getattr(self.module, "opaque_weight_bytes", None)
        return opaque if opaque is not None else sum(p.numel() * p.element_size() for p in self.module.parameters())

    def __call__(self, *args, **named) -> "torch.Tensor":
        """The module on its inputs (positional in ``spec.input_names`` order, or by name), without autograd."""
        import torch

        if named:
            args = (*args, *[named[n] for n in self.spec.input_names[len(args):]])
        with torch.no_grad():
            return self.module(*args)

    def run_feeds(self, feeds: dict[str, Any]) -> "torch.Tensor":
        """The module on a feed dict (numpy arrays or tensors, keyed by input name)."""
        import numpy as np
        import torch

        args = [feeds[n] if isinstance(feeds[n], torch.Tensor) else torch.from_numpy(np.ascontiguousarray(feeds[n]))
                for n in self.spec.input_names]
        return self(*args)

    def predict_chunk(self, observation: dict[str, Any], noise: "np.ndarray | None" = None) -> "np.ndarray":
        """One observation in LeRobot's batch keys -> the action chunk [chunk, action_dim] in physical units.

        ``observation``: ``observation.images.<camera>`` as float [3, H, W] in [0, 1] or uint8
        [H, W, 3], ``observation.state``, and ``task`` (the instruction). ``noise``: the initial
        flow sample in the family's own shape ``spec.noise_shape`` (drawn from N(0, 1) when None).
        """
        import numpy as np

        from vlacompile.families import make_preprocessor
        from vlacompile.observation import from_lerobot

        obs = from_lerobot(observation, self.spec)
        if noise is None:
            noise = np.random.default_rng().standard_normal(self.spec.noise_shape, dtype=np.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != self.spec.noise_shape:
            from vlacompile.errors import ConfigError

            raise ConfigError(
                f"noise has shape {noise.shape}, the {self.family} policy takes {self.spec.noise_shape}",
                source="noise", hint="pass noise of shape spec.noise_shape (chunk, padded action dim), or None",
            )
        if self._preprocessor is None or self._preprocessor.spec != self.spec:
            self._preprocessor = make_preprocessor(self.spec)
        return self.run_feeds(self._preprocessor(obs, noise))[0].numpy()
