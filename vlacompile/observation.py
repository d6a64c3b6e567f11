"""What a robot hands a policy at every control step, in the layout camera drivers deliver it.

    Observation = {"images": {camera: uint8 [H, W, 3]}, "state": float32 [state_dim], "task": str}

A batch of them (``ObservationBatch``: per camera uint8 [N, H, W, 3], state [N, state_dim], N
tasks) is what stages and verify feed a family's preprocessor. LeRobot's batch keys
(``observation.images.<camera>`` as float [3, H, W] in [0, 1] or uint8 [H, W, 3],
``observation.state``, ``task``) convert with ``from_lerobot``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from vlacompile.errors import ConfigError

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"


class Observation(TypedDict):
    images: dict[str, np.ndarray]  # camera name -> uint8 [H, W, 3]
    state: np.ndarray  # float32 [state_dim], physical units
    task: str  # the language instruction


@dataclass
class ObservationBatch:
    images: dict[str, np.ndarray]  # camera name -> uint8 [N, H, W, 3]
    state: np.ndarray  # float32 [N, state_dim]
    tasks: list[str]

    def __len__(self) -> int:
        return int(self.state.shape[0])

    @classmethod
    def of(cls, obs: Observation) -> "ObservationBatch":
        return cls({c: np.asarray(v)[None] for c, v in obs["images"].items()}, np.asarray(obs["state"], np.float32)[None], [obs["task"]])

    def row(self, i: int) -> Observation:
        return {"images": {c: np.ascontiguousarray(v[i]) for c, v in self.images.items()}, "state": self.state[i], "task": self.tasks[i]}


def as_uint8_hwc(image: Any, where: str) -> np.ndarray:
    """uint8 [H, W, 3] as is; float [3, H, W] in [0, 1] (LeRobot's decoded frames: k / 255) to uint8.

    Float frames that are not multiples of 1/255 (to 1e-3 of a level) are refused: a policy graph
    reads uint8 frames, and rounding them silently would compare the policy on other pixels."""
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        if arr.ndim == 3 and arr.shape[-1] == 3:
            return np.ascontiguousarray(arr)
        if arr.ndim == 3 and arr.shape[0] == 3:
            return np.ascontiguousarray(arr.transpose(1, 2, 0))
    elif np.issubdtype(arr.dtype, np.floating) and arr.ndim == 3 and arr.shape[0] == 3:
        scaled = arr.astype(np.float64) * 255.0
        levels = np.rint(scaled)
        if arr.size and (np.abs(scaled - levels).max() > 1e-3 or levels.min() < 0 or levels.max() > 255):
            raise ConfigError(
                f"{where} holds float values that are not uint8 levels / 255 (as LeRobot decodes frames)",
                source=where, hint="pass the camera frame as uint8 [H, W, 3], or as float [3, H, W] = uint8 / 255",
            )
        return np.ascontiguousarray(levels.astype(np.uint8).transpose(1, 2, 0))
    raise ConfigError(
        f"{where} has shape {arr.shape} and dtype {arr.dtype}",
        source=where, hint="pass uint8 [H, W, 3] or float [3, H, W] in [0, 1]",
    )


def from_lerobot(observation: dict[str, Any], spec) -> Observation:
    """LeRobot's keys for one observation -> an ``Observation`` for ``spec``'s cameras."""
    if "images" in observation and "state" in observation:  # already vlacompile's layout
        return observation  # type: ignore[return-value]
    missing = [f"{IMAGE_PREFIX}{c.name}" for c in spec.cameras if f"{IMAGE_PREFIX}{c.name}" not in observation]
    for key in (STATE_KEY, "task"):
        if key not in observation:
            missing.append(key)
    if missing:
        raise ConfigError(
            f"the observation lacks {missing}; it has {sorted(observation)}",
            source="observation", hint=f"the {spec.family} policy reads {[f'{IMAGE_PREFIX}{c.name}' for c in spec.cameras]}, {STATE_KEY} and task",
        )
    state = observation[STATE_KEY]
    if hasattr(state, "detach"):
        state = state.detach().cpu().numpy()
    state = np.asarray(state, dtype=np.float32).reshape(-1)
    if state.shape != (spec.state_dim,):
        raise ConfigError(f"{STATE_KEY} has {state.size} values, the policy reads {spec.state_dim}", source="observation")
    task = observation["task"]
    if not isinstance(task, str):
        raise ConfigError(f"task must be a string, got {type(task).__name__}", source="observation")
    images = {c.name: as_uint8_hwc(observation[f"{IMAGE_PREFIX}{c.name}"], f"{IMAGE_PREFIX}{c.name}") for c in spec.cameras}
    return {"images": images, "state": state, "task": task}
