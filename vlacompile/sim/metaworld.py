"""Meta-World MT10 (metaworld 3.x, MuJoCo) as a closed-loop suite.

Each task is one MT10 environment with an English instruction. Observations follow vlacompile's
layout: one camera rendered offscreen (``rgb_array``) at ``image_size``, turned upright, with shadows
and reflections off (61 -> 16 ms a frame under OSMesa here); state = Meta-World's full 39-number
observation (``STATE_NAMES``: hand, gripper, object poses, the previous frame of those, and the goal).
The goal is in the state because the renders do not show it (reach, push and pick-place goals are
invisible sites), as LeRobot's Meta-World datasets carry it in ``observation.environment_state``.
Actions are Meta-World's (dx, dy, dz, gripper) in [-1, 1]. ``reset(seed=s)`` draws object and goal
positions from ``s`` (Meta-World ignores gymnasium's reset seed, so the seed goes through
``env.seed`` with seeded random vectors).

Images are rendered when an observation's ``images`` are first read, not at every step: a policy
that executes 8 actions per chunk looks at one frame in 8, and rendering dominates a step's cost.

Needs the ``sim`` extra: ``pip install 'vlacompile[sim]'`` (metaworld, gymnasium, mujoco).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from vlacompile.errors import MissingDependencyError

# MT10's environments and the instruction a language-conditioned policy is given for each.
MT10_INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg sideways",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}
# Cameras that metaworld renders upside down and mirrored.
_FLIPPED_CAMERAS = ("corner", "corner2", "corner3")

# Meta-World's observation: this frame's 18 numbers, the previous frame's, then the goal.
_FRAME = ("hand_x", "hand_y", "hand_z", "gripper", *(f"obj1_{k}" for k in ("x", "y", "z", "qw", "qx", "qy", "qz")),
          *(f"obj2_{k}" for k in ("x", "y", "z", "qw", "qx", "qy", "qz")))
STATE_NAMES: tuple[str, ...] = (*_FRAME, *(f"prev_{n}" for n in _FRAME), "goal_x", "goal_y", "goal_z")


def _import_metaworld():
    import os

    # MuJoCo defaults to GLFW, which needs a display; headless machines render with OSMesa
    # (Debian's libosmesa6; EGL failed on the CPU build machines). An explicit MUJOCO_GL wins.
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "osmesa"
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    try:
        import gymnasium  # noqa: F401
        import metaworld
    except ImportError as e:
        raise MissingDependencyError(
            f"the Meta-World suite needs metaworld and gymnasium ({e})",
            source="metaworld-mt10",
            hint="pip install 'vlacompile[sim]'",
        ) from e
    return metaworld


class _LazyImages(Mapping):
    """``{camera_key: image}`` rendered on first access, valid only until the env steps again."""

    def __init__(self, env: "MetaWorldEnv", step: int):
        self._env, self._step, self._images = env, step, None

    def _load(self) -> dict:
        if self._images is None:
            if self._env._t != self._step:
                raise RuntimeError(
                    f"the images of step {self._step} were read after the environment moved on to step {self._env._t}; "
                    "read an observation's images before stepping again"
                )
            self._images = {self._env.camera_key: self._env._render()}
        return self._images

    def __getitem__(self, key):
        return self._load()[key]

    def __iter__(self):
        return iter((self._env.camera_key,))

    def __len__(self) -> int:
        return 1


class MetaWorldEnv:
    """One MT10 task; gymnasium's reset/step API with vlacompile observations."""

    def __init__(self, env_name: str, instruction: str, *, camera: str, camera_key: str, image_size: int, max_steps: int):
        metaworld = _import_metaworld()
        self.task = instruction
        self.camera_key = camera_key
        self.max_steps = int(max_steps)
        self._flip = camera in _FLIPPED_CAMERAS
        mt1 = metaworld.MT1(env_name, seed=0)
        self._env = mt1.train_classes[env_name](render_mode="rgb_array", camera_name=camera, width=image_size, height=image_size)
        self._env.set_task(mt1.train_tasks[0])
        self._env._partially_observable = False  # the goal is part of the state (see the module doc)
        self._t = 0
        self._viewer = None

    def _render(self) -> np.ndarray:
        if self._viewer is None:  # the viewer exists after the first render
            import mujoco

            self._env.render()
            self._viewer = self._env.mujoco_renderer._get_viewer("rgb_array")
            self._viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # Every env has its own OpenGL context, and gymnasium makes one current only when it is
        # created: after another env rendered, this one would read that env's frame (the student's
        # closed loop, played in the environments the teacher had used, scored 0.82 instead of 0.91).
        self._viewer.make_context_current()
        image = np.asarray(self._env.render(), dtype=np.uint8)
        if self._flip:
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def _obs(self, raw: np.ndarray) -> dict:
        return {
            "images": _LazyImages(self, self._t),
            "state": np.asarray(raw, dtype=np.float32).reshape(-1)[: len(STATE_NAMES)],
            "task": self.task,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        env = self._env
        # Randomise object and goal positions from `seed` instead of the task's frozen vector.
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        if seed is not None:
            env.seed(int(seed))
        raw, _ = env.reset()
        self._t = 0
        return self._obs(raw), {"success": False}

    def step(self, action) -> tuple[dict, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)
        if a.shape != (4,):
            raise ValueError(f"a Meta-World action is 4 numbers (dx, dy, dz, gripper), got shape {a.shape}")
        raw, reward, _, truncated, info = self._env.step(a)
        self._t += 1
        success = bool(info.get("success", 0.0))
        truncated = bool(truncated) or (self._t >= self.max_steps and not success)
        return self._obs(raw), float(reward), success, truncated, {**info, "success": success}

    def close(self) -> None:
        self._env.close()


@dataclass(frozen=True)
class MetaWorldSuite:
    """MT10. ``cameras`` names the single observation key; ``camera`` the MuJoCo camera rendered."""

    cameras: tuple[str, ...] = ("front",)
    image_size: int = 64
    max_steps: int = 200
    camera: str = "corner2"
    name: str = "metaworld-mt10"
    state_dim: int = len(STATE_NAMES)
    action_dim: int = 4
    env_names: dict[str, str] = field(default_factory=lambda: dict(MT10_INSTRUCTIONS))

    def __post_init__(self) -> None:
        _import_metaworld()  # fail when the suite is chosen, not at the first episode
        object.__setattr__(self, "cameras", tuple(self.cameras))
        if len(self.cameras) != 1:
            raise ValueError(f"the Meta-World suite renders one camera; got cameras {self.cameras}")

    @property
    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES

    @property
    def tasks(self) -> list[str]:
        return list(self.env_names.values())

    def make_env(self, task: str) -> MetaWorldEnv:
        by_instruction = {v: k for k, v in self.env_names.items()}
        if task not in by_instruction:
            raise ValueError(f"not an MT10 instruction: {task!r}; expected one of {self.tasks}")
        return MetaWorldEnv(
            by_instruction[task], task, camera=self.camera, camera_key=self.cameras[0], image_size=self.image_size, max_steps=self.max_steps
        )
