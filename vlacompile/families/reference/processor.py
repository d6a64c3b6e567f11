"""The reference family's processor: the runtime's (``vlacompile_runtime.processors``: the byte
tokenizer, cameras stacked), plus what only the compiler needs: frames of another size resized
bilinearly with torch (a student distilled from another family's teacher reads that teacher's
episodes at its own resolution; on the robot, frames must come at the policy's resolution).
"""
from __future__ import annotations

import numpy as np
from vlacompile_runtime.processors import (  # noqa: F401  (re-exported)
    BOS_ID,
    BYTE_OFFSET,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    ByteTokenizer,
)
from vlacompile_runtime.processors import ReferencePreprocessor as RuntimeReferencePreprocessor


class ReferencePreprocessor(RuntimeReferencePreprocessor):
    def frames(self, frames: np.ndarray, height: int, width: int) -> np.ndarray:
        return _at(frames, height, width)


def _at(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, 3] frames at the policy's resolution: as they are, or resized bilinearly."""
    if frames.shape[1:3] == (height, width):
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
