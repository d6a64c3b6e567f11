"""The ONNX policy as a torch module: forward runs the graph in ONNX Runtime (no autograd, no
parameters), converting vlacompile's inputs (uint8 [B, 3, H, W] images, float state, int64
tokens, bool mask, float noise) to what the graph declares, in slices of a static batch."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vlacompile.families.onnx_policy.configuration import IMAGE_PREFIX, OnnxPolicyConfig

class OnnxPolicyModule(nn.Module):
    runtime_name = "onnxruntime-cpu (ONNX teacher)"

    def __init__(self, cfg: OnnxPolicyConfig, graph_path: str, threads: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.graph_path = graph_path
        self.threads = threads
        self._session = None
        self.opaque_parameters = cfg.parameters
        self.opaque_weight_bytes = cfg.weight_bytes

    @property
    def session(self):
        if self._session is None:
            from vlacompile.backends.onnxrt import make_session

            self._session = make_session(self.graph_path, "cpu", self.threads)
        return self._session

    def __getstate__(self):  # sessions do not pickle or deep-copy; they reopen on first use
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def _feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        feeds = {}
        for gi in cfg.inputs:
            if gi.key.startswith(IMAGE_PREFIX):
                x = inputs[f"images.{gi.key[len(IMAGE_PREFIX):]}"].numpy()  # uint8 [B, 3, H, W]
                if cfg.image_layout == "NHWC":
                    x = x.transpose(0, 2, 3, 1)
                x = x if gi.dtype == "uint8" else x.astype(np.float32) / 255.0
            elif gi.key == "observation.state":
                x = inputs["state"].numpy()
            elif gi.key == "task":
                x = inputs["tokens"].numpy()
            elif gi.key == "token_mask":
                x = inputs["token_mask"].numpy()
            else:  # noise
                x = inputs["noise"].numpy()
            feeds[gi.name] = np.ascontiguousarray(x.astype(np.dtype(gi.dtype), copy=False))
        return feeds

    @torch.no_grad()
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        from vlacompile.families import get_family

        names = get_family("onnx-policy").input_names(self.cfg)
        feeds = self._feeds(dict(zip(names, args)))
        n = len(next(iter(feeds.values())))
        b = self.cfg.static_batch
        if b and n != b:
            outs = []
            for s in range(0, n, b):
                part = {k: v[s:s + b] for k, v in feeds.items()}
                m = len(next(iter(part.values())))
                if m < b:  # pad the last slice to the graph's batch
                    part = {k: np.concatenate([v, np.repeat(v[-1:], b - m, axis=0)]) for k, v in part.items()}
                outs.append(self.session.run([self.cfg.output], part)[0][:m])
            out = np.concatenate(outs)
        else:
            out = self.session.run([self.cfg.output], feeds)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
