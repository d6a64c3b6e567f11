"""Finding and checking a checkpoint's tokenizer (the tokenizer itself, ``TextTokenizer``, is the
runtime's: ``vlacompile_runtime.tokenizer``, re-exported here).

Also where the Hugging Face hub cache keeps a repository's snapshot, for names like
``google/paligemma-3b-pt-224`` that a user has already downloaded. Never the network.
"""
from __future__ import annotations

import os
from pathlib import Path

from vlacompile_runtime.tokenizer import (  # noqa: F401  (re-exported)
    TOKENIZER_FILE,
    TextTokenizer,
    _token_content,
    read_tokenizer_config,
)

from vlacompile.errors import CheckpointError


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
