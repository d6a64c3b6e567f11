"""Meta-World expert recordings: written, read back, and replayable to success."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="needs the sim extra (metaworld, gymnasium, mujoco)")

from vlacompile.data import read_episodes, write_episodes  # noqa: E402
from vlacompile.sim.metaworld import MetaWorldSuite  # noqa: E402
from vlacompile.sim.record import ROBOT_TYPE, record_expert_episodes_with_summary, record_seed  # noqa: E402
from vlacompile.sim.rollout import episode_seed  # noqa: E402


def test_recorded_experts_round_trip_and_replay_to_success(tmp_path):
    suite = MetaWorldSuite(image_size=32, max_steps=150)
    tasks = suite.tasks[:2]
    es, summary = record_expert_episodes_with_summary(suite, tasks=tasks, episodes_per_task=1, seed=3, max_steps=150, progress=False)
    assert [r["success"] for r in summary] == [True, True], summary
    assert es.fps == pytest.approx(80.0) and es.robot_type == ROBOT_TYPE

    back = read_episodes(write_episodes(tmp_path / "mt", es))
    # The recorder's --video: the same episodes as lerobot's default AV1 MP4s (lossy, close).
    video = read_episodes(write_episodes(tmp_path / "mt-video", es, video=True))
    assert video.camera_storage == {"front": "video"}
    for a, b in zip(es.episodes, video.episodes):
        assert b.state.tobytes() == a.state.astype(np.float32).tobytes()
        assert np.abs(np.asarray(b.images["front"]).astype(int) - a.images["front"]).mean() < 8
    assert len(back) == 2 and [ep.task for ep in back.episodes] == tasks
    assert back.robot_type == ROBOT_TYPE and back.state_dim == 39 and back.action_dim == 4
    for ep, rec in zip(back.episodes, summary):
        img = np.asarray(ep.images["front"])  # frames are read on demand; all of them, here
        assert img.dtype == np.uint8 and img.shape == (len(ep), 32, 32, 3) and img.std() > 5  # a scene, not blank
        assert np.all(np.abs(ep.action) <= 1.0) and len(ep) == rec["frames"] < 150
        # Recording and evaluation scenes come from different seed streams.
        assert rec["env_seed"] == record_seed(3, suite.tasks.index(ep.task), 0) != episode_seed(3, suite.tasks.index(ep.task), 0)

        # Replaying the stored actions from the recorded seed reproduces the frames and succeeds
        # within the last few frames (the episode ends shortly after success).
        env = suite.make_env(ep.task)
        obs, _ = env.reset(seed=rec["env_seed"])
        successes = []
        for t in range(len(ep)):
            np.testing.assert_array_equal(obs["images"]["front"], img[t], err_msg=f"{ep.task} frame {t}")
            np.testing.assert_allclose(obs["state"], ep.state[t], atol=1e-5)
            obs, _, _, _, info = env.step(ep.action[t])
            successes.append(info["success"])
        env.close()
        assert successes[-1] and not successes[0]
