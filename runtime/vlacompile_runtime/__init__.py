"""vlacompile-runtime: run an artifact `vlacompile build` wrote, with numpy, ONNX Runtime and
tokenizers, and no torch.

    import vlacompile_runtime

    policy = vlacompile_runtime.load("build/x86-cpu")              # provider="cpu" | "cuda" | "tensorrt"
    action = policy.select_action({
        "observation.images.front": frame,                        # uint8 [H, W, 3], one key per camera
        "observation.state": state,                               # float [state_dim], physical units
        "task": "pick up the cube",
    })

The runtime never imports the compiler (``vlacompile``); the compiler imports the runtime's spec,
observation, preprocessor, split and ONNX Runtime code, so what verify measures is what runs here.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["CompiledPolicy", "FORMAT_VERSION", "ArtifactError", "ObservationError", "VlaCompileError", "load", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import vlacompile_runtime.errors` (which the compiler does at import) stays cheap.
    if name in ("load", "CompiledPolicy"):
        from vlacompile_runtime import policy

        return getattr(policy, name)
    if name == "FORMAT_VERSION":
        from vlacompile_runtime.artifact import FORMAT_VERSION

        return FORMAT_VERSION
    if name in ("ArtifactError", "ObservationError", "VlaCompileError"):
        from vlacompile_runtime import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'vlacompile_runtime' has no attribute {name!r}")
