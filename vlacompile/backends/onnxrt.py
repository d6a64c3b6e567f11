"""ONNX Runtime: the compiled student's runtime on CPU (x86-cpu) and, with the CUDA or TensorRT
execution provider, on an x86 GPU box. Sessions are made as the runtime makes them
(``vlacompile_runtime.onnxrt``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from vlacompile_runtime.onnxrt import PROVIDERS, default_threads, make_session  # noqa: F401  (re-exported)
from vlacompile_runtime.policy import SingleGraph

from vlacompile.backends.base import Runner
from vlacompile.policy import PolicySpec

class OrtRunner(Runner):
    """The single graph, run by the runtime's ``SingleGraph`` (what ``vlacompile_runtime.load`` runs)."""

    def __init__(self, path: Path | str, spec: PolicySpec, provider: str = "cpu", threads: int | None = None):
        super().__init__(spec)
        self.path = Path(path)
        self.graph = SingleGraph(self.path, provider, threads)
        self.session = self.graph.session
        self.input_names = self.graph.input_names
        self.static_batch = self.graph.static_batch
        self.name = f"onnxruntime-{provider}"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.graph(inputs)
