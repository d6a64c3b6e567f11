"""Observations -> a policy graph's inputs, in numpy: every family's preprocessor.

Which one runs is data in the artifact: ``student_spec.json`` names the family (``spec.family``)
and holds its settings (``spec.processor``: tokenizer directory, prompt format, pi0.5's state
statistics). ``make_preprocessor`` picks the class from ``PREPROCESSORS``; no family's torch code is
imported. The compiler's families return these same classes from ``Family.preprocessor``, so what
verify measures is what the robot runs.

* ``vlacompile-reference``: every camera stacked uint8 [N, cams, 3, H, W], the state as it is (the
  graph standardises it), byte tokens (``ByteTokenizer``).
* ``smolvla``: uint8 [N, 3, H, W] per camera, the state, the task + "\\n" tokenised with the
  SmolVLM2 tokenizer (lerobot's ``smolvla_new_line_processor`` and ``tokenizer_processor``).
* ``pi0``, variant pi0: as SmolVLA with the PaliGemma tokenizer; variant pi05: the *normalised*
  state (lerobot's float32 op order, ``vlacompile_runtime.normalize``) digitised into 256 bins over
  [-1, 1] and written into the prompt ``"Task: {task}, State: {bins};\\nAction: "`` (lerobot's
  ``Pi05PrepareStateTokenizerProcessorStep``), which is then tokenised.
* ``onnx-policy``: uint8 [N, 3, H, W] per camera, the state, the task in the manifest's prompt.

Images stay uint8 (the graphs divide by 255, resize and pad).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlacompile_runtime.errors import ArtifactError, EpisodeError
from vlacompile_runtime.observation import Observation, ObservationBatch
from vlacompile_runtime.spec import PolicySpec


class Preprocessor(ABC):
    """Observations -> the policy graph's inputs (numpy, batch first). Part of every timed get_action call."""

    def __init__(self, spec: PolicySpec):
        self.spec = spec
        self.noise_name = next(i.name for i in spec.inputs if i.role == "noise")

    @abstractmethod
    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        """Every input but the noise, for a batch of observations."""

    def __call__(self, obs: Observation, noise: np.ndarray) -> dict[str, np.ndarray]:
        feeds = self.batch(ObservationBatch.of(obs))
        feeds[self.noise_name] = np.asarray(noise, dtype=np.float32).reshape(1, *self.spec.noise_shape)
        return feeds


def camera_feeds(spec: PolicySpec, obs: ObservationBatch) -> dict[str, np.ndarray]:
    """``images.<camera>``: uint8 [N, 3, H, W] per camera of ``spec``, each at its own resolution,
    for families that take one input per camera; a missing camera or another size is an error."""
    feeds: dict[str, np.ndarray] = {}
    for cam in spec.cameras:
        if cam.name not in obs.images:
            raise EpisodeError(f"the policy reads camera {cam.name!r}; the observations have {sorted(obs.images)}",
                               source="observations", hint="map the dataset's cameras to the policy's (or record with them)")
        frames = np.asarray(obs.images[cam.name])
        if frames.shape[1:3] != (cam.height, cam.width):
            raise EpisodeError(f"camera {cam.name!r} frames are {frames.shape[1]}x{frames.shape[2]}, the policy takes "
                               f"{cam.height}x{cam.width} (its input feature's shape)", source="observations",
                               hint="give frames at the resolution the policy was trained on")
        feeds[f"images.{cam.name}"] = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.uint8)
    return feeds


def _tokenizer(spec: PolicySpec, *, truncation: bool | None = None):
    from vlacompile_runtime.tokenizer import TextTokenizer

    s = spec.processor_settings
    return TextTokenizer(Path(s["tokenizer_dir"]), max_length=int(s["max_length"]), padding_side=s.get("padding_side", "right"),
                         truncation=bool(s["truncation"]) if truncation is None else truncation)


class _PromptCache:
    """The instruction rarely changes between calls; a robot stack caches its tokens the same way."""

    def __init__(self, tokenizer, limit: int = 4096):
        self.tokenizer, self.limit, self.hits = tokenizer, limit, {}

    def __call__(self, text: str):
        hit = self.hits.get(text)
        if hit is None:
            hit = self.tokenizer.encode(text)
            if len(self.hits) < self.limit:
                self.hits[text] = hit
        return hit


def _stack(pairs, n: int) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros((0, n), np.int64), np.zeros((0, n), bool)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ---------------------------------------------------------------------------------------------
# The reference family: byte tokens, cameras stacked

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


@dataclass(frozen=True)
class ByteTokenizer:
    """The reference family's instruction tokenizer: UTF-8 bytes (ByT5-style), no vocabulary file.
    Ids 0..2 are special (pad, bos, eos); byte b has id b + 3; padded to a fixed length."""

    max_length: int = 32

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (bos and eos), got {self.max_length}")

    def encode(self, text: str) -> np.ndarray:
        """-> int64 [max_length]: bos, bytes (truncated at a character boundary), eos, pad."""
        raw = text.strip().lower().encode("utf-8", errors="replace")[: self.max_length - 2]  # lone surrogates -> "?"
        # Drop a multi-byte character cut in half, so a truncated instruction decodes cleanly.
        raw = raw.decode("utf-8", errors="ignore").encode("utf-8")
        ids = [BOS_ID, *(b + BYTE_OFFSET for b in raw), EOS_ID]
        out = np.full(self.max_length, PAD_ID, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if texts else np.zeros((0, self.max_length), np.int64)

    def decode(self, ids) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if int(i) >= BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")


class ReferencePreprocessor(Preprocessor):
    """Observations -> the reference graph's inputs: every camera stacked as uint8 [N, cams, 3, H, W]
    in the policy's camera order, the state as it is (normalised inside the graph), byte tokens."""

    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        self.tokenizer = ByteTokenizer(spec.max_tokens)
        self._token_cache: dict[str, np.ndarray] = {}

    def tokens(self, task: str) -> np.ndarray:
        ids = self._token_cache.get(task)
        if ids is None:
            ids = self._token_cache[task] = self.tokenizer.encode(task)
        return ids

    def frames(self, frames: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 [N, H, W, 3] at the policy's resolution (the compiler's subclass resizes others)."""
        if frames.shape[1:3] != (height, width):
            raise EpisodeError(f"frames are {frames.shape[1]}x{frames.shape[2]}, the policy takes {height}x{width}",
                               source="observations", hint="give frames at the resolution the policy was trained on")
        return frames

    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        missing = [c.name for c in self.spec.cameras if c.name not in obs.images]
        if missing:
            raise EpisodeError(
                f"the policy reads cameras {missing} that the observations do not have ({sorted(obs.images)})",
                source="observations", hint="use episodes recorded with the policy's cameras",
            )
        images = np.stack([self.frames(np.asarray(obs.images[c.name]), c.height, c.width).transpose(0, 3, 1, 2)
                           for c in self.spec.cameras], axis=1)
        tokens = np.stack([self.tokens(t) for t in obs.tasks]) if obs.tasks else np.zeros((0, self.spec.max_tokens), np.int64)
        return {
            "images": np.ascontiguousarray(images, dtype=np.uint8),
            "state": np.asarray(obs.state, dtype=np.float32),
            "tokens": tokens,
        }


# ---------------------------------------------------------------------------------------------
# LeRobot SmolVLA


class SmolVLAPreprocessor(Preprocessor):
    """Observations -> ``images.<camera>`` uint8 [N, 3, H, W], ``state``, ``tokens`` / ``token_mask``.

    lerobot's ``policy_preprocessor.json`` at inference, in its step order: rename (the policy reads
    the observation's own names), batch, append "\\n" (``smolvla_new_line_processor``), tokenise
    (``tokenizer_processor``), normalise (inside the graph). A static graph pads to ``max_length``
    whatever the pipeline's ``padding`` says: padded tokens are masked out of attention."""

    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        self.tokenizer = _tokenizer(spec)
        self.append_newline = bool(spec.processor_settings["append_newline"])
        self._encode = _PromptCache(self.tokenizer)

    def tokens(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        return self._encode(task if (not self.append_newline or task.endswith("\n")) else task + "\n")

    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        feeds = camera_feeds(self.spec, obs)
        feeds["state"] = np.asarray(obs.state, dtype=np.float32)
        feeds["tokens"], feeds["token_mask"] = _stack([self.tokens(t) for t in obs.tasks], self.tokenizer.max_length)
        return feeds


# ---------------------------------------------------------------------------------------------
# pi0 / pi0.5

STATE_BINS = 256


def state_prompt(task: str, bins: np.ndarray) -> str:
    """pi0.5's prompt (lerobot ``Pi05PrepareStateTokenizerProcessorStep``)."""
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: "


def digitize_state(normalized: np.ndarray) -> np.ndarray:
    """256 bins over [-1, 1]: ``np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1`` (values outside give -1 or 255)."""
    return np.digitize(normalized, bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1


class Pi0Preprocessor(Preprocessor):
    """Observations -> ``images.<camera>`` uint8 [N, 3, H, W], pi0's ``state``, ``tokens`` / ``token_mask``.

    pi0: the task and "\\n" (``pi0_new_line_processor``), tokenised. pi0.5: the state normalised in
    numpy in lerobot's float32 op order (so a value on a bin edge lands in lerobot's bin), digitised
    and written into the prompt, which is tokenised."""

    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        s = spec.processor_settings
        self.tokenizer = _tokenizer(spec)
        self.variant = s["variant"]
        self.append_newline = bool(s["append_newline"])
        self.takes_state = any(i.role == "state" for i in spec.inputs)
        self._encode = _PromptCache(self.tokenizer)
        self._norm = None
        if self.variant == "pi05":
            from vlacompile_runtime.normalize import Normalize

            self._norm = Normalize(s["state_norm"], (spec.state_dim,), stats=s.get("state_stats") or None)

    def normalized_state(self, state: np.ndarray) -> np.ndarray:
        return self._norm(np.asarray(state, dtype=np.float32))

    def tokens(self, task: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.variant == "pi05":
            return self._encode(state_prompt(task, digitize_state(self.normalized_state(state))))
        return self._encode(task if (not self.append_newline or task.endswith("\n")) else task + "\n")

    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        feeds = camera_feeds(self.spec, obs)
        state = np.asarray(obs.state, dtype=np.float32)
        if self.takes_state:
            feeds["state"] = state
        pairs = [self.tokens(t, state[i] if self.variant == "pi05" else None) for i, t in enumerate(obs.tasks)]
        feeds["tokens"], feeds["token_mask"] = _stack(pairs, self.tokenizer.max_length)
        return feeds


# ---------------------------------------------------------------------------------------------
# An ONNX policy run as it is


class OnnxPolicyPreprocessor(Preprocessor):
    """uint8 [N, 3, H, W] per camera, the state as it is, the task written into the manifest's
    ``prompt`` ("{task}" by default; pi0's pipeline is "{task}\\n") and tokenised, padded to the
    graph's token length."""

    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        s = spec.processor_settings
        self.tokenizer = _tokenizer(spec, truncation=True) if s.get("tokenizer_dir") else None
        self.prompt = s.get("prompt") or "{task}"
        self.names = set(spec.input_names)
        self._encode = _PromptCache(self.tokenizer) if self.tokenizer is not None else None

    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        feeds = camera_feeds(self.spec, obs)
        if "state" in self.names:
            feeds["state"] = np.asarray(obs.state, dtype=np.float32)
        if self.tokenizer is not None:
            tokens, mask = _stack([self._encode(self.prompt.replace("{task}", t)) for t in obs.tasks], self.tokenizer.max_length)
            feeds["tokens"] = tokens
            if "token_mask" in self.names:
                feeds["token_mask"] = mask
        return feeds


# spec.family -> the preprocessor that family's graphs read.
PREPROCESSORS: dict[str, type[Preprocessor]] = {
    "vlacompile-reference": ReferencePreprocessor,
    "smolvla": SmolVLAPreprocessor,
    "pi0": Pi0Preprocessor,
    "onnx-policy": OnnxPolicyPreprocessor,
}


def make_preprocessor(spec: PolicySpec, source: str | Path = "student_spec.json") -> Preprocessor:
    """The preprocessor ``spec.family`` names, with ``spec.processor``'s settings."""
    cls = PREPROCESSORS.get(spec.family)
    if cls is None:
        raise ArtifactError(f"names family {spec.family!r}, whose observations this runtime cannot prepare "
                            f"(it knows {sorted(PREPROCESSORS)})", source=source,
                            hint="install the vlacompile-runtime version that came with the vlacompile that built the artifact")
    try:
        return cls(spec)
    except KeyError as e:
        raise ArtifactError(f"the {spec.family} preprocessor's settings lack {e}", source=source,
                            hint="rebuild the artifact: student_spec.json is truncated or was edited") from None
