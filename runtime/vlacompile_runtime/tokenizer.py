"""Tokenizers from an artifact's (or a checkpoint's) directory, called as lerobot's
``TokenizerProcessorStep`` calls transformers.

The ``tokenizers`` library on the directory's ``tokenizer.json`` (the fast tokenizer transformers
itself runs, without transformers): the same ids, special tokens from the file's post-processor,
truncation before the special tokens are added, padding to ``max_length`` on the pipeline's side.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlacompile_runtime.errors import CheckpointError, EpisodeError

TOKENIZER_FILE = "tokenizer.json"


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory: Path) -> dict:
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        path = directory / name
        if path.is_file():
            try:
                cfg.update(json.loads(path.read_text()))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"not valid JSON ({e})", source=path, hint="restore the tokenizer files") from None
    return cfg


class TextTokenizer:
    """``tokenizers`` on a tokenizer.json, called as lerobot's TokenizerProcessorStep calls transformers."""

    def __init__(self, directory: Path, *, max_length: int, padding_side: str = "right", truncation: bool = True):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # a core dependency; a broken install says so
            raise CheckpointError(f"the tokenizers package is missing ({e})", source="tokenizers", hint="pip install tokenizers (a dependency of vlacompile-runtime)") from None
        path = Path(directory) / TOKENIZER_FILE
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise CheckpointError(f"cannot be read as a tokenizer ({e})", source=path, hint="restore tokenizer.json from the model's files") from None
        cfg = read_tokenizer_config(Path(directory))
        self.max_length, self.padding_side, self.truncation = max_length, padding_side, truncation
        self.tok.no_padding()
        self.tok.no_truncation()
        if truncation:
            self.tok.enable_truncation(max_length, direction=cfg.get("truncation_side", "right"))
        pad = _token_content(cfg.get("pad_token"))
        self.pad_id = self.tok.token_to_id(pad) if pad else None
        if self.pad_id is None:
            self.pad_id = 0
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.extra_tokens = {k: _token_content(v) for k, v in (cfg.get("extra_special_tokens") or {}).items()}

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids int64 [max_length], mask bool [max_length]), padded on the configured side."""
        ids = self.tok.encode(text, add_special_tokens=True).ids
        if len(ids) > self.max_length:
            raise EpisodeError(f"the task {text!r} has {len(ids)} tokens, more than tokenizer_max_length {self.max_length} "
                               "and the pipeline does not truncate", source="task",
                               hint="shorten the instruction, or enable truncation in the tokenizer step")
        n, pad = len(ids), self.max_length - len(ids)
        out = np.full(self.max_length, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.max_length, dtype=bool)
        sl = slice(pad, None) if self.padding_side == "left" else slice(0, n)
        out[sl], mask[sl] = ids, True
        return out, mask
