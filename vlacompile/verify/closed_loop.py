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

    With a ``cache`` (``vlacompile.cache.StageCache``), each runner's rollouts are stored under a key of
    all they depend on (the teacher's weights, or the student graph's bytes; the suite, its tasks,
    seeds, episode count and actions per chunk, and the code that runs them): a build that changed
    none of those for a runner reuses its rollouts, and the report says whose."""
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.torch_eager import TorchRunner
    from vlacompile.sim import suite_for
    from vlacompile.sim.rollout import close_envs, compare, evaluate
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
    # The teacher's rollouts do not depend on the student: a build with another recipe or for another
    # target reuses them and runs only the student's.
    runners = {"teacher": lambda: TorchRunner(teacher), "student": lambda: OrtRunner(student_onnx, student_spec, provider=provider)}
    keys = {who: _cache_key(who, teacher, student_onnx, student_spec, suite, kwargs, provider) if cache is not None else None
            for who in runners}
    results = {who: cache.get_json(keys[who]) if keys[who] is not None else None for who in runners}
    reused = [who for who in runners if results[who] is not None]
    if reused:
        log(f"verify: closed loop in suite {suite.name}: rollouts of the {' and '.join(reused)} reused from the stage cache "
            f"(key {', '.join(keys[w][:12] for w in reused)})")
    if len(reused) < len(runners):
        log(f"verify: closed loop in suite {suite.name}, {config.episodes_per_task} seeded episodes per task, "
            f"{target.budget.actions_per_chunk} actions per chunk")
    envs: dict = {}  # one environment per task for both runners: making a Meta-World one takes about 1 s
    try:
        for who, make in runners.items():
            if results[who] is None:
                results[who] = evaluate(make(), suite, **kwargs, envs=envs)
                if keys[who] is not None:
                    cache.put_json(keys[who], "closed-loop", results[who])
    finally:
        close_envs(envs)
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
        "reused": len(reused) == len(runners),
        "reused_runs": reused,  # whose rollouts came from the stage cache
    }
    return section, closed_loop_gate(cmp, source)


def _cache_key(who: str, teacher, student_onnx: Path, student_spec, suite, kwargs: dict, provider: str) -> str | None:
    """sha256 of what one runner's rollouts depend on: the teacher's by its weights digest (None when
    it has none), the student's by its graph's bytes and spec; both by the suite, its tasks, seeds,
    episode count, actions per chunk and the code that runs them."""
    import hashlib
    import json

    from vlacompile.artifact import onnx_files
    from vlacompile.cache import stage_code_hash
    from vlacompile.checkpoint import sha256_file

    if who == "teacher":
        if not teacher.meta.get("weights_sha256"):
            return None
        policy = {"teacher": teacher.meta["weights_sha256"], "definition": teacher.meta.get("definition_sha256", ""),
                  "spec": teacher.spec.to_dict()}
    else:
        policy = {"student": [[p.name, sha256_file(p)] for p in onnx_files(Path(student_onnx))], "spec": student_spec.to_dict(),
                  "provider": provider}
    h = hashlib.sha256(f"closed-loop/2/{who}".encode())
    h.update(json.dumps({
        **policy,
        "suite": suite.name, "tasks": list(suite.tasks) if kwargs.get("tasks") is None else list(kwargs["tasks"]),
        "max_steps": getattr(suite, "max_steps", None),
        **{k: v for k, v in kwargs.items() if k not in ("progress", "tasks")},
        "code": stage_code_hash("vlacompile.sim.rollout") + stage_code_hash(suite.__class__.__module__),
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()
