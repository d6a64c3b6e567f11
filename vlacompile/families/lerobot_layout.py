"""What the families read from LeRobot policy directories the same way (SmolVLA, pi0 / pi0.5): the
policy's features, a student written back in lerobot's layout, layer-sliced students, the vision
tower's prune groups, the digest of everything that defines a policy but its weights."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from vlacompile.checkpoint import WEIGHTS_NAME, sha256_file
from vlacompile.errors import CheckpointError, ConfigError
from vlacompile.families.base import Probe, PruneGroup
from vlacompile.families.blocks import slice_layer_tensor
from vlacompile.lerobot.policy_dir import POSTPROCESSOR, PREPROCESSOR, Feature, PolicyDir
from vlacompile.observation import IMAGE_PREFIX


def camera_name(key: str) -> str:
    """``observation.images.top`` -> ``top`` (the observation's camera name)."""
    if key.startswith(IMAGE_PREFIX):
        return key[len(IMAGE_PREFIX):]
    return key[len("observation."):] if key.startswith("observation.") else key


def policy_features(pd: PolicyDir) -> tuple[list[Feature], Feature, Feature, dict[str, str]]:
    """(VISUAL features less the synthetic empty cameras, the STATE feature, the ACTION feature, the
    rename map backwards: policy key -> observation key)."""
    c, src = pd.config, pd.root / "config.json"
    step = pd.step("pre", "rename_observations_processor")
    back = {str(v): str(k) for k, v in ((step.config.get("rename_map") if step else None) or {}).items()}
    inputs, outputs = pd.features("input_features"), pd.features("output_features")
    synthetic = {f"{IMAGE_PREFIX}empty_camera_{i}" for i in range(int(c.get("empty_cameras", 0)))}
    visual = [f for k, f in inputs.items() if f.type == "VISUAL" and k not in synthetic]
    states = [f for f in inputs.values() if f.type == "STATE"]
    actions = [f for f in outputs.values() if f.type == "ACTION"]
    if len(states) != 1 or len(actions) != 1:
        raise CheckpointError(f"expected one STATE input and one ACTION output, found {[f.key for f in states]} and "
                              f"{[f.key for f in actions]}", source=src)
    return visual, states[0], actions[0], back


def definition_digest(ckpt: Path, side: Path) -> str:
    """sha256 over the policy directory's and ``side``'s (tokenizer / VLM) files, the weights excepted."""
    h = hashlib.sha256()
    for root in (ckpt, side):
        for f in sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".txt", ".model")):
            if f.name.startswith("model") and f.suffix == ".safetensors":
                continue  # the weights have their own digest
            h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def write_policy_dir(policy, out: Path, config: dict[str, Any], to_lerobot_key: Callable[[str], str], side_dir: str,
                     side_suffixes: tuple[str, ...], sidecar: tuple[str, dict[str, Any]], *,
                     extra_tensors: dict[str, Any] | None = None, side_files: dict[str, dict[str, Any]] | None = None,
                     tokenizer_name: str | None = None) -> Path:
    """lerobot's layout: ``config`` as config.json, the module's weights under lerobot's keys (plus
    ``extra_tensors``, lerobot-keyed tensors the module does not hold, as stored), both processor
    pipelines and their state files as read (the tokenizer step's ``tokenizer_name`` replaced when
    given), the tokenizer (or VLM) directory copied into ``side_dir`` with ``side_files`` (name ->
    JSON content) written instead of copied, and the sidecar (name, content) for what lerobot's
    config cannot say."""
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    src = policy.config.source
    (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    weights = {to_lerobot_key(k): v.detach().contiguous().cpu() for k, v in policy.module.state_dict().items()
               if not k.startswith("normalize.")}
    for k, v in (extra_tensors or {}).items():
        weights.setdefault(k, v.detach().contiguous().cpu())
    save_file(weights, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    for name in (PREPROCESSOR, POSTPROCESSOR):
        text = src[name]
        if tokenizer_name is not None:
            pipeline = json.loads(text)
            steps = [s for s in pipeline.get("steps", []) if s.get("registry_name") == "tokenizer_processor"]
            for s in steps:
                s.setdefault("config", {})["tokenizer_name"] = tokenizer_name
            if steps:
                text = json.dumps(pipeline, indent=2)  # as lerobot writes it
        (out / name).write_text(text)
    for name, tensors in src["state_files"].items():
        save_np({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / name))
    side = Path(policy.spec.processor_settings["tokenizer_dir"])
    (out / side_dir).mkdir(exist_ok=True)
    for f in sorted(side.iterdir()):
        if f.is_file() and f.suffix in side_suffixes and f.name not in (side_files or {}):
            shutil.copyfile(f, out / side_dir / f.name)
    for fname, content in (side_files or {}).items():
        (out / side_dir / fname).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    name, content = sidecar
    (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return out


def sliced_state(source, target_state: dict, layers: dict[str, list[int]], keep: dict, prefixes: dict[str, str],
                 vision_heads: tuple[int, ...]) -> dict:
    """The new module's state from ``source``'s: layer ``i`` of a part is the source's ``layers[part][i]``,
    sliced to the kept MLP channels / vision heads (``keep[(part, i)]``); everything else copied."""
    src = source.module.state_dict()
    new_state = {}
    for name, ref in target_state.items():
        part = next((p for p, pre in prefixes.items() if name.startswith(pre)), None)
        if part is None:
            t = src[name]
        else:
            i_str, _, rest = name[len(prefixes[part]):].partition(".")
            i = int(i_str)
            j = layers[part][i] if part in layers else i
            t = slice_layer_tensor(part == "vision", rest, src[f"{prefixes[part]}{j}.{rest}"],
                                   vision_heads[j] if part == "vision" else 0, keep.get((part, i), {}))
        if t.shape != ref.shape:
            raise ValueError(f"{name}: sliced shape {tuple(t.shape)} does not match the new config's {tuple(ref.shape)}")
        new_state[name] = t.detach().clone()
    return new_state


def vision_prune_groups(cfg, what: tuple[str, ...]) -> list[PruneGroup]:
    """MLP channels, heads and whole layers of a SigLIP tower at ``vision.layers.<i>``."""
    groups: list[PruneGroup] = []
    for i in range(cfg.vision_layers):
        base = f"vision.layers.{i}"
        if "mlp" in what:
            groups.append(PruneGroup("mlp", "vision", i, cfg.vision_mlp[i], (Probe("mlp", f"{base}.mlp.act", "output", "abs"),)))
        if "heads" in what:
            groups.append(PruneGroup("heads", "vision", i, cfg.vision_heads[i],
                                     (Probe("attn", f"{base}.self_attn.out_proj", "input", "head_norm", cfg.vision_heads[i],
                                            cfg.vision_head_dim),)))
    if "layers" in what:
        groups.append(PruneGroup("layer", "vision", -1, cfg.vision_layers,
                                 tuple(Probe("block", f"vision.layers.{i}", "output", "influence") for i in range(cfg.vision_layers))))
    return groups


def pruned_config(config, depths: dict[str, int], layers, heads, mlp, label: str, hint: str):
    """``config`` with the kept layers' MLP widths (``vision_mlp`` / ``text_mlp`` / ``expert_mlp``) and
    vision heads; the backbone and expert keep all their layers (distill chooses those), else an error."""
    changes: dict[str, Any] = {}
    for part, field_mlp in (("vision", "vision_mlp"), ("backbone", "text_mlp"), ("expert", "expert_mlp")):
        if part not in layers:
            continue
        old = getattr(config, field_mlp)
        changes[field_mlp] = tuple(old[j] if m is None else m for j, m in zip(layers[part], mlp[part]))
    if "vision" in layers:
        changes["vision_heads"] = tuple(config.vision_heads[j] if h is None else h for j, h in zip(layers["vision"], heads["vision"]))
    for part in ("backbone", "expert"):
        if part in layers and layers[part] != list(range(depths[part])):
            raise ConfigError(f"prune cannot drop {part} layers of a {label} policy", source="prune.drop_layers", hint=hint)
    return replace(config, **changes)
