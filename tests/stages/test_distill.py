"""distill: layer-selected, MLP-narrowed, step-distilled students trained to match the teacher."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ddp_worker import nmse, probe_inputs, tiny_episodes, tiny_teacher

from vlacompile.checkpoint import load_policy, save_policy
from vlacompile.errors import ConfigError
from vlacompile.stages import Artifact, BuildContext, distill
from vlacompile.training import MatchSettings, train_to_match

HERE = Path(__file__).resolve().parent


# Tiny models gain nothing from a second thread, and lose a lot when the other core is busy.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def episodes():
    return tiny_episodes()


@pytest.fixture(scope="module")
def teacher(episodes):
    return tiny_teacher(episodes[0])


def make_ctx(teacher, episodes, seed: int = 0, logs: list | None = None) -> BuildContext:
    train, calib, _ = episodes
    return BuildContext(
        target=None, workdir=Path("."), teacher=teacher, train=train, calibration=calib, seed=seed, progress=False,
        log=(logs.append if logs is not None else (lambda m: None)),
    )


def actions(policy, x) -> torch.Tensor:
    with torch.inference_mode():
        return policy(**x)


SMALL = distill.Params(layers={"vision": (1,), "backbone": (1,), "expert": (1,)}, flow_steps=1, steps=150, num_samples=256)


def test_distilled_student_matches_teacher_better_than_untrained(teacher, episodes):
    logs: list[str] = []
    ctx = make_ctx(teacher, episodes, logs=logs)
    untrained = distill.run(Artifact(policy=teacher), replace(SMALL, steps=0), ctx).policy
    art = distill.run(Artifact(policy=teacher), SMALL, ctx)
    student = art.policy
    x = probe_inputs(teacher, episodes[2])
    t = actions(teacher, x)
    before, after = nmse(actions(untrained, x), t), nmse(actions(student, x), t)
    assert after < before / 5, (before, after)

    # A 1+1+1-layer, 1-step student: really smaller, and its spec says how many steps it integrates.
    assert student.spec.flow_steps == 1 and student.config.flow_steps == 1
    assert (student.config.vision_depth, student.config.backbone_depth, student.config.expert_depth) == (1, 1, 1)
    assert student.num_parameters() < teacher.num_parameters()
    assert student.spec.action_std == teacher.spec.action_std and student.spec.action_mean == teacher.spec.action_mean
    assert not student.module.training

    rec = art.records[-1]
    assert rec["stage"] == "distill" and rec["student_params"] == student.num_parameters()
    assert rec["teacher_params"] == teacher.num_parameters()
    assert rec["final_loss"] < rec["loss_curve"][0][1] and 2 <= len(rec["loss_curve"]) <= 12
    assert rec["student_config"]["expert_heads"] == [2] and rec["seconds"] > 0
    assert json.dumps(rec)  # the report is JSON
    assert any("step 150/150" in m for m in logs)


def test_untrained_student_copies_the_selected_teacher_layers(teacher, episodes):
    p = distill.Params(layers={"vision": (1,), "backbone": (0,), "expert": (0, 1)}, steps=0)
    student = distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes)).policy
    s, t = student.module.state_dict(), teacher.module.state_dict()
    assert torch.equal(s["vision.blocks.0.attn.qkv.weight"], t["vision.blocks.1.attn.qkv.weight"])
    assert torch.equal(s["backbone.blocks.0.mlp.fc2.weight"], t["backbone.blocks.0.mlp.fc2.weight"])
    assert torch.equal(s["expert.blocks.1.cross.kv.weight"], t["expert.blocks.1.cross.kv.weight"])
    assert torch.equal(s["expert.action_out.weight"], t["expert.action_out.weight"])
    # Keeping every layer and step reproduces the teacher exactly.
    same = distill.run(Artifact(policy=teacher), distill.Params(steps=0), make_ctx(teacher, episodes)).policy
    x = probe_inputs(teacher, episodes[2], n=8)
    torch.testing.assert_close(actions(same, x), actions(teacher, x), rtol=0, atol=0)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(teacher, episodes):
    p = replace(SMALL, steps=20, num_samples=64)
    a = distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes, seed=3)).policy.module.state_dict()
    b = distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes, seed=3)).policy.module.state_dict()
    c = distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes, seed=4)).policy.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_mlp_ratio_keeps_the_most_important_channels(teacher, episodes):
    from vlacompile.data import draw_stratified
    from vlacompile.stages.prune import measure_importance

    p = distill.Params(mlp_ratio=0.5, steps=0)
    student = distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes)).policy
    fc1 = student.module.backbone.blocks[0].mlp.fc1
    assert fc1.out_features == 32 and student.config.backbone_mlp == (32, 32)
    assert student.module.expert.blocks[1].mlp.fc2.in_features == 32

    # The kept rows are the teacher's 32 channels with the largest mean |GELU(fc1 x)| on calibration data.
    calib = draw_stratified(episodes[1], distill.IMPORTANCE_SAMPLES, chunk_size=teacher.spec.chunk_size, seed=0)
    imp = measure_importance(teacher, calib, seed=0, what=("mlp",)).mlp[("backbone", 0)]
    kept = imp.topk(32).indices.sort().values
    t_fc1 = teacher.module.backbone.blocks[0].mlp.fc1
    assert torch.equal(fc1.weight, t_fc1.weight[kept])
    assert torch.equal(student.module.backbone.blocks[0].mlp.fc2.weight, teacher.module.backbone.blocks[0].mlp.fc2.weight[:, kept])


def test_feature_loss_adds_the_prefix_feature_error(teacher, episodes):
    # A student with one backbone layer has different prefix features: the weighted term shows in the loss.
    p = distill.Params(layers={"backbone": (0,)}, steps=2, num_samples=32, lr=1e-9)
    plain = distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes)).records[-1]["initial_loss"]
    with_features = distill.run(Artifact(policy=teacher), replace(p, feature_loss_weight=1.0), make_ctx(teacher, episodes)).records[-1]["initial_loss"]
    assert with_features > plain + 1e-3


def test_student_saves_and_loads(teacher, episodes, tmp_path):
    p = replace(SMALL, steps=5, num_samples=32, mlp_ratio=0.5, feature_loss_weight=0.5, noises_per_sample=2)
    student = distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes)).policy
    loaded = load_policy(save_policy(student, tmp_path / "s"))
    x = probe_inputs(teacher, episodes[2], n=4)
    torch.testing.assert_close(actions(loaded, x), actions(student, x), rtol=0, atol=0)
    assert loaded.spec == student.spec


def test_layer_index_out_of_range_names_the_param_and_the_depth(teacher, episodes):
    p = distill.Params(layers={"expert": (0, 5)}, steps=0)
    distill.check(p, None)  # legal in itself: the teacher's depth is known only at run time
    with pytest.raises(ConfigError) as e:
        distill.run(Artifact(policy=teacher), p, make_ctx(teacher, episodes))
    assert "distill.layers.expert" in str(e.value) and "2 expert layers" in str(e.value)


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(layers={"vision": (1, 0)}), "layers.vision"),
        (dict(layers={"backbone": ()}), "layers.backbone"),
        (dict(layers={"expert": (-1,)}), "layers.expert"),
        (dict(layers={"expert": 1.5}), "layers.expert"),
        (dict(per_family={"vlacompile-reference": {"steps": 3}}), "per_family"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(mlp_ratio=1.5), "mlp_ratio"),
        (dict(flow_steps=0), "flow_steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(feature_loss_weight=-1.0), "feature_loss_weight"),
        (dict(state_jitter_copies=2), "state_jitter_copies"),  # copies without a jitter are plain duplicates
        (dict(state_jitter_copies=-1), "state_jitter_copies"),
        (dict(train_precision="fp16"), "train_precision"),
    ],
)
def test_check_rejects_illegal_params(change, key):
    with pytest.raises(ConfigError) as e:
        distill.check(replace(distill.Params(), **change), None, source="r.toml")
    assert f"distill.{key}" in str(e.value) and "r.toml" in str(e.value)


def test_state_jitter_copies_keep_the_originals_and_move_only_the_state(episodes):
    import numpy as np

    from vlacompile.data import draw_stratified

    samples = draw_stratified(episodes[0], 32, chunk_size=4, seed=0)
    before = samples.state.copy()
    sigma = np.linspace(0.01, 0.5, samples.state.shape[1]).astype(np.float32)
    out = distill.with_state_jitter(samples, 3, sigma, seed=0)
    n = len(samples)
    assert len(out) == 4 * n
    np.testing.assert_array_equal(samples.state, before)  # the caller's samples are not modified
    np.testing.assert_array_equal(out.state[:n], before)
    for k in range(1, 4):
        for cam in samples.images:
            np.testing.assert_array_equal(out.images[cam][k * n : (k + 1) * n], samples.images[cam])
        assert out.tasks[k * n : (k + 1) * n] == samples.tasks
    moved = (out.state[n:] - np.tile(before, (3, 1))) / sigma
    # The noise is standard normal in units of sigma, per dimension, and deterministic under the seed.
    assert abs(moved.mean()) < 0.1 and 0.9 < moved.std() < 1.1
    np.testing.assert_array_equal(distill.with_state_jitter(samples, 3, sigma, seed=0).state, out.state)


def test_state_jitter_distillation_trains_on_the_jittered_observations(teacher, episodes):
    logs: list[str] = []
    params = replace(SMALL, steps=20, num_samples=64, state_jitter_copies=2, state_jitter=0.3)
    art = distill.run(Artifact(policy=teacher), params, make_ctx(teacher, episodes, logs=logs))
    assert art.records[-1]["num_samples"] == 3 * 64
    assert any("192 (observation, noise) pairs" in m for m in logs), logs


def test_bf16_autocast_trains_as_well_as_fp32_and_says_so(teacher, episodes):
    """train_precision = "bf16": the forward's products in BF16 with FP32 weights. The student it
    gives is as close to the teacher as the FP32 one (its weights stay FP32), and the record says
    which precision trained it."""
    logs: list[str] = []
    ctx = make_ctx(teacher, episodes, logs=logs)
    x = probe_inputs(teacher, episodes[2])
    runs = {p: distill.run(Artifact(policy=teacher), replace(SMALL, train_precision=p), ctx) for p in ("fp32", "bf16")}
    assert runs["bf16"].records[-1]["precision"] == "bf16" and runs["fp32"].records[-1]["precision"] == "fp32"
    assert any("BF16 autocast" in m for m in logs)
    assert all(p.dtype == torch.float32 for p in runs["bf16"].policy.module.parameters())
    err = {p: nmse(actions(r.policy.module, x), actions(teacher.module, x)) for p, r in runs.items()}
    untrained = nmse(actions(distill.run(Artifact(policy=teacher), replace(SMALL, steps=0), ctx).policy.module, x),
                     actions(teacher.module, x))
    assert err["bf16"] < 0.5 * untrained and err["bf16"] < 1.3 * err["fp32"] + 1e-3, (err, untrained)
    assert not torch.equal(next(runs["bf16"].policy.module.parameters()), next(runs["fp32"].policy.module.parameters()))


def _pretend_cpu_flags(monkeypatch, tmp_path, flags: str | None) -> None:
    import builtins

    cpuinfo = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n" if flags else "processor\t: 0\n")
    real_open = getattr(builtins.open, "real_open", builtins.open)

    def fake_open(f, *a, **k):
        return real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k)

    fake_open.real_open = real_open
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("flags, expected", [("avx512f avx512_bf16", "bf16"), ("avx512f amx_bf16 amx_tile", "bf16"),
                                             ("fp asimd bf16 i8mm", "bf16"), ("avx2 avx512f avx512bw", "fp32"), (None, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, tmp_path, flags, expected):
    """oneDNN emulates BF16 on CPUs without the instructions (slower than FP32), so "auto" asks the CPU flags."""
    from vlacompile import training

    _pretend_cpu_flags(monkeypatch, tmp_path, flags)
    assert training.resolve_precision("auto") == expected
    assert training.resolve_precision("fp32") == "fp32" and training.resolve_precision("bf16") == "bf16"


def test_the_distill_cache_key_holds_what_auto_precision_resolved_to(monkeypatch, tmp_path):
    """A student trained in BF16 on one machine is not taken for the FP32 one of another (a CI cache
    restored across runner types); an explicit precision gives the same key on both."""
    from vlacompile.cache import stage_keys
    from vlacompile.recipes import StageSpec

    class NoTarget:
        def to_dict(self):
            return {}

    def key(precision: str, flags: str) -> str:
        _pretend_cpu_flags(monkeypatch, tmp_path, flags)
        return stage_keys("root", [StageSpec("distill", distill.Params(train_precision=precision))], NoTarget(), {})[0]

    assert key("auto", "avx512f avx512_bf16") != key("auto", "avx512f")
    assert key("fp32", "avx512f avx512_bf16") == key("fp32", "avx512f")


def test_train_to_match_is_usable_on_its_own(teacher, episodes):
    from vlacompile.data import draw_stratified

    student = distill.init_student(teacher, distill.Params(layers={"expert": (1,)}, flow_steps=2), make_ctx(teacher, episodes))
    samples = draw_stratified(episodes[0], 64, chunk_size=teacher.spec.chunk_size, seed=0)
    out = train_to_match(student, teacher, samples, MatchSettings(steps=30, batch_size=16), make_ctx(teacher, episodes))
    assert out["final_loss"] < out["initial_loss"] and out["processes"] == 1


def test_a_non_finite_loss_stops_training_naming_the_data(teacher, episodes):
    """An absurd learning rate blows the student up: the stage stops at that step instead of training
    on NaN to the end (and failing at export with a misleading hint)."""
    from vlacompile.errors import TrainingError

    with pytest.raises(TrainingError, match=r"distill: the loss is (nan|inf) at step \d+ of 50 \(lr 1e\+30, FP32: ") as e:
        distill.run(Artifact(policy=teacher), replace(SMALL, steps=50, lr=1e30, num_samples=64), make_ctx(teacher, episodes))
    assert "lower the stage's lr" in e.value.hint


def test_non_finite_teacher_targets_are_refused(teacher, episodes):
    from vlacompile.errors import TrainingError

    broken = load_policy_copy(teacher)
    with torch.no_grad():
        next(broken.module.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"the teacher's actions are NaN or infinite on 64 of 64 observations \(first: episode"):
        distill.run(Artifact(policy=broken), replace(SMALL, steps=5, num_samples=64), make_ctx(broken, episodes))


def load_policy_copy(policy):
    import copy

    return copy.deepcopy(policy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(teacher, tmp_path):
    """The same distillation as 2 gloo processes (DDP through Accelerate) and as 1 process."""
    save_policy(teacher, tmp_path / "teacher")
    steps = "30"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    worker = [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "teacher")]
    port = str(_free_port())
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    procs = [subprocess.Popen([*worker, str(tmp_path / "single"), steps], env=env, stderr=subprocess.PIPE, text=True)]
    for rank in range(2):
        dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([*worker, str(tmp_path / "ddp"), steps], env={**env, **dist}, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]

    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    r0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert json.loads((tmp_path / "ddp" / "rank0.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "single" / "rank0.json").read_text())["processes"] == 1
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the replicas identical
    action_diff = (one.pop("__actions__") - r0.pop("__actions__")).abs().max().item()
    weight_diff = max((one[k] - r0[k]).abs().max().item() for k in one)
    print(f"1 vs 2 processes after {steps} steps: max |action diff| {action_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert action_diff < 1e-4
    # Key biases do not change attention outputs (softmax is shift-invariant): their gradient is
    # float noise that Adam scales up to ~lr-sized steps, so they differ most, harmlessly.
    assert weight_diff < 2e-3
