"""verify: the compiled student against its teacher on held-out episodes.

    accuracy   teacher (torch eager) and student (ONNX Runtime) on the same observations and the same
               noise: NMSE / worst error / cosine vs the teacher, both vs the demonstrations, jerk
    latency    the whole get_action call, warm, p50/p90/p99/max, on this host
    roofline   the lower bound for the target (data-sheet figures, or the host's microbenchmark)
    gates      the target's tolerances and budgets: measured on the host, estimated elsewhere

Every figure says where it came from; a budget judged only on an estimate is "not verified".
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlacompile.errors import CheckpointError, EpisodeError
from vlacompile.verify.accuracy import action_agreement, self_consistency
from vlacompile.verify.gates import judge
from vlacompile.verify.latency import control_rate, measure_latency
from vlacompile.verify.roofline import estimate, measure_host, policy_weight_bytes

__all__ = ["verify", "held_out_inputs", "action_agreement", "self_consistency", "measure_latency", "control_rate", "estimate", "judge"]

BATCH = 32
TRACES = 3
LATENCY_OBSERVATIONS = 16  # distinct observations cycled through by the latency loop


def _stride_for(held_out, max_samples: int) -> int | None:
    """The smallest frame stride that yields at most ``max_samples`` samples; None when even one
    sample per episode is too many."""
    if len(held_out.episodes) > max_samples:
        return None
    stride = max(1, math.ceil(held_out.num_frames / max_samples))
    while sum(math.ceil(len(ep) / stride) for ep in held_out.episodes) > max_samples:
        stride += 1
    return stride


def own_head(teacher_spec, student_spec) -> bool:
    """Whether the student has a head of its own (compared on independent noise, its own inputs): one
    of another family, or a freshly initialised one of the teacher's family (``distill.student``),
    whose inputs differ from the teacher's."""
    return student_spec.family != teacher_spec.family or student_spec.inputs != teacher_spec.inputs


def _check_student_spec(teacher_spec, student_spec, onnx_path: Path) -> None:
    if own_head(teacher_spec, student_spec):  # distilled into its own head: same observations and actions
        problems = []
        missing = [c.name for c in student_spec.cameras if c.name not in {t.name for t in teacher_spec.cameras}]
        if missing:
            problems.append(f"reads cameras {missing} the teacher does not")
        if student_spec.state_dim != teacher_spec.state_dim:
            problems.append(f"reads a {student_spec.state_dim}-dim state, the teacher {teacher_spec.state_dim}")
        if student_spec.chunk_size > teacher_spec.chunk_size:
            problems.append(f"emits chunks of {student_spec.chunk_size}, longer than the teacher's {teacher_spec.chunk_size}")
        if problems:
            raise CheckpointError("the student (a " + student_spec.family + " policy) " + "; ".join(problems), source=onnx_path,
                                  hint="compile the student from this teacher")
        return
    same = ("family", "cameras", "state_dim", "action_dim", "chunk_size", "max_tokens", "inputs")
    diff = [k for k in same if getattr(teacher_spec, k) != getattr(student_spec, k)]
    if diff:
        raise CheckpointError(
            f"the student differs from the teacher in {diff}: verify compares them on the same inputs and outputs",
            source=onnx_path,
            hint="compile the student from this teacher (only sizes and flow steps may change)",
        )


def _as_student(actions: np.ndarray, teacher_spec, student_spec) -> np.ndarray:
    """Teacher chunks [N, chunk_T, A_T] cut to the student's chunk and actions (by name)."""
    if not own_head(teacher_spec, student_spec):
        return actions
    from vlacompile.training import action_index

    return actions[:, : student_spec.chunk_size][..., action_index(student_spec, teacher_spec)]


def _traces(samples, teacher_a, student_a, k: int = TRACES) -> list[dict]:
    """The first sample of up to ``k`` different episodes: chunks for the report's trace plots."""
    picked, seen = [], set()
    for i, e in enumerate(samples.episode_index):
        if int(e) not in seen:
            seen.add(int(e))
            picked.append(i)
        if len(picked) == k:
            break
    return [
        {
            "episode_index": int(samples.episode_index[i]),
            "frame_index": int(samples.frame_index[i]),
            "task": samples.tasks[i],
            "teacher": teacher_a[i].tolist(),
            "student": student_a[i].tolist(),
            "recorded": samples.actions[i].tolist(),
        }
        for i in picked
    ]


def _student_memory(onnx_path: Path, runner, obs, noise, provider: str, notes: list[str]) -> dict | None:
    """Peak RSS of a fresh process that runs only the student; None (and a note) if that fails."""
    from vlacompile.backends.onnxrt import PROVIDERS
    from vlacompile.verify.latency import _runner_threads, measure_process_memory

    try:
        return measure_process_memory(onnx_path, runner.preprocess(obs, noise), providers=PROVIDERS[provider], threads=_runner_threads(runner) or 1)
    except (RuntimeError, OSError, ImportError) as e:
        notes.append(f"could not measure the student's memory in a separate process ({e}); the memory gate uses this process's peak")
        return None


def _roofline(policy, precision: str, target, host) -> dict | None:
    from vlacompile.families import get_family

    family = get_family(policy.family)
    flops = family.flops(policy.config) if family is not None else None
    if flops is None:  # an opaque teacher: its FLOPs are not known
        return None
    return estimate(flops, policy_weight_bytes(policy), target, precision, host=host)


@dataclass
class HeldOutInputs:
    """Held-out samples as model inputs, with one noise per sample shared by every runtime compared."""

    samples: Any
    inputs: dict[str, np.ndarray]  # batched model inputs (noise = the shared first draw)
    noise2: np.ndarray  # a second draw: the teacher's own sample-to-sample spread
    observations: list[dict]  # raw observations for timing the whole get_action path
    noises: list[np.ndarray]
    stride: int | None
    noise_name: str = "noise"


def held_out_inputs(held_out, spec, *, max_samples: int = 256, seed: int = 0) -> HeldOutInputs:
    """Every stride-th frame of every held-out episode, at most ``max_samples`` (with more episodes
    than that, a stratified draw over tasks, episodes and time)."""
    from vlacompile.data import draw_stratified, make_samples

    missing = [c.name for c in spec.cameras if c.name not in held_out.camera_names]
    if missing:
        raise EpisodeError(
            f"the policy reads cameras {missing} that the held-out episodes do not have ({list(held_out.camera_names)})",
            source=held_out.root or "held-out episodes",
            hint="verify on episodes recorded with the policy's cameras",
        )
    stride = _stride_for(held_out, max_samples)
    if stride is None:
        samples = draw_stratified(held_out, max_samples, chunk_size=spec.chunk_size, seed=seed)
    else:
        samples = make_samples(held_out, chunk_size=spec.chunk_size, stride=stride)
    n = len(samples)
    model_in = samples.model_inputs(spec)
    rng = np.random.default_rng(seed)
    shape = (n, *spec.noise_shape)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise2 = rng.standard_normal(shape, dtype=np.float32)
    noise_name = next(i.name for i in spec.inputs if i.role == "noise")
    inputs = {**model_in, noise_name: noise}
    k = min(n, LATENCY_OBSERVATIONS)
    # As a camera driver delivers frames: one contiguous HxWx3 uint8 array per camera.
    batch = samples.observations()
    observations = [batch.row(i) for i in range(k)]
    return HeldOutInputs(samples, inputs, noise2, observations, [noise[i] for i in range(k)], stride, noise_name)


def _teacher_actions(teacher, runner, inputs: dict[str, np.ndarray], noise2: np.ndarray, cache, progress: bool, notes: list[str]):
    """The teacher's chunks for both noise draws: a pure function of its weights and the inputs, so
    a stage cache (``vlacompile.cache.StageCache``) may hold them; timings are never cached."""
    key = None
    if cache is not None and teacher.meta.get("weights_sha256"):
        import hashlib

        h = hashlib.sha256(f"teacher-actions/1/{teacher.meta['weights_sha256']}".encode())
        for name in sorted(inputs):
            h.update(name.encode() + np.ascontiguousarray(inputs[name]).tobytes())
        h.update(np.ascontiguousarray(noise2).tobytes())
        key = h.hexdigest()
        hit = cache.get_arrays(key)
        if hit is not None:
            notes.append(f"the teacher's held-out actions were reused from the stage cache (key {key[:12]}); latency was measured again")
            return hit["a"], hit["b"]
    noise_name = next(i.name for i in teacher.spec.inputs if i.role == "noise")
    a = runner.run_batched(inputs, BATCH, progress=progress, desc="teacher")
    b = runner.run_batched({**inputs, noise_name: noise2}, BATCH, progress=progress, desc="teacher (2nd noise)")
    if key is not None:
        cache.put_arrays(key, "teacher-actions", {"a": a, "b": b})
    return a, b


def _student_runner(student_onnx: Path, spec, student_policy, provider: str, notes: list[str]):
    """ONNX Runtime on the exported graph; for graphs with TensorRT-only ops (modelopt FP8 / INT4-AWQ),
    which ONNX Runtime cannot load, the fake-quant torch student that was exported (same numerics)."""
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.stages.export import unsupported_domains

    domains = unsupported_domains(student_onnx)
    if not domains:
        return OrtRunner(student_onnx, spec, provider=provider)
    if student_policy is None:
        raise CheckpointError(
            f"the graph uses op domains {domains} that ONNX Runtime cannot run, and no torch student was given",
            source=student_onnx,
            hint="verify it on the device with TensorRT, or pass the fake-quant torch student",
        )
    from vlacompile.backends.torch_eager import TorchRunner

    notes.append(
        f"{student_onnx.name} uses TensorRT-only ops ({', '.join(domains)}): the student's accuracy was measured on the "
        "fake-quant torch model it was exported from (the same quantised numerics), not by running the graph; "
        "its host timings are of that torch model"
    )
    runner = TorchRunner(student_policy)
    runner.name = "torch-fake-quant (graph needs TensorRT)"
    return runner


def verify(
    teacher,
    student_onnx: Path,
    held_out,
    target,
    *,
    student_policy=None,
    student_precision: str = "fp32",
    calls: int = 200,
    max_samples: int = 256,
    seed: int = 0,
    provider: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    cache=None,
    student_runner=None,
    on_device: str | None = None,
    flow_trained: bool = False,
) -> dict[str, Any]:
    """Compare the compiled student (``student_onnx``) with ``teacher`` on ``held_out`` episodes and
    judge ``target``'s gates. ``student_policy`` (the torch student the graph was exported from)
    supplies the student's spec and its size for the roofline; without it the teacher's spec is used.
    ``flow_trained``: the student learned the teacher's chunks by flow matching (distill objective
    "flow", e.g. a ``distill.student``), so it is compared on independent noise like a head of its own.
    """
    from vlacompile.backends.torch_eager import TorchRunner
    from vlacompile.targets import host_device_string

    t_start = time.perf_counter()
    student_onnx = Path(student_onnx)
    spec = teacher.spec
    student_spec = student_policy.spec if student_policy is not None else spec
    _check_student_spec(spec, student_spec, student_onnx)
    host = host_device_string()
    notes: list[str] = []

    data = held_out_inputs(held_out, spec, max_samples=max_samples, seed=seed)
    samples, inputs, n, stride = data.samples, data.inputs, len(data.samples), data.stride
    noise2 = data.noise2
    log(f"verify: {n} samples from {len(held_out.episodes)} held-out episodes ({f'every {stride} frames' if stride else 'stratified draw'})")

    # Accuracy.
    teacher_runner = TorchRunner(teacher)
    if student_runner is None:
        student_runner = _student_runner(student_onnx, student_spec, student_policy, provider, notes)
    teacher_a, teacher_b = _teacher_actions(teacher, teacher_runner, inputs, noise2, cache, progress, notes)
    observations, noises = data.observations, data.noises
    student_inputs, student_noises = inputs, noises
    cross = own_head(spec, student_spec) or flow_trained
    if cross:
        # A head of its own: its own inputs (its preprocessor) and its own noise, drawn independently.
        rng = np.random.default_rng([seed, 0x5EED])
        s_noise = rng.standard_normal((n, *student_spec.noise_shape), dtype=np.float32)
        s_name = next(i.name for i in student_spec.inputs if i.role == "noise")
        student_inputs = {**samples.model_inputs(student_spec), s_name: s_noise}
        student_noises = [s_noise[i] for i in range(len(noises))]
        teacher_a, teacher_b = _as_student(teacher_a, spec, student_spec), _as_student(teacher_b, spec, student_spec)
        notes.append(f"the student ({student_spec.family}) learned this {spec.family} teacher's chunks with its own head and "
                     "noise, so it is compared with the teacher on independent noise draws (the teacher's own spread "
                     "across draws, teacher_self_consistency, is the floor of its NMSE)"
                     + (f"; compared on the teacher's first {student_spec.chunk_size} actions" if student_spec.chunk_size < spec.chunk_size else ""))
    student_a = student_runner.run_batched(student_inputs, BATCH, progress=progress, desc="student")
    accuracy = action_agreement(teacher_a, student_a, _as_student(samples.actions, spec, student_spec))
    accuracy["teacher_self_consistency"] = self_consistency(teacher_a, teacher_b)
    accuracy["independent_noise"] = cross
    accuracy["measured_on"] = host
    notes += accuracy.pop("notes", [])

    # Latency of the whole get_action path, on this host.
    warmup = min(20, calls)
    # Each alone: a student timed between torch calls shares the cores with torch's spinning threads
    # (the demo student's p50 went from 1.4 to 4 ms interleaved), and the budget is for the student
    # as deployed. measure_interleaved is for ratios (bench/).
    log(f"verify: timing get_action, {calls} warm calls each (teacher: torch eager; student: {student_runner.name})")
    lat_teacher = measure_latency(teacher_runner, observations, noises, calls=calls, warmup=warmup, progress=progress, desc="teacher")
    lat_student = measure_latency(student_runner, observations, student_noises, calls=calls, warmup=warmup, progress=progress, desc="student")
    load = max((lat.get("host_load_1min") or 0.0) for lat in (lat_teacher, lat_student))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load > 1.5 * cores:  # this process alone keeps up to `cores` threads busy
        notes.append(
            f"this host was busy while latency was measured (1-minute load {load:.1f} on {cores} cores): "
            "the measured tails (p99, max) are pessimistic"
        )
    if target.runs_on_host:
        lat_student["process_memory"] = _student_memory(student_onnx, student_runner, observations[0], student_noises[0], provider, notes)
    lat_teacher.update({"runtime": teacher_runner.name, "measured_on": host, "kind": "measured"})
    lat_student.update({"runtime": student_runner.name, "measured_on": on_device or host, "kind": "measured"})

    # Roofline for the target (the host's microbenchmark where the target is the host).
    host_figures = measure_host() if target.device.memory_bandwidth_gbs is None else None
    roof_teacher = _roofline(teacher, "fp32", target, host_figures)
    roof_student = _roofline(student_policy, student_precision, target, host_figures) if student_policy is not None else None
    if student_policy is None:
        notes.append("no torch student given: the student's roofline (and any latency estimate) is unavailable")
    for roof, lat in ((roof_teacher, lat_teacher), (roof_student, lat_student)):
        if roof and target.runs_on_host:
            roof["measured_over_bound"] = lat["p50_ms"] / roof["total_ms"]["value"]
        if roof:
            notes += roof.pop("notes", [])

    # Measured where the target is this host, or where the caller ran the student on the target's device.
    measured = bool(target.runs_on_host) or on_device is not None
    if measured:
        student_section = {**lat_student, "estimated_for": None, "estimate_ms": None}
        p99, p99_source = lat_student["p99_ms"], f"measured on {lat_student['measured_on']}"
        speedup = lat_teacher["p50_ms"] / lat_student["p50_ms"]
    else:
        bound = roof_student["total_ms"]["value"] if roof_student else None
        p99_source = f"estimated for {target.name} (roofline lower bound)"
        student_section = {
            "kind": "estimated",
            "p50_ms": bound,
            "p99_ms": bound,
            "runtime": f"{target.device.runtime} {student_precision} (not run here)",
            "measured_on": None,
            "estimated_for": target.name,
            "estimate_ms": bound,
            "source": p99_source,
            "host_measurement": lat_student,
        }
        p99, speedup = bound, None
    latency = {
        "teacher": lat_teacher,
        "student": student_section,
        "speedup_p50": speedup,
        "host_speedup_p50": lat_teacher["p50_ms"] / lat_student["p50_ms"],
    }
    control = control_rate(p99, target.budget, source=p99_source) if p99 is not None else None
    gates = judge(accuracy, lat_student if measured else None, roof_student, target, measured=measured)
    log(f"verify: {gates['status']} in {time.perf_counter() - t_start:.1f} s")
    return {
        "status": gates["status"],
        "passed": gates["passed"],
        "accuracy": accuracy,
        "latency": latency,
        "roofline": {"teacher": roof_teacher, "student": roof_student, "host": host_figures},
        "control": control,
        "gates": gates,
        "samples": {"count": n, "episodes": len(held_out.episodes), "stride": stride},
        "traces": _traces(samples, teacher_a, student_a),
        "notes": notes,
        "verify_seconds": round(time.perf_counter() - t_start, 1),
    }
