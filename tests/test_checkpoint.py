"""Checkpoints: a save/load round trip, and every way a checkpoint directory can be wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlacompile.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_policy, save_policy, sha256_file
from vlacompile.errors import CheckpointError
from vlacompile.families import known_families

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models; see conftest
WEIGHT = "vision.patch_embed.weight"  # a float weight every reference checkpoint has
_DROP = object()  # _edit_config: remove the key


def _actions(policy, seed: int = 0) -> torch.Tensor:
    return policy(**policy.spec.example_inputs(batch=2, seed=seed))


def _edit_config(ckpt: Path, **changes) -> None:
    path = ckpt / CONFIG_NAME
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def _edit_weights(ckpt: Path, fn) -> Path:
    path = ckpt / WEIGHTS_NAME
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))
    return path


def _load_error(ckpt: Path, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_policy(ckpt, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_gives_identical_actions(tiny_policy, tiny_checkpoint):
    loaded = load_policy(tiny_checkpoint)
    assert loaded.config == tiny_policy.config
    assert loaded.spec == tiny_policy.spec
    assert loaded.family == tiny_policy.family
    assert not loaded.module.training
    for seed in (0, 1):
        expected, got = _actions(tiny_policy, seed), _actions(loaded, seed)
        assert torch.equal(expected, got)
    # The statistics are not the identity, so un-normalisation is part of what round-trips.
    assert not torch.allclose(loaded.module.action_std, torch.ones_like(loaded.module.action_std))
    assert loaded.meta["weights_sha256"] == sha256_file(tiny_checkpoint / WEIGHTS_NAME)
    assert loaded.meta["source"] == str(tiny_checkpoint)


def test_save_is_deterministic(tiny_policy, tmp_path):
    # Cache keys hash the weights file. Several saves: a header written in hash-map order would
    # differ between two of them with high probability.
    dirs = [save_policy(tiny_policy, tmp_path / str(i)) for i in range(6)]
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert len({sha256_file(d / name) for d in dirs}) == 1, name


def test_half_precision_weights_load_as_fp32(tiny_policy, tiny_checkpoint):
    _edit_weights(tiny_checkpoint, lambda s: s.update({k: v.half() for k, v in s.items()}))
    loaded = load_policy(tiny_checkpoint)
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    torch.testing.assert_close(_actions(loaded), _actions(tiny_policy), atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# The directory and config.json


def test_missing_directory(tmp_path):
    err = _load_error(tmp_path / "no-such-teacher")
    assert "no-such-teacher" in err.source
    assert "not found" in err.message
    assert err.hint and "config.json" in err.hint


def test_missing_config_json(tiny_checkpoint):
    (tiny_checkpoint / CONFIG_NAME).unlink()
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint)
    assert "config.json" in err.message
    assert err.hint


def test_config_json_not_json(tiny_checkpoint):
    (tiny_checkpoint / CONFIG_NAME).write_text('{"model_type": "vlacompile-reference",')
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / CONFIG_NAME)
    assert "JSON" in err.message
    assert err.hint


def test_config_json_binary_garbage(tiny_checkpoint):
    (tiny_checkpoint / CONFIG_NAME).write_bytes(b"\xff\xfe\x00garbage")
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / CONFIG_NAME)


def test_config_json_not_an_object(tiny_checkpoint):
    (tiny_checkpoint / CONFIG_NAME).write_text("[1, 2, 3]")
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / CONFIG_NAME)
    assert "object" in err.message


def test_config_json_missing_keys(tiny_checkpoint):
    _edit_config(tiny_checkpoint, vision_heads=_DROP, chunk_size=_DROP)
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / CONFIG_NAME)
    assert "chunk_size" in err.message and "vision_heads" in err.message
    assert err.hint


def test_config_json_unknown_field(tiny_checkpoint):
    _edit_config(tiny_checkpoint, rope_theta=10000.0)
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / CONFIG_NAME)
    assert "rope_theta" in err.message
    assert err.hint and "vision_width" in err.hint  # says which fields the family reads


@pytest.mark.parametrize("model_type", ["smolvla", None, 3])
def test_unknown_family(tiny_checkpoint, model_type):
    _edit_config(tiny_checkpoint, model_type=model_type if model_type is not None else _DROP)
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / CONFIG_NAME)
    assert "model_type" in err.message and repr(model_type) in err.message
    for family in known_families():
        assert family in err.hint


@pytest.mark.parametrize(
    "key, value",
    [
        ("image_size", "32"),  # a string
        ("image_size", 32.5),  # a fraction
        ("image_size", True),  # a boolean
        ("flow_steps", float("inf")),  # JSON Infinity
        ("control_hz", float("nan")),  # JSON NaN
        ("control_hz", 0),
        ("vision_heads", 2),  # not a list
        ("vision_heads", [2, 2.5]),  # a fractional head count
        ("vision_mlp", [64]),  # one layer fewer than vision_heads
        ("cameras", [1]),
        ("patch_size", 0),
        ("max_tokens", 1),  # no room for bos and eos
        ("image_size", 30),  # not a multiple of patch_size
    ],
)
def test_config_json_bad_value(tiny_checkpoint, key, value):
    _edit_config(tiny_checkpoint, **{key: value})
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / CONFIG_NAME)
    assert key in err.message


def test_config_accepts_integral_floats(tiny_policy, tiny_checkpoint):
    # Some JSON writers emit 32.0 for 32.
    _edit_config(tiny_checkpoint, image_size=32.0, vision_heads=[2.0, 2.0])
    assert load_policy(tiny_checkpoint).config == tiny_policy.config


# ---------------------------------------------------------------------------------------------
# model.safetensors


def test_missing_weights(tiny_checkpoint):
    (tiny_checkpoint / WEIGHTS_NAME).unlink()
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint)
    assert WEIGHTS_NAME in err.message
    assert err.hint


def test_zero_byte_weights(tiny_checkpoint):
    (tiny_checkpoint / WEIGHTS_NAME).write_bytes(b"")
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / WEIGHTS_NAME)
    assert "empty" in err.message
    assert err.hint


@pytest.mark.parametrize(
    "keep", [lambda n: n // 2, lambda n: n - 1, lambda n: 8], ids=["half", "last-byte-missing", "header-length-only"]
)
def test_truncated_weights(tiny_checkpoint, keep):
    path = tiny_checkpoint / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])
    err = _load_error(tiny_checkpoint)
    assert err.source == str(path)
    assert "truncated or corrupt" in err.message
    assert err.hint


def test_wrong_dtype(tiny_checkpoint):
    path = _edit_weights(tiny_checkpoint, lambda s: s.update({WEIGHT: s[WEIGHT].to(torch.int32)}))
    err = _load_error(tiny_checkpoint)
    assert err.source == str(path)
    assert WEIGHT in err.message and "int32" in err.message
    assert err.hint


def test_shape_mismatch_config_wider_than_weights(tiny_checkpoint):
    _edit_config(tiny_checkpoint, vision_width=128)
    err = _load_error(tiny_checkpoint)
    assert err.source == str(tiny_checkpoint / WEIGHTS_NAME)
    assert "shape" in err.message and "config.json implies" in err.message
    assert "128" in err.message
    assert err.hint


def test_more_layers_in_config_than_in_weights(tiny_checkpoint):
    _edit_config(tiny_checkpoint, expert_heads=[2, 2, 2], expert_mlp=[64, 64, 64])
    err = _load_error(tiny_checkpoint)
    assert "missing" in err.message and "expert.blocks.2." in err.message


def test_missing_tensors(tiny_checkpoint):
    def drop(state):
        for k in [k for k in state if k.startswith("expert.blocks.1.mlp.")]:
            del state[k]

    path = _edit_weights(tiny_checkpoint, drop)
    err = _load_error(tiny_checkpoint)
    assert err.source == str(path)
    assert "4 tensors missing" in err.message and "expert.blocks.1.mlp.fc1.bias" in err.message
    assert err.hint


def test_unexpected_tensors(tiny_checkpoint):
    path = _edit_weights(tiny_checkpoint, lambda s: s.update({"lm_head.weight": torch.zeros(3, 3)}))
    err = _load_error(tiny_checkpoint)
    assert err.source == str(path)
    assert "unexpected" in err.message and "lm_head.weight" in err.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(tiny_checkpoint, bad):
    def poison(state):
        state[WEIGHT] = state[WEIGHT].clone()
        state[WEIGHT].view(-1)[17] = bad

    path = _edit_weights(tiny_checkpoint, poison)
    err = _load_error(tiny_checkpoint)
    assert err.source == str(path)
    assert WEIGHT in err.message and "NaN" in err.message
    assert err.hint


# ---------------------------------------------------------------------------------------------
# Pickle checkpoints


def _to_pickle(ckpt: Path, name: str = "pytorch_model.bin") -> Path:
    """Replace model.safetensors with a torch.save'd state dict, as older checkpoints ship."""
    weights = ckpt / WEIGHTS_NAME
    path = ckpt / name
    torch.save(load_file(str(weights)), path)
    weights.unlink()
    return path


def test_pickle_refused_by_default(tiny_checkpoint):
    path = _to_pickle(tiny_checkpoint)
    err = _load_error(tiny_checkpoint)
    assert err.source == str(path)
    assert "pickle" in err.message and "execute code" in err.message  # why
    assert "safetensors" in err.hint and "--allow-pickle" in err.hint  # how


@pytest.mark.parametrize("wrap", [False, True], ids=["state-dict", "lightning-style"])
def test_pickle_loads_when_allowed(tiny_policy, tiny_checkpoint, wrap):
    path = _to_pickle(tiny_checkpoint, "model.ckpt")
    if wrap:  # Lightning-style {"state_dict": ..., "epoch": ...}
        torch.save({"state_dict": torch.load(path, weights_only=True), "epoch": 3}, path)
    loaded = load_policy(tiny_checkpoint, allow_pickle=True)
    assert torch.equal(_actions(loaded), _actions(tiny_policy))
    assert loaded.meta["weights_sha256"] == sha256_file(path)


def test_pickle_with_non_tensor_entry(tiny_checkpoint):
    path = _to_pickle(tiny_checkpoint)
    state = torch.load(path, weights_only=True)
    state[WEIGHT] = [1.0, 2.0]  # weights_only allows plain lists
    torch.save(state, path)
    err = _load_error(tiny_checkpoint, allow_pickle=True)
    assert err.source == str(path)
    assert WEIGHT in err.message and "not a tensor" in err.message


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_does_not_execute(tiny_checkpoint, tmp_path):
    path = _to_pickle(tiny_checkpoint)
    marker = tmp_path / "pwned"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "payload": _Payload(marker)}, path)

    err = _load_error(tiny_checkpoint, allow_pickle=True)
    assert not marker.exists(), "unpickling ran the payload"
    assert err.source == str(path)
    assert err.hint and "never unpickles" in err.hint

    # The payload is live: a full unpickle of a copy does run it (so the check above means something).
    live_marker = tmp_path / "live"
    live = tmp_path / "live.bin"
    torch.save({"payload": _Payload(live_marker)}, live)
    torch.load(live, weights_only=False)
    assert live_marker.read_text() == "pwned"


def test_pickle_ignored_when_safetensors_present(tiny_policy, tiny_checkpoint):
    # A stray .bin next to model.safetensors is never opened.
    (tiny_checkpoint / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    assert torch.equal(_actions(load_policy(tiny_checkpoint)), _actions(tiny_policy))


def test_checkpoint_dir_can_be_copied(tiny_policy, tiny_checkpoint, tmp_path):
    # Nothing in a checkpoint depends on its path (no absolute paths in config.json).
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "elsewhere")
    assert torch.equal(_actions(load_policy(copy)), _actions(tiny_policy))
