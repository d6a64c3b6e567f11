"""vlacompile: compile Vision-Language-Action robot policies for a target and prove the result.

    import vlacompile
    result = vlacompile.build("x86-cpu")            # same as `vlacompile build --target x86-cpu`
    print(result.status, result.report["latency"]["student"]["p50_ms"])

Importing the package is cheap: torch, onnxruntime and modelopt load only when a build needs them.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["build", "load_policy", "load_target", "load_recipe", "__version__"]


def __getattr__(name: str):
    if name == "build":
        from vlacompile.pipeline import build

        return build
    if name == "load_policy":
        from vlacompile.checkpoint import load_policy

        return load_policy
    if name == "load_target":
        from vlacompile.targets import load_target

        return load_target
    if name == "load_recipe":
        from vlacompile.recipes import load_recipe

        return load_recipe
    raise AttributeError(f"module 'vlacompile' has no attribute {name!r}")
