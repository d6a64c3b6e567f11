"""Record Meta-World demonstrations with Meta-World's scripted expert policies.

Each episode starts from ``record_seed(seed, task_index, episode)``, a seed stream separate from the
one ``vlacompile.sim.rollout.episode_seed`` draws evaluation scenes from, so recorded scenes and
evaluation scenes differ even under the same base seed. Frame t holds the observation the expert
saw and the action it took there. Episodes stop ``POST_SUCCESS_FRAMES`` steps after the first
success (so a learner also sees what "done" looks like) or at ``max_steps``; only successful
episodes are kept.
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from vlacompile.data.episodes import Episode, EpisodeSet
from vlacompile.errors import ConfigError

ROBOT_TYPE = "metaworld-sawyer"
POST_SUCCESS_FRAMES = 5
_RECORD = 2  # seed-stream tag; rollout uses 0 (scenes) and 1 (noise)


def record_seed(seed: int, task_index: int, episode: int) -> int:
    """The environment seed of one recorded episode (never an evaluation scene's stream)."""
    return int(np.random.SeedSequence([seed, task_index, episode, _RECORD]).generate_state(1)[0])


def _tap_raw_obs(inner) -> dict:
    """Keep the raw Meta-World observation the adapter's env last returned; the expert reads it.

    The adapter returns the state as float32, and re-reading ``_get_obs()`` would
    shift Meta-World's frame stack, so reset/step are wrapped on this instance instead.
    """
    last: dict = {}
    reset, step = inner.reset, inner.step

    def tapped_reset(*args, **kwargs):
        out = reset(*args, **kwargs)
        last["obs"] = out[0]
        return out

    def tapped_step(*args, **kwargs):
        out = step(*args, **kwargs)
        last["obs"] = out[0]
        return out

    inner.reset, inner.step = tapped_reset, tapped_step
    return last


def _expert(env_name: str):
    from metaworld.policies import ENV_POLICY_MAP

    if env_name not in ENV_POLICY_MAP:
        raise ConfigError(f"Meta-World has no scripted expert for {env_name!r}", source="metaworld-mt10")
    return ENV_POLICY_MAP[env_name]()


def _record_one(env, policy, raw: dict, *, env_seed: int, max_steps: int) -> tuple[dict[str, Any], bool, int]:
    obs, _ = env.reset(seed=env_seed)
    cams = list(obs["images"])
    images: dict[str, list] = {c: [] for c in cams}
    states, actions = [], []
    success_at: int | None = None
    for t in range(max_steps):
        with warnings.catch_warnings():  # "constants may be too high": expected, we clip below
            warnings.simplefilter("ignore", UserWarning)
            expert_action = policy.get_action(raw["obs"])
        action = np.clip(np.asarray(expert_action, dtype=np.float32), -1.0, 1.0)
        for c in cams:
            images[c].append(obs["images"][c])
        states.append(np.asarray(obs["state"], dtype=np.float32))
        actions.append(action)
        obs, _, _, _, info = env.step(action)
        if success_at is None and info["success"]:
            success_at = t
        if success_at is not None and t - success_at >= POST_SUCCESS_FRAMES:
            break
    arrays = {
        "images": {c: np.stack(v).astype(np.uint8) for c, v in images.items()},
        "state": np.stack(states),
        "action": np.stack(actions),
    }
    return arrays, success_at is not None, len(actions)


def record_expert_episodes_with_summary(
    suite, *, tasks: list[str] | None = None, episodes_per_task: int, seed: int, max_steps: int, progress: bool = True
) -> tuple[EpisodeSet, list[dict[str, Any]]]:
    """Like ``record_expert_episodes``, plus one summary row per attempted episode
    ({task, env_name, episode, env_seed, success, frames, seconds})."""
    tasks = list(suite.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in suite.tasks]
    if unknown:
        raise ConfigError(f"not tasks of {suite.name}: {unknown}", hint=f"choose among {suite.tasks}")
    if episodes_per_task < 1 or max_steps < 1:
        raise ConfigError(f"episodes_per_task and max_steps must be >= 1, got {episodes_per_task} and {max_steps}")
    env_names = {v: k for k, v in suite.env_names.items()}
    jobs = [(suite.tasks.index(t), t, e) for t in tasks for e in range(episodes_per_task)]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="recording Meta-World experts", unit="episode", leave=False)
    episodes: list[Episode] = []
    summary: list[dict[str, Any]] = []
    fps = None
    env_cache: dict[str, tuple] = {}
    for ti, task, e in jobs:
        if task not in env_cache:  # one environment per task, reset for each episode
            env = suite.make_env(task)
            env_cache[task] = (env, _expert(env_names[task]), _tap_raw_obs(env._env))
            fps = 1.0 / float(env._env.dt)  # Meta-World's control period: timestep * frame_skip
        env, policy, raw = env_cache[task]
        env_seed = record_seed(seed, ti, e)
        t0 = time.perf_counter()
        arrays, ok, frames = _record_one(env, policy, raw, env_seed=env_seed, max_steps=max_steps)
        summary.append(
            dict(task=task, env_name=env_names[task], episode=e, env_seed=env_seed, success=ok, frames=frames,
                 seconds=time.perf_counter() - t0)
        )
        if ok:
            episodes.append(Episode(index=len(episodes), task=task, **arrays))
    for env, _, _ in env_cache.values():
        env.close()
    es = EpisodeSet(
        root=None,
        fps=fps if fps is not None else 80.0,
        episodes=episodes,
        camera_names=tuple(suite.cameras),
        image_shapes={c: (suite.image_size, suite.image_size) for c in suite.cameras},
        state_dim=suite.state_dim,
        action_dim=suite.action_dim,
        robot_type=ROBOT_TYPE,
        state_names=getattr(suite, "state_names", None),
        action_names=("dx", "dy", "dz", "gripper"),
    )
    return es, summary


def record_expert_episodes(
    suite, *, tasks: list[str] | None = None, episodes_per_task: int, seed: int, max_steps: int, progress: bool = True
) -> EpisodeSet:
    """Successful scripted-expert demonstrations of ``tasks`` (instructions; all of the suite's by
    default), ``episodes_per_task`` attempts each, as an EpisodeSet ``write_episodes`` can write."""
    es, _ = record_expert_episodes_with_summary(
        suite, tasks=tasks, episodes_per_task=episodes_per_task, seed=seed, max_steps=max_steps, progress=progress
    )
    return es
