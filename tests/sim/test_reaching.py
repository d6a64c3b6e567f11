"""The synthetic reaching task as a closed-loop environment: consistent with the demonstrations."""
from __future__ import annotations

import numpy as np
import pytest

from vlacompile.data import make_synthetic_episodes
from vlacompile.data import synthetic as syn
from vlacompile.sim import get_suite
from vlacompile.sim.reaching import PUSH_DISTANCE, ReachingEnv, ScriptedExpert, task_success
from vlacompile.sim.rollout import evaluate


def test_replaying_a_demonstration_reproduces_its_frames_and_succeeds():
    # Same seeds as make_synthetic_episodes uses internally: the env's reset(seed) is its scene.
    es = make_synthetic_episodes(9, image_size=32, cameras=("front", "wrist"), seed=5)
    for i, ep in enumerate(es.episodes):
        scene_seed = int(np.random.SeedSequence([5, i]).generate_state(2)[0])
        env = ReachingEnv(ep.task, image_size=32, cameras=("front", "wrist"), max_steps=len(ep))
        obs, info = env.reset(seed=scene_seed)
        assert not info["success"]
        succeeded = False
        for t in range(len(ep)):
            for cam in ("front", "wrist"):
                np.testing.assert_array_equal(obs["images"][cam], ep.images[cam][t], err_msg=f"episode {i} frame {t} {cam}")
            np.testing.assert_allclose(obs["state"], ep.state[t], atol=1e-6, err_msg=f"episode {i} frame {t}")
            assert obs["task"] == ep.task
            obs, reward, terminated, truncated, info = env.step(ep.action[t])
            succeeded |= info["success"]
            assert reward == float(info["success"]) and terminated == info["success"]
        assert succeeded, f"the demonstration of {ep.task!r} (episode {i}) does not reach the task's goal"


def test_scripted_expert_succeeds_on_every_task_with_chunking():
    suite = get_suite("reaching", cameras=("front",), image_size=16)
    for n in (1, 8):
        result = evaluate(ScriptedExpert(16), suite, episodes_per_task=6, seed=3, actions_per_chunk=n, progress=False)
        assert result["episodes"] == 54
        assert result["success_rate"] == 1.0, {t: v["success_rate"] for t, v in result["tasks"].items()}
        for task, v in result["tasks"].items():
            assert 0 < v["mean_steps_success"] < suite.max_steps, task


class RandomRunner:
    name = "random"

    def __init__(self, chunk_size: int = 8, seed: int = 0):
        self.spec = type("Spec", (), {"chunk_size": chunk_size, "action_dim": 4, "cameras": ()})()
        self.rng = np.random.default_rng(seed)

    def get_action(self, obs, noise):
        return self.rng.uniform(-1, 1, size=(self.spec.chunk_size, 4)).astype(np.float32)


def test_random_actions_rarely_succeed():
    suite = get_suite("reaching", cameras=("front",), image_size=16)
    result = evaluate(RandomRunner(), suite, episodes_per_task=6, seed=3, actions_per_chunk=8, progress=False)
    assert result["success_rate"] < 0.25
    assert result["tasks"]["pick up the red block"]["success_rate"] == 0.0


def _world(task: str) -> syn.World:
    scene = syn.Scene(
        blocks={"red": np.array([0.3, 0.5]), "green": np.array([0.7, 0.5]), "blue": np.array([0.5, 0.8])},
        gripper=np.array([0.3, 0.2]),
    )
    return syn.World(scene, task)


def test_success_is_the_named_goal_not_any_goal():
    w = _world("move to the green block")
    w.gripper = w.blocks["red"].copy()  # over the wrong block
    assert not task_success(w)
    w.gripper = w.blocks["green"] + 0.03
    assert task_success(w)

    # A closed gripper over the red block lifts red; the task named green fails.
    w = _world("pick up the green block")
    w.gripper = w.blocks["red"].copy()
    for _ in range(3):
        w.step([0, 0, 1, 0])
    w.step([0, 0, 1, 1])
    assert w.lifted == "red" and not task_success(w)

    # Lifting with an open gripper lifts nothing.
    w = _world("pick up the red block")
    w.gripper = w.blocks["red"].copy()
    w.step([0, 0, 0, 1])
    assert w.lifted is None and not task_success(w)


def test_push_succeeds_only_after_the_block_moved_far_enough():
    w = _world("push the red block")  # gripper below red: pushes along +y
    np.testing.assert_allclose(w.push_dir, [0.0, 1.0])
    moved = []
    for _ in range(30):
        w.step([0.0, 0.5, 0, 0])
        moved.append(float(w.blocks["red"][1] - 0.5))
        if task_success(w):
            break
    assert task_success(w)
    assert moved[-1] >= PUSH_DISTANCE and moved[-2] < PUSH_DISTANCE
    # The same motion under "move to the red block" pushes nothing.
    w = _world("move to the red block")
    for _ in range(5):
        w.step([0.0, 0.5, 0, 0])
    np.testing.assert_array_equal(w.blocks["red"], [0.3, 0.5])


def test_env_rejects_bad_use():
    with pytest.raises(ValueError, match="not a synthetic-task instruction"):
        ReachingEnv("fly to the moon")
    env = ReachingEnv("push the blue block", image_size=16, cameras=("front",))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(4))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step(np.array([np.nan, 0, 0, 0]))


def test_episode_truncates_at_max_steps():
    env = ReachingEnv("move to the red block", image_size=16, cameras=("front",), max_steps=5)
    env.reset(seed=1)
    flags = [env.step(np.zeros(4))[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]
