"""pi0 / pi0.5's hooks: LeRobot's policy directory in (``"type": "pi0"`` / ``"pi05"``, lerobot >= 0.5),
the same layout out, students that keep the backbone and expert paired layer for layer, prune
groups, the System 2 (per-layer K/V) / System 1 split."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlacompile.checkpoint import check_and_load_state, read_json, read_weights, weights_digest
from vlacompile.errors import CheckpointError, ConfigError
from vlacompile.families.base import Family, Probe, PruneGroup, SplitPlan, layers_from_request, part_module
from vlacompile.families.lerobot_layout import (camera_name, definition_digest, policy_features, pruned_config, sliced_state,
                                                vision_prune_groups, write_policy_dir)
from vlacompile.families.pi0.configuration import FAMILY as NAME
from vlacompile.families.pi0.configuration import QUERY_HEADS, VISION_HEADS, Pi0Config
from vlacompile.families.pi0.modeling import Pi0
from vlacompile.families.pi0.processor import PALIGEMMA, Pi0Preprocessor, resolve_tokenizer_dir
from vlacompile.lerobot.tokenizer import check_tokenizer_fits
from vlacompile.lerobot.policy_dir import PREPROCESSOR, POSTPROCESSOR, Camera, Normalisers, PolicyDir, read_policy_dir
from vlacompile.policy import CameraSpec, FlowHead, InputSpec, Policy, PolicySpec

SIDECAR = "vlacompile.json"  # per-layer sizes lerobot's config cannot say (lerobot knows only gemma_2b / gemma_300m)
TOKENIZER_DIR = "tokenizer"  # the PaliGemma tokenizer, copied into saved policies so they are self-contained
TYPES = {"pi0": "pi0", "pi05": "pi05"}
LABELS = {"pi0": "LeRobot pi0", "pi05": "LeRobot pi0.5"}
# The pipelines lerobot >= 0.5 writes; 0.4.x has no relative_actions_processor step.
PRE_STEPS = {
    "pi0": {"rename_observations_processor", "to_batch_processor", "pi0_new_line_processor", "tokenizer_processor",
            "device_processor", "relative_actions_processor", "normalizer_processor"},
    "pi05": {"rename_observations_processor", "to_batch_processor", "relative_actions_processor", "normalizer_processor",
             "pi05_prepare_state_tokenizer_processor_step", "tokenizer_processor", "device_processor"},
}
POST_STEPS = {"unnormalizer_processor", "absolute_actions_processor", "device_processor"}
LEROBOT = "model.paligemma_with_expert."
KEY_MAP = (
    (LEROBOT + "paligemma.model.vision_tower.vision_model.embeddings.", "vision.embeddings."),
    (LEROBOT + "paligemma.model.vision_tower.vision_model.encoder.layers.", "vision.layers."),
    (LEROBOT + "paligemma.model.vision_tower.vision_model.post_layernorm.", "vision.post_layernorm."),
    (LEROBOT + "paligemma.model.multi_modal_projector.linear.", "vision.projector."),
    (LEROBOT + "paligemma.model.language_model.", "backbone."),
    (LEROBOT + "gemma_expert.model.", "expert."),
    ("model.", ""),
)
UNUSED = (LEROBOT + "paligemma.lm_head.", LEROBOT + "gemma_expert.lm_head.")  # pi0 never decodes text
EMBED = LEROBOT + "paligemma.model.language_model.embed_tokens.weight"
PARTS = ("vision", "backbone", "expert")
# PaliGemma's (Gemma's) tokenizer: what a pi0 / pi0.5 checkpoint's token embedding was trained on.
TOKENIZER_CLASSES = ("Gemma", "PaliGemma")
GEMMA_SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
# Kept in higher precision: the pixel and flow-time inputs and the action projections.
DEFAULT_QUANT_EXCLUDE = {"pi0": ("vision.embeddings.patch_embedding", "state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in"),
                         "pi05": ("vision.embeddings.patch_embedding", "action_in_proj", "action_out_proj", "time_mlp_in")}


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


def lerobot_state(state: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """lerobot's key fixes on load (``_fix_pytorch_state_dict_keys``): openpi's keys without the
    ``model.`` prefix get it; pi0 names the time MLP ``action_time_mlp_*``, pi0.5 ``time_mlp_*`` and
    has no ``state_proj``; a tied embedding saved only as the LM head becomes the embedding."""
    out = {}
    for k, v in state.items():
        k = str(k)
        k = k if k.startswith("model.") else "model." + k
        if variant == "pi0":
            k = re.sub(r"^model\.time_mlp_(in|out)\.", r"model.action_time_mlp_\1.", k)
        else:
            k = re.sub(r"^model\.action_time_mlp_(in|out)\.", r"model.time_mlp_\1.", k)
            if k.startswith("model.state_proj."):
                continue
        out[k] = v
    if EMBED not in out and LEROBOT + "paligemma.lm_head.weight" in out:
        out[EMBED] = out[LEROBOT + "paligemma.lm_head.weight"]
    return out


class Pi0Family(Family):
    name = NAME
    label = "LeRobot pi0 / pi0.5"
    parts = PARTS
    config_cls = Pi0Config

    # -- checkpoints ------------------------------------------------------------------------

    def matches(self, config_json: dict[str, Any]) -> bool:
        return config_json.get("type") in TYPES

    def load(self, ckpt: Path, *, allow_pickle: bool = False, tokenizer: Path | None = None,
             allow_unnormalized: bool = False) -> Policy:
        pd = read_policy_dir(ckpt)
        variant = TYPES[pd.type]
        tok_step = pd.step("pre", "tokenizer_processor")
        tok_name = str((tok_step.config.get("tokenizer_name") if tok_step else None) or PALIGEMMA)
        tok_dir = resolve_tokenizer_dir(tok_name, tokenizer, ckpt)
        raw, files = read_weights(ckpt, allow_pickle=allow_pickle)
        state = lerobot_state(raw, variant)
        sidecar = read_json(ckpt / SIDECAR) if (ckpt / SIDECAR).is_file() else None
        config, stats, notes = _resolve_config(pd, variant, tok_dir, state, allow_unnormalized, files[0])
        # Another model's tokenizer (SmolVLM's, say) still yields ids below the embedding's rows: check it is PaliGemma's.
        check_tokenizer_fits(tok_dir, model=LABELS[variant], expected=tok_name, embedding_rows=config.vocab_size, classes=TOKENIZER_CLASSES,
                             special=GEMMA_SPECIAL, first_token="<bos>")
        module = Pi0(config)
        remapped = {}
        for k, v in state.items():
            mk = to_module_key(k)
            if mk is None and not k.startswith(UNUSED) or (mk is not None and mk.startswith("paligemma_with_expert.")):
                raise CheckpointError(f"tensor {k!r} is not one a {LABELS[variant]} policy has", source=files[0],
                                      hint="the weights are not lerobot pi0 / pi0.5 weights, or come from another variant")
            if mk is not None:
                remapped[mk] = v
        remapped.update(stats)
        check_and_load_state(module, remapped, files[0])
        module.eval()
        meta = {
            "source": str(ckpt), "weights_sha256": weights_digest(files), "format": _format_label(pd, variant, sidecar),
            "tokenizer": str(tok_dir), "definition_sha256": definition_digest(ckpt, tok_dir), "notes": notes,
            **({"allow_unnormalized": True} if allow_unnormalized else {}),
            **({"derived_from": sidecar.get("derived_from")} if sidecar else {}),
        }
        return Policy(module=module, config=config, spec=self.spec_of(module, tokenizer_dir=tok_dir), family=NAME, meta=meta)

    def save(self, policy: Policy, out: Path) -> Path:
        """lerobot's layout (config.json, model.safetensors, both pipelines and their normaliser
        files), plus tokenizer/ and vlacompile.json (per-layer sizes). A student with the teacher's
        sizes is read by lerobot as it is; other sizes need vlacompile (lerobot builds only the
        published variants)."""
        cfg: Pi0Config = policy.config
        src = cfg.source
        config = dict(src["config"])
        config.update(num_inference_steps=cfg.num_steps)
        sidecar = {"format": 1, "variant": cfg.variant, "vision_heads": list(cfg.vision_heads), "vision_mlp": list(cfg.vision_mlp),
                   "text_mlp": list(cfg.text_mlp), "expert_mlp": list(cfg.expert_mlp), "derived_from": policy.meta.get("derived_from")}
        return write_policy_dir(policy, out, config, to_lerobot_key, TOKENIZER_DIR, (".json", ".txt", ".model"), (SIDECAR, sidecar))

    def build(self, config: Pi0Config) -> Pi0:
        return Pi0(config)

    def spec_of(self, module: Pi0, tokenizer_dir: Path | None = None) -> PolicySpec:
        cfg = module.cfg
        if tokenizer_dir is None:
            tokenizer_dir = Path(cfg.source.get("tokenizer_dir", ""))
        inputs = [InputSpec(f"images.{c.name}", (3, c.height, c.width), "uint8", "image", camera=c.name) for c in cfg.cameras]
        if not cfg.pi05:
            inputs.append(InputSpec("state", (cfg.state_dim,), "float32", "state"))
        inputs += [
            InputSpec("tokens", (cfg.tokenizer_max_length,), "int64", "tokens", low=0, high=cfg.vocab_size),
            InputSpec("token_mask", (cfg.tokenizer_max_length,), "bool", "token_mask"),
            InputSpec("noise", (cfg.chunk_size, cfg.max_action_dim), "float32", "noise"),
        ]
        scale = module.normalize.action
        mean = scale.mean if scale.mode == "MEAN_STD" else torch.zeros(cfg.action_dim)
        std = scale.scale() * torch.ones(cfg.action_dim)
        norm = module.normalize.state
        settings = {"tokenizer_dir": str(tokenizer_dir), "max_length": cfg.tokenizer_max_length, "padding_side": cfg.padding_side,
                    "truncation": cfg.truncation, "append_newline": cfg.append_newline, "variant": cfg.variant}
        if cfg.pi05:  # the preprocessor writes the normalised state into the prompt
            settings["state_norm"] = norm.mode
            settings["state_stats"] = {n: [float(v) for v in b.reshape(-1)] for n, b in norm.named_buffers()}
        system2 = ("vision", "backbone") + (() if cfg.pi05 else ("state_proj",))
        system1 = ("expert", "action_in_proj", "action_out_proj") + (
            ("time_mlp_in", "time_mlp_out") if cfg.pi05 else ("action_time_mlp_in", "action_time_mlp_out"))
        return PolicySpec(
            family=NAME,
            cameras=tuple(CameraSpec(c.name, c.height, c.width) for c in cfg.cameras),
            state_dim=cfg.state_dim, action_dim=cfg.action_dim, chunk_size=cfg.chunk_size, flow_steps=cfg.num_steps,
            max_tokens=cfg.tokenizer_max_length, control_hz=cfg.control_hz,
            action_mean=tuple(float(v) for v in mean), action_std=tuple(float(v) for v in std),
            system2=system2, system1=system1, inputs=tuple(inputs),
            head=FlowHead(cfg.num_steps, 1.0, 0.0, (cfg.chunk_size, cfg.max_action_dim)),
            processor=tuple(sorted(settings.items())),
        )

    def preprocessor(self, spec: PolicySpec) -> Pi0Preprocessor:
        return Pi0Preprocessor(spec)

    def format_info(self, policy: Policy) -> dict[str, Any]:
        return {"family": NAME, "label": LABELS[policy.config.variant], "variant": policy.config.variant,
                "format": policy.meta.get("format", "lerobot policy directory"), "tokenizer": policy.meta.get("tokenizer")}

    # -- students ---------------------------------------------------------------------------

    def depths(self, config: Pi0Config) -> dict[str, int]:
        return {"vision": config.vision_layers, "backbone": config.depth, "expert": config.depth}

    def mlp_widths(self, config: Pi0Config) -> dict[str, list[int]]:
        return {"vision": list(config.vision_mlp), "backbone": list(config.text_mlp), "expert": list(config.expert_mlp)}

    def resolve_layers(self, config: Pi0Config, request: dict[str, Any], source: str) -> dict[str, list[int]]:
        """Vision layers: any subset. Backbone and expert layers: the same indices, since expert
        layer i attends over backbone layer i's K/V (lerobot zips the two stacks)."""
        unknown = sorted(set(request) - set(PARTS))
        if unknown:
            raise ConfigError(f"distill.layers names parts {unknown}; the pi0 family has {list(PARTS)}", source=source)
        out = {"vision": layers_from_request(request.get("vision"), config.vision_layers, "distill.layers.vision", source)}
        b, e = request.get("backbone"), request.get("expert")
        pb = layers_from_request(b, config.depth, "distill.layers.backbone", source) if b is not None else None
        pe = layers_from_request(e, config.depth, "distill.layers.expert", source) if e is not None else None
        if pb is not None and pe is not None and pb != pe:
            raise ConfigError(f"distill.layers keeps backbone layers {pb} and expert layers {pe}; in pi0 expert layer i attends over "
                              "backbone layer i's K/V, so both keep the same layers", source=source,
                              hint="give one of them, e.g. per_family.pi0.layers = { vision = 0.5, backbone = 0.5 }")
        keep = pb if pb is not None else pe if pe is not None else list(range(config.depth))
        out["backbone"] = out["expert"] = keep
        return out

    def student_config(self, config: Pi0Config, layers, mlp, flow_steps) -> Pi0Config:
        v = layers.get("vision") or list(range(config.vision_layers))
        b = layers.get("backbone") or list(range(config.depth))
        e = layers.get("expert") or b
        cfg = replace(
            config,
            vision_heads=tuple(config.vision_heads[i] for i in v),
            vision_mlp=tuple(mlp.get("vision", [config.vision_mlp[i] for i in v])),
            text_mlp=tuple(mlp.get("backbone", [config.text_mlp[i] for i in b])),
            expert_mlp=tuple(mlp.get("expert", [config.expert_mlp[i] for i in e])),
            num_steps=config.num_steps if flow_steps is None else flow_steps,
        )
        cfg.validate("distill student")
        return cfg

    def describe(self, config: Pi0Config) -> str:
        return f"{config.variant}: {config.vision_layers} vision + {config.depth} backbone + {config.depth} expert layers"

    # -- pruning ----------------------------------------------------------------------------

    def prune_groups(self, policy: Policy, parts, what) -> list[PruneGroup]:
        cfg: Pi0Config = policy.config
        groups: list[PruneGroup] = []
        if "vision" in parts:
            groups += vision_prune_groups(cfg, what)
        # MLP channels of the backbone (its last MLP feeds nothing, so it has no ranking) and the
        # expert. Their heads are not pruned (the expert's attention concatenates the backbone's
        # K/V heads: one head layout for both), nor whole layers (distill picks those, paired).
        if "backbone" in parts and "mlp" in what:
            for i in range(cfg.depth - 1):
                groups.append(PruneGroup("mlp", "backbone", i, cfg.text_mlp[i], (Probe("mlp", f"backbone.layers.{i}.mlp.down_proj", "input", "abs"),)))
        if "expert" in parts and "mlp" in what:
            for i in range(cfg.depth):
                groups.append(PruneGroup("mlp", "expert", i, cfg.expert_mlp[i], (Probe("mlp", f"expert.layers.{i}.mlp.down_proj", "input", "abs"),)))
        return groups

    def pruned_config(self, config: Pi0Config, layers, heads, mlp) -> Pi0Config:
        return pruned_config(config, self.depths(config), layers, heads, mlp, "pi0", "choose backbone / expert layers in distill (distill.layers)")

    def restructure(self, source: Policy, config: Pi0Config, layers=None, keep=None) -> Policy:
        layers = layers or {}
        keep = keep or {}
        src_cfg: Pi0Config = source.config
        out = self.new_policy(config)
        prefixes = {"vision": "vision.layers.", "backbone": "backbone.layers.", "expert": "expert.layers."}
        new_state = sliced_state(source, out.module.state_dict(), layers, keep, prefixes, src_cfg.vision_heads)
        out.module.load_state_dict(new_state)
        out.module.eval()
        out.spec = self.spec_of(out.module, tokenizer_dir=Path(source.spec.processor_settings["tokenizer_dir"]))
        out.meta = {"derived_from": source.meta.get("weights_sha256") or source.meta.get("derived_from"),
                    "tokenizer": source.meta.get("tokenizer"), "format": f"vlacompile student in lerobot's {config.variant} layout"}
        return out

    # -- training, quantisation, cost -------------------------------------------------------

    def action_scale(self, policy: Policy) -> torch.Tensor:
        return policy.module.normalize.action.scale() * torch.ones(policy.config.action_dim)

    def state_scale(self, policy: Policy) -> np.ndarray | None:
        norm = policy.module.normalize.state
        return None if norm.mode == "IDENTITY" else (norm.scale() * torch.ones(policy.config.state_dim)).numpy()

    def default_quant_excludes(self, config: Pi0Config) -> tuple[str, ...]:
        return DEFAULT_QUANT_EXCLUDE[config.variant]

    def flops(self, config: Pi0Config) -> dict[str, float]:
        return flops(config)

    def split_plan(self, policy: Policy) -> SplitPlan:
        cfg: Pi0Config = policy.config
        m = policy.module
        carry = [n for i in range(cfg.depth) for n in (f"k_{i}", f"v_{i}")] + ["prefix_valid"]
        if not cfg.pi05:
            carry.append("state_token")
        images = tuple(f"images.{c.name}" for c in cfg.cameras)
        inputs = (*images, *(() if cfg.pi05 else ("state",)), "tokens", "token_mask")
        return SplitPlan(
            system2=part_module(m, "prefix"), system2_inputs=inputs, system2_outputs=tuple(carry),
            system1=part_module(m, "velocity"), system1_inputs=("x_t", "t", *carry),
            integrator={"kind": "euler", "init": "noise", "x": "x_t", "t": "t", "velocity": "velocity",
                        "times": list(m.times), "update": {"op": "mul", "value": -1.0 / cfg.num_steps}},
            post=[{"op": "slice", "stop": cfg.action_dim}, *m.normalize.action.inverse_ops()],
        )


def flops(cfg: Pi0Config) -> dict[str, float]:
    """FLOPs (2 x multiply-accumulates) of one get_action call per part, for the roofline."""
    def linear(n, i, o):
        return 2.0 * n * i * o

    n = cfg.tokens_per_image
    d = cfg.vision_hidden
    vision = linear(n, 3 * cfg.patch_size**2, d) + linear(n, d, cfg.width)
    for h, m in zip(cfg.vision_heads, cfg.vision_mlp):
        inner = h * cfg.vision_head_dim
        vision += 3 * linear(n, d, inner) + linear(n, inner, d) + 2 * 2.0 * n * n * inner + linear(n, d, m) + linear(n, m, d)
    p, w, q, kv = cfg.prefix_len, cfg.width, cfg.num_heads * cfg.head_dim, cfg.kv_width
    text = 0.0
    for i, m in enumerate(cfg.text_mlp):
        text += linear(p, w, q + 2 * kv)
        if i < cfg.depth - 1:
            text += 2 * 2.0 * p * p * q + linear(p, q, w) + 3 * linear(p, w, m)
    system2 = len(cfg.cameras) * vision + text + (0.0 if cfg.pi05 else linear(1, cfg.max_state_dim, cfg.expert_width))
    s, e = cfg.suffix_len, cfg.expert_width
    c = cfg.chunk_size
    step = linear(c, cfg.max_action_dim, e) + linear(c, e, cfg.max_action_dim)
    step += 2 * linear(1, e, e) if cfg.pi05 else linear(c, 2 * e, e) + linear(c, e, e)
    for m in cfg.expert_mlp:
        step += linear(s, e, q + 2 * kv) + 2 * 2.0 * s * (p + s) * q + linear(s, q, e) + 3 * linear(s, e, m)
        if cfg.pi05:
            step += 2 * linear(1, e, 3 * e)
    return {"system2": float(system2), "system1_per_step": float(step), "system1": float(step * cfg.num_steps)}


# ---------------------------------------------------------------------------------------------
# Reading lerobot's files into a Pi0Config


def _format_label(pd: PolicyDir, variant: str, sidecar) -> str:
    kind = f"vlacompile student in lerobot's {variant} layout" if sidecar else f"lerobot {variant} policy directory"
    return f"{kind} (processor pipelines: lerobot >= 0.5; {len(pd.preprocessor)} pre / {len(pd.postprocessor)} post steps)"


def _check_pipelines(pd: PolicyDir, variant: str) -> None:
    """The step sets lerobot >= 0.5 writes. 0.4.x pipelines (no relative_actions_processor) ran other
    semantics (images padded with -1 and clamped to [-1, 1]; pi0.5's prompt carried the state
    padded to 32 numbers), so they are refused rather than guessed."""
    pre_path = pd.root / PREPROCESSOR
    names = [s.name for s in pd.preprocessor]
    if "relative_actions_processor" not in names:
        raise CheckpointError(
            f"this {variant} pipeline has no relative_actions_processor step: it was saved by lerobot 0.4.x, whose {variant} "
            "differs from lerobot >= 0.5 (resize padding -1 and clamp to [-1, 1]"
            + ("; the prompt's state padded to max_state_dim numbers" if variant == "pi05" else "") + ")",
            source=pre_path, hint="vlacompile implements lerobot >= 0.5's semantics; re-save the policy's processors with lerobot >= 0.5 "
            "(the weights load unchanged), knowing its actions change, or compile it with the lerobot version it was trained with")
    for steps, known, path in ((pd.preprocessor, PRE_STEPS[variant], pre_path), (pd.postprocessor, POST_STEPS, pd.root / POSTPROCESSOR)):
        for s in steps:
            if s.name not in known:
                raise CheckpointError(f"step {s.index} is {s.name!r}, a processor step vlacompile does not implement for {variant} "
                                      f"(it implements {sorted(known)})", source=path,
                                      hint=f"compile a policy saved by lerobot's make_{variant}_pre_post_processors")
            if s.name in ("relative_actions_processor", "absolute_actions_processor") and s.config.get("enabled"):
                raise CheckpointError(f"{s.name} is enabled (relative actions): vlacompile compiles absolute-action policies only",
                                      source=path, hint="compile a policy trained with use_relative_actions = false")
    if variant == "pi0" and "pi0_new_line_processor" not in names:
        raise CheckpointError("the pi0 pipeline has no pi0_new_line_processor step", source=pre_path)
    if variant == "pi05" and names.index("normalizer_processor") > names.index("pi05_prepare_state_tokenizer_processor_step"):
        raise CheckpointError("the state is written into the prompt before it is normalised", source=pre_path,
                              hint="lerobot's pi05 pipeline normalises first; re-save it with make_pi05_pre_post_processors")


def _resolve_config(pd: PolicyDir, variant: str, tok_dir: Path, state: dict, allow_unnormalized: bool, weights_path: Path):
    c = pd.config
    src = pd.root / "config.json"
    adaptive = LEROBOT + "gemma_expert.model.layers.0.input_layernorm.dense.weight" in state
    if adaptive != (variant == "pi05"):
        raise CheckpointError(f"config.json says type {variant!r} but the expert's norms are "
                              f"{'adaptive (pi0.5)' if adaptive else 'plain (pi0)'}", source=weights_path,
                              hint="config.json and the weights come from different policies")
    _check_pipelines(pd, variant)
    if int(c.get("n_obs_steps", 1)) != 1:
        raise CheckpointError(f"n_obs_steps is {c['n_obs_steps']}; pi0 runs on one observation", source=src)
    rtc = c.get("rtc_config")
    if isinstance(rtc, dict) and rtc.get("enabled"):
        raise CheckpointError("rtc_config is enabled: real-time chunking needs the previous chunk as an input, which vlacompile's "
                              "policies do not take", source=src, hint="disable rtc_config to compile the plain policy")
    if c.get("use_relative_actions"):
        raise CheckpointError("use_relative_actions is set: vlacompile compiles absolute-action policies only", source=src)
    res = c.get("image_resolution") or [224, 224]
    if len(res) != 2 or int(res[0]) != int(res[1]):
        raise CheckpointError(f"image_resolution {res} is not square; PaliGemma takes square images", source=src)
    tok_step = pd.step("pre", "tokenizer_processor")
    if tok_step is None:
        raise CheckpointError("the preprocessor has no tokenizer_processor step", source=pd.root / PREPROCESSOR)
    visual, state_f, action_f, back = policy_features(pd)
    empty = int(c.get("empty_cameras", 0))
    norms = Normalisers(pd, allow_unnormalized)
    state_dim, action_dim = state_f.shape[0], action_f.shape[0]
    state_norm = norms.mode(state_f, "state", (state_dim,))
    action_norm = norms.mode(action_f, "action", (action_dim,))
    cameras, visual_modes = [], set()
    for i, f in enumerate(visual):
        mode = norms.mode(f, f"images.{i}", (3, 1, 1))
        visual_modes.add(mode)
        cameras.append(Camera(f.key, camera_name(back.get(f.key, f.key)), f.shape[1], f.shape[2], normalized=mode != "IDENTITY"))

    # Sizes: the weights say them (lerobot's config names only the variant).
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"the weights lack {key!r}", source=weights_path, hint=f"the checkpoint is incomplete or not {variant}")
        return tuple(state[key].shape)

    def count(prefix: str) -> int:
        idx = {int(k[len(prefix) + 1:].split(".")[0]) for k in state if k.startswith(prefix + ".")}
        return max(idx) + 1 if idx else 0

    vt = LEROBOT + "paligemma.model.vision_tower.vision_model"
    tt = LEROBOT + "paligemma.model.language_model.layers"
    et = LEROBOT + "gemma_expert.model.layers"
    n_vision, n_text, n_expert = count(f"{vt}.encoder.layers"), count(tt), count(et)
    if n_text != n_expert:
        raise CheckpointError(f"the weights hold {n_text} backbone layers and {n_expert} expert layers; pi0 pairs them",
                              source=weights_path)
    patch = shape(f"{vt}.embeddings.patch_embedding.weight")
    v_hidden, patch_size = patch[0], patch[2]
    n_pos = shape(f"{vt}.embeddings.position_embedding.weight")[0]
    if (int(res[0]) // patch_size) ** 2 != n_pos:
        raise CheckpointError(f"image_resolution {res} with patch {patch_size} makes {(int(res[0]) // patch_size) ** 2} patches; "
                              f"the position embedding has {n_pos}", source=weights_path, hint="config.json is not this policy's")
    if v_hidden % VISION_HEADS:
        raise CheckpointError(f"the vision width {v_hidden} is not a multiple of SigLIP's {VISION_HEADS} heads", source=weights_path)
    q_out = shape(f"{tt}.0.self_attn.q_proj.weight")[0]
    head_dim = q_out // QUERY_HEADS
    kv_heads = shape(f"{tt}.0.self_attn.k_proj.weight")[0] // head_dim
    embed = shape(EMBED)
    tok_cfg = tok_step.config
    cfg = Pi0Config(
        variant=variant, cameras=tuple(cameras), state_key=state_f.key, state_name=back.get(state_f.key, state_f.key),
        state_dim=state_dim, action_dim=action_dim, empty_cameras=empty,
        chunk_size=int(c.get("chunk_size", 50)), num_steps=int(c.get("num_inference_steps", 10)),
        max_state_dim=int(c.get("max_state_dim", 32)), max_action_dim=int(c.get("max_action_dim", 32)),
        min_period=float(c.get("min_period", 4e-3)), max_period=float(c.get("max_period", 4.0)),
        resolution=int(res[0]),
        tokenizer_max_length=int(tok_cfg.get("max_length", c.get("tokenizer_max_length", 48))),
        padding_side=str(tok_cfg.get("padding_side", "right")), truncation=bool(tok_cfg.get("truncation", True)),
        append_newline=pd.step("pre", "pi0_new_line_processor") is not None,
        vision_hidden=v_hidden, vision_head_dim=v_hidden // VISION_HEADS,
        vision_heads=tuple(shape(f"{vt}.encoder.layers.{i}.self_attn.q_proj.weight")[0] // (v_hidden // VISION_HEADS) for i in range(n_vision)),
        vision_mlp=tuple(shape(f"{vt}.encoder.layers.{i}.mlp.fc1.weight")[0] for i in range(n_vision)),
        patch_size=patch_size, width=embed[1], num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=embed[0],
        text_mlp=tuple(shape(f"{tt}.{i}.mlp.gate_proj.weight")[0] for i in range(n_text)),
        expert_width=shape(f"{et}.0.mlp.gate_proj.weight")[1],
        expert_mlp=tuple(shape(f"{et}.{i}.mlp.gate_proj.weight")[0] for i in range(n_expert)),
        state_norm=state_norm, action_norm=action_norm,
        visual_norm=next((m for m in visual_modes if m != "IDENTITY"), "IDENTITY"),
        source={"config": c, PREPROCESSOR: (pd.root / PREPROCESSOR).read_text(), POSTPROCESSOR: (pd.root / POSTPROCESSOR).read_text(),
                "state_files": {s.state_file: pd.step_state(s) for s in (*pd.preprocessor, *pd.postprocessor) if s.state_file},
                "tokenizer_dir": str(tok_dir)},
    )
    if shape(f"{et}.0.self_attn.k_proj.weight")[0] != cfg.kv_width:
        raise CheckpointError("the expert's K/V width differs from the backbone's; the expert attends over the backbone's K/V",
                              source=weights_path)
    cfg.validate(str(src))
    return cfg, norms.buffers, norms.notes


FAMILY = Pi0Family()  # what the registry (vlacompile.families) reads
