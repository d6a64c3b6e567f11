"""pi0 / pi0.5's processor: the PaliGemma tokenizer from a local directory, and observations -> inputs.

lerobot's pipelines at inference (>= 0.5), in their step order:

* pi0: rename, batch, ``pi0_new_line_processor`` (append "\\n"), ``tokenizer_processor``
  (max_length, right padding), relative actions (disabled), normalise (inside the graph here);
* pi0.5: rename, batch, relative actions (disabled), normalise, then
  ``pi05_prepare_state_tokenizer_processor_step``: the *normalised* state digitised into 256 bins
  over [-1, 1] (``np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1``, so values outside give -1 or
  255) and written into the prompt ``"Task: {task, stripped, _ and \\n as spaces}, State: {bins};\\nAction: "``,
  which is then tokenised. The state's normalisation is computed in numpy in lerobot's float32 op
  order (``vlacompile_runtime.normalize``), so a value on a bin edge lands in lerobot's bin.

``Pi0Preprocessor`` is the runtime's (``vlacompile_runtime.processors``); this module finds the tokenizer.

Images stay uint8 [3, H, W] per camera (the graph divides by 255, resizes and pads).
"""
from __future__ import annotations

from pathlib import Path

from vlacompile_runtime.processors import STATE_BINS, Pi0Preprocessor, digitize_state, state_prompt  # noqa: F401  (re-exported)

from vlacompile.errors import CheckpointError
from vlacompile.lerobot.tokenizer import TOKENIZER_FILE, find_in_hub_cache, hub_cache_dirs

PALIGEMMA = "google/paligemma-3b-pt-224"


def resolve_tokenizer_dir(name: str, tokenizer: Path | None, ckpt: Path) -> Path:
    """The PaliGemma tokenizer directory: ``--tokenizer``, the copy a vlacompile student carries
    (``tokenizer/``), the pipeline's ``tokenizer_name`` as a local path, or the hub cache."""
    if tokenizer is not None:
        if tokenizer.is_dir() and (tokenizer / TOKENIZER_FILE).is_file():
            return tokenizer
        if tokenizer.is_dir() and any(tokenizer.glob("*.model")):
            raise CheckpointError(
                "the tokenizer directory has a SentencePiece model but no tokenizer.json", source=tokenizer,
                hint="vlacompile reads tokenizer.json (the fast tokenizer transformers runs); convert it once with "
                     "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
        missing = "does not exist" if not tokenizer.is_dir() else f"has no {TOKENIZER_FILE}"
        raise CheckpointError(f"the tokenizer directory {missing}", source=tokenizer,
                              hint=f"pass --tokenizer with a local copy of {name} (tokenizer.json, tokenizer_config.json)")
    for cand in (ckpt / "tokenizer", Path(name)):
        if cand.is_dir() and (cand / TOKENIZER_FILE).is_file():
            return cand
    cached = find_in_hub_cache(name)
    if cached is not None and (cached / TOKENIZER_FILE).is_file():
        return cached
    raise CheckpointError(
        f"no tokenizer for {name!r}: not a local directory, not in the Hugging Face cache ({', '.join(map(str, hub_cache_dirs()))})",
        source=ckpt / "policy_preprocessor.json",
        hint=f"pass --tokenizer DIR with a local copy of {name} (tokenizer.json and tokenizer_config.json; the hub "
             "repository is gated, accept its licence and download it once); vlacompile never downloads")
