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

# Weight-name prefixes only one family's checkpoints hold (lerobot's module trees; openpi's keys lack
# "model."). The weights say what a checkpoint is when its config.json says otherwise (a config.json
# copied from another policy): checked before any family-specific reading, whose errors would
# otherwise blame the wrong file (SmolVLA weights under "type": "pi0" were refused as a lerobot 0.4.x
# pipeline).
WEIGHT_PREFIXES: dict[str, tuple[str, ...]] = {
    "smolvla": ("model.vlm_with_expert.", "vlm_with_expert."),
    "pi0": ("model.paligemma_with_expert.", "paligemma_with_expert."),
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


def family_of_weights(names: list[str]) -> str | None:
    """The registered family whose weights these tensor names are (by ``WEIGHT_PREFIXES``), or None
    when they do not say (a reference checkpoint, an ONNX policy, names of no known family)."""
    found = {fam for fam, prefixes in WEIGHT_PREFIXES.items() if any(n.startswith(prefixes) for n in names)}
    return found.pop() if len(found) == 1 else None


def detect_checkpoint(raw: dict[str, Any], names: list[str] | None, ckpt: Path) -> "Family":
    """The family of a checkpoint directory: its config.json's (``detect``), which its weights must
    not contradict. Weights of a registered family under a config.json that names another family
    (or one vlacompile does not know) are refused naming both, before any family-specific check."""
    by_weights = family_of_weights(names or [])
    other = get_family(by_weights) if by_weights is not None else None
    prefix = next((p for p in WEIGHT_PREFIXES.get(by_weights, ()) if any(n.startswith(p) for n in names or [])), "")
    try:
        family = detect(raw, ckpt / "config.json")
    except CheckpointError as err:
        if other is None:
            raise
        # config.json names a family vlacompile does not compile: say so, and what the weights are.
        raise CheckpointError(f"{err.message}; its weights, though, are a {other.label} policy's (tensors {prefix}*)",
                              source=err.source, hint=f"{err.hint}; or, if config.json was copied from another policy, restore the "
                              f"{other.label} config.json saved with these weights") from None
    if other is None or by_weights == family.name:
        return family
    said = f'"type": "{raw["type"]}"' if isinstance(raw.get("type"), str) else f'"model_type": "{raw.get("model_type")}"'
    raise CheckpointError(
        f"config.json says {said} ({family.label}), but the weights are a {other.label} policy's (tensors {prefix}*)",
        source=ckpt / "config.json",
        hint="config.json and the weights come from different policies: restore the config.json saved with these weights "
             f"(a {other.label} one), or pass the directory of the policy config.json describes",
    )
