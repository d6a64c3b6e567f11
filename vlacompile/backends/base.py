from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypedDict

import numpy as np

from vlacompile.policy import PolicySpec
from vlacompile.tokenizer import ByteTokenizer


class Observation(TypedDict):
    images: dict[str, np.ndarray]  # camera name -> uint8 [H, W, 3], as a camera driver delivers it
    state: np.ndarray  # float32 [state_dim], physical units
    task: str  # the language instruction


class Preprocessor:
    """Observation -> model inputs (batch of one). Part of every timed get_action call."""

    def __init__(self, spec: PolicySpec):
        self.spec = spec
        self.tokenizer = ByteTokenizer(spec.max_tokens)
        self._token_cache: dict[str, np.ndarray] = {}

    def tokens(self, task: str) -> np.ndarray:
        # The instruction rarely changes between calls; a robot stack caches its tokens the same way.
        ids = self._token_cache.get(task)
        if ids is None:
            ids = self._token_cache[task] = self.tokenizer.encode(task)[None]
        return ids

    def __call__(self, obs: Observation, noise: np.ndarray) -> dict[str, np.ndarray]:
        images = np.stack([np.asarray(obs["images"][c.name]).transpose(2, 0, 1) for c in self.spec.cameras])
        return {
            "images": np.ascontiguousarray(images[None], dtype=np.uint8),
            "state": np.asarray(obs["state"], dtype=np.float32)[None],
            "tokens": self.tokens(obs["task"]),
            "noise": np.asarray(noise, dtype=np.float32).reshape(1, self.spec.chunk_size, self.spec.action_dim),
        }


class Runner(ABC):
    """One runtime executing one policy graph."""

    name: str = "runner"

    def __init__(self, spec: PolicySpec):
        self.spec = spec
        self.preprocess = Preprocessor(spec)

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Batched model inputs -> actions float32 [B, chunk, action_dim]."""

    def run_batched(self, inputs: dict[str, np.ndarray], batch_size: int = 32, *, progress: bool = False, desc: str = "") -> np.ndarray:
        n = len(inputs["state"])
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc or self.name, unit="batch", leave=False)
        outs = [self.run({k: v[i : i + batch_size] for k, v in inputs.items()}) for i in starts]
        return np.concatenate(outs) if outs else np.zeros((0, self.spec.chunk_size, self.spec.action_dim), np.float32)

    def get_action(self, obs: Observation, noise: np.ndarray) -> np.ndarray:
        """The whole control-loop call: pre-processing + inference -> action chunk [chunk, action_dim]."""
        return self.run(self.preprocess(obs, noise))[0]
