"""Runtimes that execute a policy: torch eager (the teacher), ONNX Runtime (the compiled student on
CPU or CUDA), and TensorRT (on the device; imported lazily, optional).

Every runner exposes the same ``get_action(observation)`` path, pre-processing included, which is
what verify times.
"""
from vlacompile.backends.base import Runner
from vlacompile.observation import Observation

__all__ = ["Observation", "Runner"]
