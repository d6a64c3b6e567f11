"""ONNX Runtime sessions: the CPU provider (x86-cpu), and the CUDA or TensorRT execution providers on
an x86 GPU box (``pip install vlacompile-runtime[gpu]``). ``onnxruntime`` is imported when a session
is made, never at import time."""
from __future__ import annotations

import os
from pathlib import Path

from vlacompile_runtime.errors import ArtifactError, MissingDependencyError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_session(path: Path | str, provider: str = "cpu", threads: int | None = None):
    """An InferenceSession on ``path`` with ``provider`` ("cpu", "cuda" or "tensorrt"), ``threads``
    intra-op threads (default: the cores this process may use) and every graph optimisation."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError(f"onnxruntime cannot be imported ({e})", source="onnxruntime",
                                     hint="pip install vlacompile-runtime (CPU), or vlacompile-runtime[gpu] on an NVIDIA GPU") from None
    if provider not in PROVIDERS:
        raise MissingDependencyError(f"unknown provider {provider!r}", source="provider", hint=f"pass one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted[0] not in ort.get_available_providers():
        raise MissingDependencyError(
            f"ONNX Runtime here has no {wanted[0]} (available: {ort.get_available_providers()})",
            source="onnxruntime",
            hint="install onnxruntime-gpu on a machine with an NVIDIA GPU (pip install vlacompile-runtime[gpu]), or use the CPU provider",
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), so, providers=wanted)
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile exceptions
        if isinstance(e, (MemoryError, KeyboardInterrupt)):
            raise
        raise ArtifactError(f"ONNX Runtime cannot load the graph ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
                            source=path, hint="rebuild the artifact: the graph file is damaged or truncated") from None
