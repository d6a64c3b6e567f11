"""Closed-loop success in a simulator: teacher (torch) and compiled student (ONNX Runtime) drive the
same environments from the same seeds, executing the target's actions-per-chunk before re-planning."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def closed_loop(
    teacher,
    student_onnx: Path,
    student_spec,
    target,
    config,
    *,
    provider: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    cache=None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (the report's ``closed_loop`` section, its gate). ``config`` is a recipe's ClosedLoopConfig.

    With a ``cache`` (``vlacompile.cache.StageCache``), the rollouts are stored under a key of all they
    depend on (the teacher's weights, the student graph's bytes, the suite, its tasks, seeds, episode
    count and actions per chunk, and the code that runs them): a rebuild that changed none of those
    reuses them, and the report says so."""
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.torch_eager import TorchRunner
    from vlacompile.sim import suite_for
    from vlacompile.sim.rollout import compare, evaluate
    from vlacompile.targets import host_device_string
    from vlacompile.verify.gates import closed_loop_gate

    spec = teacher.spec
    suite = suite_for(config.suite, spec)
    kwargs = dict(
        tasks=list(config.tasks) or None,
        episodes_per_task=config.episodes_per_task,
        seed=config.seed,
        actions_per_chunk=target.budget.actions_per_chunk,
        progress=progress,
    )
    key = _cache_key(teacher, student_onnx, suite, kwargs, provider) if cache is not None else None
    results = cache.get_json(key) if key is not None else None
    reused = results is not None
    if reused:
        log(f"verify: closed loop in suite {suite.name} reused from the stage cache (key {key[:12]})")
    else:
        log(f"verify: closed loop in suite {suite.name}, {config.episodes_per_task} seeded episodes per task, "
            f"{target.budget.actions_per_chunk} actions per chunk")
        results = {
            "teacher": evaluate(TorchRunner(teacher), suite, **kwargs),
            "student": evaluate(OrtRunner(student_onnx, student_spec, provider=provider), suite, **kwargs),
        }
        if key is not None:
            cache.put_json(key, "closed-loop", results)
    cmp = compare(results["teacher"], results["student"], max_drop=config.max_success_drop)
    for r in results.values():
        r.pop("runs", None)  # per-episode detail stays out of report.json
    source = f"measured on {host_device_string()} (suite {suite.name}, {results['teacher']['episodes']} episodes each)"
    section = {
        "suite": suite.name,
        "episodes": results["teacher"]["episodes"],
        "actions_per_chunk": target.budget.actions_per_chunk,
        "seed": config.seed,
        **results,
        "comparison": cmp,
        "reused": reused,
    }
    return section, closed_loop_gate(cmp, source)


def _cache_key(teacher, student_onnx: Path, suite, kwargs: dict, provider: str) -> str | None:
    """sha256 of what the rollouts depend on; None when the teacher has no weights digest."""
    import hashlib
    import json

    from vlacompile.artifact import onnx_files
    from vlacompile.cache import stage_code_hash
    from vlacompile.checkpoint import sha256_file

    if not teacher.meta.get("weights_sha256"):
        return None
    h = hashlib.sha256(b"closed-loop/1")
    h.update(json.dumps({
        "teacher": teacher.meta["weights_sha256"], "teacher_spec": teacher.spec.to_dict(),
        "student": [[p.name, sha256_file(p)] for p in onnx_files(Path(student_onnx))],
        "suite": suite.name, "tasks": list(suite.tasks) if kwargs.get("tasks") is None else list(kwargs["tasks"]),
        "max_steps": getattr(suite, "max_steps", None), "provider": provider,
        **{k: v for k, v in kwargs.items() if k not in ("progress", "tasks")},
        "code": stage_code_hash("vlacompile.sim.rollout") + stage_code_hash(suite.__class__.__module__),
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()
