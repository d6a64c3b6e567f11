"""The reference family's processor: its byte tokenizer and the observation -> input layout.

The instruction tokenizer that ships with the reference family reads UTF-8 bytes (ByT5-style).

A byte tokenizer needs no vocabulary file and no model hub, and covers any instruction text. Ids
0..2 are special (pad, bos, eos); byte b has id b + 3. Sequences are padded to a fixed length so
exported graphs have static shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlacompile.errors import EpisodeError
from vlacompile.families.base import Preprocessor
from vlacompile.observation import ObservationBatch
from vlacompile.policy import PolicySpec

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


@dataclass(frozen=True)
class ByteTokenizer:
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
        # The instruction rarely changes between calls; a robot stack caches its tokens the same way.
        ids = self._token_cache.get(task)
        if ids is None:
            ids = self._token_cache[task] = self.tokenizer.encode(task)
        return ids

    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        missing = [c.name for c in self.spec.cameras if c.name not in obs.images]
        if missing:
            raise EpisodeError(
                f"the policy reads cameras {missing} that the observations do not have ({sorted(obs.images)})",
                source="observations", hint="use episodes recorded with the policy's cameras",
            )
        images = np.stack([_at(np.asarray(obs.images[c.name]), c.height, c.width).transpose(0, 3, 1, 2)
                           for c in self.spec.cameras], axis=1)
        tokens = np.stack([self.tokens(t) for t in obs.tasks]) if obs.tasks else np.zeros((0, self.spec.max_tokens), np.int64)
        return {
            "images": np.ascontiguousarray(images, dtype=np.uint8),
            "state": np.asarray(obs.state, dtype=np.float32),
            "tokens": tokens,
        }


def _at(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, 3] frames at the policy's resolution: as they are, or resized bilinearly (a
    student distilled from another family's teacher reads that teacher's cameras at its own size)."""
    if frames.shape[1:3] == (height, width):
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
