"""pi0 / pi0.5's processor: the PaliGemma tokenizer from a local directory, and observations -> inputs.

lerobot's pipelines at inference (>= 0.5), in their step order:

* pi0: rename, batch, ``pi0_new_line_processor`` (append "\\n"), ``tokenizer_processor``
  (max_length, right padding), relative actions (disabled), normalise (inside the graph here);
* pi0.5: rename, batch, relative actions (disabled), normalise, then
  ``pi05_prepare_state_tokenizer_processor_step``: the *normalised* state digitised into 256 bins
  over [-1, 1] (``np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1``, so values outside give -1 or
  255) and written into the prompt ``"Task: {task, stripped, _ and \\n as spaces}, State: {bins};\\nAction: "``,
  which is then tokenised. The state's normalisation is computed here with torch in lerobot's
  float32 op order, so a value on a bin edge lands in lerobot's bin.

Images stay uint8 [3, H, W] per camera (the graph divides by 255, resizes and pads).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vlacompile.errors import CheckpointError
from vlacompile.families.base import Preprocessor, camera_feeds
from vlacompile.lerobot.tokenizer import TOKENIZER_FILE, TextTokenizer, find_in_hub_cache, hub_cache_dirs
from vlacompile.observation import ObservationBatch
from vlacompile.policy import PolicySpec

PALIGEMMA = "google/paligemma-3b-pt-224"
STATE_BINS = 256


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


def state_prompt(task: str, bins: np.ndarray) -> str:
    """pi0.5's prompt (lerobot ``Pi05PrepareStateTokenizerProcessorStep``)."""
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: "


def digitize_state(normalized: np.ndarray) -> np.ndarray:
    return np.digitize(normalized, bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1


class Pi0Preprocessor(Preprocessor):
    """Observations -> ``images.<camera>`` uint8 [N, 3, H, W], pi0's ``state``, ``tokens`` / ``token_mask``."""

    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        s = spec.processor_settings
        self.tokenizer = TextTokenizer(Path(s["tokenizer_dir"]), max_length=int(s["max_length"]),
                                       padding_side=s["padding_side"], truncation=bool(s["truncation"]))
        self.variant = s["variant"]
        self.append_newline = bool(s["append_newline"])
        self.takes_state = any(i.role == "state" for i in spec.inputs)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._norm = None
        if self.variant == "pi05":
            import torch

            from vlacompile.lerobot.normalize import Normalize

            stats = {k: torch.tensor(v, dtype=torch.float32) for k, v in (s.get("state_stats") or {}).items()}
            self._norm = Normalize(s["state_norm"], (spec.state_dim,), stats=stats or None)

    def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(text)
        if hit is None:
            hit = self.tokenizer.encode(text)
            if len(self._cache) < 4096:
                self._cache[text] = hit
        return hit

    def tokens(self, task: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.variant == "pi05":
            import torch

            with torch.no_grad():
                normalized = self._norm(torch.as_tensor(np.asarray(state, dtype=np.float32))).numpy()
            return self._encode(state_prompt(task, digitize_state(normalized)))
        text = task if (not self.append_newline or task.endswith("\n")) else task + "\n"
        return self._encode(text)

    def batch(self, obs: ObservationBatch) -> dict[str, np.ndarray]:
        feeds = camera_feeds(self.spec, obs)
        state = np.asarray(obs.state, dtype=np.float32)
        if self.takes_state:
            feeds["state"] = state
        pairs = [self.tokens(t, state[i] if self.variant == "pi05" else None) for i, t in enumerate(obs.tasks)]
        n = self.tokenizer.max_length
        feeds["tokens"] = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, n), np.int64)
        feeds["token_mask"] = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, n), bool)
        return feeds
