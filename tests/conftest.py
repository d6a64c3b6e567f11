"""Shared fixtures: a tiny reference-family teacher and synthetic episodes that match it.

Names are stable; other test files rely on them.

- ``tiny_config`` (session): the ``ReferenceConfig`` of the tiny teacher: one camera ("front"),
  32x32 images, patch 8, two layers of width 64 in each part (2 heads of 16, MLP 64), chunk 8,
  4 flow steps, state_dim 6, action_dim 4, 32 instruction tokens. Frozen, so safe to share.
- ``tiny_policy`` (function): a fresh ``Policy`` for ``tiny_config`` with seeded weights (equal
  across calls) and normalisation statistics taken from ``tiny_episode_set``, so action
  un-normalisation is not an identity. Mutating it cannot leak into other tests.
- ``tiny_checkpoint`` (function): ``tiny_policy`` saved with ``save_policy`` under ``tmp_path``;
  the checkpoint directory (``config.json`` + ``model.safetensors``). Tests may damage it.
- ``tiny_episode_set`` (session): ``make_synthetic_episodes(10, image_size=32, cameras=("front",),
  episode_length=20, seed=0)`` in memory (state_dim 6, action_dim 4, 10 Hz). Do not mutate.
- ``tiny_episodes`` (function): ``tiny_episode_set`` written with ``write_episodes`` under
  ``tmp_path``; the LeRobotDataset v3 directory. 10 episodes split by ``split_episodes`` defaults
  into 7 train / 1 calibration / 2 held-out (140 training frames).
- ``tiny_checkpoint_module`` / ``tiny_episodes_module`` (module): the same two directories,
  written once per test module, for expensive module-scoped fixtures. Treat them as read-only
  (copy them before damaging them).
- ``single_thread`` (module): runs torch with one intra-op thread for the module, restoring the
  previous count afterwards. Use it (``pytestmark = pytest.mark.usefixtures("single_thread")``) in
  modules that run tiny models but measure no latency: on the 2 shared cores, two OpenMP threads
  stall whenever another process holds a core (measured: a tiny forward took ~3 s with 2 threads
  under load, 10 ms with 1).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlacompile.checkpoint import new_policy, save_policy
from vlacompile.data import EpisodeSet, make_synthetic_episodes, write_episodes
from vlacompile.families import get_family
from vlacompile.families.reference import ReferenceConfig
from vlacompile.policy import Policy

TINY_EPISODES = 10
TINY_EPISODE_LENGTH = 20
TINY_WEIGHT_SEED = 1234


# A build of the tiny teacher that takes seconds: for tests of what surrounds the stages (inputs,
# outputs, errors), not of what the stages compute.
QUICK_RECIPE = """
name = "tiny-quick"
[[stages]]
stage = "distill"
layers = { vision = [0], backbone = [1], expert = [0, 1] }
flow_steps = 1
steps = 3
batch_size = 8
num_samples = 16
[[stages]]
stage = "export"
"""


def make_tiny_config(**overrides) -> ReferenceConfig:
    """The tiny teacher's config (2+2+2 layers, width 64, 32 px, chunk 8, 4 flow steps); also used
    by tests/stages/ddp_worker.py, which runs as a separate process."""
    base = dict(
        cameras=("front",),
        image_size=32,
        patch_size=8,
        vision_heads=(2, 2),
        vision_mlp=(64, 64),
        backbone_heads=(2, 2),
        backbone_mlp=(64, 64),
        expert_heads=(2, 2),
        expert_mlp=(64, 64),
        vision_width=64,
        backbone_width=64,
        expert_width=64,
        head_dim=16,
        chunk_size=8,
        flow_steps=4,
    )
    return ReferenceConfig(**{**base, **overrides})


def make_tiny_episode_set() -> EpisodeSet:
    return make_synthetic_episodes(
        TINY_EPISODES, image_size=32, cameras=("front",), episode_length=TINY_EPISODE_LENGTH, seed=0
    )


def make_tiny_policy(config: ReferenceConfig, episode_set: EpisodeSet) -> Policy:
    # Seed locally so every call gives the same weights without disturbing the global RNG.
    with torch.random.fork_rng():
        torch.manual_seed(TINY_WEIGHT_SEED)
        policy = new_policy(config)
    stats = episode_set.stats()
    policy.module.set_stats(
        stats["observation.state"]["mean"],
        stats["observation.state"]["std"],
        stats["action"]["mean"],
        stats["action"]["std"],
    )
    # The spec copies the action statistics at construction: rebuild it after set_stats.
    policy.spec = get_family(policy.family).spec_of(policy.module)
    return policy


@pytest.fixture(scope="session")
def tiny_config() -> ReferenceConfig:
    return make_tiny_config()


@pytest.fixture(scope="session")
def tiny_episode_set() -> EpisodeSet:
    return make_tiny_episode_set()


@pytest.fixture()
def tiny_policy(tiny_config, tiny_episode_set) -> Policy:
    return make_tiny_policy(tiny_config, tiny_episode_set)


@pytest.fixture()
def tiny_checkpoint(tmp_path, tiny_policy) -> Path:
    return save_policy(tiny_policy, tmp_path / "tiny-teacher")


@pytest.fixture()
def tiny_episodes(tmp_path, tiny_episode_set) -> Path:
    return write_episodes(tmp_path / "tiny-episodes", tiny_episode_set)


@pytest.fixture(scope="module")
def tiny_checkpoint_module(tmp_path_factory, tiny_config, tiny_episode_set) -> Path:
    return save_policy(make_tiny_policy(tiny_config, tiny_episode_set), tmp_path_factory.mktemp("ckpt") / "tiny-teacher")


@pytest.fixture(scope="module")
def tiny_episodes_module(tmp_path_factory, tiny_episode_set) -> Path:
    return write_episodes(tmp_path_factory.mktemp("episodes") / "tiny-episodes", tiny_episode_set)


@pytest.fixture(scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _private_stage_cache(tmp_path_factory):
    """Builds in tests use a throw-away stage cache, never the user's ~/.cache/vlacompile."""
    import os

    before = os.environ.get("VLACOMPILE_CACHE")
    os.environ["VLACOMPILE_CACHE"] = str(tmp_path_factory.mktemp("stage-cache"))
    yield
    if before is None:
        os.environ.pop("VLACOMPILE_CACHE", None)
    else:
        os.environ["VLACOMPILE_CACHE"] = before
