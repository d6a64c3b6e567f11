"""distill: a smaller student of the same family, initialised from the teacher and trained to match it.

The student keeps a subset of the teacher's layers (DistilBERT / Minitron layer selection), the
most important MLP channels (Minitron: mean activation magnitude on calibration episodes) when
``mlp_ratio`` < 1, and may integrate its flow in fewer steps. Everything it keeps is copied from
the teacher, then it is trained to reproduce the teacher's action chunks for the same observation
and the same initial noise (``vlacompile.training.train_to_match``): with fewer flow steps than
the teacher this is step distillation, the largest single latency lever of a flow-matching head.

The student's shape is said in terms every family understands: per part (``vision``, ``backbone``,
``expert``) a fraction of the teacher's layers or explicit layer indices, an MLP ratio and the flow
steps. The family resolves them under its own constraints (SmolVLA: which layers may be
self- or cross-attention, how the expert maps onto the VLM layers); ``per_family`` overrides them for
one family. The student is initialised from the stage's input policy (the teacher when distill
comes first) and always trained against the build's teacher (``ctx.teacher``).

``student = { family = "vlacompile-reference", layers = 2, width = 128, ... }`` asks for a student of
that shape, freshly initialised by that family (``Family.new_student``) to read the teacher's
cameras and state and emit its actions, whether the family is the teacher's own or another. Its
head is its own, so it does not share the teacher's noise: it learns from teacher-labelled chunks
(``noises_per_sample`` draws per observation) with flow matching (``objective = "auto"`` picks
"flow" for it, "match" otherwise). Its shape is checked with the recipe (``check``) and against the
teacher once it is loaded (``check_teacher``), before any work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from vlacompile.errors import ConfigError, EpisodeError
from vlacompile.stages import Artifact, BuildContext, Kind
from vlacompile.training import PRECISIONS, MatchSettings, resolve_precision, train_to_match

IMPORTANCE_SAMPLES = 128  # calibration observations for ranking MLP channels


LayerRequest = float | tuple[int, ...]  # a fraction of the teacher's layers, or the indices to keep
OVERRIDABLE = ("layers", "mlp_ratio", "flow_steps")


@dataclass(frozen=True)
class Params:
    # Per part: the fraction of the teacher's layers the student keeps (evenly spaced, first and last
    # kept; e.g. 0.5) or the teacher layer indices; a part left out keeps all its layers.
    layers: dict[str, LayerRequest] = field(default_factory=dict)
    mlp_ratio: float = 1.0  # student MLP width / teacher's
    flow_steps: int | None = None  # student integration steps; None keeps the teacher's
    # Overrides of layers / mlp_ratio / flow_steps for one family, e.g. per_family.smolvla.layers.backbone = [0, 1, 8, 9].
    per_family: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 600  # optimizer steps; 0 returns the initialised, untrained student
    batch_size: int = 32
    lr: float = 1e-3
    num_samples: int = 2048  # training observations drawn from the training episodes
    noises_per_sample: int = 1
    feature_loss_weight: float = 0.0  # MSE between student and teacher prefix features (families with a feature tap)
    weight_decay: float = 0.0
    # Extra copies of each observation with its state moved by N(0, (state_jitter * teacher state std)^2).
    # Distillation needs no labels, so these are free data: with a few episodes per task the student
    # otherwise sees few object/goal positions, and closed loop drifts off the recorded states.
    state_jitter_copies: int = 0
    state_jitter: float = 0.0
    # A student of another family: {"family": name, ...its shape}; empty: a student of the teacher's family.
    student: dict[str, Any] = field(default_factory=dict)
    objective: str = "auto"  # "auto" | "match" (shared noise, same family) | "flow" (teacher-labelled chunks)
    # Under accelerate launch / torchrun with several processes: "ddp" replicates the student, "fsdp"
    # shards student and teacher (FSDP2). One process: no difference.
    parallel: str = "ddp"
    # The student's forward while training: "fp32", "bf16" (autocast; weights, optimizer and loss in
    # FP32) or "auto" (bf16 where the training device computes BF16 in hardware, else fp32).
    train_precision: str = "fp32"


def kinds(params: Params, target) -> tuple[Kind, Kind]:
    return "torch", "torch"


def key_facts(params: Params) -> dict[str, Any]:
    """What the stage's result depends on beyond its params: the precision "auto" resolves to here."""
    return {"train_precision": resolve_precision(params.train_precision)}


def _check_layers(layers: dict[str, Any], where: str, source: str) -> None:
    for part, value in layers.items():
        if isinstance(value, float):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{where}.{part} is {value}; a fraction of the teacher's layers must be in (0, 1]",
                                  source=source, hint="e.g. 0.5 keeps half of them, or list the layer indices to keep")
            continue
        if not value:
            raise ConfigError(f"{where}.{part} is empty; keep at least one layer", source=source, hint="or leave the part out to keep all")
        if any(i < 0 for i in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ConfigError(
                f"{where}.{part} is {list(value)}; it must list teacher layer indices (from 0) in increasing order",
                source=source, hint="e.g. [0, 5] keeps the first and last of six layers",
            )


def resolved(params: Params, family: str, source: str = "recipe") -> Params:
    """``params`` with ``per_family[family]`` applied (checked like the rest)."""
    extra = params.per_family.get(family)
    if not extra:
        return params
    from vlacompile.config_util import from_dict

    bad = sorted(set(extra) - set(OVERRIDABLE))
    if bad:
        raise ConfigError(f"distill.per_family.{family} sets {bad}; only {list(OVERRIDABLE)} can differ per family", source=source,
                          hint="set the other keys in the [[stages]] distill table itself")
    over = from_dict(Params, extra, source, where=f"distill.per_family.{family}")
    return replace(params, **{k: getattr(over, k) for k in extra}, per_family={})


def check(params: Params, target, source: str = "recipe") -> None:
    _check_layers(params.layers, "distill.layers", source)
    if params.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"distill.parallel is {params.parallel!r}; it is \"ddp\" or \"fsdp\"", source=source,
                          hint="\"ddp\" replicates the student on each process, \"fsdp\" shards student and teacher")
    if params.train_precision not in PRECISIONS:
        raise ConfigError(f"distill.train_precision is {params.train_precision!r}; it is one of {list(PRECISIONS)}", source=source,
                          hint="\"auto\" trains in BF16 where the hardware has it")
    if params.objective not in ("auto", "match", "flow"):
        raise ConfigError(f"distill.objective is {params.objective!r}; it is \"auto\", \"match\" or \"flow\"", source=source,
                          hint="\"auto\" picks \"match\" for a student sliced from the teacher, \"flow\" for distill.student")
    if params.student:
        from vlacompile.families import get_family, known_families

        fam = params.student.get("family")
        if fam not in known_families():
            raise ConfigError(f"distill.student.family is {fam!r}; vlacompile has the families {known_families()}", source=source,
                              hint="e.g. student = { family = \"vlacompile-reference\", layers = 2, width = 128 }")
        if params.objective == "match":
            raise ConfigError("distill.objective = \"match\" shares the teacher's noise, which a student built by distill.student "
                              "(its own flow head) cannot take", source=source, hint="use objective = \"auto\" or \"flow\"")
        if params.layers or params.mlp_ratio != 1.0 or params.per_family:
            raise ConfigError("distill.layers / mlp_ratio / per_family select the teacher's own layers; a freshly initialised "
                              "student is shaped by distill.student", source=source,
                              hint="remove one of the two: distill.student for a freshly initialised student, or layers / "
                                   "mlp_ratio to slice the teacher")
        get_family(fam).check_student_shape(_shape(params), None, source)
    for family in params.per_family:
        p = resolved(params, family, source)
        _check_layers(p.layers, f"distill.per_family.{family}.layers", source)
        if not 0.0 < p.mlp_ratio <= 1.0 or (p.flow_steps is not None and p.flow_steps < 1):
            raise ConfigError(f"distill.per_family.{family}: mlp_ratio must be in (0, 1] and flow_steps >= 1, got {p.mlp_ratio} and "
                              f"{p.flow_steps}", source=source, hint=f"e.g. per_family.{family} = {{ mlp_ratio = 0.5, flow_steps = 2 }}")
    if not 0.0 < params.mlp_ratio <= 1.0:
        raise ConfigError(f"distill.mlp_ratio is {params.mlp_ratio}; it must be in (0, 1]", source=source,
                          hint="it is the fraction of MLP channels kept: 0.5 keeps half, 1.0 all")
    if params.flow_steps is not None and params.flow_steps < 1:
        raise ConfigError(f"distill.flow_steps is {params.flow_steps}; it must be >= 1", source=source,
                          hint="e.g. flow_steps = 2; leave it out to keep the teacher's")
    for key, low in (("steps", 0), ("batch_size", 1), ("num_samples", 1), ("noises_per_sample", 1), ("state_jitter_copies", 0)):
        if getattr(params, key) < low:
            raise ConfigError(f"distill.{key} is {getattr(params, key)}; it must be >= {low}", source=source,
                              hint=f"e.g. {key} = {Params.__dataclass_fields__[key].default} (its default)")
    if not params.lr > 0:
        raise ConfigError(f"distill.lr is {params.lr}; it must be > 0", source=source, hint="e.g. lr = 1e-3 (its default)")
    if (params.state_jitter_copies > 0) != (params.state_jitter > 0):
        raise ConfigError(
            f"distill.state_jitter_copies is {params.state_jitter_copies} and distill.state_jitter {params.state_jitter}",
            source=source,
            hint="set both (copies >= 1 and a jitter > 0, in units of the state's std) or neither",
        )
    for key in ("feature_loss_weight", "weight_decay", "state_jitter"):
        if getattr(params, key) < 0:
            raise ConfigError(f"distill.{key} is {getattr(params, key)}; it must be >= 0", source=source,
                              hint="0 (its default) turns it off")


def _shape(params: Params) -> dict[str, Any]:
    return {k: v for k, v in params.student.items() if k != "family"}


def check_teacher(params: Params, teacher, source: str = "recipe") -> None:
    """Before any work, once the teacher is loaded: a ``distill.student`` fits it (its chunk, its
    family: a family that cannot build a fresh student is refused here, naming the key)."""
    if params.student:
        from vlacompile.families import get_family

        get_family(params.student["family"]).check_student_shape(_shape(params), teacher.spec, source)


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


def narrow(width: int, ratio: float) -> int:
    """A student MLP width: ``ratio`` of the teacher's, at least 8 channels, never wider than the teacher."""
    return min(width, max(8, int(round(width * ratio))))


def init_student(source, params: Params, ctx: BuildContext):
    """The layer-selected (and MLP-narrowed) student with the teacher's weights, not yet trained."""
    import torch

    from vlacompile.families import get_family
    from vlacompile.stages.prune import measure_importance, top_k

    family = get_family(source.family)
    params = resolved(params, source.family)
    layers = family.resolve_layers(source.config, dict(params.layers), source="recipe stage distill")
    widths = family.mlp_widths(source.config)
    mlp = {p: [narrow(widths[p][j], params.mlp_ratio) for j in layers[p]] for p in layers if p in widths}
    cfg = family.student_config(source.config, layers, mlp, params.flow_steps)
    keep: dict[tuple[str, int], dict] = {}
    narrowed = [(p, i, j) for p in mlp for i, j in enumerate(layers[p]) if mlp[p][i] < widths[p][j]]
    if narrowed:
        from vlacompile.data.sampling import draw_stratified

        episodes = ctx.calibration if ctx.calibration is not None else ctx.train
        if episodes is None:
            raise EpisodeError("distill with mlp_ratio < 1 needs calibration episodes to rank MLP channels", source="distill.mlp_ratio")
        calib = draw_stratified(episodes, IMPORTANCE_SAMPLES, chunk_size=source.spec.chunk_size, seed=ctx.seed)
        imp = measure_importance(source, calib, seed=ctx.seed, parts=tuple(sorted({p for p, _, _ in narrowed})), what=("mlp",))
        for p, i, j in narrowed:
            # A layer the family offers no ranking for computes nothing the outputs read (SmolVLA's
            # last VLM layer: only its K/V are used): which channels it keeps does not matter.
            scores = imp.mlp.get((p, j))
            keep[(p, i)] = {"mlp": top_k(scores, mlp[p][i]) if scores is not None else torch.arange(mlp[p][i])}
    return family.restructure(source, cfg, layers=layers, keep=keep)


def run(artifact: Artifact, params: Params, ctx: BuildContext) -> Artifact:
    import numpy as np
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
    family = get_family(teacher.family)
    torch.manual_seed(ctx.seed)
    # distill.student: a freshly initialised student of that shape, of the teacher's family or another
    # (a same-family one was silently sliced from the teacher, keeping its size: issue 18).
    fresh = bool(params.student)
    if fresh:
        if ctx.train is None:
            raise EpisodeError("a student built by distill.student needs training episodes (their statistics normalise it)",
                               source="distill", hint="pass --episodes")
        stats = ctx.train.stats()
        student = get_family(params.student["family"]).new_student(teacher, _shape(params), stats, source="recipe stage distill")
        if params.flow_steps is not None:  # the student's own head: its flow steps are a shape like any other
            fam = get_family(student.family)
            student = fam.restructure(student, fam.student_config(student.config, {}, {}, params.flow_steps))
    else:
        # The student is sliced from the teacher (or its pruned self), so it keeps the teacher's
        # normalisation statistics and reproduces it in the teacher's units.
        student = init_student(artifact.policy, params, ctx)
    objective = params.objective if params.objective != "auto" else ("flow" if fresh else "match")
    ctx.log(
        f"distill: student {student.num_parameters() / 1e6:.2f}M params "
        f"({get_family(student.family).describe(student.config)}, {student.spec.flow_steps} flow steps) from teacher "
        f"{teacher.num_parameters() / 1e6:.2f}M ({teacher.spec.flow_steps} flow steps)"
    )

    metrics: dict[str, Any] = {}
    if params.steps > 0:
        if ctx.train is None:
            raise EpisodeError("distill needs training episodes", source="distill", hint="pass --episodes")
        samples = draw_stratified(ctx.train, params.num_samples, chunk_size=teacher.spec.chunk_size, seed=ctx.seed)
        if params.state_jitter_copies:
            std = family.state_scale(teacher)
            if std is None:
                std = np.asarray(ctx.train.stats()["observation.state"]["std"], np.float32)
            samples = with_state_jitter(samples, params.state_jitter_copies, params.state_jitter * std, seed=ctx.seed)
        settings = MatchSettings(
            steps=params.steps,
            batch_size=params.batch_size,
            lr=params.lr,
            weight_decay=params.weight_decay,
            noises_per_sample=params.noises_per_sample,
            feature_loss_weight=params.feature_loss_weight,
            objective=objective,
            parallel=params.parallel,
            precision=params.train_precision,  # "auto" is settled in the loop, on the first batch
        )
        metrics = train_to_match(student, teacher, samples, settings, ctx, name="distill")
        metrics["num_samples"] = len(samples)

    record = {
        "stage": "distill",
        "params": to_dict(params),
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": metrics.get("final_loss"),
        "loss_curve": metrics.get("loss_curve", []),
        **{k: metrics[k] for k in ("initial_loss", "target_seconds", "targets_reused", "train_seconds", "processes", "parallel", "local_parameters",
                                   "num_samples", "precision", "precision_reason") if k in metrics},
        "objective": objective,
        "student_family": student.family,
        "student_params": student.num_parameters(),
        "teacher_params": teacher.num_parameters(),
        "student_config": student.config.to_dict(),
    }
    return Artifact(policy=student, onnx_path=None, precision="fp32", quantized_torch=False, records=[*artifact.records, record])
