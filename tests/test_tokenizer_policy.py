"""The byte tokenizer, the policy spec and the reference family (config, shrink, forward, FLOPs)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from vlacompile.checkpoint import new_policy
from vlacompile.errors import CheckpointError
from vlacompile.families import get_family
from vlacompile.families.reference import FAMILY, ReferenceConfig, flops_per_call
from vlacompile.families.reference.processor import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer
from vlacompile.policy import OUTPUT_NAMES

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models; see conftest

# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("Pick up the red cube", "pick up the red cube"),
        ("  push the block left \n", "push the block left"),
        ("Ölflasche öffnen", "ölflasche öffnen"),
        ("把红色方块放进盒子", "把红色方块放进盒子"),
        ("grasp 🤖", "grasp 🤖"),
        ("", ""),
    ],
)
def test_round_trip(text, normalised):
    tok = ByteTokenizer(64)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (64,)
    assert tok.decode(ids) == normalised


def test_layout_and_padding():
    tok = ByteTokenizer(16)
    ids = tok.encode("Go")
    assert ids.tolist() == [BOS_ID, ord("g") + BYTE_OFFSET, ord("o") + BYTE_OFFSET, EOS_ID] + [PAD_ID] * 12
    assert ids.max() < VOCAB_SIZE


def test_truncation_keeps_bos_and_eos():
    tok = ByteTokenizer(10)
    ids = tok.encode("put the green sphere into the drawer")
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert PAD_ID not in ids.tolist()
    assert tok.decode(ids) == "put the "  # max_length - 2 bytes of text


def test_truncation_does_not_split_a_character():
    tok = ByteTokenizer(6)  # room for 4 bytes: "aé" is 3 bytes, "aéé" would be 5
    ids = tok.encode("aéé")
    assert tok.decode(ids) == "aé"
    assert ids.tolist() == [BOS_ID, *(b + BYTE_OFFSET for b in "aé".encode()), EOS_ID, PAD_ID]


def test_encode_batch():
    tok = ByteTokenizer(8)
    batch = tok.encode_batch(["a", "bb"])
    assert batch.shape == (2, 8) and batch.dtype == np.int64
    np.testing.assert_array_equal(batch[1], tok.encode("bb"))
    assert tok.encode_batch([]).shape == (0, 8)


@pytest.mark.parametrize("n", [0, 1])
def test_too_short_max_length(n):
    with pytest.raises(ValueError, match="at least 2"):
        ByteTokenizer(n)


def test_minimum_max_length():
    assert ByteTokenizer(2).encode("anything").tolist() == [BOS_ID, EOS_ID]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40), n=st.integers(2, 48))
def test_fuzz_encode(text, n):
    tok = ByteTokenizer(n)
    ids = tok.encode(text).tolist()
    assert len(ids) == n and ids[0] == BOS_ID
    end = ids.index(EOS_ID)
    assert all(i >= BYTE_OFFSET for i in ids[1:end])
    assert all(i == PAD_ID for i in ids[end + 1 :])
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    decoded, full = tok.decode(ids), text.strip().lower()
    assert full.startswith(decoded)
    if len(full.encode()) <= n - 2:
        assert decoded == full


# ---------------------------------------------------------------------------------------------
# ReferenceConfig


def test_config_dict_round_trip(tiny_config):
    for cfg in (tiny_config, ReferenceConfig(), tiny_config.shrink(expert_layers=[1], mlp_ratio=0.5, flow_steps=1)):
        d = cfg.to_dict()
        assert d["model_type"] == FAMILY
        assert ReferenceConfig.from_dict(d) == cfg


@pytest.mark.parametrize("part", ["vision", "backbone", "expert"])
def test_mismatched_heads_and_mlp_lengths(tiny_config, part):
    bad = dataclasses.replace(tiny_config, **{f"{part}_mlp": (64, 64, 64)})
    with pytest.raises(CheckpointError, match=f"{part}_heads has 2 layers but {part}_mlp has 3"):
        bad.validate("cfg")
    with pytest.raises(CheckpointError):
        new_policy(bad)
    with pytest.raises(CheckpointError) as info:
        ReferenceConfig.from_dict(bad.to_dict(), "teacher/config.json")
    assert info.value.source == "teacher/config.json"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"vision_heads": (2, 0)}, "no heads"),
        ({"image_size": 30}, "multiple of patch_size"),
        ({"patch_size": 0}, "patch_size must be at least 1"),
        ({"expert_width": 0}, "expert_width must be at least 1"),
        ({"max_tokens": 1}, "max_tokens must be at least 2"),
        ({"control_hz": float("nan")}, "control_hz"),
        ({"cameras": ()}, "no cameras"),
    ],
)
def test_invalid_configs(tiny_config, change, words):
    with pytest.raises(CheckpointError, match=words):
        dataclasses.replace(tiny_config, **change).validate()


def test_shrink_keeps_requested_layers():
    cfg = ReferenceConfig(
        vision_heads=(1, 2, 3, 4),
        vision_mlp=(100, 200, 300, 400),
        backbone_heads=(5, 6, 7),
        backbone_mlp=(50, 60, 70),
        expert_heads=(8, 9),
        expert_mlp=(80, 90),
        flow_steps=10,
    )
    small = cfg.shrink(vision_layers=[0, 3], backbone_layers=[2], mlp_ratio=0.5, flow_steps=2)
    assert small.vision_heads == (1, 4) and small.vision_mlp == (50, 200)
    assert small.backbone_heads == (7,) and small.backbone_mlp == (35,)
    assert small.expert_heads == (8, 9) and small.expert_mlp == (40, 45)  # None: every layer, still scaled
    assert small.flow_steps == 2
    assert (small.vision_width, small.head_dim, small.chunk_size) == (cfg.vision_width, cfg.head_dim, cfg.chunk_size)
    small.validate()
    # MLP widths never drop below 8 channels.
    assert cfg.shrink(mlp_ratio=0.01).vision_mlp == (8, 8, 8, 8)
    assert cfg.shrink() == cfg


def test_shrink_empty_list_keeps_no_layers():
    # [] means "no blocks", not "all blocks": heads and MLP lists must stay the same length.
    small = ReferenceConfig().shrink(vision_layers=[])
    assert small.vision_heads == () and small.vision_mlp == ()
    small.validate()


def test_shrink_rejects_out_of_range_layers(tiny_config):
    with pytest.raises(ValueError, match="expert layer indices \\[2\\]"):
        tiny_config.shrink(expert_layers=[0, 2])
    with pytest.raises(ValueError, match="vision"):
        tiny_config.shrink(vision_layers=[-1])


# Mutated config.json contents: from_dict returns a valid config or raises CheckpointError.
config_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.one_of(st.integers(-2, 300), st.floats(), st.text(max_size=3), st.booleans()), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_reference_config_from_dict(tiny_config, data):
    d = tiny_config.to_dict()
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(sorted(d)) | st.text(max_size=4))
        if data.draw(st.booleans()):
            d.pop(key, None)
        else:
            d[key] = data.draw(config_values)
    try:
        cfg = ReferenceConfig.from_dict(d, "fuzz/config.json")
    except CheckpointError as err:
        assert err.source == "fuzz/config.json"
        return
    cfg.validate()
    assert ReferenceConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# The module


def test_spec(tiny_policy, tiny_config):
    spec = tiny_policy.spec
    assert [c.name for c in spec.cameras] == ["front"]
    assert spec.input_shapes(batch=3) == {
        "images": (3, 1, 3, 32, 32),
        "state": (3, 6),
        "tokens": (3, 32),
        "noise": (3, 8, 4),
    }
    assert tuple(spec.input_shapes()) == spec.input_names == ("images", "state", "tokens", "noise") and OUTPUT_NAMES == ("actions",)
    assert (spec.chunk_size, spec.flow_steps, spec.family) == (8, 4, FAMILY)
    assert spec.action_std == tuple(float(v) for v in tiny_policy.module.action_std)
    ex = spec.example_inputs(batch=2)
    assert ex["images"].dtype == torch.uint8 and ex["tokens"].dtype == torch.int64


def test_forward_deterministic_for_fixed_noise(tiny_policy):
    inputs = tiny_policy.spec.example_inputs(batch=3, seed=5)
    a = tiny_policy(**inputs)
    b = tiny_policy(**inputs)
    assert a.shape == (3, 8, 4) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # Each row depends only on its own inputs.
    row = tiny_policy(**{k: v[1:2] for k, v in inputs.items()})
    torch.testing.assert_close(row, a[1:2], atol=1e-5, rtol=1e-5)


def test_actions_differ_for_different_noise(tiny_policy):
    inputs = tiny_policy.spec.example_inputs(batch=2, seed=5)
    other = {**inputs, "noise": torch.randn(inputs["noise"].shape, generator=torch.Generator().manual_seed(99))}
    a, b = tiny_policy(**inputs), tiny_policy(**other)
    assert (a - b).abs().max() > 1e-3


def test_output_is_in_physical_units(tiny_policy):
    # forward = integrate in normalised space, then x * std + mean.
    m = tiny_policy.module
    inputs = tiny_policy.spec.example_inputs(batch=2)
    a = tiny_policy(**inputs)
    with torch.no_grad():
        m.action_mean.add_(10.0)
        try:
            b = tiny_policy(**inputs)
        finally:
            m.action_mean.sub_(10.0)
    torch.testing.assert_close(b - a, torch.full_like(a, 10.0))


def test_odd_expert_width_runs(tiny_config):
    # Pruning can leave an odd width; the time embedding must still match it.
    policy = new_policy(dataclasses.replace(tiny_config, expert_width=63))
    out = policy(**policy.spec.example_inputs())
    assert out.shape == (1, 8, 4) and torch.isfinite(out).all()


def test_flow_matching_loss_trains(tiny_policy):
    m = tiny_policy.module
    x = tiny_policy.spec.example_inputs(batch=2)
    actions = torch.randn(2, 8, 4)
    g = torch.Generator().manual_seed(0)
    loss = m.flow_matching_loss(x["images"], x["state"], x["tokens"], actions, generator=g)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.expert.action_out.weight.grad is not None and m.vision.patch_embed.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_linear_in_flow_steps(tiny_config):
    one = flops_per_call(dataclasses.replace(tiny_config, flow_steps=1))
    for k in (2, 4, 10):
        f = flops_per_call(dataclasses.replace(tiny_config, flow_steps=k))
        assert f["system1"] == pytest.approx(k * one["system1"])
        assert f["system1_per_step"] == one["system1_per_step"]
        assert f["system2"] == one["system2"]
    assert get_family(FAMILY).flops(tiny_config) == flops_per_call(tiny_config)


def test_flops_shrink_with_the_model(tiny_config):
    full = flops_per_call(tiny_config)
    small = flops_per_call(tiny_config.shrink(vision_layers=[0], expert_layers=[1], mlp_ratio=0.5))
    assert small["system2"] < full["system2"] and small["system1_per_step"] < full["system1_per_step"]


@pytest.mark.parametrize("two_cameras", [False, True])
def test_flops_match_torch_flop_counter(tiny_config, two_cameras):
    """The roofline's FLOPs agree with torch's count of the same call (small linears aside)."""
    cfg = tiny_config
    if two_cameras:
        cfg = dataclasses.replace(cfg, cameras=("front", "wrist"), vision_heads=(1, 3), expert_mlp=(16, 128), max_tokens=12)
    policy = new_policy(cfg)
    m, x = policy.module, policy.spec.example_inputs()
    with torch.no_grad():
        with FlopCounterMode(display=False) as prefix_count:
            prefix, mask = m.prefix(x["images"], x["tokens"])
        with FlopCounterMode(display=False) as step_count:
            m.velocity(x["noise"], torch.zeros(1), m.normalize_state(x["state"]), prefix, mask)
        with FlopCounterMode(display=False) as call_count:
            m(**x)
    f = flops_per_call(cfg)
    # The formula leaves out the expert's tiny in/out/time projections (~1.5% of a step).
    assert f["system2"] == pytest.approx(prefix_count.get_total_flops(), rel=0.03)
    assert f["system1_per_step"] == pytest.approx(step_count.get_total_flops(), rel=0.03)
    # The parts are the split graphs': System 1 projects the prefix's K/V at every step; the single
    # graph projects them once per call (the same result, K - 1 projections fewer).
    n_prefix = len(cfg.cameras) * cfg.num_patches + cfg.max_tokens
    kv = sum(2 * n_prefix * cfg.backbone_width * 2 * h * cfg.head_dim for h in cfg.expert_heads)
    once = f["system2"] + f["system1"] - (cfg.flow_steps - 1) * kv
    assert once == pytest.approx(call_count.get_total_flops(), rel=0.03)
    assert kv > 0.05 * f["system1_per_step"]  # large enough that the test tells the two apart
