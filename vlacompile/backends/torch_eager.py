"""Torch eager runtime: how the teacher runs in its training framework."""
from __future__ import annotations

import numpy as np
import torch

from vlacompile.backends.base import Runner
from vlacompile.policy import Policy


class TorchRunner(Runner):
    name = "torch-eager-fp32"

    def __init__(self, policy: Policy, threads: int | None = None):
        super().__init__(policy.spec)
        self.policy = policy
        self.name = getattr(policy.module, "runtime_name", type(self).name)
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.policy.module(*[torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in self.spec.input_names]).numpy()
