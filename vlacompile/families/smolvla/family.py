"""SmolVLA's hooks: LeRobot's policy directory in, the same layout out, students that keep
lerobot's layer rules, prune groups, the System 2 (per-layer K/V) / System 1 split."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlacompile.checkpoint import check_and_load_state, read_json, read_weights, weights_digest
from vlacompile.errors import CheckpointError, ConfigError
from vlacompile.families.base import Family, Probe, PruneGroup, SplitPlan, evenly_spaced, layers_from_request, part_module
from vlacompile.families.lerobot_layout import (camera_name, definition_digest, policy_features, pruned_config, sliced_state,
                                                vision_prune_groups, write_policy_dir)
from vlacompile.families.smolvla.configuration import FAMILY as NAME
from vlacompile.families.smolvla.configuration import (LEROBOT_VERSIONS, PATCH_LABELS, PATCH_POSITIONS, Camera, SmolVLAConfig,
                                                       get_intermediate_size, parse_lerobot_version)
from vlacompile.families.smolvla.modeling import SmolVLA, _navit_position_ids
from vlacompile.families.smolvla.processor import TOKENIZER_FILE, SmolVLAPreprocessor, TextTokenizer, resolve_vlm_dir
from vlacompile.lerobot.policy_dir import PREPROCESSOR, POSTPROCESSOR, Normalisers, PolicyDir, read_policy_dir
from vlacompile.policy import CameraSpec, FlowHead, InputSpec, Policy, PolicySpec

SIDECAR = "vlacompile.json"  # what a vlacompile student adds to lerobot's layout (per-layer sizes)
VLM_DIR = "vlm"  # the SmolVLM2 tokenizer and config, copied into saved policies so they are self-contained
PRE_STEPS = {"rename_observations_processor", "to_batch_processor", "smolvla_new_line_processor", "tokenizer_processor",
             "device_processor", "normalizer_processor"}
POST_STEPS = {"unnormalizer_processor", "device_processor"}
# lerobot key prefix -> this module's (and back, for saving).
KEY_MAP = (
    ("model.vlm_with_expert.vlm.model.vision_model.embeddings.", "vision.embeddings."),
    ("model.vlm_with_expert.vlm.model.vision_model.encoder.layers.", "vision.layers."),
    ("model.vlm_with_expert.vlm.model.vision_model.post_layernorm.", "vision.post_layernorm."),
    ("model.vlm_with_expert.vlm.model.connector.modality_projection.proj.", "vision.connector.proj."),
    ("model.vlm_with_expert.vlm.model.text_model.", "text."),
    ("model.vlm_with_expert.lm_expert.", "expert."),
    ("model.", ""),
)
UNUSED = ("model.vlm_with_expert.vlm.lm_head.",)  # the VLM's LM head: SmolVLA never decodes text
PARTS = ("vision", "backbone", "expert")
DEFAULT_QUANT_EXCLUDE = ("vision.embeddings.patch_embedding", "state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in")


def to_module_key(key: str) -> str | None:
    if key.startswith(UNUSED):
        return None
    for src, dst in KEY_MAP:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_lerobot_key(key: str) -> str:
    for src, dst in KEY_MAP:
        if dst and key.startswith(dst):
            return src + key[len(dst):]
    return "model." + key


class SmolVLAFamily(Family):
    name = NAME
    label = "LeRobot SmolVLA"
    parts = PARTS
    config_cls = SmolVLAConfig

    # -- checkpoints ------------------------------------------------------------------------

    def matches(self, config_json: dict[str, Any]) -> bool:
        return config_json.get("type") == "smolvla"

    def load(self, ckpt: Path, *, allow_pickle: bool = False, tokenizer: Path | None = None,
             allow_unnormalized: bool = False, lerobot_version: str | None = None) -> Policy:
        """``lerobot_version``: the lerobot release the policy is run with ("0.4", "0.6.1", ...), which
        decides the vision tower's patch position ids (see ``configuration``). None: read it from
        a vlacompile student's sidecar, or from config.json (lerobot >= 0.6 writes
        ``pretrained_revision``); where neither says and the two conventions differ for this
        policy's images, refuse and ask for it."""
        pd = read_policy_dir(ckpt)
        vlm_dir = resolve_vlm_dir(str(pd.config.get("vlm_model_name", "")), tokenizer, ckpt)
        state, files = read_weights(ckpt, allow_pickle=allow_pickle)
        sidecar = read_json(ckpt / SIDECAR) if (ckpt / SIDECAR).is_file() else None
        config, stats, notes = _resolve_config(pd, vlm_dir, state, sidecar, allow_unnormalized, files[0], lerobot_version)
        module = SmolVLA(config)
        remapped, unused = {}, {}
        for k, v in state.items():
            mk = to_module_key(str(k))
            if mk is None and str(k).startswith(UNUSED):
                unused[str(k)] = v  # kept as stored, so a saved student has every tensor lerobot stores
                continue
            if mk is None or mk.startswith("vlm_with_expert."):
                raise CheckpointError(f"tensor {k!r} is not one a SmolVLA policy has", source=files[0],
                                      hint="the weights are not lerobot SmolVLA weights, or come from an incompatible version")
            remapped[mk] = v
        config.source["unused_tensors"] = unused
        remapped.update(stats)
        check_and_load_state(module, remapped, files[0])
        module.eval()
        semantics = config.source["lerobot_semantics"]
        meta = {
            "source": str(ckpt), "weights_sha256": weights_digest(files), "format": _format_label(pd, sidecar),
            "tokenizer": str(vlm_dir),
            # What lerobot semantics the policy computes is part of its definition (cache keys, teacher targets).
            "definition_sha256": hashlib.sha256(f"{definition_digest(ckpt, vlm_dir)}/{config.patch_positions}".encode()).hexdigest(),
            "lerobot_version": semantics["lerobot_version"], "lerobot_semantics": semantics["summary"],
            "notes": notes, **({"allow_unnormalized": True} if allow_unnormalized else {}),
            **({"derived_from": sidecar.get("derived_from")} if sidecar else {}),
        }
        return Policy(module=module, config=config, spec=self.spec_of(module, tokenizer_dir=vlm_dir), family=NAME, meta=meta)

    def save(self, policy: Policy, out: Path) -> Path:
        """lerobot's layout (config.json, model.safetensors, both processor pipelines and their
        normaliser files), plus vlm/ (the tokenizer and the VLM config) and vlacompile.json (per-layer
        sizes, the lerobot semantics). Every depth and width lerobot reads is written where it reads
        it: ``num_vlm_layers`` / ``num_expert_layers`` in config.json, the vision and text depths and
        MLP widths in vlm/config.json, which config.json's ``vlm_model_name`` and the tokenizer step's
        ``tokenizer_name`` name as ``vlm`` (lerobot resolves that against its working directory: load
        from inside the directory, or point both at it). What lerobot cannot express (``lerobot_gaps``)
        is in the sidecar and, in a build, in its log and report."""
        cfg: SmolVLAConfig = policy.config
        src = cfg.source
        config = dict(src["config"])
        config.update(num_vlm_layers=cfg.num_vlm_layers, num_steps=cfg.num_steps, vlm_model_name=VLM_DIR,
                      num_expert_layers=cfg.num_expert_layers if cfg.num_expert_layers != cfg.num_vlm_layers else -1)
        side = Path(policy.spec.processor_settings["tokenizer_dir"])
        vlm_config = student_vlm_config(read_json(side / "config.json", "SmolVLM2 backbone config (config.json)"), cfg)
        sidecar = {"format": 2, "vision_heads": list(cfg.vision_heads), "vision_mlp": list(cfg.vision_mlp),
                   "text_mlp": list(cfg.text_mlp), "expert_mlp": list(cfg.expert_mlp), "expert_kv_in": list(cfg.expert_kv_in),
                   "derived_from": policy.meta.get("derived_from"), "patch_positions": cfg.patch_positions,
                   "lerobot_version": policy.meta.get("lerobot_version"), "lerobot_gaps": self.lerobot_gaps(policy)}
        return write_policy_dir(policy, out, config, to_lerobot_key, VLM_DIR, (".json", ".txt", ".model", ".jinja"), (SIDECAR, sidecar),
                                extra_tensors=src.get("unused_tensors") or {}, side_files={"config.json": vlm_config},
                                tokenizer_name=VLM_DIR)

    def lerobot_gaps(self, policy: Policy) -> list[str]:
        """What lerobot's files cannot say about this policy: lerobot builds one MLP width per part
        (vision: ``intermediate_size``; text: ``intermediate_size``; expert: a function of its hidden
        width) and one vision head count, so a policy whose layers differ from that does not load in
        lerobot (its weights do not fit the modules lerobot builds). Empty when lerobot loads it."""
        cfg: SmolVLAConfig = policy.config
        vlm = read_json(Path(policy.spec.processor_settings["tokenizer_dir"]) / "config.json", "SmolVLM2 backbone config (config.json)")
        vision = vlm.get("vision_config") or {}
        gaps = []
        if len(set(cfg.vision_mlp)) > 1:
            gaps.append(f"the vision layers' MLP widths differ per layer ({list(cfg.vision_mlp)}); lerobot builds one "
                        "(vision_config.intermediate_size)")
        if len(set(cfg.text_mlp)) > 1:
            gaps.append(f"the VLM text layers' MLP widths differ per layer ({list(cfg.text_mlp)}); lerobot builds one "
                        "(text_config.intermediate_size)")
        want = get_intermediate_size(cfg.expert_hidden)
        if any(m != want for m in cfg.expert_mlp):
            gaps.append(f"the expert's MLP widths are {list(cfg.expert_mlp)}; lerobot builds {want} for a {cfg.expert_hidden}-wide "
                        "expert (get_intermediate_size), whatever the config says")
        heads = int(vision.get("num_attention_heads", 0) or 0)
        if any(h != heads for h in cfg.vision_heads):
            gaps.append(f"the vision layers keep {list(cfg.vision_heads)} attention heads; lerobot builds {heads} per layer "
                        "(vision_config.num_attention_heads sets the head width too)")
        return gaps

    def build(self, config: SmolVLAConfig) -> SmolVLA:
        return SmolVLA(config)

    def spec_of(self, module: SmolVLA, tokenizer_dir: Path | None = None) -> PolicySpec:
        cfg = module.cfg
        if tokenizer_dir is None:
            tokenizer_dir = Path(cfg.source.get("tokenizer_dir", ""))
        inputs = [InputSpec(f"images.{c.name}", (3, c.height, c.width), "uint8", "image", camera=c.name) for c in cfg.cameras]
        inputs += [
            InputSpec("state", (cfg.state_dim,), "float32", "state"),
            InputSpec("tokens", (cfg.tokenizer_max_length,), "int64", "tokens", low=0, high=cfg.vocab_size),
            InputSpec("token_mask", (cfg.tokenizer_max_length,), "bool", "token_mask"),
            InputSpec("noise", (cfg.chunk_size, cfg.max_action_dim), "float32", "noise"),
        ]
        scale = module.normalize.action
        mean = scale.mean if scale.mode == "MEAN_STD" else torch.zeros(cfg.action_dim)
        std = scale.scale() * torch.ones(cfg.action_dim)
        settings = {"tokenizer_dir": str(tokenizer_dir), "max_length": cfg.tokenizer_max_length, "padding_side": cfg.padding_side,
                    "truncation": cfg.truncation, "append_newline": cfg.append_newline}
        return PolicySpec(
            family=NAME,
            cameras=tuple(CameraSpec(c.name, c.height, c.width) for c in cfg.cameras),
            state_dim=cfg.state_dim, action_dim=cfg.action_dim, chunk_size=cfg.chunk_size, flow_steps=cfg.num_steps,
            max_tokens=cfg.tokenizer_max_length, control_hz=cfg.control_hz,
            action_mean=tuple(float(v) for v in mean), action_std=tuple(float(v) for v in std),
            system2=("vision", "text", "state_proj"),
            system1=("expert", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"),
            inputs=tuple(inputs),
            head=FlowHead(cfg.num_steps, 1.0, 0.0, (cfg.chunk_size, cfg.max_action_dim)),
            processor=tuple(sorted(settings.items())),
        )

    def preprocessor(self, spec: PolicySpec) -> SmolVLAPreprocessor:
        return SmolVLAPreprocessor(spec)

    def format_info(self, policy: Policy) -> dict[str, Any]:
        return {"family": NAME, "label": self.label, "format": policy.meta.get("format", "lerobot policy directory"),
                "tokenizer": policy.meta.get("tokenizer"), "lerobot_version": policy.meta.get("lerobot_version"),
                "lerobot_semantics": policy.meta.get("lerobot_semantics")}

    # -- students ---------------------------------------------------------------------------

    def depths(self, config: SmolVLAConfig) -> dict[str, int]:
        return {"vision": config.vision_layers, "backbone": config.num_vlm_layers, "expert": config.num_expert_layers}

    def mlp_widths(self, config: SmolVLAConfig) -> dict[str, list[int]]:
        return {"vision": list(config.vision_mlp), "backbone": list(config.text_mlp), "expert": list(config.expert_mlp)}

    def resolve_layers(self, config: SmolVLAConfig, request: dict[str, Any], source: str) -> dict[str, list[int]]:
        """Vision layers: any subset. VLM and expert layers: coupled by lerobot's layout. The student
        keeps expert layers E (teacher indices) and, for each, the VLM layers it spans
        (``e * m .. e * m + m - 1``, m = VLM layers per expert layer), so every kept expert reads the
        K/V of the VLM layer it was trained on, and its layer type (self- or cross-attention) at its
        new position is the one its projections were made for."""
        unknown = sorted(set(request) - set(PARTS))
        if unknown:
            raise ConfigError(f"distill.layers names parts {unknown}; the {self.label} family has {list(PARTS)}", source=source)
        out = {"vision": layers_from_request(request.get("vision"), config.vision_layers, "distill.layers.vision", source)}
        m = config.expert_stride
        if request.get("expert") is not None:
            experts = self._expert_request(config, request["expert"], "distill.layers.expert", source)
            if request.get("backbone") is not None:
                want = layers_from_request(request["backbone"], config.num_vlm_layers, "distill.layers.backbone", source)
                spans = [e * m + r for e in experts for r in range(m)]
                if not isinstance(request["backbone"], (list, tuple)) and len(want) != len(spans):
                    raise ConfigError(
                        f"distill.layers asks for {len(want)} VLM layers and {len(experts)} expert layers; in SmolVLA each "
                        f"expert layer spans {m} VLM layer(s), so the two follow each other",
                        source=source, hint="give one of them for SmolVLA, e.g. per_family.smolvla.layers = { vision = 0.5, backbone = 0.5 }")
                if isinstance(request["backbone"], (list, tuple)) and want != spans:
                    raise ConfigError(
                        f"distill.layers.backbone = {want} does not match the kept expert layers {experts}: each expert layer "
                        f"spans VLM layers e*{m} .. e*{m}+{m - 1}, so the VLM layers are {spans}",
                        source=source, hint="give either the backbone or the expert layers; the other follows")
        elif request.get("backbone") is not None:
            value = request["backbone"]
            if isinstance(value, (list, tuple)):
                want = layers_from_request(value, config.num_vlm_layers, "distill.layers.backbone", source)
                experts = sorted({i // m for i in want})
                if [e * m + r for e in experts for r in range(m)] != want:
                    raise ConfigError(f"distill.layers.backbone = {want}: with {m} VLM layers per expert layer, keep whole "
                                      f"groups e*{m} .. e*{m}+{m - 1}", source=source)
                self._check_types(config, experts, source)
            else:
                experts = self._expert_request(config, value, "distill.layers.backbone", source)
        else:
            experts = list(range(config.num_expert_layers))
        out["expert"] = experts
        out["backbone"] = [e * m + r for e in experts for r in range(m)]
        return out

    def _expert_request(self, config: SmolVLAConfig, value, where: str, source: str) -> list[int]:
        n_e = config.num_expert_layers
        if isinstance(value, (list, tuple)):
            experts = layers_from_request(value, n_e, where, source)
            self._check_types(config, experts, source)
            return experts
        k = len(layers_from_request(value, n_e, where, source))
        return self._pick_experts(config, k)

    def _types_ok(self, config: SmolVLAConfig, experts: list[int]) -> bool:
        m = config.expert_stride
        if config.cross and config.self_attn_every_n_layers > 0:
            for j, e in enumerate(experts):
                if config.is_self_attn(j * m) != config.is_self_attn(e * m):
                    return False
        return True

    def _check_types(self, config: SmolVLAConfig, experts: list[int], source: str) -> None:
        if not self._types_ok(config, experts):
            n, m = config.self_attn_every_n_layers, config.expert_stride
            kinds = ["self" if config.is_self_attn(e * m) else "cross" for e in experts]
            raise ConfigError(
                f"distill.layers: the kept expert layers {experts} are {kinds}-attention layers in the teacher, but at "
                f"their new positions every {n}th layer is self-attention (self_attn_every_n_layers = {n})",
                source=source, hint=f"keep layers whose self/cross pattern repeats every {n} (e.g. {self._pick_experts(config, len(experts))})")

    def _pick_experts(self, config: SmolVLAConfig, k: int) -> list[int]:
        """``k`` expert layers, spread like ``evenly_spaced`` but each of the attention type its new
        position needs (with self-attention every n layers, each kept n-group of the pattern)."""
        n_e, m = config.num_expert_layers, config.expert_stride
        if self._types_ok(config, evenly_spaced(n_e, k)):
            return evenly_spaced(n_e, k)
        picked: list[int] = []
        for j, target in enumerate(np.linspace(0, n_e - 1, k) if k > 1 else [0.0]):
            need = config.is_self_attn(j * m)
            lo = picked[-1] + 1 if picked else 0
            cands = [e for e in range(lo, n_e - (k - j - 1)) if config.is_self_attn(e * m) == need]
            if not cands:
                raise ConfigError(f"no {k} expert layers of the teacher's {n_e} fit the self/cross-attention pattern",
                                  source="recipe stage distill", hint="keep more layers, or list them")
            picked.append(min(cands, key=lambda e: (abs(e - target), e)))
        return picked

    def student_config(self, config: SmolVLAConfig, layers, mlp, flow_steps) -> SmolVLAConfig:
        v, b, e = layers.get("vision"), layers.get("backbone"), layers.get("expert")
        v = v if v is not None else list(range(config.vision_layers))
        b = b if b is not None else list(range(config.num_vlm_layers))
        e = e if e is not None else list(range(config.num_expert_layers))
        cfg = replace(
            config,
            vision_heads=tuple(config.vision_heads[i] for i in v),
            vision_mlp=tuple(mlp.get("vision", [config.vision_mlp[i] for i in v])),
            text_mlp=tuple(mlp.get("backbone", [config.text_mlp[i] for i in b])),
            expert_mlp=tuple(mlp.get("expert", [config.expert_mlp[i] for i in e])),
            expert_kv_in=tuple(config.expert_kv_in[i] for i in e),
            num_steps=config.num_steps if flow_steps is None else flow_steps,
        )
        cfg.validate("distill student")
        return cfg

    def describe(self, config: SmolVLAConfig) -> str:
        return f"{config.vision_layers} vision + {config.num_vlm_layers} VLM + {config.num_expert_layers} expert layers"

    # -- pruning ----------------------------------------------------------------------------

    def prune_groups(self, policy: Policy, parts, what) -> list[PruneGroup]:
        cfg: SmolVLAConfig = policy.config
        groups: list[PruneGroup] = []
        if "vision" in parts:
            groups += vision_prune_groups(cfg, what)
        # MLP channels of the VLM's text layers (the last one's MLP feeds nothing, so it has no ranking)
        # and of the expert. Their heads are not pruned: the expert's cross-attention reads the VLM's
        # K/V heads, and lerobot's layout has one head count for both; nor whole layers: distill picks
        # those under the layout's rules.
        if "backbone" in parts and "mlp" in what:
            for i in range(cfg.num_vlm_layers - 1):
                groups.append(PruneGroup("mlp", "backbone", i, cfg.text_mlp[i], (Probe("mlp", f"text.layers.{i}.mlp.down_proj", "input", "abs"),)))
        if "expert" in parts and "mlp" in what:
            for i in range(cfg.num_expert_layers):
                groups.append(PruneGroup("mlp", "expert", i, cfg.expert_mlp[i], (Probe("mlp", f"expert.layers.{i}.mlp.down_proj", "input", "abs"),)))
        return groups

    def pruned_config(self, config: SmolVLAConfig, layers, heads, mlp) -> SmolVLAConfig:
        return pruned_config(config, self.depths(config), layers, heads, mlp, "SmolVLA", "choose VLM / expert layers in distill (distill.layers)")

    def restructure(self, source: Policy, config: SmolVLAConfig, layers=None, keep=None) -> Policy:
        layers = layers or {}
        keep = keep or {}
        src_cfg: SmolVLAConfig = source.config
        out = self.new_policy(config)
        prefixes = {"vision": "vision.layers.", "backbone": "text.layers.", "expert": "expert.layers."}
        new_state = sliced_state(source, out.module.state_dict(), layers, keep, prefixes, src_cfg.vision_heads)
        out.module.load_state_dict(new_state)
        out.module.eval()
        out.spec = self.spec_of(out.module, tokenizer_dir=Path(source.spec.processor_settings["tokenizer_dir"]))
        out.meta = {"derived_from": source.meta.get("weights_sha256") or source.meta.get("derived_from"),
                    "tokenizer": source.meta.get("tokenizer"), "format": "vlacompile student in lerobot's SmolVLA layout",
                    "lerobot_version": source.meta.get("lerobot_version"), "lerobot_semantics": source.meta.get("lerobot_semantics")}
        return out

    # -- training, quantisation, cost -------------------------------------------------------

    def action_scale(self, policy: Policy) -> torch.Tensor:
        return policy.module.normalize.action.scale() * torch.ones(policy.config.action_dim)

    def state_scale(self, policy: Policy) -> np.ndarray | None:
        norm = policy.module.normalize.state
        return None if norm.mode == "IDENTITY" else (norm.scale() * torch.ones(policy.config.state_dim)).numpy()

    def default_quant_excludes(self, config) -> tuple[str, ...]:
        return DEFAULT_QUANT_EXCLUDE

    def flops(self, config: SmolVLAConfig) -> dict[str, float]:
        return flops(config)

    def split_plan(self, policy: Policy) -> SplitPlan:
        cfg: SmolVLAConfig = policy.config
        if cfg.adapt_to_pi_aloha:
            raise NotImplementedError("adapt_to_pi_aloha's gripper transform runs only inside the single graph")
        m = policy.module
        carry = []
        j = 0
        for i in range(cfg.num_vlm_layers):
            if cfg.expert_at(i) is not None:
                carry += [f"k_{j}", f"v_{j}"]
                j += 1
        images = tuple(f"images.{c.name}" for c in cfg.cameras)
        return SplitPlan(
            system2=part_module(m, "prefix"),
            system2_inputs=(*images, "state", "tokens", "token_mask"),
            system2_outputs=(*carry, "prefix_valid"),
            system1=part_module(m, "velocity"),
            system1_inputs=("x_t", "t", *carry, "prefix_valid"),
            integrator={"kind": "euler", "init": "noise", "x": "x_t", "t": "t", "velocity": "velocity",
                        "times": list(m.times), "update": {"op": "mul", "value": -1.0 / cfg.num_steps}},
            post=[{"op": "slice", "stop": cfg.action_dim}, *m.normalize.action.inverse_ops()],
        )


def flops(cfg: SmolVLAConfig) -> dict[str, float]:
    """FLOPs (2 x multiply-accumulates) of one get_action call per part, for the roofline."""
    def linear(n, i, o):
        return 2.0 * n * i * o

    hw = (cfg.resize[1], cfg.resize[0]) if cfg.resize else (cfg.cameras[0].height, cfg.cameras[0].width)
    patches = (hw[0] // cfg.patch_size) * (hw[1] // cfg.patch_size)
    d = cfg.vision_hidden
    vision = linear(patches, 3 * cfg.patch_size**2, d)
    for h, m in zip(cfg.vision_heads, cfg.vision_mlp):
        inner = h * cfg.vision_head_dim
        vision += 3 * linear(patches, d, inner) + linear(patches, inner, d) + 2 * 2.0 * patches * patches * inner
        vision += linear(patches, d, m) + linear(patches, m, d)
    vision += linear(patches // cfg.scale_factor**2, d * cfg.scale_factor**2, cfg.text_hidden)
    p, dt, hd = cfg.prefix_len, cfg.text_hidden, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.kv_width
    text = 0.0
    for i, m in enumerate(cfg.text_mlp):
        text += linear(p, dt, q + 2 * kv)
        if i < cfg.num_vlm_layers - 1:
            text += 2 * 2.0 * p * p * q + linear(p, q, dt) + 3 * linear(p, dt, m)
        e = cfg.expert_at(i)
        if e is not None and not cfg.is_self_attn(i):
            text += 2 * linear(p, kv, kv)  # the expert's cross-attention K/V, computed once per chunk
    system2 = cfg.num_images * vision + text + linear(1, cfg.max_state_dim, dt)
    c, de = cfg.chunk_size, cfg.expert_hidden
    step = linear(c, cfg.max_action_dim, de) + linear(c, 2 * de, de) + linear(c, de, de) + linear(c, de, cfg.max_action_dim)
    for i in range(cfg.num_vlm_layers):
        e = cfg.expert_at(i)
        if e is None:
            continue
        keys = p + c if cfg.is_self_attn(i) else p
        step += linear(c, de, q) + (linear(c, de, 2 * kv) if cfg.is_self_attn(i) else 0.0)
        step += 2 * 2.0 * c * keys * q + linear(c, q, de) + 3 * linear(c, de, cfg.expert_mlp[e])
    return {"system2": float(system2), "system1_per_step": float(step), "system1": float(step * cfg.num_steps)}


# ---------------------------------------------------------------------------------------------
# Reading lerobot's files into a SmolVLAConfig


def _format_label(pd: PolicyDir, sidecar) -> str:
    kind = "vlacompile student in lerobot's SmolVLA layout" if sidecar else "lerobot SmolVLA policy directory"
    return f"{kind} (processor pipelines: lerobot >= 0.4; {len(pd.preprocessor)} pre / {len(pd.postprocessor)} post steps)"


def _check_steps(pd: PolicyDir) -> None:
    for steps, known, path in ((pd.preprocessor, PRE_STEPS, pd.root / PREPROCESSOR), (pd.postprocessor, POST_STEPS, pd.root / POSTPROCESSOR)):
        for s in steps:
            if s.name not in known:
                raise CheckpointError(
                    f"step {s.index} is {s.name!r}, a processor step vlacompile does not implement for SmolVLA "
                    f"(it implements {sorted(known)})", source=path,
                    hint="this pipeline differs from the one lerobot's SmolVLA writes; compile a policy saved by lerobot's make_smolvla_pre_post_processors")


def _resolve_config(pd: PolicyDir, vlm_dir: Path, state: dict, sidecar, allow_unnormalized: bool, weights_path: Path,
                    lerobot_version: str | None = None):
    c = pd.config
    src = pd.root / "config.json"
    _check_steps(pd)
    if int(c.get("n_obs_steps", 1)) != 1:
        raise CheckpointError(f"n_obs_steps is {c['n_obs_steps']}; SmolVLA runs on one observation", source=src)
    rtc = c.get("rtc_config")
    if isinstance(rtc, dict) and rtc.get("enabled"):
        raise CheckpointError("rtc_config is enabled: real-time chunking needs the previous chunk as an input, which vlacompile's "
                              "policies do not take", source=src, hint="disable rtc_config to compile the plain policy")
    vlm_cfg = read_json(vlm_dir / "config.json", "SmolVLM2 backbone config (config.json)")
    text, vision = vlm_cfg.get("text_config") or {}, vlm_cfg.get("vision_config") or {}
    vsrc = vlm_dir / "config.json"

    def need(d: dict, key: str, where: str):
        if key not in d:
            raise CheckpointError(f"{where} has no {key!r}", source=vsrc, hint="use the SmolVLM2 config.json the policy was trained with")
        return d[key]

    # Processor pipelines.
    tok_step = pd.step("pre", "tokenizer_processor")
    if tok_step is None or pd.step("post", "unnormalizer_processor") is None:
        raise CheckpointError("the pipelines lack a tokenizer_processor or unnormalizer_processor step", source=pd.root / PREPROCESSOR)
    visual, state_f, action_f, back = policy_features(pd)
    empty = int(c.get("empty_cameras", 0))

    norms = Normalisers(pd, allow_unnormalized)

    state_dim, action_dim = state_f.shape[0], action_f.shape[0]
    state_norm = norms.mode(state_f, "state", (state_dim,))
    action_norm = norms.mode(action_f, "action", (action_dim,))
    cameras = []
    visual_modes = set()
    for i, f in enumerate(visual):
        mode = norms.mode(f, f"images.{i}", (3, 1, 1))
        visual_modes.add(mode)
        name = camera_name(back.get(f.key, f.key))
        cameras.append(Camera(f.key, name, f.shape[1], f.shape[2], normalized=mode != "IDENTITY"))
    visual_norm = next((m for m in visual_modes if m != "IDENTITY"), "IDENTITY")

    # Sizes: the weights say the per-layer widths; the configs say the rest.
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"the weights lack {key!r}", source=weights_path, hint="the checkpoint is incomplete or not SmolVLA")
        return tuple(state[key].shape)

    vt = "model.vlm_with_expert.vlm.model.vision_model.encoder.layers"
    tt = "model.vlm_with_expert.vlm.model.text_model.layers"
    et = "model.vlm_with_expert.lm_expert.layers"

    def count(prefix: str) -> int:
        idx = {int(k[len(prefix) + 1:].split(".")[0]) for k in state if k.startswith(prefix + ".")}
        return max(idx) + 1 if idx else 0

    n_vision, n_text, n_expert = count(vt), count(tt), count(et)
    num_vlm = int(c.get("num_vlm_layers", 16))
    total_text = int(need(text, "num_hidden_layers", "text_config"))
    want_vlm = num_vlm if num_vlm > 0 else total_text
    want_expert = int(c.get("num_expert_layers", -1))
    want_expert = want_expert if want_expert > 0 else want_vlm
    if n_text != want_vlm or n_expert != want_expert:
        raise CheckpointError(f"the weights hold {n_text} VLM text layers and {n_expert} expert layers; config.json says "
                              f"{want_vlm} and {want_expert}", source=weights_path,
                              hint="config.json and the weights come from different policies")
    vision_cfg_layers = int(need(vision, "num_hidden_layers", "vision_config"))
    if sidecar is None and n_vision != vision_cfg_layers:
        raise CheckpointError(f"the weights hold {n_vision} vision layers; the backbone config says {vision_cfg_layers}",
                              source=weights_path, hint="the checkpoint's VLM differs from the tokenizer directory's config.json")
    v_hidden = int(need(vision, "hidden_size", "vision_config"))
    v_heads_cfg = int(need(vision, "num_attention_heads", "vision_config"))
    v_head_dim = v_hidden // v_heads_cfg
    t_hidden = int(need(text, "hidden_size", "text_config"))
    heads = int(need(text, "num_attention_heads", "text_config"))
    kv_heads = int(text.get("num_key_value_heads", heads))
    head_dim = int(text.get("head_dim") or t_hidden // heads)
    mult = float(c.get("expert_width_multiplier", 0.75))
    expert_hidden = int(t_hidden * mult)

    tok_cfg = tok_step.config
    tokenizer = TextTokenizer(vlm_dir, max_length=int(tok_cfg.get("max_length", c.get("tokenizer_max_length", 48))),
                              padding_side=str(tok_cfg.get("padding_side", "right")), truncation=bool(tok_cfg.get("truncation", True)))
    rows = shape("model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight")[0]
    if tokenizer.vocab_size > rows:  # another model's tokenizer still makes ids: the build would pass on prompts never seen
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's token embedding has {rows} rows: "
                              "it is another model's tokenizer", source=vlm_dir / TOKENIZER_FILE,
                              hint="pass --tokenizer with the SmolVLM2 directory the policy was trained with (vlm_model_name)")
    fake = tokenizer.extra_tokens.get("fake_image_token") or "<fake_token_around_image>"
    glob = tokenizer.extra_tokens.get("global_image_token") or "<global-img>"
    add_special = bool(c.get("add_image_special_tokens", False))
    start_ids = (tokenizer.token_id(fake), tokenizer.token_id(glob))
    if add_special and None in start_ids:
        raise CheckpointError(f"add_image_special_tokens is set, but the tokenizer has no {fake!r} / {glob!r} tokens",
                              source=vlm_dir / TOKENIZER_FILE)
    resize = c.get("resize_imgs_with_padding")
    attention_mode = str(c.get("attention_mode", "cross_attn"))
    patch = int(need(vision, "patch_size", "vision_config"))
    hw = (int(resize[1]), int(resize[0])) if resize else (cameras[0].height, cameras[0].width)
    grid = (hw[0] // patch, hw[1] // patch, int(need(vision, "image_size", "vision_config")) // patch)
    semantics = _lerobot_semantics(pd, sidecar, lerobot_version, grid)
    notes = [*norms.notes, *semantics["notes"]]

    cfg = SmolVLAConfig(
        cameras=tuple(cameras), state_key=state_f.key, state_name=back.get(state_f.key, state_f.key), state_dim=state_dim,
        action_dim=action_dim, empty_cameras=empty,
        chunk_size=int(c.get("chunk_size", 50)), num_steps=int(c.get("num_steps", 10)),
        max_state_dim=int(c.get("max_state_dim", 32)), max_action_dim=int(c.get("max_action_dim", 32)),
        min_period=float(c.get("min_period", 4e-3)), max_period=float(c.get("max_period", 4.0)),
        resize=(int(resize[0]), int(resize[1])) if resize else None, patch_positions=semantics["patch_positions"],
        tokenizer_max_length=tokenizer.max_length, padding=str(tok_cfg.get("padding", "longest")),
        padding_side=tokenizer.padding_side, truncation=tokenizer.truncation,
        append_newline=pd.step("pre", "smolvla_new_line_processor") is not None,
        add_image_special_tokens=add_special,
        image_start_tokens=tuple(int(i or 0) for i in start_ids), image_end_tokens=(int(start_ids[0] or 0),),
        prefix_length=int(c.get("prefix_length", -1)),
        attention_mode=attention_mode, self_attn_every_n_layers=int(c.get("self_attn_every_n_layers", -1)),
        vision_hidden=v_hidden, vision_head_dim=v_head_dim,
        vision_heads=tuple(shape(f"{vt}.{i}.self_attn.q_proj.weight")[0] // v_head_dim for i in range(n_vision)),
        vision_mlp=tuple(shape(f"{vt}.{i}.mlp.fc1.weight")[0] for i in range(n_vision)),
        vision_image_size=int(need(vision, "image_size", "vision_config")), patch_size=int(need(vision, "patch_size", "vision_config")),
        vision_eps=float(vision.get("layer_norm_eps", 1e-6)), vision_act=str(vision.get("hidden_act", "gelu_pytorch_tanh")),
        scale_factor=int(vlm_cfg.get("scale_factor", 2)),
        text_hidden=t_hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_eps=float(text.get("rms_norm_eps", 1e-5)), vocab_size=shape(f"model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight")[0],
        text_act=str(text.get("hidden_act", "silu")), attention_bias=bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)),
        text_mlp=tuple(shape(f"{tt}.{i}.mlp.gate_proj.weight")[0] for i in range(n_text)),
        expert_hidden=expert_hidden,
        expert_mlp=tuple(shape(f"{et}.{i}.mlp.gate_proj.weight")[0] for i in range(n_expert)),
        expert_kv_in=tuple(shape(f"{et}.{i}.self_attn.k_proj.weight")[1] for i in range(n_expert)),
        state_norm=state_norm, action_norm=action_norm, visual_norm=visual_norm,
        adapt_to_pi_aloha=bool(c.get("adapt_to_pi_aloha", False)),
        source={"config": c, PREPROCESSOR: (pd.root / PREPROCESSOR).read_text(), POSTPROCESSOR: (pd.root / POSTPROCESSOR).read_text(),
                "state_files": {s.state_file: pd.step_state(s) for s in (*pd.preprocessor, *pd.postprocessor) if s.state_file},
                "tokenizer_dir": str(vlm_dir), "lerobot_semantics": semantics},
    )
    if resize is None and any((cam.height, cam.width) != (cfg.cameras[0].height, cfg.cameras[0].width) for cam in cfg.cameras):
        raise CheckpointError("cameras of different sizes without resize_imgs_with_padding", source=src)
    if shape("model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight")[1] != t_hidden:
        raise CheckpointError("the text embedding width differs from the backbone config's hidden_size", source=weights_path,
                              hint="the tokenizer directory's config.json is not this policy's VLM")
    cfg.validate(str(src))
    return cfg, norms.buffers, notes


def _lerobot_semantics(pd: PolicyDir, sidecar, named: str | None, grid: tuple[int, int, int]) -> dict[str, Any]:
    """Which lerobot's semantics the policy is compiled with: {patch_positions, lerobot_version (a
    release line, or None where it does not matter), summary (how it was decided), notes}.

    In order: the version the user names; a vlacompile student's sidecar (the semantics it was
    built under); config.json's ``pretrained_revision``, a field lerobot >= 0.6 writes and older
    lerobot rejects (draccus refuses unknown fields), so the policy runs on transformers 5. A policy
    saved by lerobot 0.4 or 0.5 says neither: when the two conventions give this policy's image grid
    different position ids, it is refused with a request to name the version; never guessed."""
    c, src = pd.config, pd.root / "config.json"
    h, w, per_side = grid
    same = all(torch.equal(_navit_position_ids(h, w, per_side, "transformers4"), _navit_position_ids(h, w, per_side, pp))
               for pp in PATCH_POSITIONS)
    written_by_06 = "pretrained_revision" in c
    notes: list[str] = []
    side_pp = (sidecar or {}).get("patch_positions")
    if named is not None:
        line = parse_lerobot_version(named)
        pp, how = LEROBOT_VERSIONS[line], f"named (--lerobot-version {named})"
        if written_by_06 and line == "0.4":
            notes.append("config.json has pretrained_revision, which lerobot >= 0.6 writes and lerobot 0.4 does not read; "
                         "compiled with lerobot 0.4's semantics as named")
        if side_pp in PATCH_POSITIONS and side_pp != pp:
            notes.append(f"this vlacompile student was built under {side_pp} patch positions; compiled with {pp} as named")
    elif side_pp in PATCH_POSITIONS:
        line, pp = (sidecar or {}).get("lerobot_version"), side_pp
        how = "from vlacompile.json (the semantics the student was built under)"
    elif written_by_06:
        line, pp = "0.6", "transformers5"
        how = "detected: config.json has pretrained_revision, which lerobot >= 0.6 writes"
    elif same:
        line, pp = None, "transformers5"
        how = f"either: lerobot 0.4 and >= 0.5 give the same patch positions for a {h}x{w} patch grid"
    else:
        raise CheckpointError(
            "does not say which lerobot runs this policy, and that decides its output: lerobot 0.4.x (transformers 4) "
            "and lerobot 0.5 / 0.6 (transformers 5) number the vision tower's image patches differently "
            f"({PATCH_POSITIONS['transformers4']} vs {PATCH_POSITIONS['transformers5']} for patch i of n), and on the same checkpoint "
            "their action chunks differ by up to tenths. The config.json has no pretrained_revision, so lerobot 0.4 or 0.5 "
            "saved it, and either may run it", source=src,
            hint="pass --lerobot-version with the lerobot release you run the policy with (e.g. --lerobot-version 0.4 or "
            "--lerobot-version 0.6; load_policy(..., lerobot_version=...) in Python)")
    summary = f"{PATCH_LABELS[pp]} patch positions ({PATCH_POSITIONS[pp]}), {how}" if not same else f"patch positions {how}"
    return {"patch_positions": pp, "lerobot_version": line, "summary": summary, "notes": notes}


def student_vlm_config(vlm: dict[str, Any], cfg: SmolVLAConfig) -> dict[str, Any]:
    """The VLM config.json lerobot builds ``cfg`` from: the source's, with the policy's vision and text
    depths and, where a part has one MLP width, that width (``lerobot_gaps`` names what else differs)."""
    out = json.loads(json.dumps(vlm))
    vision, text = out.setdefault("vision_config", {}), out.setdefault("text_config", {})
    vision["num_hidden_layers"] = cfg.vision_layers
    text["num_hidden_layers"] = cfg.num_vlm_layers
    if len(set(cfg.vision_mlp)) == 1:
        vision["intermediate_size"] = cfg.vision_mlp[0]
    if len(set(cfg.text_mlp)) == 1:
        text["intermediate_size"] = cfg.text_mlp[0]
    return out


FAMILY = SmolVLAFamily()  # what the registry (vlacompile.families) reads
