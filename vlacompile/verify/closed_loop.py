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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (the report's ``closed_loop`` section, its gate). ``config`` is a recipe's ClosedLoopConfig."""
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
    log(f"verify: closed loop in suite {suite.name}, {config.episodes_per_task} seeded episodes per task, "
        f"{target.budget.actions_per_chunk} actions per chunk")
    results = {
        "teacher": evaluate(TorchRunner(teacher), suite, **kwargs),
        "student": evaluate(OrtRunner(student_onnx, student_spec, provider=provider), suite, **kwargs),
    }
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
    }
    return section, closed_loop_gate(cmp, source)
