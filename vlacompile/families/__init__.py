"""Policy families: where a checkpoint's architecture is recognised, loaded and described.

One folder per family (``reference/``, ``smolvla/``, ``pi0/`` for pi0 and pi0.5), each with its configuration, modeling,
processor and the ``Family`` hooks (``vlacompile.families.base``). A family registers here by
name; its modules are imported only when a checkpoint of it is met, so the registry stays light.
``detect`` reads a checkpoint's ``config.json`` (``model_type``, or LeRobot's ``type``) and names
what it found when no registered family takes it.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlacompile.errors import CheckpointError

if TYPE_CHECKING:
    from vlacompile.families.base import Family, Preprocessor
    from vlacompile.policy import PolicySpec

# name -> module that defines FAMILY (a Family instance), imported on first use.
_REGISTRY: dict[str, str] = {
    "vlacompile-reference": "vlacompile.families.reference.family",
    "smolvla": "vlacompile.families.smolvla.family",
    "pi0": "vlacompile.families.pi0.family",
    "onnx-policy": "vlacompile.families.onnx_policy.family",
}
_LOADED: dict[str, "Family"] = {}

# LeRobot policy types vlacompile recognises but cannot compile yet (config.json "type").
LEROBOT_TYPES = {
    "pi0": "pi0", "pi05": "pi0.5", "pi0_fast": "pi0-FAST", "groot": "GR00T", "act": "ACT", "diffusion": "Diffusion Policy",
    "vqbet": "VQ-BeT", "tdmpc": "TD-MPC", "sac": "SAC", "smolvla": "SmolVLA", "xvla": "X-VLA", "wall_x": "WALL-OSS",
}


def register(name: str, module: str) -> None:
    """Register a family defined by ``FAMILY`` in ``module`` (imported lazily)."""
    _REGISTRY[name] = module
    _LOADED.pop(name, None)


def get_family(name: str | None) -> "Family | None":
    if name not in _REGISTRY:
        return None
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_REGISTRY[name]).FAMILY
    return _LOADED[name]


def known_families() -> list[str]:
    return sorted(_REGISTRY)


def family_of_config(config) -> "Family":
    for name in _REGISTRY:
        fam = get_family(name)
        if isinstance(config, fam.config_cls):
            return fam
    raise TypeError(f"no registered family has config type {type(config).__name__}")


def make_preprocessor(spec: "PolicySpec") -> "Preprocessor":
    family = get_family(spec.family)
    if family is None:
        raise CheckpointError(f"unknown policy family {spec.family!r}", source="spec", hint=f"vlacompile knows {known_families()}")
    return family.preprocessor(spec)


def detect(raw: dict[str, Any], config_path: Path) -> "Family":
    """The family whose checkpoints look like ``raw`` (a config.json), or a CheckpointError naming what it is."""
    for name in _REGISTRY:
        family = get_family(name)
        if family.matches(raw):
            return family
    supported = ", ".join(f"{get_family(n).label} ({n})" for n in known_families())
    lerobot_type = raw.get("type")
    if isinstance(lerobot_type, str):
        what = LEROBOT_TYPES.get(lerobot_type, lerobot_type)
        raise CheckpointError(
            f"a lerobot `{lerobot_type}` checkpoint ({what}); vlacompile supports {supported}",
            source=config_path,
            hint="compile a supported family, or add one in vlacompile/families/ (a folder plus a registration)",
        )
    model_type = raw.get("model_type")
    raise CheckpointError(
        f"unknown policy family model_type={model_type!r}" + (" and no LeRobot \"type\"" if model_type is None else ""),
        source=config_path,
        hint=f"vlacompile supports {supported}; a new family is added in vlacompile/families/",
    )
