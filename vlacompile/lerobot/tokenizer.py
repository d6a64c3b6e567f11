"""Tokenizers from local directories, called as lerobot's ``TokenizerProcessorStep`` calls transformers.

The ``tokenizers`` library on the directory's ``tokenizer.json`` (the fast tokenizer transformers
itself runs, without transformers): the same ids, special tokens from the file's post-processor,
truncation before the special tokens are added, padding to ``max_length`` on the pipeline's side.
Also where the Hugging Face hub cache keeps a repository's snapshot, for names like
``google/paligemma-3b-pt-224`` that a user has already downloaded. Never the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vlacompile.errors import CheckpointError, EpisodeError

TOKENIZER_FILE = "tokenizer.json"


def hub_cache_dirs() -> list[Path]:
    """Where the Hugging Face hub cache keeps repositories (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)."""
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    return out


def find_in_hub_cache(repo_id: str) -> Path | None:
    """The snapshot directory of ``repo_id`` in the local hub cache (refs/main's, else the newest), or None."""
    if "/" not in repo_id:
        return None
    for cache in hub_cache_dirs():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return None


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
            raise CheckpointError(f"the tokenizers package is missing ({e})", source="tokenizers", hint="pip install tokenizers") from None
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


# tokenizer_config.json classes that say nothing about the vocabulary (transformers' generic fast
# tokenizer, and what transformers >= 5 writes for any tokenizers-backed one).
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def check_tokenizer_fits(directory: Path, *, model: str, expected: str, embedding_rows: int, classes: tuple[str, ...],
                         special: dict[str, int], first_token: str | None) -> None:
    """Refuse a tokenizer directory that is not the one a checkpoint was trained with, before any work:
    a tokenizer of another model still produces ids, so the build would run and pass on prompts the
    policy never saw. Checked: the class tokenizer_config.json names (when it names a specific one),
    the vocabulary against the checkpoint's embedding rows, the special tokens' ids (``special``:
    token -> id, as the model's vocabulary has them) and the token prepended to every prompt.
    ``expected`` names the tokenizer the model reads (for the hint), ``model`` the checkpoint's kind."""
    directory = Path(directory)
    cfg = read_tokenizer_config(directory)
    hint = f"pass --tokenizer with a local copy of {expected}'s tokenizer (tokenizer.json, tokenizer_config.json), which {model} reads"
    cls = cfg.get("tokenizer_class")
    if isinstance(cls, str) and cls not in GENERIC_CLASSES and not cls.startswith(classes):
        raise CheckpointError(f"is a {cls} tokenizer; a {model} checkpoint reads a {' / '.join(classes)} tokenizer",
                              source=directory / "tokenizer_config.json", hint=hint)
    tok = TextTokenizer(directory, max_length=8)
    if tok.vocab_size > embedding_rows:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens but the checkpoint's token embedding has {embedding_rows} "
                              "rows: it is another model's tokenizer", source=directory / TOKENIZER_FILE, hint=hint)
    wrong = {t: tok.token_id(t) for t, i in special.items() if tok.token_id(t) != i}
    if wrong:
        have = ", ".join(f"{t} = {i}" if i is not None else f"no {t}" for t, i in wrong.items())
        want = ", ".join(f"{t} = {i}" for t, i in special.items())
        raise CheckpointError(f"the tokenizer's special tokens are not {model}'s: it has {have} (the checkpoint's vocabulary has "
                              f"{want})", source=directory / TOKENIZER_FILE, hint=hint)
    pad = _token_content(cfg.get("pad_token"))
    if pad is not None and pad in special and tok.pad_id != special[pad]:
        raise CheckpointError(f"tokenizer_config.json pads with {pad!r} = {tok.pad_id}; {model} pads with id {special[pad]}",
                              source=directory / "tokenizer_config.json", hint=hint)
    if first_token is not None:
        ids = tok.tok.encode("a", add_special_tokens=True).ids
        if not ids or ids[0] != special.get(first_token, tok.token_id(first_token)):
            raise CheckpointError(f"the tokenizer does not begin a prompt with {first_token} as {model}'s does (it writes ids "
                                  f"{ids[:3]} for \"a\")", source=directory / TOKENIZER_FILE, hint=hint)
