"""TensorRT: what can be checked on any machine (``readiness``: will TensorRT's ONNX parser take
this graph, and will it fuse its Q/DQ into integer kernels) and what needs the device's GPU
(``engine``: plans, their manifests and the compatibility check). ``tensorrt`` itself is imported
only inside the functions that need it."""
from vlacompile.errors import VlaCompileError

GPU_INSTALL_HINT = "pip install 'vlacompile[gpu]' on a machine with an NVIDIA GPU (TensorRT has no CPU build)"


class ReadinessError(VlaCompileError):
    """A graph TensorRT would reject or run without its intended precision; names the nodes."""


class EngineError(VlaCompileError):
    """A TensorRT plan that cannot be built, or was built for another TensorRT version or GPU."""


__all__ = ["GPU_INSTALL_HINT", "EngineError", "ReadinessError"]
