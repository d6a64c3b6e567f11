"""prune: structured pruning that really removes parameters, ranked by activation importance.

Importance is measured on calibration episodes (Minitron-style, forward hooks, seeded noise):

* MLP channel   mean |GELU(fc1 x)| over every token the channel sees;
* attention head  mean L2 norm of the head's output before ``proj`` (self- and cross-attention);
* block         influence 1 - cos(block input, block output), averaged over tokens.

The least important heads, channels and (optionally) whole blocks are sliced out of the weights:
the result is a smaller model of the same family whose per-layer config (heads, MLP width, depth)
says what is left, so it saves, loads and exports like any other. A short distillation against the
teacher (``recovery_steps``) then wins back most of the lost accuracy.

``measure_importance`` and ``restructure`` are shared with the distill stage, which uses them to
build its student from the teacher's weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from vlacompile.errors import ConfigError, EpisodeError
from vlacompile.policy import Policy
from vlacompile.stages import Artifact, BuildContext, Kind
from vlacompile.training import MatchSettings, model_inputs, seeded_noise, train_to_match

PARTS = ("vision", "backbone", "expert")
RECOVERY_SAMPLES = 1024  # observations drawn from the training episodes for recovery distillation


@dataclass(frozen=True)
class Params:
    heads_ratio: float = 0.0  # fraction of attention heads removed in every pruned layer
    mlp_ratio: float = 0.0  # fraction of MLP channels removed in every pruned layer
    drop_layers: int = 0  # whole blocks removed from each pruned part (lowest block influence)
    parts: tuple[str, ...] = PARTS
    calibration_samples: int = 128
    recovery_steps: int = 200  # distillation steps against the teacher after pruning; 0 skips
    recovery_lr: float = 5e-4


def kinds(params: Params, target) -> tuple[Kind, Kind]:
    return "torch", "torch"


def check(params: Params, target, source: str = "recipe") -> None:
    for key in ("heads_ratio", "mlp_ratio"):
        value = getattr(params, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(
                f"prune.{key} is {value}; it must be in [0, 1)",
                source=source,
                hint=f"{key} is the fraction removed: 0.25 removes a quarter, 0 keeps all",
            )
    if params.drop_layers < 0:
        raise ConfigError(f"prune.drop_layers is {params.drop_layers}; it must be >= 0", source=source)
    unknown = [p for p in params.parts if p not in PARTS]
    if unknown or not params.parts or len(set(params.parts)) != len(params.parts):
        raise ConfigError(
            f"prune.parts is {list(params.parts)}; it must list distinct parts among {list(PARTS)}",
            source=source,
        )
    if params.calibration_samples < 1:
        raise ConfigError(f"prune.calibration_samples is {params.calibration_samples}; it must be >= 1", source=source)
    if params.recovery_steps < 0:
        raise ConfigError(f"prune.recovery_steps is {params.recovery_steps}; it must be >= 0", source=source)
    if not params.recovery_lr > 0:
        raise ConfigError(f"prune.recovery_lr is {params.recovery_lr}; it must be > 0", source=source)


# ---------------------------------------------------------------------------------------------
# Importance


@dataclass
class Importance:
    """Activation statistics per (part, layer index in the measured model)."""

    mlp: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [hidden] mean |GELU(fc1 x)|
    attn_heads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [heads] mean L2 norm
    cross_heads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [heads] mean L2 norm
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # part -> [depth] 1 - cos(in, out)


def blocks_of(module: nn.Module, part: str) -> nn.ModuleList:
    return getattr(module, part).blocks


class _Mean:
    """A running mean of per-channel statistics over calls of different token counts."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:  # [..., C]: sums over all leading dims
        flat = values.reshape(-1, values.shape[-1]).double()
        s = flat.sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += flat.shape[0]

    def value(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float().cpu()


@torch.inference_mode()
def measure_importance(
    policy: Policy,
    samples,
    *,
    seed: int = 0,
    parts: tuple[str, ...] = PARTS,
    what: tuple[str, ...] = ("mlp", "heads", "layers"),
    batch_size: int = 32,
) -> Importance:
    """Run the policy on ``samples`` with hooks on the blocks of ``parts`` and average activations."""
    module = policy.module
    stats: dict[tuple[str, str, int], _Mean] = {}
    handles = []

    def track(kind: str, part: str, i: int) -> _Mean:
        return stats.setdefault((kind, part, i), _Mean())

    for part in parts:
        for i, blk in enumerate(blocks_of(module, part)):
            if "mlp" in what:
                acc = track("mlp", part, i)
                handles.append(blk.mlp.act.register_forward_hook(lambda m, a, out, acc=acc: acc.add(out.abs())))
            if "heads" in what:
                for kind, attn in (("attn", blk.attn), ("cross", blk.cross)):
                    if attn is None:
                        continue
                    acc = track(kind, part, i)

                    def head_norms(m, args, acc=acc, h=attn.num_heads, d=attn.head_dim):
                        x = args[0]
                        acc.add(x.reshape(*x.shape[:-1], h, d).norm(dim=-1))

                    handles.append(attn.proj.register_forward_pre_hook(head_norms))
            if "layers" in what:
                acc = track("layer", part, i)

                def influence(m, args, out, acc=acc):
                    cos = torch.nn.functional.cosine_similarity(args[0], out, dim=-1)
                    acc.add((1.0 - cos)[..., None])

                handles.append(blk.register_forward_hook(influence))

    inputs = model_inputs(policy, samples)
    n = len(samples)
    noise = seeded_noise((n, policy.spec.chunk_size, policy.spec.action_dim), seed)
    was_training = module.training
    module.eval()
    try:
        for s in range(0, n, batch_size):
            b = slice(s, s + batch_size)
            module(inputs["images"][b], inputs["state"][b], inputs["tokens"][b], noise[b])
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)

    imp = Importance()
    for (kind, part, i), acc in sorted(stats.items()):
        if kind == "mlp":
            imp.mlp[(part, i)] = acc.value()
        elif kind == "attn":
            imp.attn_heads[(part, i)] = acc.value()
        elif kind == "cross":
            imp.cross_heads[(part, i)] = acc.value()
    for part in parts:
        if "layers" in what:
            imp.layers[part] = torch.cat([stats[("layer", part, i)].value() for i in range(len(blocks_of(module, part)))])
    return imp


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order (keeps the weights' layout)."""
    return torch.topk(scores, k, sorted=False).indices.sort().values


# ---------------------------------------------------------------------------------------------
# Slicing


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


def restructure(
    source: Policy,
    config: Any,
    *,
    layers: dict[str, list[int]] | None = None,
    keep: dict[tuple[str, int], dict[str, torch.Tensor]] | None = None,
) -> Policy:
    """A new policy with ``config`` whose weights are sliced from ``source``.

    ``layers[part]`` lists the source blocks the new model keeps (all when absent);
    ``keep[(part, new_layer)]`` maps "attn" / "cross" / "mlp" to the kept head or channel indices
    of that block (all when absent). ``config`` must describe the result (heads, widths, depth).
    """
    from vlacompile.checkpoint import new_policy
    from vlacompile.families import get_family

    layers = layers or {}
    keep = keep or {}
    src_cfg = source.config
    src_state = source.module.state_dict()
    target = new_policy(config, source.family)
    new_state = {}
    for name, ref in target.module.state_dict().items():
        part, _, rest = name.partition(".")
        if part in PARTS and rest.startswith("blocks."):
            i_str, _, rest = rest[len("blocks.") :].partition(".")
            i = int(i_str)
            j = layers[part][i] if part in layers else i
            t = src_state[f"{part}.blocks.{j}.{rest}"]
            t = _slice_tensor(rest, t, getattr(src_cfg, f"{part}_heads")[j], src_cfg.head_dim, keep.get((part, i), {}))
        else:
            t = src_state[name]
        if t.shape != ref.shape:
            raise ValueError(f"{name}: sliced shape {tuple(t.shape)} does not match the new config's {tuple(ref.shape)}")
        new_state[name] = t.detach().clone()
    target.module.load_state_dict(new_state)
    target.module.eval()
    # The spec carries the normalisation statistics, which only exist once the weights are in.
    target.spec = get_family(source.family).spec_of(target.module)
    target.meta = {"derived_from": source.meta.get("weights_sha256") or source.meta.get("derived_from")}
    return target


# ---------------------------------------------------------------------------------------------
# The stage


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan(config: Any, imp: Importance, params: Params) -> tuple[Any, dict[str, list[int]], dict]:
    """(pruned config, kept layers per part, kept heads/channels per new layer) from importance."""
    layers: dict[str, list[int]] = {}
    keep: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    changes: dict[str, tuple[int, ...]] = {}
    for part in params.parts:
        heads = getattr(config, f"{part}_heads")
        mlp = getattr(config, f"{part}_mlp")
        depth = len(heads)
        if params.drop_layers >= depth:
            raise ConfigError(
                f"prune.drop_layers={params.drop_layers} would remove every block of the {part} "
                f"(the model has {depth} {part} layers)",
                source="prune.drop_layers",
                hint=f"drop at most {depth - 1} layers, or leave '{part}' out of prune.parts",
            )
        kept = sorted(range(depth))
        if params.drop_layers:
            kept = top_k(imp.layers[part], depth - params.drop_layers).tolist()
        layers[part] = kept
        new_heads, new_mlp = [], []
        for new_i, j in enumerate(kept):
            h = max(1, heads[j] - _round_half_up(heads[j] * params.heads_ratio))
            m = max(1, mlp[j] - _round_half_up(mlp[j] * params.mlp_ratio))
            block_keep = {}
            if h < heads[j]:
                block_keep["attn"] = top_k(imp.attn_heads[(part, j)], h)
                if (part, j) in imp.cross_heads:
                    block_keep["cross"] = top_k(imp.cross_heads[(part, j)], h)
            if m < mlp[j]:
                block_keep["mlp"] = top_k(imp.mlp[(part, j)], m)
            keep[(part, new_i)] = block_keep
            new_heads.append(h)
            new_mlp.append(m)
        changes[f"{part}_heads"] = tuple(new_heads)
        changes[f"{part}_mlp"] = tuple(new_mlp)
    return replace(config, **changes), layers, keep


def _attention_heads(config: Any) -> int:
    return sum(sum(getattr(config, f"{p}_heads")) for p in PARTS)


def _mlp_channels(config: Any) -> int:
    return sum(sum(getattr(config, f"{p}_mlp")) for p in PARTS)


def run(artifact: Artifact, params: Params, ctx: BuildContext) -> Artifact:
    from vlacompile.config_util import to_dict
    from vlacompile.data.sampling import draw_stratified

    t0 = time.perf_counter()
    source = artifact.policy
    if artifact.quantized_torch:
        raise ConfigError(
            "prune runs on a full-precision torch model, but this one is already quantised",
            source="recipe stage prune",
            hint="put prune before quantize in the recipe",
        )
    cfg = source.config
    nothing_to_remove = params.heads_ratio == 0 and params.mlp_ratio == 0 and params.drop_layers == 0
    if nothing_to_remove:
        imp = Importance()
    else:
        episodes = ctx.calibration if ctx.calibration is not None else ctx.train
        if episodes is None:
            raise EpisodeError("prune needs calibration episodes to rank heads and channels", source="prune")
        calib = draw_stratified(episodes, params.calibration_samples, chunk_size=source.spec.chunk_size, seed=ctx.seed)
        imp = measure_importance(source, calib, seed=ctx.seed, parts=params.parts)
    new_cfg, layers, keep = plan(cfg, imp, params)
    pruned = restructure(source, new_cfg, layers=layers, keep=keep)
    ctx.log(
        f"prune: {source.num_parameters() / 1e6:.2f}M -> {pruned.num_parameters() / 1e6:.2f}M params "
        f"(heads {_attention_heads(cfg)} -> {_attention_heads(new_cfg)}, "
        f"MLP channels {_mlp_channels(cfg)} -> {_mlp_channels(new_cfg)})"
    )

    recovery: dict[str, Any] = {}
    if params.recovery_steps > 0:
        if ctx.train is None:
            raise EpisodeError("prune recovery needs training episodes", source="prune.recovery_steps", hint="set recovery_steps = 0 to skip recovery")
        samples = draw_stratified(ctx.train, RECOVERY_SAMPLES, chunk_size=source.spec.chunk_size, seed=ctx.seed)
        settings = MatchSettings(steps=params.recovery_steps, lr=params.recovery_lr)
        recovery = train_to_match(pruned, ctx.teacher, samples, settings, ctx, name="prune recovery")

    record = {
        "stage": "prune",
        "params": to_dict(params),
        "seconds": round(time.perf_counter() - t0, 2),
        "params_before": source.num_parameters(),
        "params_after": pruned.num_parameters(),
        "removed": {
            "attention_heads": _attention_heads(cfg) - _attention_heads(new_cfg),
            "mlp_channels": _mlp_channels(cfg) - _mlp_channels(new_cfg),
            "layers": {p: sorted(set(range(len(getattr(cfg, f"{p}_heads")))) - set(layers[p])) for p in params.parts},
        },
        "recovery_final_loss": recovery.get("final_loss"),
        "recovery_loss_curve": recovery.get("loss_curve", []),
        "student_config": new_cfg.to_dict(),
    }
    return Artifact(
        policy=pruned,
        onnx_path=None,
        precision=artifact.precision,
        quantized_torch=False,
        records=[*artifact.records, record],
    )
