"""LeRobot policy directories, the one owner of that format (lerobot >= 0.4, processor pipelines):

    config.json                      draccus config with "type" ("smolvla", "pi0", ...), input/output features
    model.safetensors                the weights (keys "model.*"; dtypes may mix)
    policy_preprocessor.json         {"name", "steps": [{"registry_name", "config", "state_file"?}]}
    policy_postprocessor.json
    policy_*processor_step_<i>_<name>.safetensors   a step's state, e.g. the normaliser's flat
                                     "<feature>.<stat>" tensors ("observation.state.mean", "action.std")

The step order is a serialised contract and the normaliser's file name changes with policy and
version, so steps and their state files are read from the JSON, never assumed. Legacy
checkpoints (lerobot <= 0.3: no processor files, statistics inside model.safetensors as
``normalize_inputs.buffer_*``) are recognised and refused with the migration hint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlacompile.errors import CheckpointError

PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
STEP_KEYS = ("registry_name", "class", "config", "state_file")


@dataclass(frozen=True)
class Step:
    name: str  # the registry name ("normalizer_processor"), or the class path of unregistered steps
    config: dict[str, Any]
    state_file: str | None
    index: int
    pipeline: Path


@dataclass
class Feature:
    key: str  # "observation.images.top"
    type: str  # VISUAL, STATE, ACTION, ENV, ...
    shape: tuple[int, ...]


@dataclass
class PolicyDir:
    root: Path
    config: dict[str, Any]
    preprocessor: list[Step]
    postprocessor: list[Step]
    state: dict[Path, dict[str, np.ndarray]] = field(default_factory=dict)  # state file -> tensors

    @property
    def type(self) -> str:
        return self.config["type"]

    def features(self, which: str) -> dict[str, Feature]:
        """``input_features`` or ``output_features`` of config.json, in their order."""
        raw = self.config.get(which) or {}
        out = {}
        for key, f in raw.items():
            if not isinstance(f, dict) or "type" not in f or "shape" not in f:
                raise CheckpointError(f"{which}.{key} is not {{type, shape}}", source=self.root / "config.json",
                                      hint="restore config.json from the saved policy")
            out[key] = Feature(key, str(f["type"]), tuple(int(s) for s in f["shape"]))
        return out

    def step(self, pipeline: str, name: str) -> Step | None:
        steps = self.preprocessor if pipeline == "pre" else self.postprocessor
        found = [s for s in steps if s.name == name]
        return found[0] if found else None

    def step_state(self, step: Step) -> dict[str, np.ndarray]:
        """A step's state tensors (e.g. the normaliser's statistics), read from the file its JSON names."""
        if step.state_file is None:
            return {}
        path = self.root / step.state_file
        if path not in self.state:
            from safetensors import SafetensorError
            from safetensors.numpy import load_file

            if not path.is_file():
                raise CheckpointError(f"{step.pipeline.name} step {step.index} ({step.name}) names {step.state_file}, which is missing",
                                      source=path, hint="copy the whole policy directory (lerobot's save_pretrained of the processors)")
            try:
                self.state[path] = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"is truncated or corrupt ({e})", source=path, hint="copy the policy directory again") from None
        return self.state[path]


def _read_pipeline(path: Path) -> list[Step]:
    from vlacompile.checkpoint import read_json

    data = read_json(path, "processor pipeline")
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise CheckpointError("has no steps list", source=path, hint="restore the file from the saved policy")
    out = []
    for i, raw in enumerate(steps):
        if not isinstance(raw, dict) or not ({"registry_name", "class"} & set(raw)):
            raise CheckpointError(f"step {i} has neither registry_name nor class", source=path,
                                  hint="this is not a processor pipeline lerobot >= 0.4 writes")
        name = raw.get("registry_name") or raw.get("class")
        out.append(Step(str(name), dict(raw.get("config") or {}), raw.get("state_file"), i, path))
    return out


def read_policy_dir(root: Path) -> PolicyDir:
    """A LeRobot policy directory; a legacy (<= 0.3) one or one without processor files is an error naming it."""
    from vlacompile.checkpoint import read_config

    config = read_config(root)
    if not isinstance(config.get("type"), str):
        raise CheckpointError("config.json has no \"type\": not a LeRobot policy", source=root / "config.json")
    pre, post = root / PREPROCESSOR, root / POSTPROCESSOR
    if not pre.is_file() or not post.is_file():
        legacy = _has_legacy_stats(root)
        raise CheckpointError(
            f"no {PREPROCESSOR if not pre.is_file() else POSTPROCESSOR}"
            + ("; its normalisation statistics are inside model.safetensors (normalize_inputs.*), the layout of lerobot <= 0.3" if legacy else ""),
            source=root,
            hint="migrate it with lerobot >= 0.4 (lerobot/processor/migrate_policy_normalization.py), which writes the processor "
            "pipelines and their normaliser files" if legacy else
            "copy the whole directory lerobot saved (policy.save_pretrained plus the pre/post-processor save_pretrained)",
        )
    return PolicyDir(root=root, config=config, preprocessor=_read_pipeline(pre), postprocessor=_read_pipeline(post))


def _has_legacy_stats(root: Path) -> bool:
    path = root / "model.safetensors"
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            return any(k.startswith(("normalize_inputs.", "unnormalize_outputs.", "normalize_targets.")) for k in f.keys())
    except Exception:  # a damaged file is reported when the weights are read
        return False


def feature_stats(state: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    """The ``<key>.<stat>`` tensors of a normaliser state, by stat name."""
    prefix = key + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
