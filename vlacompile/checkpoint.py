"""Load and save policy checkpoints: ``config.json`` + ``model.safetensors`` (Hugging Face layout).

Weights load from safetensors only. Pickle-based files (``.bin``, ``.pt``, ``.ckpt``) can run code
when unpickled, so they are refused unless the caller passes ``allow_pickle=True``; even then they
are read with ``torch.load(weights_only=True)``, which rejects anything but tensors.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vlacompile.errors import CheckpointError
from vlacompile.families import get_family, known_families
from vlacompile.policy import Policy

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_config(ckpt: Path) -> dict:
    path = ckpt / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            "no config.json", source=ckpt, hint="a checkpoint directory holds config.json and model.safetensors"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"not valid JSON ({e})", source=path, hint="restore the file from the original checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointError("must hold a JSON object", source=path)
    return config


def _find_pickles(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)


def _read_weights(ckpt: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    path = ckpt / WEIGHTS_NAME
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if path.stat().st_size == 0:
            raise CheckpointError("is empty (0 bytes)", source=path, hint="the copy was interrupted; copy the checkpoint again")
        try:
            return load_file(str(path)), path
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"is truncated or corrupt ({e})", source=path, hint="the file is incomplete; copy or download it again"
            ) from None
    pickles = _find_pickles(ckpt)
    if not pickles:
        raise CheckpointError(f"no {WEIGHTS_NAME}", source=ckpt, hint="a checkpoint directory holds config.json and model.safetensors")
    if not allow_pickle:
        raise CheckpointError(
            f"weights are in a pickle file ({pickles[0].name}), which can execute code when loaded; refusing",
            source=pickles[0],
            hint="convert it once with safetensors (safetensors.torch.save_file(torch.load(f, weights_only=True), "
            "'model.safetensors')), or pass --allow-pickle if you trust its origin",
        )
    try:
        state = torch.load(pickles[0], map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only raises UnpicklingError for any non-tensor payload
        raise CheckpointError(
            f"could not be loaded as plain tensors ({e})",
            source=pickles[0],
            hint="the file is damaged or holds objects other than tensors, which vlacompile never unpickles; "
            "re-save only the state dict (torch.save(model.state_dict(), f)) or convert it to model.safetensors",
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError("does not hold a state dict", source=pickles[0])
    return state, pickles[0]


def load_policy(checkpoint: str | Path, *, allow_pickle: bool = False) -> Policy:
    """Load a checkpoint directory into a ``Policy`` (module in eval mode, FP32)."""
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(
            "checkpoint directory not found", source=ckpt, hint="pass --checkpoint DIR with config.json and model.safetensors"
        )
    raw = read_config(ckpt)
    family_name = raw.get("model_type")
    family = get_family(family_name) if isinstance(family_name, str) else None
    if family is None:
        raise CheckpointError(
            f"unknown policy family model_type={family_name!r}",
            source=ckpt / CONFIG_NAME,
            hint=f"vlacompile knows {known_families()}; a new family is added in vlacompile/families/",
        )
    config = family.config_from_dict(raw, str(ckpt / CONFIG_NAME))
    module = family.build(config)
    state, weights_path = _read_weights(ckpt, allow_pickle)

    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(str(k) for k in set(state) - set(expected))  # pickled keys need not be str
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        raise CheckpointError(
            "weights do not match config.json: " + "; ".join(parts),
            source=weights_path,
            hint="config.json and the weights come from different models; use the pair saved together",
        )
    for name, ref in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):  # weights_only pickles may also hold ints, strings, lists
            raise CheckpointError(
                f"entry {name!r} is a {type(t).__name__}, not a tensor",
                source=weights_path,
                hint="save the model's state_dict (tensors only)",
            )
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)} but config.json implies {tuple(ref.shape)}",
                source=weights_path,
                hint="config.json and the weights come from different models; use the pair saved together",
            )
        if not t.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r} has dtype {t.dtype}; expected floating point weights",
                source=weights_path,
                hint="vlacompile takes full- or half-precision checkpoints; quantised checkpoints are its output, not its input",
            )
        if not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name!r} holds NaN or infinite values", source=weights_path, hint="the checkpoint is damaged or diverged in training")
    module.load_state_dict({k: v.float() for k, v in state.items()})
    module.eval()
    return Policy(
        module=module,
        config=config,
        spec=family.spec_of(module),
        family=family.name,
        meta={"source": str(ckpt), "weights_sha256": sha256_file(weights_path)},
    )


def save_policy(policy: Policy, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors``; deterministic bytes for equal weights."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(policy.config.to_dict(), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in policy.module.state_dict().items()}
    # One metadata key only: safetensors writes metadata in hash-map order, so two keys make equal
    # weights hash differently from save to save (safetensors issue #584). The family is in config.json.
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def new_policy(config, family_name: str | None = None) -> Policy:
    """A freshly initialised policy for ``config`` (used by training and distillation)."""
    raw = config.to_dict()
    family = get_family(family_name or raw["model_type"])
    module = family.build(config)
    module.eval()
    return Policy(module=module, config=config, spec=family.spec_of(module), family=family.name)
