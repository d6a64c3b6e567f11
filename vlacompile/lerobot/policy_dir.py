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


@dataclass(frozen=True)
class Camera:
    """A VISUAL input feature of a policy, as a family's config holds it."""

    key: str  # the policy's feature key, "observation.images.top"
    name: str  # the observation's camera name (lerobot's rename map applied backwards)
    height: int
    width: int
    normalized: bool = False  # VISUAL normalisation applies (mode not IDENTITY and stats present)


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


def norm_map(step: Step | None, path: Path) -> dict[str, str]:
    """A normaliser step's ``norm_map`` ({feature type: mode}), checked against lerobot's modes."""
    from vlacompile.lerobot.normalize import MODES

    if step is None:
        return {}
    out = {str(k): str(v) for k, v in (step.config.get("norm_map") or {}).items()}
    bad = {k: v for k, v in out.items() if v not in MODES}
    if bad:
        raise CheckpointError(f"norm_map has modes {bad} that lerobot does not define ({list(MODES)})", source=path)
    return out


class Normalisers:
    """The normaliser / unnormaliser steps of a policy directory, resolved per feature: each
    feature's mode and its two statistics (as ``normalize.<buffer>.<stat>`` tensors for the
    family's ``Normalization`` module). lerobot passes a feature it has no statistics for through
    unnormalised; that is refused unless ``allow_unnormalized``, and then noted."""

    def __init__(self, pd: PolicyDir, allow_unnormalized: bool):
        self.pd, self.allow_unnormalized = pd, allow_unnormalized
        self.norm_step, self.unnorm_step = pd.step("pre", "normalizer_processor"), pd.step("post", "unnormalizer_processor")
        if self.unnorm_step is None:
            raise CheckpointError("the postprocessor has no unnormalizer_processor step", source=pd.root / POSTPROCESSOR)
        self.pre_path = pd.root / (self.norm_step.state_file if self.norm_step and self.norm_step.state_file else PREPROCESSOR)
        self.post_path = pd.root / (self.unnorm_step.state_file or POSTPROCESSOR)
        self.norm_map = norm_map(self.norm_step, pd.root / PREPROCESSOR)
        self.unnorm_map = norm_map(self.unnorm_step, pd.root / POSTPROCESSOR)
        self.pre_stats = pd.step_state(self.norm_step) if self.norm_step else {}
        self.post_stats = pd.step_state(self.unnorm_step)
        self.observation_keys = self.norm_step.config.get("normalize_observation_keys") if self.norm_step else None
        self.buffers: dict[str, Any] = {}
        self.stats: dict[str, dict[str, list[float]]] = {}  # buffer -> {stat: values}
        self.notes: list[str] = []

    def mode(self, f: Feature, buffer: str, shape: tuple[int, ...]) -> str:
        """The mode ``f`` is (un)normalised with; records its statistics under ``buffer``."""
        import torch

        from vlacompile.lerobot.normalize import STATS_FOR

        output = f.type == "ACTION"
        if not output and self.norm_step is None:
            return "IDENTITY"
        stats, nmap, path = (self.post_stats, self.unnorm_map, self.post_path) if output else (self.pre_stats, self.norm_map, self.pre_path)
        mode = nmap.get(f.type, "IDENTITY")
        if not output and self.observation_keys is not None and f.key not in self.observation_keys:
            return "IDENTITY"
        if mode == "IDENTITY":
            return mode
        have = feature_stats(stats, f.key)
        needed = STATS_FOR[mode]
        missing = [s for s in needed if s not in have]
        if missing:
            qualified = sorted({k.rsplit(".", 2)[0] for k in stats if k.endswith(tuple(f".{s}" for s in needed))} - {f.key})
            msg = (f"the normaliser stats do not cover {f.key} (mode {mode} needs {', '.join(needed)}; missing {missing})"
                   + (f"; the file holds stats for {qualified[:4]}" if qualified else ""))
            if not self.allow_unnormalized:
                raise CheckpointError(msg, source=path, hint="lerobot silently passes such a feature through unnormalised; "
                                      "re-save the processors with the dataset's stats, or pass --allow-unnormalized to compile exactly that")
            self.notes.append(msg + ": passed through unnormalised, as lerobot does (--allow-unnormalized)")
            return "IDENTITY"
        for s in needed:
            value = np.asarray(have[s], dtype=np.float32)
            if value.size != int(np.prod(shape)):
                raise CheckpointError(f"the normaliser's {f.key}.{s} has {value.size} values; the feature's shape is {list(shape)}",
                                      source=path, hint="the processor files come from another policy or dataset; copy the directory "
                                      "lerobot saved together")
            value = value.reshape(shape)
            self.buffers[f"normalize.{buffer}.{s}"] = torch.as_tensor(value)
            self.stats.setdefault(buffer, {})[s] = [float(v) for v in value.reshape(-1)]
        return mode
