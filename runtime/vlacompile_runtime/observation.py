"""What a robot hands a policy at every control step, in the layout camera drivers deliver it.

    Observation = {"images": {camera: uint8 [H, W, 3]}, "state": float32 [state_dim], "task": str}

A batch of them (``ObservationBatch``: per camera uint8 [N, H, W, 3], state [N, state_dim], N
tasks) is what a preprocessor (``vlacompile_runtime.processors``) turns into graph inputs. LeRobot's
keys (``observation.images.<camera>`` as uint8 [H, W, 3] or float [3, H, W] in [0, 1],
``observation.state``, ``task``) convert with ``from_lerobot``; ``check_observation`` refuses, naming
the key, whatever a policy cannot run on (the runtime calls both on every observation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from vlacompile_runtime.errors import ObservationError

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
        if not np.isfinite(arr).all():
            raise ObservationError(f"{where} holds non-finite values", source=where,
                                   hint="pass the camera frame as uint8 [H, W, 3], or as float [3, H, W] = uint8 / 255")
        scaled = arr.astype(np.float64) * 255.0
        levels = np.rint(scaled)
        if arr.size and (np.abs(scaled - levels).max() > 1e-3 or levels.min() < 0 or levels.max() > 255):
            raise ObservationError(
                f"{where} holds float values that are not uint8 levels / 255 (as LeRobot decodes frames)",
                source=where, hint="pass the camera frame as uint8 [H, W, 3], or as float [3, H, W] = uint8 / 255",
            )
        return np.ascontiguousarray(levels.astype(np.uint8).transpose(1, 2, 0))
    raise ObservationError(
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
        raise ObservationError(
            f"the observation lacks {missing}; it has {sorted(observation)}",
            source=missing[0], hint=f"the {spec.family} policy reads {[f'{IMAGE_PREFIX}{c.name}' for c in spec.cameras]}, {STATE_KEY} and task",
        )
    state = observation[STATE_KEY]
    if hasattr(state, "detach"):
        state = state.detach().cpu().numpy()
    state = as_state(state, spec, STATE_KEY)
    task = observation["task"]
    if not isinstance(task, str):
        raise ObservationError(f"task must be a string, got {type(task).__name__}", source="task",
                               hint="pass the language instruction as a str")
    images = {c.name: as_uint8_hwc(observation[f"{IMAGE_PREFIX}{c.name}"], f"{IMAGE_PREFIX}{c.name}") for c in spec.cameras}
    return {"images": images, "state": state, "task": task}


def as_state(state: Any, spec, where: str = STATE_KEY) -> np.ndarray:
    """The state as float32 [state_dim]: a float array of ``spec.state_dim`` finite values, else an
    ObservationError naming ``where``."""
    arr = np.asarray(state)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == np.bool_:
        raise ObservationError(f"{where} has dtype {arr.dtype}", source=where,
                               hint=f"pass the state as float32 [{spec.state_dim}] in physical units")
    arr = arr.astype(np.float32).reshape(-1)
    if arr.shape != (spec.state_dim,):
        raise ObservationError(f"{where} has {arr.size} values, the policy reads {spec.state_dim}", source=where,
                               hint=f"pass the robot's full state vector ({spec.state_dim} values"
                                    + (f": {', '.join(spec.state_names)}" if spec.state_names else "") + ")")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ObservationError(f"{where} holds non-finite values at index {bad.tolist()}", source=where,
                               hint="check the robot's state reading: the policy cannot act on NaN or infinite values")
    return arr


def check_observation(obs: Observation, spec) -> Observation:
    """An ``Observation`` (vlacompile's layout) checked against ``spec``: every camera present as
    uint8 [H, W, 3] at its resolution, the state finite and of ``state_dim`` values, the task a string."""
    if not isinstance(obs, dict) or not {"images", "state", "task"} <= set(obs):
        raise ObservationError("the observation is not a dict with images, state and task", source="observation")
    images = obs["images"]
    for cam in spec.cameras:
        key = f"{IMAGE_PREFIX}{cam.name}"
        if cam.name not in images:
            raise ObservationError(f"the observation has no camera {cam.name!r} (it has {sorted(images)})", source=key,
                                   hint=f"the policy reads cameras {[c.name for c in spec.cameras]}")
        frame = np.asarray(images[cam.name])
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ObservationError(f"{key} has shape {frame.shape} and dtype {frame.dtype}", source=key,
                                   hint=f"pass the frame as uint8 [{cam.height}, {cam.width}, 3]")
        if frame.shape[:2] != (cam.height, cam.width):
            raise ObservationError(f"{key} is {frame.shape[0]}x{frame.shape[1]}, the policy takes {cam.height}x{cam.width}",
                                   source=key, hint=f"give {cam.name} frames at the resolution the policy was trained on "
                                                    f"({cam.height}x{cam.width}, height x width)")
    state = as_state(obs["state"], spec, STATE_KEY)
    if not isinstance(obs["task"], str):
        raise ObservationError(f"task must be a string, got {type(obs['task']).__name__}", source="task",
                               hint="pass the language instruction as a str")
    return {"images": {c.name: images[c.name] for c in spec.cameras}, "state": state, "task": obs["task"]}
