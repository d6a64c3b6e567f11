"""The instruction tokenizer that ships with the reference family: UTF-8 bytes (ByT5-style).

A byte tokenizer needs no vocabulary file and no model hub, and covers any instruction text. Ids
0..2 are special (pad, bos, eos); byte b has id b + 3. Sequences are padded to a fixed length so
exported graphs have static shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
