"""SmolVLA's processor: the SmolVLM2 tokenizer from a local directory, and observations -> inputs
(``SmolVLAPreprocessor``, the runtime's: ``vlacompile_runtime.processors``).

What lerobot's ``policy_preprocessor.json`` does at inference, in its step order: rename
observation keys (here: the policy reads the observation's own names, the rename map applied
backwards), add the batch dimension, append "\\n" to the task (``smolvla_new_line_processor``),
tokenize it (``tokenizer_processor``: max_length, padding side, truncation), and normalise
(inside the graph, ``vlacompile.lerobot.normalize``). Images stay uint8 [3, H, W] per camera: the
graph divides by 255, as lerobot's decoded frames are ``uint8 / 255``.

The tokenizer is the ``tokenizers`` library on the directory's ``tokenizer.json`` (the fast
tokenizer transformers itself runs, without transformers): the same ids, special tokens from the
file's post-processor, truncation before the special tokens are added. A static graph pads to
``max_length`` whatever the pipeline's ``padding`` says: padded tokens are masked out of attention
and do not shift positions, so "longest" and "max_length" give the same actions.
"""
from __future__ import annotations

from pathlib import Path

from vlacompile_runtime.processors import SmolVLAPreprocessor  # noqa: F401  (the runtime's; re-exported)

from vlacompile.errors import CheckpointError
from vlacompile.lerobot.tokenizer import TOKENIZER_FILE, TextTokenizer, find_in_hub_cache, hub_cache_dirs  # noqa: F401


def resolve_vlm_dir(vlm_model_name: str, tokenizer: Path | None, ckpt: Path) -> Path:
    """The directory holding the SmolVLM2 tokenizer and config: ``--tokenizer``, the copy a vlacompile
    student carries (``vlm/``), ``vlm_model_name`` as a local path, or the hub cache. Never the network."""
    tried = []
    for cand in ([tokenizer] if tokenizer is not None else []) + [ckpt / "vlm", Path(vlm_model_name)]:
        tried.append(str(cand))
        if cand.is_dir() and (cand / TOKENIZER_FILE).is_file():
            return cand
        if cand is tokenizer:
            missing = "does not exist" if not cand.is_dir() else f"has no {TOKENIZER_FILE}"
            raise CheckpointError(f"the tokenizer directory {missing}", source=cand,
                                  hint=f"pass --tokenizer with a local copy of {vlm_model_name} (tokenizer.json, tokenizer_config.json, config.json)")
    cached = find_in_hub_cache(vlm_model_name)
    if cached is not None and (cached / TOKENIZER_FILE).is_file():
        return cached
    raise CheckpointError(
        f"no tokenizer for {vlm_model_name!r}: not a local directory, not in the Hugging Face cache ({', '.join(map(str, hub_cache_dirs()))})",
        source=ckpt / "config.json",
        hint=f"pass --tokenizer DIR with a local copy of {vlm_model_name} (tokenizer.json, tokenizer_config.json and its config.json); "
        "vlacompile never downloads",
    )
