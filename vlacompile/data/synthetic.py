"""A small, learnable, language-conditioned reaching task rendered with numpy.

A square table (world coordinates [0, 1] x [0, 1]) is seen from above. Three blocks - red, green
and blue - lie at random, non-overlapping positions; the gripper is a dark dot whose size shows how
far it is open. The instruction names a verb and a colour:

* ``"move to the <colour> block"``  - reach the block and hover over it;
* ``"push the <colour> block"``     - reach the block and keep going, pushing it along the approach
  direction until it nears the table edge;
* ``"pick up the <colour> block"``  - reach the block, close the gripper, then lift it (the ``lift``
  action becomes 1 once the gripper has closed on it; the lifted block is drawn larger, with a shadow).

State (6): gripper x, y, gripper opening (1 open .. 0 closed), velocity x, y (the previous step's
command), phase (t / (T - 1)). Action (4): dx, dy (a velocity command in [-1, 1]; one step moves
``MAX_STEP`` table units at full command), gripper command (1 = close), lift (1 = lift).

The expert moves smoothly toward the named block with a little noise, so the actions depend on the
instruction: the same scene with a different colour or verb gives different actions. Everything is
deterministic under ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlacompile.data.episodes import Episode, EpisodeSet

FPS = 10.0
MAX_STEP = 0.06  # table units moved per step at full command
BLOCK_HALF = 0.055  # half side of a block
LIFTED_HALF = 0.07
ARRIVE_DIST = 0.03
GRASP_RADIUS = BLOCK_HALF  # a closed gripper lifts a block only when it is over it
PUSH_CONTACT = 0.075  # gripper-to-block-centre distance while pushing
PUSH_SPEED = 0.35  # command magnitude while pushing (slower than reaching)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 165, 65),
    "blue": (45, 75, 215),
}
VERBS = ("pick up", "push", "move to")
TEMPLATES = {
    "pick up": "pick up the {colour} block",
    "push": "push the {colour} block",
    "move to": "move to the {colour} block",
}
TASKS: tuple[str, ...] = tuple(TEMPLATES[v].format(colour=c) for v in VERBS for c in COLOURS)
STATE_NAMES = ("gripper_x", "gripper_y", "gripper_opening", "velocity_x", "velocity_y", "phase")
ACTION_NAMES = ("dx", "dy", "gripper_close", "lift")
ROBOT_TYPE = "vlacompile-synthetic"

# Camera views: (mirror x, swap axes, zoom, shift x, shift y, background tint).
_VIEWS = (
    (False, False, 1.0, 0.0, 0.0, (0, 0, 0)),
    (True, False, 1.15, 0.04, -0.03, (-18, -6, 12)),
    (False, True, 0.85, -0.03, 0.04, (10, 8, -12)),
    (True, True, 1.15, 0.0, 0.0, (-8, 10, -4)),
)
_TABLE = np.array((196, 186, 164), dtype=np.float32)
_FLOOR = np.array((92, 88, 84), dtype=np.float32)
_GRIPPER = np.array((28, 28, 34), dtype=np.float32)
_SHADOW = np.array((120, 112, 100), dtype=np.float32)


def parse_task(task: str) -> tuple[str, str]:
    """``"push the green block"`` -> ``("push", "green")``; ValueError for other text."""
    for verb, template in TEMPLATES.items():
        for colour in COLOURS:
            if task == template.format(colour=colour):
                return verb, colour
    raise ValueError(f"not a synthetic-task instruction: {task!r}; expected one of {list(TASKS)}")


@dataclass
class Scene:
    blocks: dict[str, np.ndarray]  # colour -> (x, y)
    gripper: np.ndarray  # (x, y) at t = 0


def make_scene(rng: np.random.Generator) -> Scene:
    """Blocks at least 0.25 apart inside the table; the gripper starts at least 0.2 from each."""
    while True:
        pts = rng.uniform(0.15, 0.85, size=(3, 2))
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(3)
        if d.min() >= 0.25:
            break
    while True:
        g = rng.uniform(0.08, 0.92, size=2)
        if np.linalg.norm(pts - g, axis=1).min() >= 0.2:
            break
    return Scene(blocks={c: pts[i].copy() for i, c in enumerate(COLOURS)}, gripper=g)


def _pixel_world(size: int, view) -> tuple[np.ndarray, np.ndarray]:
    mirror, swap, zoom, sx, sy, _ = view
    u = (np.arange(size, dtype=np.float32) + 0.5) / size
    uu, vv = np.meshgrid(u, u)  # uu: column (x), vv: row (y)
    if mirror:
        uu = 1.0 - uu
    wx = (uu - 0.5 - sx) / zoom + 0.5
    wy = (vv - 0.5 - sy) / zoom + 0.5
    if swap:
        wx, wy = wy, wx
    return wx, wy


def render(
    size: int,
    view_index: int,
    blocks: dict[str, np.ndarray],
    lifted: str | None,
    gripper: np.ndarray,
    opening: float,
    _grid: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """One uint8 [size, size, 3] frame of the table seen by camera ``view_index``."""
    view = _VIEWS[view_index % len(_VIEWS)]
    wx, wy = _grid if _grid is not None else _pixel_world(size, view)
    on_table = (wx >= 0) & (wx <= 1) & (wy >= 0) & (wy <= 1)
    # A gentle lighting gradient so the background is not a flat colour.
    shade = 1.0 - 0.12 * ((wx - 0.3) ** 2 + (wy - 0.3) ** 2)
    img = np.where(on_table[..., None], _TABLE * shade[..., None], _FLOOR)
    img = img + np.asarray(view[5], dtype=np.float32)
    order = [c for c in COLOURS if c != lifted] + ([lifted] if lifted else [])
    for colour in order:
        bx, by = blocks[colour]
        half = LIFTED_HALF if colour == lifted else BLOCK_HALF
        if colour == lifted:
            shadow = (np.abs(wx - bx - 0.025) < BLOCK_HALF) & (np.abs(wy - by - 0.025) < BLOCK_HALF)
            img[shadow] = _SHADOW
        mask = (np.abs(wx - bx) < half) & (np.abs(wy - by) < half)
        img[mask] = np.asarray(COLOURS[colour], dtype=np.float32)
    r = 0.022 + 0.022 * float(opening)
    dot = (wx - gripper[0]) ** 2 + (wy - gripper[1]) ** 2 < r * r
    img[dot] = _GRIPPER
    return np.clip(img, 0, 255).astype(np.uint8)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.array([1.0, 0.0])


class World:
    """The table's state and dynamics for one instruction: what the episode generator records and
    what the closed-loop environment (``vlacompile.sim.reaching``) steps, so both behave the same.

    Contact is scripted as in the demonstrations: only the named block of a ``push`` instruction is
    pushed, once the gripper has reached the contact point behind it (seen from where the gripper
    started); then the block stays ``PUSH_CONTACT`` ahead of the gripper along that direction. A
    closed gripper lifts the block under it on a lift command, and the block then follows the gripper.
    """

    def __init__(self, scene: Scene, task: str, episode_length: int = 40):
        self.task = task
        self.verb, self.colour = parse_task(task)
        self.episode_length = int(episode_length)
        self.blocks = {c: p.copy() for c, p in scene.blocks.items()}
        self.start_blocks = {c: p.copy() for c, p in scene.blocks.items()}
        self.gripper = scene.gripper.astype(np.float64).copy()
        self.opening = 1.0
        self.velocity = np.zeros(2)  # the previous step's command
        self.push_dir = _unit(self.blocks[self.colour] - self.gripper)
        self.arrived = False  # latched: the gripper has reached target() once
        self.lifted: str | None = None
        self.t = 0
        self._latch_arrival()

    def target(self) -> np.ndarray:
        """Where the gripper goes first: the named block, or the contact point behind it for ``push``."""
        target = self.blocks[self.colour]
        if self.verb == "push":
            target = target - self.push_dir * PUSH_CONTACT
        return target

    def _latch_arrival(self) -> None:
        if not self.arrived and np.linalg.norm(self.target() - self.gripper) < ARRIVE_DIST:
            self.arrived = True

    def pushed_to_edge(self) -> bool:
        """Whether the named block, pushed a little further, would reach the table's edge band."""
        ahead = self.blocks[self.colour] + self.push_dir * 0.02
        return bool(np.any(ahead < 0.08) or np.any(ahead > 0.92))

    def state(self) -> np.ndarray:
        T = self.episode_length
        g, v = self.gripper, self.velocity
        return np.array((g[0], g[1], self.opening, v[0], v[1], self.t / (T - 1) if T > 1 else 0.0), dtype=np.float32)

    def render(self, size: int, view_index: int, grid: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        return render(size, view_index, self.blocks, self.lifted, self.gripper, self.opening, _grid=grid)

    def step(self, action) -> None:
        """Apply one action (dx, dy, gripper close, lift); the last two act when above 0.5."""
        cmd = np.clip(np.asarray(action[:2], dtype=np.float64), -1.0, 1.0)
        self.gripper = np.clip(self.gripper + MAX_STEP * cmd, 0.0, 1.0)
        self.velocity = cmd.copy()
        if action[2] > 0.5:
            self.opening = max(0.0, self.opening - 0.34)
        if action[3] > 0.5 and self.lifted is None and self.opening <= 0.0:
            dist = {c: float(np.linalg.norm(p - self.gripper)) for c, p in self.blocks.items()}
            nearest = min(dist, key=dist.get)
            if dist[nearest] < GRASP_RADIUS:
                self.lifted = nearest
        if self.lifted is not None:
            self.blocks[self.lifted] = self.gripper.copy()
        elif self.verb == "push" and self.arrived:
            self.blocks[self.colour] = np.clip(self.gripper + self.push_dir * PUSH_CONTACT, 0.0, 1.0)
        self.t += 1
        self._latch_arrival()


def expert_action(world: World, noise: np.ndarray) -> np.ndarray:
    """The scripted expert's next action (float64 [4]) in ``world``; ``noise`` (2,) is added to the
    velocity command (the demonstrations draw it from N(0, 0.03^2))."""
    g = world.gripper
    grip = 0.0
    lift = 0.0
    if world.verb == "push" and world.arrived:
        desired = np.zeros(2) if world.pushed_to_edge() else world.push_dir * PUSH_SPEED
    else:
        desired = (world.target() - g) / MAX_STEP * 0.6
        n = float(np.linalg.norm(desired))
        if n > 1.0:
            desired = desired / n
    if world.verb == "pick up" and world.arrived:
        grip = 1.0
        if world.opening <= 0.0:
            lift = 1.0
    # The expert smooths its command: half the previous one (the world's velocity) plus half the new.
    cmd = np.clip(0.5 * world.velocity + 0.5 * desired + noise, -1.0, 1.0)
    return np.array((cmd[0], cmd[1], grip, lift))


def make_synthetic_episode(
    task: str,
    *,
    scene_seed: int,
    noise_seed: int | None = None,
    index: int = 0,
    image_size: int = 64,
    cameras: tuple[str, ...] | list[str] = ("front",),
    episode_length: int = 40,
) -> Episode:
    """Roll out the expert for ``task`` in the scene drawn from ``scene_seed``.

    Two calls with the same seeds and different instructions see the same scene and the same
    noise, so any difference in their actions comes from the instruction.
    """
    parse_task(task)
    noise = np.random.default_rng(scene_seed + 7919 if noise_seed is None else noise_seed)
    cams = tuple(cameras)
    grids = [_pixel_world(image_size, _VIEWS[i % len(_VIEWS)]) for i in range(len(cams))]
    T = int(episode_length)
    world = World(make_scene(np.random.default_rng(scene_seed)), task, episode_length=T)

    images = {c: np.empty((T, image_size, image_size, 3), dtype=np.uint8) for c in cams}
    state = np.empty((T, 6), dtype=np.float32)
    action = np.empty((T, 4), dtype=np.float32)
    for t in range(T):
        state[t] = world.state()
        for i, cam in enumerate(cams):
            images[cam][t] = world.render(image_size, i, grids[i])
        a = expert_action(world, noise.normal(0.0, 0.03, size=2))
        action[t] = a
        world.step(a)

    return Episode(index=index, task=task, images=images, state=state, action=action)


def make_synthetic_episodes(
    n_episodes: int,
    *,
    image_size: int = 64,
    cameras: tuple[str, ...] | list[str] = ("front",),
    episode_length: int = 40,
    seed: int = 0,
) -> EpisodeSet:
    """``n_episodes`` expert demonstrations, the 9 instructions balanced (round-robin in a seeded order)."""
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if episode_length < 2:
        raise ValueError(f"episode_length must be >= 2, got {episode_length}")
    cams = tuple(cameras)
    if not cams or len(set(cams)) != len(cams):
        raise ValueError(f"cameras must be non-empty and unique, got {cams}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(TASKS))
    episodes = []
    for i in range(n_episodes):
        scene_seed, noise_seed = (int(s) for s in np.random.SeedSequence([seed, i]).generate_state(2))
        episodes.append(
            make_synthetic_episode(
                TASKS[int(order[i % len(TASKS)])],
                scene_seed=scene_seed,
                noise_seed=noise_seed,
                index=i,
                image_size=image_size,
                cameras=cams,
                episode_length=episode_length,
            )
        )
    return EpisodeSet(
        root=None,
        fps=FPS,
        episodes=episodes,
        camera_names=cams,
        image_shapes={c: (image_size, image_size) for c in cams},
        state_dim=6,
        action_dim=4,
        robot_type=ROBOT_TYPE,
        state_names=STATE_NAMES,
        action_names=ACTION_NAMES,
    )
