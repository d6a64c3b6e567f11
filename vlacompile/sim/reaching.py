"""The synthetic reaching task (``vlacompile.data.synthetic``) as a closed-loop environment.

Scene sampling, rendering and dynamics are the episode generator's own code (``synthetic.World``), so
a policy trained on the generated demonstrations sees the same images and states here, and replaying
a demonstration's actions reproduces its frames. Success is the instruction's goal:

* ``move to``: the gripper is over the named block (within ``REACH_RADIUS`` of its centre);
* ``pick up``: the named block is lifted (the gripper closed over it, then a lift command);
* ``push``:    the named block has moved ``PUSH_DISTANCE`` from where it started, along the
  direction from the gripper's start to the block (the direction the demonstrations push in), or
  has been pushed (``PUSH_MIN`` at least) into the band by the table's edge where the
  demonstrations stop pushing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from vlacompile.data import synthetic as syn

REACH_RADIUS = syn.BLOCK_HALF  # the gripper's centre lies over the block
PUSH_DISTANCE = 0.1  # table units; the table is 1 x 1 and a block 0.11 wide
PUSH_MIN = 0.02


def task_success(world: syn.World) -> bool:
    colour = world.colour
    if world.verb == "move to":
        return bool(np.linalg.norm(world.gripper - world.blocks[colour]) < REACH_RADIUS)
    if world.verb == "pick up":
        return world.lifted == colour
    moved = float(np.dot(world.blocks[colour] - world.start_blocks[colour], world.push_dir))
    return moved >= PUSH_DISTANCE or (moved >= PUSH_MIN and world.pushed_to_edge())


class ReachingEnv:
    """One instruction of the synthetic task; gymnasium's reset/step API.

    ``max_steps`` is also the episode length the state's phase feature is normalised by, as in the
    demonstrations (keep it equal to the episode length the policy was trained on).
    """

    def __init__(self, task: str, *, image_size: int = 64, cameras: tuple[str, ...] = ("front", "wrist"), max_steps: int = 40):
        syn.parse_task(task)  # fail here, naming the instruction, rather than at reset
        self.task = task
        self.image_size = int(image_size)
        self.cameras = tuple(cameras)
        self.max_steps = int(max_steps)
        self._grids = [syn._pixel_world(self.image_size, syn._VIEWS[i % len(syn._VIEWS)]) for i in range(len(self.cameras))]
        self.world: syn.World | None = None

    def _obs(self) -> dict:
        w = self.world
        return {
            "images": {c: w.render(self.image_size, i, self._grids[i]) for i, c in enumerate(self.cameras)},
            "state": w.state(),
            "task": self.task,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """A new scene drawn like the generator's ``make_scene(default_rng(seed))``."""
        self.world = syn.World(syn.make_scene(np.random.default_rng(seed)), self.task, episode_length=self.max_steps)
        return self._obs(), {"success": task_success(self.world)}

    def step(self, action) -> tuple[dict, float, bool, bool, dict]:
        if self.world is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (4,) or not np.all(np.isfinite(a)):
            raise ValueError(f"a reaching action is 4 finite numbers (dx, dy, gripper close, lift), got {action!r}")
        self.world.step(a)
        success = task_success(self.world)
        truncated = self.world.t >= self.max_steps and not success
        return self._obs(), float(success), success, truncated, {"success": success}


@dataclass(frozen=True)
class ReachingSuite:
    """The 9 instructions of the synthetic task, rendered like the shipped demo episodes."""

    cameras: tuple[str, ...] = ("front", "wrist")
    image_size: int = 64
    max_steps: int = 40
    name: str = "reaching"
    state_dim: int = 6
    action_dim: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras", tuple(self.cameras))

    @property
    def tasks(self) -> list[str]:
        return list(syn.TASKS)

    def make_env(self, task: str) -> ReachingEnv:
        return ReachingEnv(task, image_size=self.image_size, cameras=self.cameras, max_steps=self.max_steps)


@dataclass(frozen=True)
class ExpertSpec:
    chunk_size: int
    action_dim: int = 4
    cameras: tuple = ()


class ScriptedExpert:
    """The demonstrations' scripted expert as a chunking controller (privileged: it reads the world).

    Each call plans ``chunk_size`` actions by stepping a copy of the world; the chunk's noise input
    supplies the expert's action noise (N(0, 0.03^2) on dx, dy, as in the demonstrations), so the
    expert consumes noise the same way a flow-matching policy does.
    """

    name = "scripted-expert"

    def __init__(self, chunk_size: int = 16):
        self.spec = ExpertSpec(chunk_size=chunk_size)
        self._env: ReachingEnv | None = None

    def begin_episode(self, env: ReachingEnv) -> None:
        self._env = env

    def get_action(self, obs: dict, noise: np.ndarray) -> np.ndarray:
        if self._env is None or self._env.world is None:
            raise RuntimeError("the scripted expert reads the simulator: evaluate() binds it with begin_episode(env)")
        world = copy.deepcopy(self._env.world)
        noise = np.asarray(noise, dtype=np.float64).reshape(self.spec.chunk_size, -1)
        chunk = np.empty((self.spec.chunk_size, 4), dtype=np.float32)
        for k in range(self.spec.chunk_size):
            a = syn.expert_action(world, 0.03 * noise[k, :2])
            chunk[k] = a
            world.step(a)
        return chunk
