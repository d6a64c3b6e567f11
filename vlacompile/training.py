"""Train a student policy to reproduce its teacher's action chunks (distillation and recovery).

    targets = teacher(obs, noise)            once, for a fixed seeded set of (observation, noise) pairs
    loss    = mean(((student(obs, noise) - targets) / action_std) ** 2)   [+ w * prefix-feature MSE]

Giving the student the SAME initial noise as the teacher makes the teacher's K-step flow
integration the target of the student's k-step one: with k < K this is step distillation.

A student of another family (another head: its own noise shape, time convention, normalisation)
cannot share the teacher's noise. It learns from teacher-labelled chunks instead (``objective =
"flow"``): the teacher's chunks for several noise draws per observation, in physical units,
matched to the student's actions by name and cut to its chunk, are the data the student's own
flow head is trained on with flow matching (x_t between fresh noise and the chunk in the student's
x space, the velocity as target), through the family's split plan (System 2 once, one System 1
step). Each model reads the same raw observations through its own preprocessor.

The loop runs on Hugging Face Accelerate, so the same code trains in-process on one CPU or GPU and
under ``accelerate launch`` (or torchrun) on many. Batches are split across processes
(``split_batches``): the global batch, the data order and hence the result do not depend on the
number of processes, up to float rounding. Teacher targets are computed once, each process doing a
share of the observations. ``parallel = "ddp"`` replicates the student (Accelerate's DDP);
``parallel = "fsdp"`` shards it and the teacher with PyTorch's FSDP2 (``fully_shard`` on every
layer of a ``ModuleList`` and on the root, over a 1-D device mesh): each process holds 1/N of the
weights, gathered layer by layer for compute, gradients reduce-scattered, which is what a 3B
teacher needs. FSDP2 runs on CPU (gloo) as on GPU (NCCL).
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from vlacompile.errors import ConfigError, TrainingError
from vlacompile.policy import Policy


@dataclass(frozen=True)
class MatchSettings:
    steps: int = 600  # optimizer steps
    batch_size: int = 32  # global batch (split across processes)
    lr: float = 1e-3  # AdamW peak learning rate: linear warm-up, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW decay of tensors with ndim >= 2 (not biases or norm gains)
    noises_per_sample: int = 1  # (observation, noise) pairs per observation
    feature_loss_weight: float = 0.0  # MSE between student and teacher backbone (prefix) features
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    target_batch_size: int = 64  # teacher inference batch when computing targets
    objective: str = "match"  # "match": shared-noise chunk matching; "flow": flow matching on teacher-labelled chunks
    parallel: str = "ddp"  # with several processes: "ddp" (replicas) or "fsdp" (sharded student and teacher)
    log_points: int = 10  # loss values logged (and kept in the loss curve) over the run
    precision: str = "fp32"  # the student's forward: "fp32", "bf16" autocast (master weights, optimizer and loss stay FP32), or "auto"


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether ``device`` multiplies BF16 in hardware (CUDA compute capability >= 8; a CPU with
    AVX512-BF16 or AMX, or an Arm core with the BF16 extension, such as Jetson Thor's). oneDNN
    emulates BF16 on other CPUs, which is slower than FP32, so "auto" keeps those in FP32."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def resolve_precision(requested: str, device: torch.device | None = None) -> str:
    """``requested`` ("auto", "fp32", "bf16") -> what the training loop runs: "auto" is BF16
    autocast where the device computes BF16 natively, FP32 elsewhere."""
    if requested not in PRECISIONS:
        raise ConfigError(f"train_precision is {requested!r}; it is one of {list(PRECISIONS)}", source="recipe")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


# "auto" trains in BF16 only when the student's BF16 forward on the first batch is finite and within
# this relative L2 distance of its FP32 forward. BF16 keeps 8 significant bits (0.4% a rounding): the
# families' tiny policies measured up to 0.6%, so this catches NaN and garbage, not roundings.
BF16_CHECK_TOLERANCE = 0.05


def choose_precision(requested: str, objective: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[str, str]:
    """-> (the precision the loop trains in, why). "auto" picks BF16 where the device has BF16 units
    and the student's BF16 forward on ``batch`` is finite and close to its FP32 forward, FP32 otherwise."""
    if requested != "auto":
        return resolve_precision(requested, device), "asked for by distill.train_precision"
    if resolve_precision("auto", device) == "fp32":
        return "fp32", f"auto: {device.type} has no native BF16 units (BF16 would be emulated, slower than FP32)"
    with torch.no_grad():
        want = objective.prediction(**batch).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = objective.prediction(**batch).float()
    if not bool(torch.isfinite(got).all()):
        bad = int((~torch.isfinite(got)).sum())
        return "fp32", f"auto: the student's BF16 forward gave {bad} non-finite values on the first batch (FP32: " \
                       f"{'finite' if bool(torch.isfinite(want).all()) else 'non-finite too'}); falling back to FP32"
    err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-12))
    if err > BF16_CHECK_TOLERANCE:
        return "fp32", f"auto: the student's BF16 forward is {err:.1%} from FP32 on the first batch (limit " \
                       f"{BF16_CHECK_TOLERANCE:.0%}); falling back to FP32"
    return "bf16", f"auto: {device.type} has native BF16 units and the student's BF16 forward is {err:.2%} from FP32 on the first batch"


def model_inputs(policy: Policy, samples) -> dict[str, torch.Tensor]:
    """Samples -> the module's inputs other than the noise, through the family's preprocessor."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in samples.model_inputs(policy.spec).items()}


def noise_input(spec) -> str:
    """The name of the policy input that takes the flow's initial noise."""
    return next(i.name for i in spec.inputs if i.role == "noise")


def call(module: nn.Module, spec, inputs: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """``module`` on its inputs in ``spec`` order, with ``noise`` in the noise input's place."""
    name = noise_input(spec)
    return module(*[noise if n == name else inputs[n] for n in spec.input_names])


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Targets:
    """The teacher's outputs for pairs j = sample * noises_per_sample + r."""

    inputs: dict[str, torch.Tensor]  # per sample: every policy input but the noise
    noise: torch.Tensor  # [N, R, *spec.noise_shape]
    actions: torch.Tensor  # [N, R, chunk, A] physical units
    features: torch.Tensor | None = None  # [N, prefix tokens, width] backbone output
    feature_mask: torch.Tensor | None = None  # [N, prefix tokens] True where a token is not padding

    @property
    def num_pairs(self) -> int:
        return self.noise.shape[0] * self.noise.shape[1]


class _CaptureFeatures:
    """Forward hook on the family's feature tap, keeping the latest (features [B, n, w], valid [B, n])."""

    def __init__(self, module: nn.Module, tap):
        self.tap = tap
        self.output: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handle = module.get_submodule(tap.module).register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.output = self.tap.extract(output)

    def valid(self) -> torch.Tensor:
        return self.output[1]

    def remove(self) -> None:
        self.handle.remove()


def feature_tap(policy: Policy):
    """The family's feature tap for ``policy``, or a ConfigError when it has none."""
    from vlacompile.families import get_family

    tap = get_family(policy.family).feature_tap(policy.module)
    if tap is None:
        raise ConfigError(
            f"distill.feature_loss_weight > 0, but the {policy.family} family has no feature tap",
            source="recipe stage distill", hint="set feature_loss_weight = 0 for this teacher",
        )
    return tap


def _gather_rows(accelerator, local: torch.Tensor, per: int, total: int) -> torch.Tensor:
    """Concatenate every process's rows [start_r, start_r + per) (the last ones shorter) in order."""
    if accelerator is None or accelerator.num_processes == 1:
        return local
    pad = per - local.shape[0]
    if pad:
        local = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))])
    return accelerator.gather(local.to(accelerator.device).contiguous()).cpu()[:total]


def teacher_targets(
    teacher: Policy,
    samples,
    *,
    noises_per_sample: int,
    seed: int,
    features: bool,
    accelerator=None,
    batch_size: int = 64,
    progress: bool = False,
    sharded_teacher: bool = False,
    inputs: dict[str, torch.Tensor] | None = None,
) -> Targets:
    """Run the teacher once on every (sample, seeded noise) pair; processes share the samples.
    ``inputs``: the teacher's model inputs for ``samples``, when the caller has them already."""
    from tqdm import tqdm

    spec = teacher.spec
    inputs = model_inputs(teacher, samples) if inputs is None else inputs
    n, r = len(samples), noises_per_sample
    noise = seeded_noise((n, r, *spec.noise_shape), seed)
    procs = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    per = math.ceil(n / procs)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)

    module = teacher.module
    first = next(module.parameters(), None)  # an opaque (ONNX) teacher has none
    home = first.device if first is not None else torch.device("cpu")
    was_training = module.training
    sharded = sharded_teacher and procs > 1 and first is not None
    if sharded:  # a sharded copy: every process runs the same number of batches (the gathers are collective)
        module = shard(copy.deepcopy(module).to(device).eval())
    else:
        module.to(device).eval()
    tap = feature_tap(teacher) if features else None
    capture = _CaptureFeatures(module, tap) if features else None
    actions, feats, masks = [], [], []
    end = lo + per if sharded else hi  # sharded: as many batches as every other process, padded past hi
    try:
        with torch.inference_mode():
            for s in tqdm(range(lo, end, batch_size), desc="teacher targets", disable=not progress, mininterval=1.0):
                wanted = torch.arange(s, min(s + batch_size, end))
                keep = int((wanted < hi).sum())
                rows = wanted.clamp(max=n - 1)
                x = {k: v[rows].to(device) for k, v in inputs.items()}
                outs = []
                for k in range(r):
                    outs.append(call(module, spec, x, noise[rows, k].to(device)).cpu()[:keep])
                    if capture is not None and k == 0:
                        feats.append(capture.output[0].cpu()[:keep])
                        masks.append(capture.valid().cpu()[:keep])
                actions.append(torch.stack(outs, dim=1))
    finally:
        if capture is not None:
            capture.remove()
        if not sharded:
            module.to(home).train(was_training)

    def rows(parts: list[torch.Tensor], like: tuple[int, ...]) -> torch.Tensor:
        local = torch.cat(parts) if parts else torch.zeros((0, *like))  # a process may get no samples
        # clone(): inference tensors cannot take part in autograd later.
        return _gather_rows(accelerator, local, per, n).clone()

    out = Targets(inputs=inputs, noise=noise, actions=rows(actions, (r, spec.chunk_size, spec.action_dim)))
    if features:
        out.features = rows(feats, (tap.tokens, tap.width))
        # Gathered as float: not every backend can all-gather booleans.
        out.feature_mask = rows([m.float() for m in masks], (tap.tokens,)) > 0.5
    return out


class _PairDataset(torch.utils.data.Dataset):
    """(observation, noise, teacher actions[, teacher features]) by pair index; fetched a batch at a time.

    ``inputs``: the student's model inputs per sample (its own preprocessor) when they differ from
    the teacher's. ``flow``: (noise shape, seed): instead of the teacher's noise, a fresh noise and
    flow time per visit, drawn from the visit's position so the stream is the same on any number of
    processes (the sampler then yields (position, pair) tuples)."""

    def __init__(self, targets: Targets, noise_name: str, inputs: dict[str, torch.Tensor] | None = None,
                 flow: tuple[tuple[int, ...], int] | None = None):
        self.t = targets
        self.inputs = inputs if inputs is not None else targets.inputs
        self.noise_name = noise_name
        self.r = targets.noise.shape[1]
        self.noise = targets.noise.flatten(0, 1)
        self.actions = targets.actions.flatten(0, 1)
        self.flow = flow

    def __len__(self) -> int:
        return self.t.num_pairs

    def __getitems__(self, idx: list) -> dict[str, torch.Tensor]:
        if self.flow is not None:
            pos, idx = [p for p, _ in idx], [j for _, j in idx]
        j = torch.as_tensor(idx, dtype=torch.long)
        s = j // self.r
        batch = {k: v[s] for k, v in self.inputs.items()}
        batch["target"] = self.actions[j]
        if self.flow is None:
            batch[self.noise_name] = self.noise[j]
        else:
            shape, seed = self.flow
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + p) for p in pos]
            batch[self.noise_name] = torch.stack([torch.randn(shape, generator=g) for g in gens])
            batch["flow_u"] = torch.stack([torch.rand((), generator=g) for g in gens])
        if self.t.features is not None:
            batch["features"] = self.t.features[s]
            batch["feature_mask"] = self.t.feature_mask[s]
        return batch

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _batch_as_is(batch):
    return batch  # __getitems__ already returns a collated batch


class _EpochSampler(torch.utils.data.Sampler[int]):
    """``total`` indices: seeded permutations of range(n) back to back. The same on every process.
    ``with_position``: (position in the stream, index) tuples."""

    def __init__(self, n: int, total: int, seed: int, with_position: bool = False):
        self.n, self.total, self.seed, self.with_position = n, total, seed, with_position

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator:
        g = torch.Generator().manual_seed(self.seed)
        done = 0
        while done < self.total:
            perm = torch.randperm(self.n, generator=g)[: self.total - done]
            if self.with_position:
                yield from zip(range(done, done + len(perm)), perm.tolist())
            else:
                yield from perm.tolist()
            done += len(perm)


class _MatchObjective(nn.Module):
    """Wraps the student so that one forward returns the loss (what DDP/FSDP need to wrap)."""

    def __init__(self, student: Policy, module: nn.Module, action_std: torch.Tensor, feature_loss_weight: float):
        super().__init__()
        self.student = module
        self.spec = student.spec
        self.feature_loss_weight = feature_loss_weight
        self.register_buffer("inv_std", 1.0 / action_std.detach().clone(), persistent=False)
        self.capture = _CaptureFeatures(module, feature_tap(student)) if feature_loss_weight > 0 else None

    def prediction(self, target=None, features=None, feature_mask=None, **inputs) -> torch.Tensor:
        """The student's chunk for a batch (what the loss compares with the teacher's)."""
        return call(self.student, self.spec, inputs, inputs[noise_input(self.spec)])

    def forward(self, target, features=None, feature_mask=None, **inputs) -> torch.Tensor:
        actions = self.prediction(**inputs)
        loss = (((actions - target) * self.inv_std) ** 2).mean()
        if self.capture is not None:
            # Per-sample mean over real (non-padding) tokens, so a split batch averages the same way.
            err = ((self.capture.output[0] - features) ** 2).mean(-1)
            m = feature_mask.float()
            per_sample = (err * m).sum(-1) / m.sum(-1).clamp_min(1.0)
            loss = loss + self.feature_loss_weight * per_sample.mean()
        return loss


class _FlowObjective(nn.Module):
    """Flow matching of a student of another family on the teacher's chunks (``objective = "flow"``).

    The teacher's chunk (physical units, [B, chunk_T, A_T]) is cut to the student's chunk, its
    actions picked by name, and mapped into the student's x space by inverting the split plan's
    post ops (padding dimensions 0). With the plan's integrator running from t0 over D = K * dt:
    x_t = noise + u (a - noise) at t = t0 + u D, and the target velocity is (a - noise) / D. The loss
    is the mean squared error over the student's real action dimensions."""

    def __init__(self, student: Policy, module: nn.Module, action_index: list[int]):
        super().__init__()
        from dataclasses import replace

        from vlacompile.families import get_family

        self.student = module
        self.spec = student.spec
        plan = get_family(student.family).split_plan(replace(student, module=module))
        object.__setattr__(self, "_plan", plan)  # views sharing self.student's children: not registered twice
        integ = plan.integrator
        k = len(integ["times"])
        step = float(integ["update"]["value"])
        self.t0 = float(integ["times"][0])
        self.span = (step if integ["update"]["op"] == "mul" else 1.0 / step) * k
        self.register_buffer("action_index", torch.as_tensor(action_index, dtype=torch.long), persistent=False)
        self.chunk, self.width = student.spec.chunk_size, student.spec.noise_shape[-1]
        self.action_dim = student.spec.action_dim

    def prediction(self, target, flow_u, **inputs) -> torch.Tensor:
        """The student's velocity for a batch (what the loss compares with the target velocity)."""
        return self._velocity(target, flow_u, **inputs)[0]

    def forward(self, target, flow_u, **inputs) -> torch.Tensor:
        v, a, noise = self._velocity(target, flow_u, **inputs)
        return ((v - (a - noise) / self.span)[..., : self.action_dim] ** 2).mean()

    def _velocity(self, target, flow_u, **inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from vlacompile.families.base import apply_ops, invert_ops

        plan = self._plan
        values = dict(inputs)
        for d in plan.derived:
            values[d["output"]] = apply_ops(values[d["input"]], d["ops"])
        carry = plan.system2(*[values[n] for n in plan.system2_inputs])
        carry = carry if isinstance(carry, tuple) else (carry,)
        values.update(zip(plan.system2_outputs, carry))
        a = invert_ops(target[:, : self.chunk].index_select(-1, self.action_index), plan.post, self.width)
        noise = values[plan.integrator["init"]]
        u = flow_u.reshape(-1, *([1] * (noise.dim() - 1)))
        values[plan.integrator["x"]] = noise + u * (a - noise)
        values[plan.integrator["t"]] = self.t0 + flow_u * self.span
        return plan.system1(*[values[n] for n in plan.system1_inputs]), a, noise


def action_index(student_spec, teacher_spec) -> list[int]:
    """For each of the student's actions, the teacher's action with its name (or at its position
    when either side has no names)."""
    s, t = student_spec.action_names, teacher_spec.action_names
    if s is None or t is None:
        if student_spec.action_dim > teacher_spec.action_dim:
            raise ConfigError(f"the student emits {student_spec.action_dim} actions, the teacher {teacher_spec.action_dim}",
                              source="recipe stage distill")
        return list(range(student_spec.action_dim))
    missing = [n for n in s if n not in t]
    if missing:
        raise ConfigError(f"the student's actions {missing} are not among the teacher's {list(t)}", source="recipe stage distill",
                          hint="a student can only learn actions its teacher emits")
    return [list(t).index(n) for n in s]


def shard(module: nn.Module) -> nn.Module:
    """FSDP2 over all processes: every layer of every ``ModuleList`` that is called as a module (has
    a forward: FSDP gathers a unit in its forward hook) its own unit, then the root (embeddings,
    projections, norms, and layers used only as containers). In place; returns the module."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for layer in sub:
                if type(layer).forward is not nn.Module.forward and any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def local_parameters(module: nn.Module) -> int:
    """Parameter elements this process holds (a shard's local part under FSDP)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay weight matrices only; biases, norm gains and 1-D parameters are left alone.
    decay = [p for p in module.parameters() if p.ndim >= 2]
    rest = [p for p in module.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # split_batches: the loader's batch is the GLOBAL batch, cut into one slice per process.
    return Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(split_batches=True))


def _data_source(ctx) -> str:
    """The episodes the samples came from, for error messages."""
    root = getattr(getattr(ctx, "train", None), "root", None)
    return str(root) if root is not None else "the training samples"


def _targets_key(teacher: Policy, inputs: dict[str, torch.Tensor], settings: MatchSettings, seed: int) -> str | None:
    """What the teacher's targets depend on: its weights and definition, the observations (as its
    preprocessor sees them), the noise seed and draws, whether features are kept. Not the student,
    its steps or the target profile: one precompute serves every build that draws these samples."""
    import hashlib

    if not teacher.meta.get("weights_sha256"):
        return None
    h = hashlib.sha256(f"teacher-targets/1/{teacher.meta['weights_sha256']}/{teacher.meta.get('definition_sha256', '')}".encode())
    h.update(json_bytes({"seed": seed, "r": settings.noises_per_sample, "features": settings.feature_loss_weight > 0,
                         "spec": teacher.spec.to_dict()}))
    for name, v in sorted(inputs.items()):
        h.update(name.encode() + np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()


def json_bytes(value) -> bytes:
    import json

    return json.dumps(value, sort_keys=True, default=str).encode()


def _cached_targets(cache, key: str, teacher: Policy, inputs: dict[str, torch.Tensor], seed: int) -> Targets | None:
    hit = cache.get_arrays(key)
    if hit is None:
        return None
    actions = torch.from_numpy(hit["actions"])
    n, r = actions.shape[:2]
    spec = teacher.spec
    out = Targets(inputs=inputs, noise=seeded_noise((n, r, *spec.noise_shape), seed), actions=actions)
    if "features" in hit:
        out.features, out.feature_mask = torch.from_numpy(hit["features"]), torch.from_numpy(hit["feature_mask"])
    return out


def train_to_match(student: Policy, teacher: Policy, samples, settings: MatchSettings, ctx, *, name: str = "distill") -> dict[str, Any]:
    """Train ``student`` in place to reproduce ``teacher`` on ``samples``; returns loss metrics.

    ``ctx`` supplies ``seed``, ``progress`` and ``log`` (a ``BuildContext``). Deterministic under
    ``ctx.seed``; the same result (up to float rounding) on 1 or N processes.
    """
    from tqdm import tqdm

    torch.manual_seed(ctx.seed)
    accelerator = make_accelerator()
    procs = accelerator.num_processes
    if settings.batch_size % procs:
        raise ConfigError(
            f"batch_size={settings.batch_size} cannot be split evenly over {procs} processes",
            source=f"recipe stage {name.split()[0]}",
            hint=f"use a batch size that is a multiple of {procs}",
        )
    main = accelerator.is_main_process
    show = ctx.progress and main

    t0 = time.perf_counter()
    cache = getattr(ctx, "cache", None)
    teacher_in = model_inputs(teacher, samples)  # once: the cache key hashes them, the teacher runs on them
    key = _targets_key(teacher, teacher_in, settings, ctx.seed) if cache is not None else None
    targets = _cached_targets(cache, key, teacher, teacher_in, ctx.seed) if key is not None else None
    reused = targets is not None
    if targets is None:
        targets = teacher_targets(
            teacher,
            samples,
            noises_per_sample=settings.noises_per_sample,
            seed=ctx.seed,
            features=settings.feature_loss_weight > 0,
            accelerator=accelerator,
            batch_size=settings.target_batch_size,
            progress=show,
            sharded_teacher=settings.parallel == "fsdp",
            inputs=teacher_in,
        )
        if key is not None:
            arrays = {"actions": targets.actions.numpy()}
            if targets.features is not None:
                arrays.update(features=targets.features.numpy(), feature_mask=targets.feature_mask.numpy())
            cache.put_arrays(key, "teacher-targets", arrays)
    target_seconds = time.perf_counter() - t0
    if main:
        how = f"reused from the stage cache (key {key[:12]})" if reused else f"in {target_seconds:.1f} s"
        ctx.log(f"{name}: teacher targets for {targets.num_pairs} (observation, noise) pairs {how}")
    data = _data_source(ctx)
    finite = torch.isfinite(targets.actions).flatten(1).all(dim=1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten().tolist()
        first = rows[0]  # actions are [sample, noise draw, chunk, action]
        where = (f"episode {int(samples.episode_index[first])} frame {int(samples.frame_index[first])}"
                 if hasattr(samples, "episode_index") else f"sample {first}")
        raise TrainingError(
            f"{name}: the teacher's actions are NaN or infinite on {len(rows)} of {len(finite)} observations "
            f"(first: {where})",
            source=data,
            hint="the teacher or these observations are broken: check the episodes' values and the teacher's weights",
        )

    # Train a copy: wrappers (DDP, FSDP) may rewrite the module they are given.
    from vlacompile.families import get_family

    flow = settings.objective == "flow"
    if flow:
        if settings.feature_loss_weight > 0:
            raise ConfigError("distill.feature_loss_weight > 0 needs a student of the teacher's family (its prefix features)",
                              source=f"recipe stage {name.split()[0]}", hint="set feature_loss_weight = 0")
        if student.spec.chunk_size > teacher.spec.chunk_size:
            raise ConfigError(f"the student's chunk ({student.spec.chunk_size}) is longer than the teacher's ({teacher.spec.chunk_size})",
                              source=f"recipe stage {name.split()[0]}")
        objective = _FlowObjective(student, copy.deepcopy(student.module), action_index(student.spec, teacher.spec))
    else:
        action_std = get_family(teacher.family).action_scale(teacher)
        objective = _MatchObjective(student, copy.deepcopy(student.module), action_std, settings.feature_loss_weight)
    objective.train()
    same_inputs = student.spec.inputs == teacher.spec.inputs
    dataset = _PairDataset(targets, noise_input(student.spec), inputs=None if same_inputs else model_inputs(student, samples),
                           flow=(tuple(student.spec.noise_shape), ctx.seed) if flow else None)
    sampler = _EpochSampler(targets.num_pairs, settings.steps * settings.batch_size, ctx.seed, with_position=flow)
    # The same first batch on every process (the sampler is seeded), so all of them decide alike.
    first = dataset.__getitems__(list(itertools.islice(iter(sampler), settings.batch_size)))
    objective.to(accelerator.device)
    precision, why = choose_precision(settings.precision, objective, {k: v.to(accelerator.device) for k, v in first.items()},
                                      accelerator.device)
    if main:
        how = "BF16 autocast (FP32 weights and optimizer)" if precision == "bf16" else "FP32"
        ctx.log(f"{name}: training in {how}; {why}")
    fsdp = settings.parallel == "fsdp" and procs > 1
    if fsdp:
        # FSDP2 by hand (Accelerate's FSDP needs GPUs): shard before the optimizer sees the parameters.
        shard(objective.to(accelerator.device))
    optimizer = torch.optim.AdamW(_param_groups(objective.student, settings.weight_decay), lr=settings.lr, foreach=True)
    warmup = max(1, round(settings.warmup_fraction * settings.steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=_batch_as_is,
    )
    if fsdp:
        loader = accelerator.prepare(loader)
    else:
        objective, optimizer, loader, scheduler = accelerator.prepare(objective, optimizer, loader, scheduler)
    held = local_parameters(objective)

    log_every = max(1, settings.steps // max(1, settings.log_points))
    # Mixed precision as on GPUs: the forward's matrix products in BF16 (2.3x an FP32 one on
    # AVX512-BF16), with FP32 weights, gradients, optimizer and loss; autocast keeps the norms,
    # softmax and reductions in FP32.
    autocast = precision == "bf16"
    curve: list[list[float]] = []
    window, count = torch.zeros((), device=accelerator.device), 0
    t1 = time.perf_counter()
    with tqdm(total=settings.steps, desc=name, disable=not show, mininterval=1.0) as bar:
        for step, batch in enumerate(loader):
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = objective(**batch)
            loss = loss.float()
            if not bool(torch.isfinite(loss.detach())):  # training on NaN would run to the end and fail at export
                raise TrainingError(
                    f"{name}: the loss is {float(loss.detach())} at step {step + 1} of {settings.steps} "
                    f"(lr {settings.lr:g}, {'BF16 autocast' if autocast else 'FP32'}: {why})",
                    source=data,
                    hint=("train in FP32 (train_precision = \"fp32\") to tell a BF16 overflow from the rest; then "
                          if autocast else "") + "lower the stage's lr, or check the episodes for corrupt values (huge or "
                         "wrong-unit states and actions); nothing was written",
                )
            if fsdp:
                loss.backward()  # FSDP2 reduce-scatters the gradients (mean over processes)
                if settings.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(objective.parameters(), settings.max_grad_norm)
            else:
                accelerator.backward(loss)
                if settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(objective.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window += loss.detach()
            count += 1
            if (step + 1) % log_every == 0 or step + 1 == settings.steps:
                # Each process's loss is the mean over its equal slice: their mean is the global loss.
                value = float(accelerator.reduce(window / count, reduction="mean"))
                curve.append([step + 1, value])
                window.zero_()
                count = 0
                bar.set_postfix(loss=f"{value:.4g}")
                if main:
                    ctx.log(f"{name}: step {step + 1}/{settings.steps} loss {value:.4g}")
            bar.update(1)
    train_seconds = time.perf_counter() - t1

    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True))  # every process, as with DDP
    else:
        full = accelerator.get_state_dict(objective)
    prefix = "student."
    student.module.load_state_dict({k[len(prefix) :]: v.detach().cpu() for k, v in full.items() if k.startswith(prefix)})
    student.module.eval()
    accelerator.free_memory()
    if main:
        ctx.log(f"{name}: {settings.steps} steps in {train_seconds:.1f} s, final loss {curve[-1][1]:.4g}" if curve else f"{name}: no steps")
    return {
        "final_loss": curve[-1][1] if curve else None,
        "initial_loss": curve[0][1] if curve else None,
        "loss_curve": curve,
        "target_seconds": round(target_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "targets_reused": reused,
        "processes": procs,
        "parallel": "fsdp" if fsdp else ("ddp" if procs > 1 else "none"),
        "precision": precision,
        "precision_reason": why,
        "local_parameters": held,  # what this process held while training (1/N of them under FSDP)
    }
