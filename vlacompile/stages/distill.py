"""distill: a smaller student of the same family, initialised from the teacher and trained to match it.

The student keeps a subset of the teacher's layers (DistilBERT / Minitron layer selection), the
most important MLP channels (Minitron: mean |GELU(fc1 x)| on calibration episodes) when
``mlp_ratio`` < 1, and may integrate its flow in fewer steps. Everything it keeps is copied from
the teacher, then it is trained to reproduce the teacher's action chunks for the same observation
and the same initial noise (``vlacompile.training.train_to_match``): with fewer flow steps than
the teacher this is step distillation, the largest single latency lever of a flow-matching head.

The student is initialised from the stage's input policy (the teacher when distill comes first)
and always trained against the build's teacher (``ctx.teacher``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from vlacompile.errors import ConfigError, EpisodeError
from vlacompile.stages import Artifact, BuildContext, Kind
from vlacompile.stages.prune import PARTS, measure_importance, restructure, top_k
from vlacompile.training import MatchSettings, train_to_match

IMPORTANCE_SAMPLES = 128  # calibration observations for ranking MLP channels


@dataclass(frozen=True)
class Params:
    vision_layers: tuple[int, ...] | None = None  # teacher layers the student keeps; None keeps all
    backbone_layers: tuple[int, ...] | None = None
    expert_layers: tuple[int, ...] | None = None
    mlp_ratio: float = 1.0  # student MLP width / teacher's
    flow_steps: int | None = None  # student integration steps; None keeps the teacher's
    steps: int = 600  # optimizer steps; 0 returns the initialised, untrained student
    batch_size: int = 32
    lr: float = 1e-3
    num_samples: int = 2048  # training observations drawn from the training episodes
    noises_per_sample: int = 1
    feature_loss_weight: float = 0.0  # MSE between student and teacher prefix (backbone) features
    weight_decay: float = 0.0
    # Extra copies of each observation with its state moved by N(0, (state_jitter * teacher state std)^2).
    # Distillation needs no labels, so these are free data: with a few episodes per task the student
    # otherwise sees few object/goal positions, and closed loop drifts off the recorded states.
    state_jitter_copies: int = 0
    state_jitter: float = 0.0


def kinds(params: Params, target) -> tuple[Kind, Kind]:
    return "torch", "torch"


def check(params: Params, target, source: str = "recipe") -> None:
    for part in PARTS:
        layers = getattr(params, f"{part}_layers")
        if layers is None:
            continue
        if not layers:
            raise ConfigError(f"distill.{part}_layers is empty; keep at least one layer", source=source, hint="or leave it out to keep all")
        if any(i < 0 for i in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ConfigError(
                f"distill.{part}_layers is {list(layers)}; it must list teacher layer indices (from 0) in increasing order",
                source=source,
                hint="e.g. [0, 5] keeps the first and last of six layers",
            )
    if not 0.0 < params.mlp_ratio <= 1.0:
        raise ConfigError(f"distill.mlp_ratio is {params.mlp_ratio}; it must be in (0, 1]", source=source)
    if params.flow_steps is not None and params.flow_steps < 1:
        raise ConfigError(f"distill.flow_steps is {params.flow_steps}; it must be >= 1", source=source)
    for key, low in (("steps", 0), ("batch_size", 1), ("num_samples", 1), ("noises_per_sample", 1), ("state_jitter_copies", 0)):
        if getattr(params, key) < low:
            raise ConfigError(f"distill.{key} is {getattr(params, key)}; it must be >= {low}", source=source)
    if not params.lr > 0:
        raise ConfigError(f"distill.lr is {params.lr}; it must be > 0", source=source)
    if (params.state_jitter_copies > 0) != (params.state_jitter > 0):
        raise ConfigError(
            f"distill.state_jitter_copies is {params.state_jitter_copies} and distill.state_jitter {params.state_jitter}",
            source=source,
            hint="set both (copies >= 1 and a jitter > 0, in units of the state's std) or neither",
        )
    for key in ("feature_loss_weight", "weight_decay", "state_jitter"):
        if getattr(params, key) < 0:
            raise ConfigError(f"distill.{key} is {getattr(params, key)}; it must be >= 0", source=source)


def with_state_jitter(samples, copies: int, sigma, *, seed: int):
    """``samples`` followed by ``copies`` copies whose states carry Gaussian noise of std ``sigma``
    (per dimension); each copy repeats the original's images, instructions and recorded actions."""
    import numpy as np

    rng = np.random.default_rng([seed, 0x57A7E])
    rows = np.tile(np.arange(len(samples)), copies + 1)
    out = samples.select(rows)
    n = len(samples)
    noise = rng.standard_normal((n * copies, out.state.shape[1])).astype(np.float32) * np.asarray(sigma, np.float32)
    out.state[n:] += noise
    return out


def _check_against(params: Params, config: Any) -> dict[str, list[int]]:
    """Layer indices against the teacher's depth (known only once the teacher is loaded)."""
    layers = {}
    for part in PARTS:
        depth = len(getattr(config, f"{part}_heads"))
        keep = getattr(params, f"{part}_layers")
        if keep is None:
            layers[part] = list(range(depth))
            continue
        bad = [i for i in keep if not 0 <= i < depth]
        if bad:
            raise ConfigError(
                f"distill.{part}_layers={list(keep)} names layer {bad[0]}, but the teacher has {depth} {part} layers "
                f"(indices 0..{depth - 1})",
                source="recipe stage distill",
                hint=f"pick {part} layers from 0 to {depth - 1}",
            )
        layers[part] = list(keep)
    return layers


def student_config(params: Params, config: Any, layers: dict[str, list[int]]) -> Any:
    cfg = config.shrink(
        vision_layers=layers["vision"],
        backbone_layers=layers["backbone"],
        expert_layers=layers["expert"],
        mlp_ratio=params.mlp_ratio,
        flow_steps=params.flow_steps,
    )
    # shrink() floors widths at 8 channels; a student is never wider than its teacher.
    return replace(
        cfg,
        **{
            f"{p}_mlp": tuple(min(w, getattr(config, f"{p}_mlp")[j]) for w, j in zip(getattr(cfg, f"{p}_mlp"), layers[p]))
            for p in PARTS
        },
    )


def init_student(source, params: Params, ctx: BuildContext):
    """The layer-selected (and MLP-narrowed) student with the teacher's weights, not yet trained."""
    layers = _check_against(params, source.config)
    cfg = student_config(params, source.config, layers)
    keep: dict[tuple[str, int], dict] = {}
    narrowed = [
        (p, i, j) for p in PARTS for i, j in enumerate(layers[p]) if getattr(cfg, f"{p}_mlp")[i] < getattr(source.config, f"{p}_mlp")[j]
    ]
    if narrowed:
        from vlacompile.data.sampling import draw_stratified

        episodes = ctx.calibration if ctx.calibration is not None else ctx.train
        if episodes is None:
            raise EpisodeError("distill with mlp_ratio < 1 needs calibration episodes to rank MLP channels", source="distill.mlp_ratio")
        calib = draw_stratified(episodes, IMPORTANCE_SAMPLES, chunk_size=source.spec.chunk_size, seed=ctx.seed)
        imp = measure_importance(source, calib, seed=ctx.seed, parts=tuple(sorted({p for p, _, _ in narrowed})), what=("mlp",))
        for p, i, j in narrowed:
            keep[(p, i)] = {"mlp": top_k(imp.mlp[(p, j)], getattr(cfg, f"{p}_mlp")[i])}
    return restructure(source, cfg, layers=layers, keep=keep)


def run(artifact: Artifact, params: Params, ctx: BuildContext) -> Artifact:
    import torch

    from vlacompile.config_util import to_dict
    from vlacompile.data.sampling import draw_stratified
    from vlacompile.families import get_family

    t0 = time.perf_counter()
    if artifact.quantized_torch:
        raise ConfigError(
            "distill trains a full-precision torch model, but this one is already quantised",
            source="recipe stage distill",
            hint="put distill before quantize in the recipe",
        )
    teacher = ctx.teacher
    torch.manual_seed(ctx.seed)
    student = init_student(artifact.policy, params, ctx)
    # The student reproduces the teacher in the teacher's units: same normalisation statistics.
    for name in ("state_mean", "state_std", "action_mean", "action_std"):
        getattr(student.module, name).copy_(getattr(teacher.module, name))
    student.spec = get_family(student.family).spec_of(student.module)
    ctx.log(
        f"distill: student {student.num_parameters() / 1e6:.2f}M params "
        f"({student.config.vision_depth}+{student.config.backbone_depth}+{student.config.expert_depth} layers, "
        f"{student.config.flow_steps} flow steps) from teacher {teacher.num_parameters() / 1e6:.2f}M "
        f"({teacher.config.flow_steps} flow steps)"
    )

    metrics: dict[str, Any] = {}
    if params.steps > 0:
        if ctx.train is None:
            raise EpisodeError("distill needs training episodes", source="distill", hint="pass --episodes")
        samples = draw_stratified(ctx.train, params.num_samples, chunk_size=teacher.spec.chunk_size, seed=ctx.seed)
        if params.state_jitter_copies:
            std = teacher.module.state_std.detach().cpu().numpy()
            samples = with_state_jitter(samples, params.state_jitter_copies, params.state_jitter * std, seed=ctx.seed)
        settings = MatchSettings(
            steps=params.steps,
            batch_size=params.batch_size,
            lr=params.lr,
            weight_decay=params.weight_decay,
            noises_per_sample=params.noises_per_sample,
            feature_loss_weight=params.feature_loss_weight,
        )
        metrics = train_to_match(student, teacher, samples, settings, ctx, name="distill")
        metrics["num_samples"] = len(samples)

    record = {
        "stage": "distill",
        "params": to_dict(params),
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": metrics.get("final_loss"),
        "loss_curve": metrics.get("loss_curve", []),
        **{k: metrics[k] for k in ("initial_loss", "target_seconds", "train_seconds", "processes", "num_samples") if k in metrics},
        "student_params": student.num_parameters(),
        "teacher_params": teacher.num_parameters(),
        "student_config": student.config.to_dict(),
    }
    return Artifact(policy=student, onnx_path=None, precision="fp32", quantized_torch=False, records=[*artifact.records, record])
