"""Closed-loop evaluation: seeds shared by teacher and student, chunked execution, the gate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vlacompile.backends.torch_eager import TorchRunner
from vlacompile.errors import ConfigError, MissingDependencyError
from vlacompile.sim import SUITES, Suite, get_suite, suite_for
from vlacompile.sim.reaching import ScriptedExpert
from vlacompile.sim.rollout import compare, evaluate

pytestmark = pytest.mark.usefixtures("single_thread")


class Recording:
    """Wraps a runner; records the first observation and every noise it is given."""

    def __init__(self, runner):
        self.runner, self.spec, self.name = runner, runner.spec, getattr(runner, "name", "runner")
        self.first_obs: list[dict] = []
        self.noises: list[np.ndarray] = []
        self._new = False

    def begin_episode(self, env):
        self._new = True
        if hasattr(self.runner, "begin_episode"):
            self.runner.begin_episode(env)

    def get_action(self, obs, noise):
        if self._new:
            self.first_obs.append(obs)
            self._new = False
        self.noises.append(noise.copy())
        return self.runner.get_action(obs, noise)


class Still:
    """Never moves, so never succeeds: every episode runs to max_steps."""

    name = "still"

    def __init__(self, chunk_size: int):
        self.spec = type("Spec", (), {"chunk_size": chunk_size, "action_dim": 4, "cameras": ()})()
        self.calls = 0

    def get_action(self, obs, noise):
        self.calls += 1
        return np.zeros((self.spec.chunk_size, 4), np.float32)


def _strip_time(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("seconds", "seconds_per_episode")}


@pytest.fixture(scope="module")
def suite():
    return get_suite("reaching", cameras=("front",), image_size=32)


TASKS = ["push the red block", "move to the blue block"]


def test_same_seed_gives_identical_results(suite, tiny_policy):
    runs = [evaluate(TorchRunner(tiny_policy), suite, tasks=TASKS, episodes_per_task=2, seed=7, actions_per_chunk=4, progress=False) for _ in range(2)]
    assert _strip_time(runs[0]) == _strip_time(runs[1])
    other = evaluate(TorchRunner(tiny_policy), suite, tasks=TASKS, episodes_per_task=2, seed=8, actions_per_chunk=4, progress=False)
    assert [r["seed"] for r in other["runs"]] != [r["seed"] for r in runs[0]["runs"]]


def test_teacher_and_student_see_the_same_initial_states_and_noise(suite, tiny_policy):
    teacher = Recording(TorchRunner(tiny_policy))
    student = Recording(ScriptedExpert(tiny_policy.spec.chunk_size))  # a very different controller
    rt = evaluate(teacher, suite, tasks=TASKS, episodes_per_task=3, seed=11, actions_per_chunk=4, progress=False)
    rs = evaluate(student, suite, tasks=TASKS, episodes_per_task=3, seed=11, actions_per_chunk=4, progress=False)
    assert len(teacher.first_obs) == len(student.first_obs) == 6
    for a, b in zip(teacher.first_obs, student.first_obs):
        np.testing.assert_array_equal(a["images"]["front"], b["images"]["front"])
        np.testing.assert_array_equal(a["state"], b["state"])
        assert a["task"] == b["task"]
    # Scenes differ between episodes, and the first chunk's noise is shared.
    assert not np.array_equal(teacher.first_obs[0]["state"], teacher.first_obs[1]["state"])
    np.testing.assert_array_equal(teacher.noises[0], student.noises[0])
    assert [r["seed"] for r in rt["runs"]] == [r["seed"] for r in rs["runs"]]
    # A task subset keeps each task's seeds: episode seeds depend on the task's index in the suite.
    sub = evaluate(Recording(ScriptedExpert(8)), suite, tasks=TASKS[1:], episodes_per_task=3, seed=11, actions_per_chunk=4, progress=False)
    assert [r["seed"] for r in sub["runs"]] == [r["seed"] for r in rs["runs"][3:]]


@pytest.mark.parametrize("n", [1, 3, 8, 16, 40])
def test_each_chunk_executes_exactly_n_actions(suite, n):
    runner = Still(chunk_size=16)
    result = evaluate(runner, suite, tasks=["move to the red block"], episodes_per_task=2, seed=0, actions_per_chunk=n, progress=False)
    executed = min(n, 16)  # at most the whole chunk
    per_episode = math.ceil(suite.max_steps / executed)
    assert runner.calls == 2 * per_episode
    assert result["actions_per_chunk"] == executed
    assert all(r["steps"] == suite.max_steps and r["chunks"] == per_episode and not r["success"] for r in result["runs"])


def test_environments_shared_between_evaluations_change_nothing(suite, tiny_policy):
    """closed_loop() plays the teacher and then the student in the same environments (one per task):
    each episode resets from its seed, so the student's results are those of fresh environments."""
    from vlacompile.sim.rollout import close_envs

    kwargs = dict(tasks=TASKS, episodes_per_task=2, seed=3, actions_per_chunk=4, progress=False)
    fresh = evaluate(TorchRunner(tiny_policy), suite, **kwargs)
    envs: dict = {}
    evaluate(ScriptedExpert(tiny_policy.spec.chunk_size), suite, **kwargs, envs=envs)
    made = dict(envs)
    shared = evaluate(TorchRunner(tiny_policy), suite, **kwargs, envs=envs)
    assert envs == made and set(envs) == set(TASKS)  # reused, not remade, and left open for the caller
    assert _strip_time(shared) == _strip_time(fresh)
    close_envs(envs)
    assert envs == {}


def test_report_fields(suite):
    result = evaluate(ScriptedExpert(8), suite, tasks=TASKS, episodes_per_task=2, seed=1, actions_per_chunk=8, progress=False)
    assert result["episodes"] == 4 and result["success_rate"] == 1.0
    for task in TASKS:
        t = result["tasks"][task]
        assert t["episodes"] == 2 and t["successes"] == 2
        assert t["mean_steps_success"] == np.mean([r["steps"] for r in result["runs"] if r["task"] == task])
        assert t["mean_jerk"] is not None and t["mean_jerk"] >= 0


def _result(successes: list[bool], seed: int = 0) -> dict:
    runs = [{"task": "t", "episode": i, "success": s} for i, s in enumerate(successes)]
    rate = sum(successes) / len(successes)
    return {
        "suite": "reaching", "seed": seed, "episodes_per_task": len(runs), "actions_per_chunk": 8, "max_steps": 40,
        "success_rate": rate, "tasks": {"t": {"success_rate": rate}}, "runs": runs,
    }


def test_compare_gates_the_drop():
    teacher = _result([True] * 8 + [False] * 2)  # 0.8
    ok = compare(teacher, _result([True] * 7 + [False] * 3), max_drop=0.1)
    assert ok["passed"] and ok["status"] == "pass" and ok["drop"] == pytest.approx(0.1)
    # 4 episodes only the teacher solved, none only the student: a drop of 0.4, but a fair coin gives
    # 4 of 4 one in 16 times. Not significant, so it does not fail; the report says so.
    noisy = compare(teacher, _result([False] * 2 + [True] * 4 + [False] * 4), max_drop=0.1)
    assert noisy["passed"] and noisy["drop"] == pytest.approx(0.4) and noisy["paired"]["verdict"] == "within noise"
    assert noisy["teacher_only"] == 4 and noisy["student_only"] == 0
    assert noisy["paired"]["p_student_worse"] == pytest.approx(1 / 16)
    assert noisy["per_task"]["t"]["drop"] == pytest.approx(0.4) and noisy["per_task"]["t"]["teacher_only"] == 4
    # 8 of 8 discordant episodes against the student: p = 1/256, a real drop.
    bad = compare(_result([True] * 10), _result([True] * 2 + [False] * 8), max_drop=0.1)
    assert not bad["passed"] and bad["status"] == "fail" and bad["paired"]["verdict"] == "fail"
    lo, hi = bad["paired"]["interval"]
    assert bad["drop"] == pytest.approx(0.8) and 0.1 < lo < bad["drop"] <= hi <= 0.8 + 1e-9
    better = compare(teacher, _result([True] * 10), max_drop=0.0)
    assert better["passed"] and better["drop"] < 0
    with pytest.raises(ValueError, match="seed"):
        compare(teacher, _result([True] * 10, seed=1), max_drop=0.1)


def test_mismatched_policy_and_suite_are_config_errors(suite, tiny_policy):
    two_cams = get_suite("reaching", cameras=("wrist",), image_size=32)
    with pytest.raises(ConfigError, match=r"cameras \['front'\]"):
        evaluate(TorchRunner(tiny_policy), two_cams, episodes_per_task=1, seed=0, actions_per_chunk=4, progress=False)
    with pytest.raises(ConfigError, match="not in suite"):
        evaluate(Still(8), suite, tasks=["fly"], episodes_per_task=1, seed=0, actions_per_chunk=4, progress=False)
    with pytest.raises(ConfigError, match="actions_per_chunk"):
        evaluate(Still(8), suite, episodes_per_task=1, seed=0, actions_per_chunk=0, progress=False)
    with pytest.raises(ConfigError, match="known suites"):
        get_suite("libero")


def test_registry():
    assert set(SUITES) >= {"reaching", "metaworld-mt10"}
    assert isinstance(get_suite("reaching"), Suite)


def test_metaworld_without_the_extra_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "metaworld", None)  # as if the [sim] extra were not installed
    with pytest.raises(MissingDependencyError, match=r"vlacompile\[sim\]"):
        get_suite("metaworld-mt10")


def test_metaworld_suite_runs_a_closed_loop_episode():
    pytest.importorskip("metaworld", reason="Meta-World is the optional [sim] extra; not installed in this environment")
    suite = get_suite("metaworld-mt10", cameras=("front",), image_size=32, max_steps=20)
    assert len(suite.tasks) == 10 and isinstance(suite, Suite)
    env = suite.make_env(suite.tasks[0])
    obs, info = env.reset(seed=3)
    assert obs["images"]["front"].shape == (32, 32, 3) and obs["images"]["front"].dtype == np.uint8
    assert obs["state"].shape == (suite.state_dim,) and obs["state"].dtype == np.float32
    again, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs["state"], again["state"])
    result = evaluate(Still(8), suite, tasks=suite.tasks[:2], episodes_per_task=1, seed=0, actions_per_chunk=8, progress=False)
    assert result["episodes"] == 2


def test_metaworld_state_carries_the_goal_and_images_render_only_when_read():
    pytest.importorskip("metaworld", reason="Meta-World is the optional [sim] extra; not installed in this environment")
    from vlacompile.sim.metaworld import STATE_NAMES

    suite = get_suite("metaworld-mt10", cameras=("front",), image_size=32, max_steps=20)
    assert suite.state_dim == len(STATE_NAMES) == 39
    env = suite.make_env("reach the goal position")
    obs, _ = env.reset(seed=5)
    goal = [STATE_NAMES.index(f"goal_{k}") for k in "xyz"]
    # The goal the renders do not show is in the state, and it is the scene's goal.
    np.testing.assert_allclose(obs["state"][goal], env._env._target_pos, atol=1e-6)
    other, _ = env.reset(seed=6)
    assert not np.allclose(other["state"][goal], obs["state"][goal])
    # Frames render lazily: an unread observation costs no render, and reading a stale one is refused
    # instead of silently rendering the newer scene.
    renders = []
    real = env._render
    env._render = lambda: renders.append(1) or real()
    first, _ = env.reset(seed=5)
    second, *_ = env.step(np.zeros(4, np.float32))
    assert renders == []
    with pytest.raises(RuntimeError, match="after the environment moved on"):
        first["images"]["front"]
    assert second["images"]["front"].shape == (32, 32, 3) and len(renders) == 1
    second["images"]["front"]
    assert len(renders) == 1  # rendered once, then kept


def test_metaworld_envs_render_their_own_scene_when_interleaved():
    """Each env renders into its own OpenGL context. closed_loop() plays the teacher and then the
    student in the same ten environments: before each env made its context current, the student's
    frames after the teacher's last task showed another task's scene (its success 0.91 -> 0.82)."""
    pytest.importorskip("metaworld", reason="Meta-World is the optional [sim] extra; not installed in this environment")
    suite = get_suite("metaworld-mt10", cameras=("front",), image_size=32, max_steps=20)

    def frames(env, seed):
        obs, _ = env.reset(seed=seed)
        out = [np.array(obs["images"]["front"])]
        for a in np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4):
            obs, *_ = env.step(a)
            out.append(np.array(obs["images"]["front"]))
        return np.stack(out)

    door, drawer = suite.make_env("open the door"), suite.make_env("close the drawer")
    try:
        alone = frames(door, 7)
        other = frames(drawer, 8)
        again = frames(door, 7)
        assert not np.array_equal(other[0], alone[0])  # two different scenes
        np.testing.assert_array_equal(again, alone)
        np.testing.assert_array_equal(frames(drawer, 8), other)
    finally:
        door.close()
        drawer.close()


def test_a_policy_with_another_state_size_is_refused_for_the_suite(tiny_policy):
    from vlacompile.sim.rollout import check_compatible

    suite = suite_for("reaching", tiny_policy.spec)
    check_compatible(tiny_policy.spec, suite)  # the tiny policy is built for the reaching task
    import dataclasses

    with pytest.raises(ConfigError, match=r"state has 7 dimensions; suite 'reaching' has 6"):
        check_compatible(dataclasses.replace(tiny_policy.spec, state_dim=7), suite)
