"""Observations -> an ONNX policy's inputs: uint8 [N, 3, H, W] per camera, the state as it is, the
task written into the manifest's ``prompt`` ("{task}" by default; pi0's pipeline is "{task}\\n") and
tokenised with its tokenizer, padded to the graph's token length."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vlacompile.families.base import Preprocessor, camera_feeds
from vlacompile.observation import ObservationBatch
from vlacompile.policy import PolicySpec


class OnnxPolicyPreprocessor(Preprocessor):
    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        s = spec.processor_settings
        self.tokenizer = None
        if s.get("tokenizer_dir"):
            from vlacompile.lerobot.tokenizer import TextTokenizer

            self.tokenizer = TextTokenizer(Path(s["tokenizer_dir"]), max_length=int(s["max_length"]),
                                           padding_side=s.get("padding_side", "right"), truncation=True)
        self.prompt = s.get("prompt") or "{task}"
        self.names = set(spec.input_names)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        feeds = camera_feeds(self.spec, obs)
        if "state" in self.names:
            feeds["state"] = np.asarray(obs.state, dtype=np.float32)
        if self.tokenizer is not None:
            pairs = []
            for t in obs.tasks:
                if t not in self._cache:
                    self._cache[t] = self.tokenizer.encode(self.prompt.replace("{task}", t))
                pairs.append(self._cache[t])
            n = self.tokenizer.max_length
            feeds["tokens"] = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, n), np.int64)
            if "token_mask" in self.names:
                feeds["token_mask"] = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, n), bool)
        return feeds
