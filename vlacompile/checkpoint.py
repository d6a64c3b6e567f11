"""Checkpoints: find a directory's family, read its weights safely, and load or save a Policy.

Weights load from safetensors only: one ``model.safetensors``, or shards listed in
``model.safetensors.index.json``; tensors may mix dtypes (bf16 backbones beside fp32 heads) and
are upcast to float32 for compute. Pickle-based files (``.bin``, ``.pt``, ``.ckpt``) can run code
when unpickled, so they are refused unless the caller passes ``allow_pickle=True``; even then they
are read with ``torch.load(weights_only=True)``, which rejects anything but tensors. Code shipped
inside a checkpoint (``auto_map``, ``*.py``) is never imported.

Which family a directory holds is decided by ``vlacompile.families.detect`` from its
``config.json`` (``model_type`` for vlacompile's own format, ``type`` for LeRobot's).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vlacompile.errors import CheckpointError, ConfigError
from vlacompile.policy import Policy

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, what: str = "file") -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no {path.name}", source=path.parent, hint=f"the checkpoint needs its {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"not valid JSON ({e})", source=path, hint="restore the file from the original checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError("must hold a JSON object", source=path)
    return data


def read_config(ckpt: Path) -> dict:
    path = ckpt / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            "no config.json", source=ckpt, hint="a checkpoint directory holds config.json and model.safetensors"
        )
    return read_json(path)


def _find_pickles(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError("weights shard is missing", source=path, hint="copy the whole checkpoint directory")
    if path.stat().st_size == 0:
        raise CheckpointError("is empty (0 bytes)", source=path, hint="the copy was interrupted; copy the checkpoint again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"is truncated or corrupt ({e})", source=path, hint="the file is incomplete; copy or download it again"
        ) from None


def read_weights(ckpt: Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of a checkpoint directory (dtypes as stored) and the files they came from."""
    single = ckpt / WEIGHTS_NAME
    if single.is_file():
        return _load_safetensors(single), [single]
    index = ckpt / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("has no weight_map", source=index, hint="restore the index from the original checkpoint")
        state: dict[str, torch.Tensor] = {}
        files = [ckpt / f for f in sorted(set(weight_map.values()))]
        for f in files:
            shard = _load_safetensors(f)
            state.update(shard)
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"the index lists {len(missing)} tensors no shard holds (e.g. {missing[:3]})", source=index,
                                  hint="a shard is from another checkpoint; copy the checkpoint again")
        return state, files
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
    return state, [pickles[0]]


def weight_names(ckpt: Path) -> list[str] | None:
    """The tensor names of a checkpoint's safetensors weights, read from the headers only (cheap);
    None when they cannot be listed (pickle weights, a damaged file: reported when the weights load)."""
    try:
        single = ckpt / WEIGHTS_NAME
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "np") as f:
                return list(f.keys())
        index = ckpt / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            return [str(k) for k in weight_map] if isinstance(weight_map, dict) else None
    except Exception:  # noqa: BLE001 - any damage is reported, with its own message, by read_weights
        return None
    return None


def weights_digest(files: list[Path]) -> str:
    """sha256 of the weights: the file's own for one file, of the shard hashes in order for several."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def check_and_load_state(module: torch.nn.Module, state: dict, source: Path, *, strict: bool = True,
                         ignore: tuple[str, ...] = ()) -> None:
    """Check ``state`` against ``module`` (names, shapes, floating point, finite) and load it, upcast to float32.

    ``strict``: unexpected tensors are errors too (not only missing ones); ``ignore`` lists names
    (prefixes) that may be present and are dropped."""
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if not any(str(k).startswith(p) for p in ignore)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(str(k) for k in set(state) - set(expected))  # pickled keys need not be str
    if missing or (unexpected and strict):
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[:3]})")
        if unexpected and strict:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        raise CheckpointError(
            "weights do not match config.json: " + "; ".join(parts),
            source=source,
            hint="config.json and the weights come from different models; use the pair saved together",
        )
    for name, ref in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):  # weights_only pickles may also hold ints, strings, lists
            raise CheckpointError(
                f"entry {name!r} is a {type(t).__name__}, not a tensor", source=source, hint="save the model's state_dict (tensors only)"
            )
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)} but config.json implies {tuple(ref.shape)}",
                source=source,
                hint="config.json and the weights come from different models; use the pair saved together",
            )
        if not t.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r} has dtype {t.dtype}; expected floating point weights",
                source=source,
                hint="vlacompile takes full- or half-precision checkpoints; quantised checkpoints are its output, not its input",
            )
        if not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name!r} holds NaN or infinite values", source=source, hint="the checkpoint is damaged or diverged in training")
    module.load_state_dict({k: state[k].float() for k in expected})


def load_policy(checkpoint: str | Path, *, allow_pickle: bool = False, tokenizer: str | Path | None = None,
                allow_unnormalized: bool = False, lerobot_version: str | None = None) -> Policy:
    """Load a checkpoint directory of any registered family into a ``Policy`` (eval mode, FP32 compute).

    ``tokenizer``: a local tokenizer directory for families whose checkpoints do not carry one
    (SmolVLA: the SmolVLM2 backbone directory); None looks in the Hugging Face cache, never the network.
    ``allow_unnormalized``: accept a LeRobot checkpoint whose normaliser stats miss some of its
    features (LeRobot then passes them through unnormalised). ``lerobot_version``: for LeRobot
    SmolVLA checkpoints, the lerobot release the policy is run with ("0.4", "0.6.1", ...), whose
    semantics it is compiled with; None detects it where the checkpoint says, and refuses where it
    does not and it matters."""
    from vlacompile.families import detect_checkpoint

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(
            "checkpoint directory not found", source=ckpt, hint="pass --checkpoint DIR with config.json and model.safetensors"
        )
    # config.json's family, checked against the weights' tensor names before any family reads a file:
    # a config.json copied from another policy is named as such, not blamed on its processor files.
    family = detect_checkpoint(read_config(ckpt), weight_names(ckpt), ckpt)
    extra: dict = {}
    if lerobot_version is not None:
        if family.name != "smolvla":
            raise ConfigError(f"--lerobot-version applies to LeRobot SmolVLA checkpoints; this one is a {family.label} checkpoint",
                              source=ckpt / CONFIG_NAME, hint="leave --lerobot-version out for it")
        extra["lerobot_version"] = str(lerobot_version)
    return family.load(ckpt, allow_pickle=allow_pickle, tokenizer=Path(tokenizer) if tokenizer is not None else None,
                       allow_unnormalized=allow_unnormalized, **extra)


def save_policy(policy: Policy, directory: str | Path) -> Path:
    """Write the policy in its family's checkpoint format; deterministic bytes for equal weights."""
    from vlacompile.families import get_family

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    return get_family(policy.family).save(policy, out)


def save_state(module: torch.nn.Module, path: Path) -> None:
    """``model.safetensors`` of a module's state dict, deterministic bytes for equal weights."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    # One metadata key only: safetensors writes metadata in hash-map order, so two keys make equal
    # weights hash differently from save to save (safetensors issue #584). The family is in config.json.
    save_file(state, str(path), metadata={"format": "pt"})


def new_policy(config, family_name: str | None = None) -> Policy:
    """A freshly initialised policy for ``config`` (used by training and distillation)."""
    from vlacompile.families import family_of_config, get_family

    family = get_family(family_name) if family_name else family_of_config(config)
    return family.new_policy(config)
