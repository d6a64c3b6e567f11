"""Samples (observation + action chunk) from episodes, and stratified calibration draws."""
from __future__ import annotations

import numpy as np
import pytest

from vlacompile.data import EpisodeSet, draw_stratified, make_samples, make_synthetic_episodes
from vlacompile.data.synthetic import TASKS
from vlacompile.errors import EpisodeError


@pytest.fixture(scope="module")
def es() -> EpisodeSet:
    return make_synthetic_episodes(18, image_size=16, cameras=("front", "side"), episode_length=20, seed=2)


def test_make_samples_shapes_and_layout(es):
    s = make_samples(es, chunk_size=4, stride=5)
    n = 18 * 4  # frames 0, 5, 10, 15 of every episode
    assert len(s) == n
    assert list(s.images) == ["front", "side"]
    assert all(v.shape == (n, 16, 16, 3) and v.dtype == np.uint8 for v in s.images.values())
    assert s.state.shape == (n, 6) and s.state.dtype == np.float32
    assert s.actions.shape == (n, 4, 4) and s.actions.dtype == np.float32
    assert s.episode_index.dtype == np.int64 and s.frame_index.dtype == np.int64
    assert len(s.tasks) == n
    row = 6  # episode 1, frame 10
    ep = es.episodes[1]
    assert (s.episode_index[row], s.frame_index[row], s.tasks[row]) == (1, 10, ep.task)
    # Per camera, as a camera driver delivers frames (H, W, 3).
    np.testing.assert_array_equal(s.images["front"][row], ep.images["front"][10])
    np.testing.assert_array_equal(s.images["side"][row], ep.images["side"][10])
    np.testing.assert_array_equal(s.state[row], ep.state[10])
    np.testing.assert_array_equal(s.actions[row], ep.action[10:14])


def test_chunks_past_the_end_repeat_the_last_action(es):
    ep = es.episodes[3]
    s = make_samples(es, chunk_size=6, frames=[(ep.index, 17), (ep.index, 19)])
    np.testing.assert_array_equal(s.actions[0, :3], ep.action[17:20])
    for k in range(3, 6):
        np.testing.assert_array_equal(s.actions[0, k], ep.action[19])
    assert (s.actions[1] == ep.action[19]).all()
    assert not np.array_equal(ep.action[18], ep.action[19])  # the padding is visible


def test_frames_refer_to_episode_index_not_position(es):
    sub = es.subset([5, 2])
    s = make_samples(sub, chunk_size=2, frames=[(2, 0), (5, 1)])
    assert s.episode_index.tolist() == [2, 5]
    np.testing.assert_array_equal(s.state[1], es.episodes[5].state[1])
    with pytest.raises(ValueError):
        make_samples(sub, chunk_size=2, frames=[(0, 0)])
    with pytest.raises(ValueError):
        make_samples(sub, chunk_size=2, frames=[(2, 20)])


def test_select(es):
    s = make_samples(es, chunk_size=3, stride=10)
    picked = s.select([3, 0])
    assert picked.episode_index.tolist() == [s.episode_index[3], s.episode_index[0]]
    assert picked.tasks == [s.tasks[3], s.tasks[0]]
    np.testing.assert_array_equal(picked.images["side"][0], s.images["side"][3])
    masked = s.select(s.frame_index == 10)
    assert len(masked) == 18 and (masked.frame_index == 10).all()
    assert len(s.select(slice(0, 5))) == 5


def test_draw_stratified_covers_tasks_and_spreads_over_time(es):
    s = draw_stratified(es, 72, chunk_size=4, seed=0)  # 9 tasks x 2 episodes x 4 draws
    assert len(s) == 72
    counts = {t: s.tasks.count(t) for t in set(s.tasks)}
    assert set(counts) == set(TASKS) and set(counts.values()) == {8}
    pairs = list(zip(s.episode_index.tolist(), s.frame_index.tolist()))
    assert len(set(pairs)) == len(pairs)  # no frame twice
    for e in range(18):
        frames = sorted(f for ep, f in pairs if ep == e)
        assert len(frames) == 4  # every episode equally
        # one frame in each quarter of the 20-frame episode
        assert [f // 5 for f in frames] == [0, 1, 2, 3]
    # Round-robin order: any prefix of 9 covers all 9 tasks.
    assert set(s.tasks[:9]) == set(TASKS)
    # Observations and chunks match make_samples for the same frames.
    ref = make_samples(es, chunk_size=4, frames=pairs[:5])
    np.testing.assert_array_equal(ref.actions, s.actions[:5])
    for cam in ref.images:
        np.testing.assert_array_equal(ref.images[cam], s.images[cam][:5])


def test_draw_stratified_is_deterministic(es):
    a = draw_stratified(es, 20, chunk_size=2, seed=7)
    b = draw_stratified(es, 20, chunk_size=2, seed=7)
    c = draw_stratified(es, 20, chunk_size=2, seed=8)
    key = lambda s: list(zip(s.episode_index.tolist(), s.frame_index.tolist()))
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert len(set(a.tasks)) == 9


def test_draw_stratified_small_and_oversized(es):
    s = draw_stratified(es, 3, chunk_size=1, seed=0)
    assert len(s) == 3 and len(set(s.tasks)) == 3
    tiny = es.subset([0, 1])
    everything = draw_stratified(tiny, 1000, chunk_size=1)
    assert len(everything) == 40  # capped at the frames available, no repeats
    assert len(set(zip(everything.episode_index.tolist(), everything.frame_index.tolist()))) == 40


def test_empty_set_raises(es):
    with pytest.raises(EpisodeError):
        make_samples(es.subset([]), chunk_size=2)
    with pytest.raises(EpisodeError):
        draw_stratified(es.subset([]), 5, chunk_size=2)


def test_model_inputs_follow_the_policys_camera_order_not_the_episodes():
    from vlacompile.data import make_synthetic_episodes
    from vlacompile.data.sampling import make_samples
    from vlacompile.policy import CameraSpec, PolicySpec

    es = make_synthetic_episodes(2, image_size=32, cameras=("wrist", "front"), episode_length=6, seed=3)
    samples = make_samples(es, chunk_size=4)
    assert samples.camera_names == ("wrist", "front")
    spec = PolicySpec(
        family="vlacompile-reference", cameras=(CameraSpec("front", 32, 32), CameraSpec("wrist", 32, 32)), state_dim=es.state_dim,
        action_dim=es.action_dim, chunk_size=4, flow_steps=1, max_tokens=16, control_hz=10.0,
        action_mean=(0.0,) * es.action_dim, action_std=(1.0,) * es.action_dim,
    )
    inputs = samples.model_inputs(spec)
    # The reference family stacks cameras in the policy's order, channels first.
    np.testing.assert_array_equal(inputs["images"][:, 0], samples.images["front"].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(inputs["images"][:, 1], samples.images["wrist"].transpose(0, 3, 1, 2))
    assert inputs["tokens"].shape == (len(samples), 16)
    # A subset keeps the camera order it came with.
    assert samples.select([0, 1]).camera_names == ("wrist", "front")

    spec_missing = PolicySpec(**{**spec.__dict__, "cameras": (CameraSpec("top", 32, 32),), "inputs": ()})
    with pytest.raises(EpisodeError, match="top"):
        samples.model_inputs(spec_missing)
