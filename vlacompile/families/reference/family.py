"""The reference family's hooks: vlacompile's own checkpoint format and its three-part layout
(``vision``, ``backbone``, ``expert``; timm-style blocks with fused qkv)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlacompile.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_and_load_state, read_config, read_weights, save_state, weights_digest
from vlacompile.errors import CheckpointError, ConfigError
from vlacompile.families.base import FeatureTap, Family, Probe, PruneGroup, SplitPlan, part_module
from vlacompile.families.reference.configuration import FAMILY as NAME
from vlacompile.families.reference.configuration import ReferenceConfig
from vlacompile.families.reference.modeling import ReferenceVLA, flops_per_call, spec_of
from vlacompile.families.reference.processor import ReferencePreprocessor
from vlacompile.policy import Policy, PolicySpec

PARTS = ("vision", "backbone", "expert")
# Most of the INT8 error measured on this family came from the state embedding feeding the
# read-out token; the patch embedding and the action projections are small and sensitive too.
DEFAULT_QUANT_EXCLUDE = ("expert.state_in", "expert.action_in", "expert.action_out", "vision.patch_embed")


class ReferenceFamily(Family):
    name = NAME
    label = "vlacompile reference VLA"
    parts = PARTS
    config_cls = ReferenceConfig

    # -- checkpoints ------------------------------------------------------------------------

    def matches(self, config_json: dict[str, Any]) -> bool:
        return config_json.get("model_type") == NAME

    def load(self, ckpt: Path, *, allow_pickle: bool = False, tokenizer: Path | None = None,
             allow_unnormalized: bool = False) -> Policy:
        config = ReferenceConfig.from_dict(read_config(ckpt), str(ckpt / CONFIG_NAME))
        module = self.build(config)
        state, files = read_weights(ckpt, allow_pickle=allow_pickle)
        check_and_load_state(module, state, files[0] if len(files) == 1 else ckpt)
        module.eval()
        return Policy(module=module, config=config, spec=spec_of(module), family=NAME,
                      meta={"source": str(ckpt), "weights_sha256": weights_digest(files), "format": "vlacompile"})

    def save(self, policy: Policy, out: Path) -> Path:
        (out / CONFIG_NAME).write_text(json.dumps(policy.config.to_dict(), indent=2, sort_keys=True) + "\n")
        save_state(policy.module, out / WEIGHTS_NAME)
        return out

    def build(self, config: ReferenceConfig) -> ReferenceVLA:
        return ReferenceVLA(config)

    def spec_of(self, module: ReferenceVLA) -> PolicySpec:
        return spec_of(module)

    def preprocessor(self, spec: PolicySpec) -> ReferencePreprocessor:
        return ReferencePreprocessor(spec)

    # -- students ---------------------------------------------------------------------------

    def depths(self, config: ReferenceConfig) -> dict[str, int]:
        return {p: len(getattr(config, f"{p}_heads")) for p in PARTS}

    def mlp_widths(self, config: ReferenceConfig) -> dict[str, list[int]]:
        return {p: list(getattr(config, f"{p}_mlp")) for p in PARTS}

    def student_config(self, config: ReferenceConfig, layers, mlp, flow_steps):
        changes: dict[str, Any] = {}
        for p in PARTS:
            keep = layers.get(p, list(range(len(getattr(config, f"{p}_heads")))))
            changes[f"{p}_heads"] = tuple(getattr(config, f"{p}_heads")[j] for j in keep)
            changes[f"{p}_mlp"] = tuple(mlp[p]) if p in mlp else tuple(getattr(config, f"{p}_mlp")[j] for j in keep)
        return replace(config, **changes, flow_steps=config.flow_steps if flow_steps is None else flow_steps)

    def new_student(self, teacher: Policy, shape: dict[str, Any], stats, source: str) -> Policy:
        """A reference-family student for any teacher (its own family's too): the teacher's cameras
        (resized on the host to ``image_size`` when their frames differ), state and actions; its own
        sizes from ``shape`` (``layers`` / ``width`` / ``heads`` / ``mlp`` for all three parts, or any
        config field), normalised with the training episodes' statistics."""
        config = self._student_config(shape, teacher.spec, source)
        policy = self.new_policy(config)
        s, a = stats["observation.state"], stats["action"]
        policy.module.set_stats(s["mean"], s["std"], a["mean"], a["std"])
        policy.spec = self.spec_of(policy.module)
        policy.meta = {"format": "vlacompile", "derived_from": teacher.meta.get("weights_sha256"),
                       "distilled_from_family": teacher.family}
        return policy

    def check_student_shape(self, shape: dict[str, Any], teacher_spec: PolicySpec | None, source: str) -> None:
        self._student_config(shape, teacher_spec, source)

    def _student_config(self, shape: dict[str, Any], t: PolicySpec | None, source: str) -> ReferenceConfig:
        """The student's config from ``distill.student``, every value checked with its key named;
        ``t`` None: the recipe alone (placeholders for what the teacher decides)."""
        fields = ReferenceConfig.__dataclass_fields__
        known = set(fields) - {"cameras", "state_dim", "action_dim"}
        short = {"layers", "width", "heads", "mlp"}
        bad = sorted(set(shape) - known - short)
        if bad:
            raise ConfigError(f"distill.student sets {bad}, which a vlacompile-reference student does not have", source=source,
                              hint=f"set {sorted(short)} or config fields {sorted(known)}")

        def whole(key: str, value: Any, low: int = 1) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"distill.student.{key} is {value!r}; it must be a whole number >= {low}", source=source,
                                  hint="e.g. student = { family = \"vlacompile-reference\", layers = 2, width = 128, heads = 4 }")
            return value

        for key in sorted(short & set(shape)):
            whole(key, shape[key])
        layers, width = shape.get("layers", 2), shape.get("width", 128)
        heads, mlp = shape.get("heads", 4), shape.get("mlp", 4 * width)
        chunk = t.chunk_size if t is not None else shape.get("chunk_size", 1)
        base: dict[str, Any] = dict(
            cameras=tuple(c.name for c in t.cameras) if t is not None else ("camera",),
            state_dim=t.state_dim if t is not None else 1, action_dim=t.action_dim if t is not None else 1,
            chunk_size=chunk, flow_steps=min(t.flow_steps, 2) if t is not None else 2, max_tokens=32,
            control_hz=(t.control_hz or 10.0) if t is not None else 10.0,
            image_size=64, patch_size=8, head_dim=max(8, width // heads),
            **{f"{p}_width": width for p in PARTS}, **{f"{p}_heads": (heads,) * layers for p in PARTS},
            **{f"{p}_mlp": (mlp,) * layers for p in PARTS})
        for k, v in shape.items():
            if k not in known:
                continue
            default = fields[k].default
            if isinstance(default, tuple):
                if not isinstance(v, (list, tuple)) or not v:
                    raise ConfigError(f"distill.student.{k} is {v!r}; it must be a list of whole numbers >= 1, one per layer",
                                      source=source, hint=f"e.g. {k} = {list(default[:2])}")
                base[k] = tuple(whole(f"{k}[{i}]", x) for i, x in enumerate(v))
            elif isinstance(default, float):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                    raise ConfigError(f"distill.student.{k} is {v!r}; it must be a positive number", source=source,
                                      hint=f"e.g. {k} = {default}")
                base[k] = float(v)
            else:
                base[k] = whole(k, v, 2 if k == "max_tokens" else 1)
        if t is not None and base["chunk_size"] > t.chunk_size:
            raise ConfigError(f"distill.student.chunk_size = {base['chunk_size']} is longer than the teacher's chunk "
                              f"({t.chunk_size}): the teacher labels only {t.chunk_size} actions", source=source,
                              hint=f"set distill.student.chunk_size <= {t.chunk_size}, or leave it out to take the teacher's")
        config = ReferenceConfig(**base)
        if config.image_size % config.patch_size:
            raise ConfigError(f"distill.student.image_size {config.image_size} is not a multiple of patch_size {config.patch_size}",
                              source=source, hint="e.g. image_size = 64 with patch_size = 8")
        depths = {p: (len(getattr(config, f"{p}_heads")), len(getattr(config, f"{p}_mlp"))) for p in PARTS}
        uneven = {p: d for p, d in depths.items() if d[0] != d[1]}
        if uneven:
            p, (nh, nm) = next(iter(uneven.items()))
            raise ConfigError(f"distill.student gives {p}_heads {nh} layers but {p}_mlp {nm}", source=source,
                              hint="give both lists one entry per layer, or set layers / heads / mlp for all parts")
        try:
            config.validate(source)
        except CheckpointError as e:  # the config's own rules, said as the recipe's
            raise ConfigError(f"distill.student gives an impossible student: {e.message}", source=source,
                              hint="e.g. student = { family = \"vlacompile-reference\", layers = 2, width = 128, heads = 4 }") from None
        return config

    def describe(self, config: ReferenceConfig) -> str:
        return f"{config.vision_depth}+{config.backbone_depth}+{config.expert_depth} layers"

    # -- pruning ----------------------------------------------------------------------------

    def prune_groups(self, policy: Policy, parts, what) -> list[PruneGroup]:
        cfg, module = policy.config, policy.module
        groups: list[PruneGroup] = []
        for part in parts:
            blocks = getattr(module, part).blocks
            for i, blk in enumerate(blocks):
                base = f"{part}.blocks.{i}"
                if "mlp" in what:
                    groups.append(PruneGroup("mlp", part, i, blk.mlp.fc1.out_features, (Probe("mlp", f"{base}.mlp.act", "output", "abs"),)))
                if "heads" in what:
                    probes = [Probe("attn", f"{base}.attn.proj", "input", "head_norm", blk.attn.num_heads, blk.attn.head_dim)]
                    if blk.cross is not None:
                        probes.append(Probe("cross", f"{base}.cross.proj", "input", "head_norm", blk.cross.num_heads, blk.cross.head_dim))
                    groups.append(PruneGroup("heads", part, i, blk.attn.num_heads, tuple(probes)))
            if "layers" in what:
                groups.append(PruneGroup("layer", part, -1, len(blocks),
                                         tuple(Probe("block", f"{part}.blocks.{i}", "output", "influence") for i in range(len(blocks)))))
        return groups

    def pruned_config(self, config: ReferenceConfig, layers, heads, mlp) -> ReferenceConfig:
        changes = {}
        for part in layers:
            changes[f"{part}_heads"] = tuple(heads[part])
            changes[f"{part}_mlp"] = tuple(mlp[part])
        return replace(config, **changes)

    def restructure(self, source: Policy, config: ReferenceConfig, layers=None, keep=None) -> Policy:
        from vlacompile.checkpoint import new_policy

        layers = layers or {}
        keep = keep or {}
        src_cfg = source.config
        src_state = source.module.state_dict()
        out = new_policy(config, NAME)
        new_state = {}
        for name, ref in out.module.state_dict().items():
            part, _, rest = name.partition(".")
            if part in PARTS and rest.startswith("blocks."):
                i_str, _, rest = rest[len("blocks."):].partition(".")
                i = int(i_str)
                j = layers[part][i] if part in layers else i
                t = src_state[f"{part}.blocks.{j}.{rest}"]
                t = _slice_tensor(rest, t, getattr(src_cfg, f"{part}_heads")[j], src_cfg.head_dim, keep.get((part, i), {}))
            else:
                t = src_state[name]
            if t.shape != ref.shape:
                raise ValueError(f"{name}: sliced shape {tuple(t.shape)} does not match the new config's {tuple(ref.shape)}")
            new_state[name] = t.detach().clone()
        out.module.load_state_dict(new_state)
        out.module.eval()
        # The spec carries the normalisation statistics, which only exist once the weights are in.
        out.spec = spec_of(out.module)
        out.meta = {"derived_from": source.meta.get("weights_sha256") or source.meta.get("derived_from")}
        return out

    # -- training, quantisation, cost -------------------------------------------------------

    def feature_tap(self, module: ReferenceVLA) -> FeatureTap:
        # The backbone returns (prefix features [B, n, w], additive key padding [B, 1, 1, n]).
        return FeatureTap("backbone", lambda out: (out[0], out[1][:, 0, 0, :] == 0),
                          tokens=module.backbone.causal.shape[0], width=module.backbone.norm.normalized_shape[0])

    def action_scale(self, policy: Policy) -> torch.Tensor:
        return policy.module.action_std

    def state_scale(self, policy: Policy) -> np.ndarray:
        return policy.module.state_std.detach().cpu().numpy()

    def default_quant_excludes(self, config) -> tuple[str, ...]:
        return DEFAULT_QUANT_EXCLUDE

    def flops(self, config: ReferenceConfig) -> dict[str, float]:
        return flops_per_call(config)

    def split_plan(self, policy: Policy) -> SplitPlan:
        """System 2 = ``prefix(images, tokens)`` -> (prefix, prefix_mask); System 1 = one
        ``velocity(x_t, t, state_n, prefix, prefix_mask)``; the runner standardises the state,
        integrates from t=0 to 1 (x += v / K at t = i / K) and un-standardises the actions."""
        m = policy.module
        k = policy.spec.flow_steps
        f32 = lambda t: [float(v) for v in t.detach().cpu().float().reshape(-1)]
        return SplitPlan(
            system2=part_module(m, "prefix"),
            system2_inputs=("images", "tokens"),
            system2_outputs=("prefix", "prefix_mask"),
            system1=part_module(m, "velocity"),
            system1_inputs=("x_t", "t", "state_n", "prefix", "prefix_mask"),
            derived=[{"input": "state", "output": "state_n",
                      "ops": [{"op": "sub", "value": f32(m.state_mean)}, {"op": "div", "value": f32(m.state_std)}]}],
            integrator={"kind": "euler", "init": "noise", "x": "x_t", "t": "t", "velocity": "velocity",
                        "times": [i / k for i in range(k)], "update": {"op": "div", "value": float(k)}},
            post=[{"op": "mul", "value": f32(m.action_std)}, {"op": "add", "value": f32(m.action_mean)}],
        )


def _slice_tensor(rest: str, t: torch.Tensor, heads: int, head_dim: int, keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """Slice one tensor of a block (``rest`` is its name inside the block) to the kept heads/channels."""
    attn = keep.get("attn")
    cross = keep.get("cross")
    mlp = keep.get("mlp")
    # Fused projections lay their output rows out as [n_proj, heads, head_dim].
    if attn is not None and rest in ("attn.qkv.weight", "attn.qkv.bias"):
        return t.reshape(3, heads, head_dim, *t.shape[1:])[:, attn].reshape(-1, *t.shape[1:])
    if cross is not None and rest in ("cross.kv.weight", "cross.kv.bias"):
        return t.reshape(2, heads, head_dim, *t.shape[1:])[:, cross].reshape(-1, *t.shape[1:])
    if cross is not None and rest in ("cross.q.weight", "cross.q.bias"):
        return t.reshape(heads, head_dim, *t.shape[1:])[cross].reshape(-1, *t.shape[1:])
    for name, idx in (("attn", attn), ("cross", cross)):
        if idx is not None and rest == f"{name}.proj.weight":
            return t.reshape(t.shape[0], heads, head_dim)[:, idx].reshape(t.shape[0], -1)
    if mlp is not None and rest in ("mlp.fc1.weight", "mlp.fc1.bias"):
        return t[mlp]
    if mlp is not None and rest == "mlp.fc2.weight":
        return t[:, mlp]
    return t


FAMILY = ReferenceFamily()  # what the registry (vlacompile.families) reads
