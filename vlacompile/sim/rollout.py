"""Closed-loop evaluation: a runner drives a suite's environments with action chunking.

Each call of ``runner.get_action(obs, noise)`` returns a chunk [H, A]; the first
``actions_per_chunk`` actions (the target's ``budget.actions_per_chunk``, at most H) are executed,
then the runner re-plans from the new observation, as the robot's controller does. Episode seeds and
the noise of every chunk depend only on (seed, task, episode, chunk), so a teacher and its student
evaluated with the same arguments start from the same states and sample with the same noise: their
success rates differ only through their actions.

A runner needs ``spec.chunk_size``, ``spec.action_dim`` and ``get_action`` (and ``spec.state_dim``
when it reads the state); a controller that reads
the simulator (a scripted expert) may also define ``begin_episode(env)``, called after each reset.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from vlacompile.errors import ConfigError
from vlacompile.sim import Suite

_SCENE, _NOISE = 0, 1  # seed-stream tags, so scene and noise draws never coincide


def episode_seed(seed: int, task_index: int, episode: int) -> int:
    """The environment seed of one episode: the same for every runner evaluated with ``seed``."""
    return int(np.random.SeedSequence([seed, task_index, episode, _SCENE]).generate_state(1)[0])


def chunk_noise(seed: int, task_index: int, episode: int, chunk: int, shape: tuple[int, int]) -> np.ndarray:
    """The flow-matching noise of one chunk: standard normal, float32, the same for every runner."""
    rng = np.random.default_rng([seed, task_index, episode, _NOISE, chunk])
    return rng.standard_normal(shape, dtype=np.float32)


def _jerk(actions: np.ndarray) -> float | None:
    """Mean squared third difference of the executed actions over time (units per step^3)."""
    if len(actions) < 4:
        return None
    return float(np.mean(np.diff(actions, n=3, axis=0) ** 2))


def check_compatible(spec, suite: Suite, tasks: list[str] | None = None) -> None:
    """The policy ``spec`` can drive ``suite``: tasks, cameras, state and action sizes match."""
    tasks = list(suite.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in suite.tasks]
    if unknown:
        raise ConfigError(f"tasks {unknown} are not in suite {suite.name!r}", source="closed-loop evaluation", hint=f"choose from {suite.tasks}")
    missing = [c.name for c in getattr(spec, "cameras", ()) if c.name not in suite.cameras]
    if missing:
        raise ConfigError(
            f"the policy reads cameras {missing} that suite {suite.name!r} does not render ({list(suite.cameras)})",
            source="closed-loop evaluation",
            hint="build the suite with the policy's camera names",
        )
    # A controller without a state_dim (a scripted one) does not read the state vector.
    for what, have, need in (("state", getattr(spec, "state_dim", None), suite.state_dim), ("action", spec.action_dim, suite.action_dim)):
        if have is not None and have != need:
            raise ConfigError(
                f"the policy's {what} has {have} dimensions; suite {suite.name!r} has {need}",
                source="closed-loop evaluation",
                hint="evaluate in the suite the policy was trained for (recipe [closed_loop] suite)",
            )


def _check(runner, suite: Suite, tasks: list[str], actions_per_chunk: int, episodes_per_task: int) -> None:
    check_compatible(runner.spec, suite, tasks)
    if actions_per_chunk < 1:
        raise ConfigError(f"actions_per_chunk must be at least 1, got {actions_per_chunk}", source="closed-loop evaluation")
    if episodes_per_task < 1:
        raise ConfigError(f"episodes_per_task must be at least 1, got {episodes_per_task}", source="closed-loop evaluation")


def run_episode(runner, env, *, env_seed: int, noise_key: tuple[int, int, int], actions_per_chunk: int, max_steps: int) -> dict:
    """One closed-loop episode; stops at success, termination, truncation or ``max_steps``."""
    spec = runner.spec
    shape = (spec.chunk_size, spec.action_dim)
    noise_shape = tuple(getattr(spec, "noise_shape", shape))  # the family's own noise shape (padded actions)
    n = min(actions_per_chunk, spec.chunk_size)
    obs, info = env.reset(seed=env_seed)
    if hasattr(runner, "begin_episode"):
        runner.begin_episode(env)
    success = bool(info.get("success", False))
    executed: list[np.ndarray] = []
    chunks = 0
    while not success and len(executed) < max_steps:
        chunk = np.asarray(runner.get_action(obs, chunk_noise(*noise_key, chunks, noise_shape)), dtype=np.float32)
        if chunk.shape != shape:
            raise ValueError(f"{getattr(runner, 'name', 'runner')} returned a chunk of shape {chunk.shape}, expected {shape}")
        chunks += 1
        done = False
        for action in chunk[:n]:
            obs, _, terminated, truncated, info = env.step(action)
            executed.append(action)
            success = bool(info.get("success", False))
            done = success or terminated or truncated or len(executed) >= max_steps
            if done:
                break
        if done:
            break
    actions = np.stack(executed) if executed else np.zeros((0, spec.action_dim), np.float32)
    return {"seed": env_seed, "success": success, "steps": len(executed), "chunks": chunks, "jerk": _jerk(actions)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate(
    runner,
    suite: Suite,
    *,
    tasks: list[str] | None = None,
    episodes_per_task: int,
    seed: int,
    actions_per_chunk: int,
    progress: bool = True,
    envs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Success rate of ``runner`` as a closed-loop controller on ``suite``'s tasks (all by default).

    Episode ``e`` of the task at index ``i`` of ``suite.tasks`` starts from
    ``episode_seed(seed, i, e)``, whichever subset of tasks is evaluated. ``envs``: task ->
    environment, shared with other evaluations (every episode resets from its seed, so a reused
    environment starts where a new one would); the caller closes them. Without it, the environments
    are made here and closed at the end.
    """
    tasks = list(suite.tasks if tasks is None else tasks)
    _check(runner, suite, tasks, actions_per_chunk, episodes_per_task)
    t0 = time.perf_counter()
    jobs = [(suite.tasks.index(t), t, e) for t in tasks for e in range(episodes_per_task)]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc=f"closed loop: {getattr(runner, 'name', 'runner')}", unit="episode", leave=False)
    runs: list[dict] = []
    owned = envs is None
    envs = {} if envs is None else envs
    for ti, task, e in jobs:
        if task not in envs:  # one environment per task, reset for each episode
            envs[task] = suite.make_env(task)
        env = envs[task]
        r = run_episode(
            runner,
            env,
            env_seed=episode_seed(seed, ti, e),
            noise_key=(seed, ti, e),
            actions_per_chunk=actions_per_chunk,
            max_steps=suite.max_steps,
        )
        runs.append({"task": task, "episode": e, **r})
    if owned:
        close_envs(envs)
    per_task = {}
    for task in tasks:
        rs = [r for r in runs if r["task"] == task]
        wins = [r for r in rs if r["success"]]
        per_task[task] = {
            "success_rate": len(wins) / len(rs),
            "successes": len(wins),
            "episodes": len(rs),
            "mean_steps_success": _mean([r["steps"] for r in wins]),
            "mean_jerk": _mean([r["jerk"] for r in rs]),
        }
    seconds = time.perf_counter() - t0
    return {
        "suite": suite.name,
        "runner": getattr(runner, "name", type(runner).__name__),
        "seed": seed,
        "episodes_per_task": episodes_per_task,
        "actions_per_chunk": min(actions_per_chunk, runner.spec.chunk_size),
        "chunk_size": runner.spec.chunk_size,
        "max_steps": suite.max_steps,
        "success_rate": sum(r["success"] for r in runs) / len(runs),
        "episodes": len(runs),
        "tasks": per_task,
        "runs": runs,
        "seconds": round(seconds, 2),
        "seconds_per_episode": round(seconds / len(runs), 3),
    }


def close_envs(envs: dict[str, Any]) -> None:
    for env in envs.values():
        if hasattr(env, "close"):
            env.close()
    envs.clear()


def compare(teacher: dict, student: dict, max_drop: float) -> dict[str, Any]:
    """The student's success-rate drop from the teacher's, judged against ``max_drop`` (a fraction,
    0.05 = 5 points) as a paired comparison (``vlacompile.verify.stats.paired_closed_loop``).

    Both results must come from the same suite, seed, tasks and episodes; the per-episode pairing
    then counts episodes only one of them solved (the drop is their difference over all episodes).
    """
    keys = ("suite", "seed", "episodes_per_task", "actions_per_chunk", "max_steps")
    differ = [k for k in keys if teacher[k] != student[k]]
    # Sets: a result read back from the cache's JSON has its task keys sorted.
    if differ or set(teacher["tasks"]) != set(student["tasks"]):
        raise ValueError(f"teacher and student were evaluated differently ({differ or ['tasks']}): their success rates are not comparable")
    from vlacompile.verify.stats import paired_closed_loop

    pairs = list(zip(teacher["runs"], student["runs"]))
    if len(teacher["runs"]) != len(student["runs"]) or any((t["task"], t["episode"]) != (s["task"], s["episode"]) for t, s in pairs):
        raise ValueError("teacher and student episodes do not pair up (task, episode): their success rates are not comparable")
    drop = teacher["success_rate"] - student["success_rate"]
    b = sum(t["success"] and not s["success"] for t, s in pairs)
    c = sum(s["success"] and not t["success"] for t, s in pairs)
    paired = paired_closed_loop(b, c, len(pairs), max_drop)
    per_task = {}
    for task in dict.fromkeys(t["task"] for t in teacher["runs"]):  # the evaluation's order
        tp = [(t, s) for t, s in pairs if t["task"] == task]
        tb = sum(t["success"] and not s["success"] for t, s in tp)
        tc = sum(s["success"] and not t["success"] for t, s in tp)
        per_task[task] = {
            "teacher": teacher["tasks"][task]["success_rate"],
            "student": student["tasks"][task]["success_rate"],
            "drop": teacher["tasks"][task]["success_rate"] - student["tasks"][task]["success_rate"],
            "teacher_only": tb, "student_only": tc,
            **{k: paired_closed_loop(tb, tc, len(tp), max_drop)[k] for k in ("interval", "p_student_worse")},
        }
    passed = paired["verdict"] != "fail"
    return {
        "teacher_success_rate": teacher["success_rate"],
        "student_success_rate": student["success_rate"],
        "drop": drop,
        "max_drop": max_drop,
        "passed": passed,
        "status": "pass" if passed else "fail",
        "episodes": len(pairs),
        "teacher_only": b,
        "student_only": c,
        "paired": paired,
        "per_task": per_task,
    }
