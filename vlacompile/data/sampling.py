"""Turn episodes into model samples (observation + target action chunk) and draw calibration sets."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlacompile.data.episodes import EpisodeSet
from vlacompile.data.frames import take_frames
from vlacompile.errors import EpisodeError
from vlacompile.observation import ObservationBatch


@dataclass
class Samples:
    """A batch of observations and target action chunks, as numpy arrays."""

    images: dict[str, np.ndarray]  # camera name -> uint8 [N, H, W, 3] (each camera its own resolution)
    state: np.ndarray  # float32 [N, state_dim]
    tasks: list[str]  # N instructions
    actions: np.ndarray  # float32 [N, chunk, action_dim]: a[t:t+chunk], last action repeated past the end
    episode_index: np.ndarray  # int64 [N]
    frame_index: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return int(self.state.shape[0])

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(self.images)

    def select(self, idx) -> "Samples":
        """Rows ``idx`` (an int array, a boolean mask or a slice)."""
        if isinstance(idx, slice):
            rows = np.arange(len(self))[idx]
        else:
            rows = np.asarray(idx)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = rows.astype(np.int64).reshape(-1)
        return Samples(
            images={c: v[rows] for c, v in self.images.items()},
            state=self.state[rows],
            tasks=[self.tasks[int(i)] for i in rows],
            actions=self.actions[rows],
            episode_index=self.episode_index[rows],
            frame_index=self.frame_index[rows],
        )

    def observations(self) -> ObservationBatch:
        """The observations as a robot would hand them to a policy (what a family's preprocessor reads)."""
        return ObservationBatch(images=self.images, state=self.state.astype(np.float32), tasks=self.tasks)

    def model_inputs(self, spec) -> dict[str, np.ndarray]:
        """The policy's inputs less the noise, from the family's preprocessor for ``spec``."""
        from vlacompile.families import make_preprocessor

        missing = [c.name for c in spec.cameras if c.name not in self.images]
        if missing:
            raise EpisodeError(
                f"the policy reads cameras {missing} that the episodes do not have ({list(self.camera_names)})",
                source="episodes",
                hint="use episodes recorded with the policy's cameras",
            )
        return make_preprocessor(spec).batch(self.observations())


def make_samples(
    es: EpisodeSet,
    *,
    chunk_size: int,
    stride: int = 1,
    frames: list[tuple[int, int]] | None = None,
) -> Samples:
    """One sample per frame (every ``stride``-th frame of every episode), or per ``frames``.

    ``frames`` lists ``(episode_index, frame_index)`` pairs - the same numbers a ``Samples`` carries
    in its ``episode_index`` / ``frame_index`` fields.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not es.episodes:
        raise EpisodeError(
            "cannot make samples from an empty episode set", source=es.root, hint="pass at least one episode"
        )
    by_index = {ep.index: pos for pos, ep in enumerate(es.episodes)}
    if frames is None:
        pairs = [(pos, t) for pos, ep in enumerate(es.episodes) for t in range(0, len(ep), stride)]
    else:
        pairs = []
        for e, t in frames:
            if int(e) not in by_index:
                raise ValueError(f"episode_index {e} is not in the episode set")
            pos = by_index[int(e)]
            if not 0 <= int(t) < len(es.episodes[pos]):
                raise ValueError(f"frame {t} is outside episode {e} (length {len(es.episodes[pos])})")
            pairs.append((pos, int(t)))

    return _samples_at(es, pairs, chunk_size)


def _samples_at(es: EpisodeSet, pairs: list[tuple[int, int]], chunk_size: int) -> Samples:
    """Samples at ``(position in es.episodes, frame)`` pairs."""
    n = len(pairs)
    cams = es.camera_names
    images = {cam: np.empty((n, *es.image_shapes[cam], 3), dtype=np.uint8) for cam in cams}
    state = np.empty((n, es.state_dim), dtype=np.float32)
    actions = np.empty((n, chunk_size, es.action_dim), dtype=np.float32)
    episode_index = np.empty(n, dtype=np.int64)
    frame_index = np.empty(n, dtype=np.int64)
    tasks: list[str] = []
    steps = np.arange(chunk_size)
    for row, (pos, t) in enumerate(pairs):
        ep = es.episodes[pos]
        state[row] = ep.state[t]
        actions[row] = ep.action[np.minimum(t + steps, len(ep) - 1)]
        episode_index[row] = ep.index
        frame_index[row] = t
        tasks.append(ep.task)
    # Frames are read per episode in one pass each (a video decodes forward instead of seeking per frame).
    rows_of: dict[int, list[int]] = {}
    for row, (pos, _) in enumerate(pairs):
        rows_of.setdefault(pos, []).append(row)
    for pos, rows in rows_of.items():
        ts = [pairs[r][1] for r in rows]
        for cam in cams:
            images[cam][rows] = take_frames(es.episodes[pos].images[cam], ts)
    return Samples(images, state, tasks, actions, episode_index, frame_index)


def draw_stratified(es: EpisodeSet, n: int, *, chunk_size: int, seed: int = 0) -> Samples:
    """``n`` samples stratified over tasks, episodes within a task, and time within an episode.

    Draws go round-robin over the tasks (in a seeded order), within a task round-robin over its
    episodes (seeded order), so every task gets an equal share while it has frames left. Each
    episode that is drawn ``k`` times is cut into ``k`` equal time bins with one random frame from
    each, so the draws spread over the whole episode. Returns ``min(n, total frames)`` samples,
    no frame twice. Deterministic under ``seed``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not es.episodes:
        raise EpisodeError(
            "cannot draw samples from an empty episode set", source=es.root, hint="pass at least one episode"
        )
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for pos, ep in enumerate(es.episodes):
        by_task.setdefault(ep.task, []).append(pos)
    task_names = sorted(by_task)
    task_order = [task_names[i] for i in rng.permutation(len(task_names))]
    queues = {t: [by_task[t][i] for i in rng.permutation(len(by_task[t]))] for t in task_order}
    cursor = {t: 0 for t in task_order}
    left = {pos: len(ep) for pos, ep in enumerate(es.episodes)}
    total = sum(left.values())
    target = min(int(n), total)

    # Allocation: the sequence of episode positions in draw order.
    draws: list[int] = []
    while len(draws) < target:
        progressed = False
        for t in task_order:
            if len(draws) >= target:
                break
            q = queues[t]
            for _ in range(len(q)):  # next episode of this task with frames left
                pos = q[cursor[t] % len(q)]
                cursor[t] += 1
                if left[pos] > 0:
                    left[pos] -= 1
                    draws.append(pos)
                    progressed = True
                    break
        if not progressed:
            break

    # Time bins: an episode drawn k times is cut into k equal bins, one random frame per bin.
    counts: dict[int, int] = {}
    for pos in draws:
        counts[pos] = counts.get(pos, 0) + 1
    frames_of: dict[int, list[int]] = {}
    for pos in sorted(counts):
        k = counts[pos]
        length = len(es.episodes[pos])
        edges = [math.floor(i * length / k) for i in range(k + 1)]
        picks = [int(rng.integers(edges[i], edges[i + 1])) for i in range(k)]
        frames_of[pos] = [picks[i] for i in rng.permutation(k)]
    used = {pos: 0 for pos in counts}
    pairs = []
    for pos in draws:
        pairs.append((pos, frames_of[pos][used[pos]]))
        used[pos] += 1
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _samples_at(es, pairs, chunk_size)
