"""ONNX Runtime: the compiled student's runtime on CPU (x86-cpu) and, with the CUDA or TensorRT
execution provider, on an x86 GPU box."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlacompile.backends.base import Runner, in_static_batches
from vlacompile.errors import MissingDependencyError
from vlacompile.policy import PolicySpec

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_session(path: Path | str, provider: str = "cpu", threads: int | None = None):
    import onnxruntime as ort

    wanted = PROVIDERS[provider]
    if wanted[0] not in ort.get_available_providers():
        raise MissingDependencyError(
            f"ONNX Runtime here has no {wanted[0]} (available: {ort.get_available_providers()})",
            source="onnxruntime",
            hint="install onnxruntime-gpu on a machine with an NVIDIA GPU, or use the CPU provider",
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=wanted)


class OrtRunner(Runner):
    def __init__(self, path: Path | str, spec: PolicySpec, provider: str = "cpu", threads: int | None = None):
        super().__init__(spec)
        self.path = Path(path)
        self.session = make_session(self.path, provider, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.name = f"onnxruntime-{provider}"
        # Graphs with a static batch (TensorRT-style profiles) run in slices of that batch.
        shape = self.session.get_inputs()[0].shape
        self.static_batch = shape[0] if isinstance(shape[0], int) else None

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: inputs[k] for k in self.input_names})[0]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.static_batch and len(next(iter(inputs.values()))) != self.static_batch:
            return in_static_batches(self.static_batch, inputs, self._run)
        return self._run(inputs)
