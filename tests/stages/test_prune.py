"""prune: heads, MLP channels and blocks really removed, ranked by activation importance."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ddp_worker import nmse, probe_inputs, tiny_episodes, tiny_teacher

from vlacompile.checkpoint import load_policy, save_policy
from vlacompile.data import draw_stratified
from vlacompile.errors import ConfigError
from vlacompile.families import get_family
from vlacompile.stages import Artifact, BuildContext, prune


# Tiny models gain nothing from a second thread, and lose a lot when the other core is busy.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def episodes():
    return tiny_episodes()


@pytest.fixture(scope="module")
def teacher(episodes):
    # Four heads per layer so that head pruning has choices to make.
    from ddp_worker import tiny_config

    cfg = tiny_config(vision_heads=(4, 4), backbone_heads=(4, 4), expert_heads=(4, 4))
    return tiny_teacher(episodes[0], config=cfg)


@pytest.fixture(scope="module")
def importance(teacher, episodes):
    calib = draw_stratified(episodes[1], 64, chunk_size=teacher.spec.chunk_size, seed=0)
    return prune.measure_importance(teacher, calib, seed=0)


def make_ctx(teacher, episodes, seed: int = 0) -> BuildContext:
    train, calib, _ = episodes
    return BuildContext(target=None, workdir=Path("."), teacher=teacher, train=train, calibration=calib, seed=seed, progress=False, log=lambda m: None)


def actions(policy, x) -> torch.Tensor:
    with torch.inference_mode():
        return policy(**x)


HALF = prune.Params(heads_ratio=0.5, mlp_ratio=0.5, recovery_steps=0, calibration_samples=64)


def test_pruned_model_is_smaller_and_round_trips(teacher, episodes, tmp_path):
    art = prune.run(Artifact(policy=teacher), replace(HALF, drop_layers=1), make_ctx(teacher, episodes))
    pruned = art.policy
    cfg = pruned.config
    assert cfg.vision_heads == (2,) and cfg.backbone_mlp == (32,) and cfg.expert_depth == 1
    assert pruned.module.expert.blocks[0].attn.qkv.out_features == 3 * 2 * 16
    assert pruned.module.expert.blocks[0].cross.kv.out_features == 2 * 2 * 16
    assert pruned.num_parameters() < teacher.num_parameters() / 2

    loaded = load_policy(save_policy(pruned, tmp_path / "pruned"))
    assert loaded.config == cfg and loaded.spec == pruned.spec
    x = probe_inputs(teacher, episodes[2], n=8)
    torch.testing.assert_close(actions(loaded, x), actions(pruned, x), rtol=0, atol=0)

    rec = art.records[-1]
    assert rec["stage"] == "prune" and rec["params_after"] == pruned.num_parameters()
    assert rec["params_before"] == teacher.num_parameters()
    assert rec["removed"]["attention_heads"] == 24 - 6 and rec["removed"]["mlp_channels"] == 384 - 96
    assert all(len(v) == 1 for v in rec["removed"]["layers"].values())
    assert json.dumps(rec)


def test_zero_ratios_give_an_identical_model(teacher, episodes):
    p = prune.Params(recovery_steps=0)
    pruned = prune.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes)).policy
    assert pruned.config == teacher.config and pruned.module is not teacher.module
    x = probe_inputs(teacher, episodes[2], n=8)
    torch.testing.assert_close(actions(pruned, x), actions(teacher, x), rtol=0, atol=0)


def _mask_like_plan(teacher, plan_keep, layers) -> torch.nn.Module:
    """The teacher with the outputs of removed heads / channels zeroed instead of sliced out."""
    import copy

    m = copy.deepcopy(teacher.module)
    with torch.no_grad():
        for (part, i), keep in plan_keep.items():
            blk = getattr(m, part).blocks[layers[part][i]]  # the reference family's layout
            for name, attn in (("attn", blk.attn), ("cross", blk.cross)):
                if name in keep:
                    gone = sorted(set(range(attn.num_heads)) - set(keep[name].tolist()))
                    w = attn.proj.weight.view(attn.proj.out_features, attn.num_heads, attn.head_dim)
                    w[:, gone] = 0
            if "mlp" in keep:
                gone = sorted(set(range(blk.mlp.fc1.out_features)) - set(keep["mlp"].tolist()))
                blk.mlp.fc2.weight[:, gone] = 0
    return m


def test_slicing_equals_zeroing_the_removed_heads_and_channels(teacher, importance, episodes):
    """Checks the [3, heads, head_dim] / [2, heads, head_dim] layouts of qkv and kv are sliced right."""
    cfg, layers, keep = prune.plan(teacher, importance, HALF)
    pruned = get_family(teacher.family).restructure(teacher, cfg, layers=layers, keep=keep)
    masked = _mask_like_plan(teacher, keep, layers)
    x = probe_inputs(teacher, episodes[2], n=8)
    with torch.inference_mode():
        torch.testing.assert_close(pruned.module(**x), masked(**x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "heads"])
def test_importance_ranks(teacher, importance, episodes, kind):
    """Zeroing the least important half changes the actions less than zeroing the most important half."""
    x = probe_inputs(teacher, episodes[2], n=32)
    ref = actions(teacher, x)

    def zero_half(least: bool) -> float:
        keep = {}
        for (part, i), scores in (importance.mlp if kind == "mlp" else importance.attn_heads).items():
            k = len(scores) // 2
            kept = prune.top_k(scores if least else -scores, k)  # keep the top (least=True drops the bottom)
            if kind == "mlp":
                keep[(part, i)] = {"mlp": kept}
            else:
                keep[(part, i)] = {"attn": kept}
                if (part, i) in importance.cross_heads:
                    ks = importance.cross_heads[(part, i)]
                    keep[(part, i)]["cross"] = prune.top_k(ks if least else -ks, k)
        layers = {p: list(range(d)) for p, d in get_family(teacher.family).depths(teacher.config).items()}
        m = _mask_like_plan(teacher, keep, layers)
        with torch.inference_mode():
            return nmse(m(**x), ref)

    drop_least, drop_most = zero_half(True), zero_half(False)
    assert drop_least < drop_most / 2, (drop_least, drop_most)


def test_drop_layers_removes_the_least_influential_block(teacher, importance, episodes):
    p = prune.Params(drop_layers=1, parts=("expert", "vision"), recovery_steps=0, calibration_samples=64)
    art = prune.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes))
    removed = art.records[-1]["removed"]["layers"]
    assert removed == {
        "expert": [int(importance.layers["expert"].argmin())],
        "vision": [int(importance.layers["vision"].argmin())],
    }
    assert art.policy.config.backbone_depth == 2  # parts not listed are untouched
    with pytest.raises(ConfigError) as e:
        prune.run(Artifact(policy=teacher), replace(p, drop_layers=2), make_ctx(teacher, episodes))
    assert "drop_layers" in str(e.value) and "2 expert layers" in str(e.value)


def test_recovery_brings_the_pruned_model_closer_to_the_teacher(teacher, episodes):
    ctx = make_ctx(teacher, episodes)
    x = probe_inputs(teacher, episodes[2], n=64)
    ref = actions(teacher, x)
    raw = prune.run(Artifact(policy=teacher), HALF, ctx)
    rec = prune.run(Artifact(policy=teacher), replace(HALF, recovery_steps=100, recovery_lr=1e-3), ctx)
    before, after = nmse(actions(raw.policy, x), ref), nmse(actions(rec.policy, x), ref)
    assert after < before / 2, (before, after)
    r = rec.records[-1]
    assert r["recovery_final_loss"] < r["recovery_loss_curve"][0][1]
    assert raw.records[-1]["recovery_final_loss"] is None


def test_pruned_model_exports_to_onnx_and_matches_torch(teacher, episodes, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from vlacompile.policy import OUTPUT_NAMES

    pruned = prune.run(Artifact(policy=teacher), replace(HALF, drop_layers=1), make_ctx(teacher, episodes)).policy
    INPUT_NAMES = pruned.spec.input_names
    x = probe_inputs(teacher, episodes[2], n=2)
    path = tmp_path / "pruned.onnx"
    args = tuple(x[k] for k in INPUT_NAMES)
    torch.onnx.export(pruned.module, args, str(path), dynamo=True, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {k: x[k].numpy() for k in INPUT_NAMES})
    np.testing.assert_allclose(out, actions(pruned, x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(heads_ratio=1.0), "heads_ratio"),
        (dict(heads_ratio=-0.1), "heads_ratio"),
        (dict(mlp_ratio=1.0), "mlp_ratio"),
        (dict(drop_layers=-1), "drop_layers"),
        (dict(parts=("decoder",)), "parts"),
        (dict(parts=()), "parts"),
        (dict(calibration_samples=0), "calibration_samples"),
        (dict(recovery_lr=0.0), "recovery_lr"),
    ],
)
def test_check_rejects_illegal_params(change, key):
    with pytest.raises(ConfigError) as e:
        prune.check(replace(prune.Params(), **change), None, source="r.toml")
    assert f"prune.{key}" in str(e.value) and "r.toml" in str(e.value)
