"""prune: structured pruning that really removes parameters, ranked by activation importance.

What may be removed is the family's: its ``prune_groups`` (``vlacompile.families.base``) name the
MLP channels, attention heads and blocks of each part and where their importance is read.
Importance is measured on calibration episodes (Minitron-style, forward hooks, seeded noise):

* MLP channel   mean |activation| of the channel's hidden unit over every token it sees;
* attention head  mean L2 norm of the head's output before the output projection (self- and
                cross-attention heads of a block are cut to the same count);
* block         influence 1 - cos(block input, block output), averaged over tokens.

The least important heads, channels and (optionally) whole blocks are sliced out of the weights
by the family (``restructure``): the result is a smaller model of the same family whose config
says what is left, so it saves, loads and exports like any other. A short distillation against the
teacher (``recovery_steps``) then wins back most of the lost accuracy.

``measure_importance`` and ``top_k`` are shared with the distill stage, which ranks MLP channels
with them when it narrows the student.
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
from vlacompile.training import MatchSettings, call, model_inputs, seeded_noise, train_to_match

PARTS = ("vision", "backbone", "expert")  # the part names every family's layer groups use
RECOVERY_SAMPLES = 1024  # observations drawn from the training episodes for recovery distillation


@dataclass(frozen=True)
class Params:
    heads_ratio: float = 0.0  # fraction of attention heads removed in every pruned layer
    mlp_ratio: float = 0.0  # fraction of MLP channels removed in every pruned layer
    drop_layers: int = 0  # whole blocks removed from each pruned part (lowest block influence)
    parts: tuple[str, ...] = PARTS  # of the family's parts; a family may offer fewer groups in some
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
        raise ConfigError(f"prune.drop_layers is {params.drop_layers}; it must be >= 0", source=source,
                          hint="the number of layers removed per part; 0 keeps them all")
    unknown = [p for p in params.parts if p not in PARTS]
    if unknown or not params.parts or len(set(params.parts)) != len(params.parts):
        raise ConfigError(
            f"prune.parts is {list(params.parts)}; it must list distinct parts among {list(PARTS)}",
            source=source,
            hint=f"e.g. parts = {list(PARTS)}",
        )
    if params.calibration_samples < 1:
        raise ConfigError(f"prune.calibration_samples is {params.calibration_samples}; it must be >= 1", source=source,
                          hint=f"e.g. calibration_samples = {Params.__dataclass_fields__['calibration_samples'].default} (its default)")
    if params.recovery_steps < 0:
        raise ConfigError(f"prune.recovery_steps is {params.recovery_steps}; it must be >= 0", source=source,
                          hint="0 skips the recovery training after pruning")
    if not params.recovery_lr > 0:
        raise ConfigError(f"prune.recovery_lr is {params.recovery_lr}; it must be > 0", source=source,
                          hint=f"e.g. recovery_lr = {Params.__dataclass_fields__['recovery_lr'].default} (its default)")


# ---------------------------------------------------------------------------------------------
# Importance


@dataclass
class Importance:
    """Activation statistics per (part, layer index in the measured model)."""

    mlp: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [hidden] mean |GELU(fc1 x)|
    attn_heads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [heads] mean L2 norm
    cross_heads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [heads] mean L2 norm
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # part -> [depth] 1 - cos(in, out)


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
    """Run the policy on ``samples`` with hooks at its family's probes in ``parts`` and average activations."""
    from vlacompile.families import get_family

    module = policy.module
    groups = get_family(policy.family).prune_groups(policy, parts, what)
    stats: dict[tuple[str, str, int], _Mean] = {}
    handles = []
    for g in groups:
        for k, probe in enumerate(g.probes):
            layer = k if g.kind == "layer" else g.layer
            acc = stats.setdefault((probe.member, g.part, layer), _Mean())
            handles.append(_attach(module.get_submodule(probe.module), probe, acc))

    inputs = model_inputs(policy, samples)
    n = len(samples)
    noise = seeded_noise((n, *policy.spec.noise_shape), seed)
    was_training = module.training
    module.eval()
    try:
        for s in range(0, n, batch_size):
            b = slice(s, s + batch_size)
            call(module, policy.spec, {k: v[b] for k, v in inputs.items()}, noise[b])
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)

    imp = Importance()
    for (member, part, i), acc in sorted(stats.items()):
        if member == "mlp":
            imp.mlp[(part, i)] = acc.value()
        elif member == "attn":
            imp.attn_heads[(part, i)] = acc.value()
        elif member == "cross":
            imp.cross_heads[(part, i)] = acc.value()
    for g in groups:
        if g.kind == "layer":
            imp.layers[g.part] = torch.cat([stats[("block", g.part, i)].value() for i in range(g.units)])
    return imp


def _attach(target: nn.Module, probe, acc: "_Mean"):
    """A hook at ``target`` adding ``probe``'s statistic to ``acc``."""
    if probe.stat == "abs":
        if probe.hook == "output":
            return target.register_forward_hook(lambda m, a, out: acc.add(out.abs()))
        return target.register_forward_pre_hook(lambda m, args: acc.add(args[0].abs()))
    if probe.stat == "head_norm":
        h, d = probe.heads, probe.head_dim

        def head_norms(x):
            acc.add(x.reshape(*x.shape[:-1], h, d).norm(dim=-1))

        if probe.hook == "output":
            return target.register_forward_hook(lambda m, a, out: head_norms(out))
        return target.register_forward_pre_hook(lambda m, args: head_norms(args[0]))
    if probe.stat == "influence":
        def influence(m, args, out):
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(args[0], y, dim=-1)
            acc.add((1.0 - cos)[..., None])

        return target.register_forward_hook(influence)
    raise ValueError(f"unknown probe statistic {probe.stat!r}")


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order (keeps the weights' layout)."""
    return torch.topk(scores, k, sorted=False).indices.sort().values


# ---------------------------------------------------------------------------------------------
# The stage


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan(policy: Policy, imp: Importance, params: Params) -> tuple[Any, dict[str, list[int]], dict]:
    """(pruned config, kept layers per part, kept heads/channels per new layer) from importance."""
    from vlacompile.families import get_family

    family = get_family(policy.family)
    config = policy.config
    depths = family.depths(config)
    what = ("mlp", "heads", "layers")
    groups = {(g.kind, g.part, g.layer): g for g in family.prune_groups(policy, params.parts, what)}
    layers: dict[str, list[int]] = {}
    keep: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    heads_after: dict[str, list[int | None]] = {}
    mlp_after: dict[str, list[int | None]] = {}
    for part in params.parts:
        depth = depths[part]
        if params.drop_layers >= depth:
            raise ConfigError(
                f"prune.drop_layers={params.drop_layers} would remove every block of the {part} "
                f"(the model has {depth} {part} layers)",
                source="prune.drop_layers",
                hint=f"drop at most {depth - 1} layers, or leave '{part}' out of prune.parts",
            )
        kept = list(range(depth))
        if params.drop_layers:
            if ("layer", part, -1) not in groups:
                raise ConfigError(
                    f"prune.drop_layers: the {family.label} family cannot drop whole {part} layers",
                    source="prune.drop_layers", hint=f"leave '{part}' out of prune.parts, or choose its layers in distill",
                )
            kept = top_k(imp.layers[part], depth - params.drop_layers).tolist()
        layers[part] = kept
        heads_after[part], mlp_after[part] = [], []
        for new_i, j in enumerate(kept):
            block_keep = {}
            h = m = None
            if (g := groups.get(("heads", part, j))) is not None:
                h = max(1, g.units - _round_half_up(g.units * params.heads_ratio))
                if h < g.units:
                    for probe in g.probes:
                        scores = imp.attn_heads if probe.member == "attn" else imp.cross_heads
                        block_keep[probe.member] = top_k(scores[(part, j)], h)
            if (g := groups.get(("mlp", part, j))) is not None:
                m = max(1, g.units - _round_half_up(g.units * params.mlp_ratio))
                if m < g.units:
                    block_keep["mlp"] = top_k(imp.mlp[(part, j)], m)
            keep[(part, new_i)] = block_keep
            heads_after[part].append(h)
            mlp_after[part].append(m)
    return family.pruned_config(config, layers, heads_after, mlp_after), layers, keep


def _count(policy: Policy, kind: str) -> int:
    """Attention heads or MLP channels of every prunable group of the policy."""
    from vlacompile.families import get_family

    family = get_family(policy.family)
    return sum(g.units for g in family.prune_groups(policy, family.parts, (kind,)))


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
    from vlacompile.families import get_family

    family = get_family(source.family)
    unknown = [p for p in params.parts if p not in family.parts]
    if unknown:
        raise ConfigError(f"prune.parts names {unknown}; the {family.label} family has parts {list(family.parts)}",
                          source="recipe stage prune", hint=f"list only {list(family.parts)} in prune.parts")
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
    new_cfg, layers, keep = plan(source, imp, params)
    pruned = family.restructure(source, new_cfg, layers=layers, keep=keep)
    heads = (_count(source, "heads"), _count(pruned, "heads"))
    channels = (_count(source, "mlp"), _count(pruned, "mlp"))
    ctx.log(
        f"prune: {source.num_parameters() / 1e6:.2f}M -> {pruned.num_parameters() / 1e6:.2f}M params "
        f"(heads {heads[0]} -> {heads[1]}, MLP channels {channels[0]} -> {channels[1]})"
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
            "attention_heads": heads[0] - heads[1],
            "mlp_channels": channels[0] - channels[1],
            "layers": {p: sorted(set(range(family.depths(cfg)[p])) - set(layers[p])) for p in params.parts},
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
