from __future__ import annotations

from abc import ABC, abstractmethod
import numpy as np
from vlacompile_runtime.policy import feed_rows, in_static_batches  # noqa: F401  (re-exported)

from vlacompile.observation import Observation
from vlacompile.policy import PolicySpec


class Runner(ABC):
    """One runtime executing one policy graph. ``get_action`` is the whole control-loop call:
    the family's preprocessor (tokenizer, image layout) plus inference, what verify times."""

    name: str = "runner"

    def __init__(self, spec: PolicySpec):
        from vlacompile.families import make_preprocessor

        self.spec = spec
        self.preprocess = make_preprocessor(spec)

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Batched model inputs -> actions float32 [B, chunk, action_dim]."""

    def run_batched(self, inputs: dict[str, np.ndarray], batch_size: int = 32, *, progress: bool = False, desc: str = "") -> np.ndarray:
        n = feed_rows(inputs)
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc or self.name, unit="batch", leave=False)
        outs = [self.run({k: v[i : i + batch_size] for k, v in inputs.items()}) for i in starts]
        return np.concatenate(outs) if outs else np.zeros((0, self.spec.chunk_size, self.spec.action_dim), np.float32)

    def get_action(self, obs: Observation, noise: np.ndarray) -> np.ndarray:
        """The whole control-loop call: pre-processing + inference -> action chunk [chunk, action_dim]."""
        return self.run(self.preprocess(obs, noise))[0]
