"""Accuracy metrics on hand-computed cases, and verify() end to end on a tiny teacher."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vlacompile.verify.accuracy import action_agreement, self_consistency

# Tiny models on 2 shared cores: one torch thread avoids OpenMP stalls (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _chunks(seed=0, n=50, chunk=8, a=4, scale=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, chunk, a))
    if scale is not None:
        x = x * np.asarray(scale)
    return x


def test_identical_chunks_agree_perfectly():
    t = _chunks()
    r = action_agreement(t, t.copy())
    assert r["nmse_vs_teacher"] == 0.0
    assert r["max_abs_error"] == 0.0
    assert r["cosine"] == pytest.approx(1.0)
    assert all(d["nmse"] == 0.0 and d["rmse"] == 0.0 for d in r["per_dim"])


def test_predicting_the_teacher_mean_gives_nmse_one():
    t = _chunks(scale=[1.0, 10.0, 0.1, 3.0]) + np.array([5.0, -2.0, 0.0, 100.0])
    mean = t.reshape(-1, 4).mean(axis=0)
    s = np.broadcast_to(mean, t.shape)
    r = action_agreement(t, s)
    assert r["nmse_vs_teacher"] == pytest.approx(1.0, rel=1e-9)
    assert [d["nmse"] for d in r["per_dim"]] == pytest.approx([1.0] * 4, rel=1e-9)


def test_nmse_is_scale_invariant_per_dimension():
    t = _chunks(1)
    s = t + 0.1 * _chunks(2)
    base = action_agreement(t, s)
    scale = np.array([1000.0, 1.0, 1e-3, 7.0])
    scaled = action_agreement(t * scale, s * scale)
    assert scaled["nmse_vs_teacher"] == pytest.approx(base["nmse_vs_teacher"], rel=1e-9)
    assert [d["nmse"] for d in scaled["per_dim"]] == pytest.approx([d["nmse"] for d in base["per_dim"]], rel=1e-9)
    # The absolute error is in physical units: it scales, and the worst dimension moves to the big one.
    assert scaled["max_abs_error_dim"] == 0
    assert scaled["max_abs_error"] == pytest.approx(base["per_dim"][0]["max_abs_error"] * 1000.0)


def test_nmse_value_on_a_hand_computed_case():
    # One dimension, teacher values 0,2,0,2 (variance 1), student off by 1 everywhere: NMSE = 1/1.
    t = np.array([0.0, 2.0, 0.0, 2.0]).reshape(1, 4, 1)
    s = t + 1.0
    assert action_agreement(t, s)["nmse_vs_teacher"] == pytest.approx(1.0)
    s = t + 0.5
    assert action_agreement(t, s)["nmse_vs_teacher"] == pytest.approx(0.25)


def test_cosine_and_max_abs_error_by_hand():
    t = np.array([[[1.0, 0.0]], [[1.0, 1.0]]])  # [N=2, chunk=1, A=2]
    s = np.array([[[0.0, 1.0]], [[2.0, 2.0]]])
    r = action_agreement(t, s)
    # Sample 0 is orthogonal (0), sample 1 parallel (1): mean 0.5.
    assert r["cosine"] == pytest.approx(0.5)
    # |s - t|: [[1, 1], [1, 1]] -> dimension 0 first at 1.0; make dimension 1 worse.
    s[1, 0, 1] = 4.0
    r = action_agreement(t, s)
    assert r["max_abs_error"] == pytest.approx(3.0)
    assert r["max_abs_error_dim"] == 1
    assert r["per_dim"][0]["max_abs_error"] == pytest.approx(1.0)
    assert r["per_dim"][1]["rmse"] == pytest.approx(np.sqrt((1 + 9) / 2))


def test_zero_chunks_cosine():
    z = np.zeros((1, 2, 2))
    assert action_agreement(z, z)["cosine"] == 1.0
    assert action_agreement(z, z + 1)["cosine"] == 0.0


def test_constant_dimension_is_floored_and_reported():
    t = _chunks(3)
    t[..., 2] = 0.25  # a gripper that never moves in these chunks
    s = t.copy()
    s[..., 2] += 1e-3
    r = action_agreement(t, s)
    assert r["degenerate_dims"] == [2]
    assert np.isfinite(r["nmse_vs_teacher"])
    assert r["per_dim"][2]["nmse"] > 1.0  # the student moves where the teacher holds still: an error
    assert any("floored" in n for n in r["notes"])


def test_against_recorded_actions_uses_the_recorded_variance():
    rec = _chunks(4, scale=[1.0, 2.0, 3.0, 4.0])
    teacher = rec.copy()
    student = np.broadcast_to(rec.reshape(-1, 4).mean(axis=0), rec.shape)
    r = action_agreement(teacher, student, rec)
    assert r["teacher_vs_recorded"]["nmse"] == 0.0
    assert r["student_vs_recorded"]["nmse"] == pytest.approx(1.0)
    assert r["student_vs_recorded"]["per_dim_rmse"] == pytest.approx(rec.reshape(-1, 4).std(axis=0))


def test_smoothness_is_the_mean_squared_third_difference():
    steps = np.arange(6, dtype=float)
    linear = np.broadcast_to(steps[None, :, None], (2, 6, 1))
    cubic = np.broadcast_to((steps**3)[None, :, None], (2, 6, 1))
    r = action_agreement(linear, cubic, linear)
    assert r["smoothness"]["teacher_jerk"] == 0.0
    assert r["smoothness"]["recorded_jerk"] == 0.0
    assert r["smoothness"]["student_jerk"] == pytest.approx(36.0)  # third difference of t^3 is 6
    short = action_agreement(np.ones((1, 3, 1)), np.ones((1, 3, 1)))
    assert short["smoothness"]["teacher_jerk"] is None


def test_bad_inputs_name_the_array():
    t = _chunks()
    with pytest.raises(ValueError, match="student"):
        action_agreement(t, t[:, :4])
    with pytest.raises(ValueError, match="recorded"):
        action_agreement(t, t, t[:10])
    bad = t.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="student: holds NaN"):
        action_agreement(t, bad)
    with pytest.raises(ValueError, match="teacher"):
        action_agreement(t[0], t[0])


def test_self_consistency():
    a = _chunks(5)
    assert self_consistency(a, a)["nmse"] == 0.0
    b = _chunks(6)  # an independent draw of the same distribution: NMSE ~ 2 (two variances)
    assert self_consistency(a, b)["nmse"] == pytest.approx(2.0, abs=0.3)


# ----------------------------------------------------------------------------------------------
# verify() end to end: the teacher against its own ONNX export, and against a 2-step student.
# ----------------------------------------------------------------------------------------------

TINY = dict(
    cameras=("front",), image_size=32, patch_size=8, vision_heads=(2, 2), vision_mlp=(64, 64), backbone_heads=(2, 2),
    backbone_mlp=(64, 64), expert_heads=(2, 2), expert_mlp=(64, 64), vision_width=64, backbone_width=64,
    expert_width=64, head_dim=16, chunk_size=8, flow_steps=4,
)


def _export(policy, path):
    import torch

    from vlacompile.policy import OUTPUT_NAMES

    INPUT_NAMES = policy.spec.input_names

    ex = policy.spec.example_inputs(1)
    torch.onnx.export(
        policy.module, tuple(ex[k] for k in INPUT_NAMES), str(path), input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES), dynamo=False,
        dynamic_axes={k: {0: "batch"} for k in INPUT_NAMES + OUTPUT_NAMES},
    )
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from vlacompile.checkpoint import new_policy
    from vlacompile.data import make_synthetic_episodes
    from vlacompile.families.reference import ReferenceConfig

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("verify")
    teacher = new_policy(ReferenceConfig(**TINY))
    # A step-distilled student in miniature: the same weights, half the flow steps.
    student = new_policy(dataclasses.replace(teacher.config, flow_steps=2))
    student.module.load_state_dict(teacher.module.state_dict())
    student = dataclasses.replace(student, spec=dataclasses.replace(student.spec, action_mean=teacher.spec.action_mean, action_std=teacher.spec.action_std))
    es = make_synthetic_episodes(3, image_size=32, episode_length=12, seed=1)
    return {
        "teacher": teacher,
        "student": student,
        "teacher_onnx": _export(teacher, d / "teacher.onnx"),
        "student_onnx": _export(student, d / "student.onnx"),
        "episodes": es,
    }


def test_verify_teacher_against_its_own_export_on_the_host(tiny):
    from vlacompile.targets import host_device_string, load_target

    r = verify_quiet(tiny["teacher"], tiny["teacher_onnx"], tiny["episodes"], load_target("x86-cpu"), student_policy=tiny["teacher"], max_samples=20)
    acc = r["accuracy"]
    assert acc["nmse_vs_teacher"] < 1e-8
    assert acc["cosine"] > 0.999999
    assert acc["teacher_self_consistency"]["nmse"] > 0.1  # another noise draw gives another chunk
    assert r["samples"]["count"] <= 20 and r["samples"]["episodes"] == 3
    assert r["samples"]["stride"] == 2  # 36 frames: every 2nd frame gives 18 samples
    lat = r["latency"]
    assert lat["student"]["kind"] == "measured" and lat["student"]["measured_on"] == host_device_string()
    assert lat["teacher"]["runtime"] == "torch-eager-fp32" and lat["student"]["runtime"] == "onnxruntime-cpu"
    assert lat["student"]["calls"] == 5 and len(lat["student"]["samples_ms"]) == 5
    assert lat["speedup_p50"] == pytest.approx(lat["teacher"]["p50_ms"] / lat["student"]["p50_ms"])
    names = {g["name"]: g for g in r["gates"]["gates"]}
    assert names["nmse_vs_teacher"]["status"] == "pass" and names["cosine"]["status"] == "pass"
    assert names["p99_latency_ms"]["value"] == lat["student"]["p99_ms"]
    assert names["p99_latency_ms"]["status"] in ("pass", "fail")  # measured: never "not_verified"
    # Memory is the student's own process, not this test process (torch, the teacher).
    assert names["memory_mb"]["value"] == lat["student"]["process_memory"]["peak_rss_mb"] < lat["student"]["peak_rss_mb"]
    assert r["roofline"]["student"]["memory_bandwidth_gbs"]["source"].startswith("measured on")
    assert r["roofline"]["student"]["measured_over_bound"] > 0
    assert len(r["traces"]) == 3 and len(r["traces"][0]["teacher"]) == 8


def test_verify_estimates_for_a_device_and_never_passes(tiny):
    from vlacompile.targets import load_target

    thor = load_target("jetson-thor")
    r = verify_quiet(tiny["teacher"], tiny["student_onnx"], tiny["episodes"], thor, student_policy=tiny["student"], student_precision="int8", max_samples=12)
    assert r["status"] in ("unverified", "failed") and r["passed"] is False
    # Halving the flow steps changes the chunks: the comparison is real.
    assert r["accuracy"]["nmse_vs_teacher"] > 1e-4
    student = r["latency"]["student"]
    assert student["kind"] == "estimated" and student["measured_on"] is None and student["estimated_for"] == "jetson-thor"
    assert student["p99_ms"] == r["roofline"]["student"]["total_ms"]["value"] == student["estimate_ms"]
    assert student["host_measurement"]["kind"] == "measured"
    assert r["latency"]["speedup_p50"] is None
    assert r["roofline"]["student"]["system1"]["steps"] == 2 and r["roofline"]["teacher"]["system1"]["steps"] == 4
    latency_gates = [g for g in r["gates"]["gates"] if g["name"] not in ("nmse_vs_teacher", "cosine", "max_abs_error")]
    assert latency_gates and all(g["status"] != "pass" for g in latency_gates)
    assert all(g["source"].startswith("estimated for jetson-thor") for g in latency_gates)


def test_verify_refuses_a_student_with_other_outputs(tiny):
    from vlacompile.errors import CheckpointError
    from vlacompile.targets import load_target

    other = dataclasses.replace(tiny["student"], spec=dataclasses.replace(tiny["student"].spec, chunk_size=4))
    with pytest.raises(CheckpointError, match="chunk_size"):
        verify_quiet(tiny["teacher"], tiny["student_onnx"], tiny["episodes"], load_target("x86-cpu"), student_policy=other)


def test_verify_with_more_episodes_than_samples_draws_stratified(tiny):
    from vlacompile.targets import load_target

    r = verify_quiet(tiny["teacher"], tiny["teacher_onnx"], tiny["episodes"], load_target("jetson-orin"), student_policy=tiny["teacher"], max_samples=2)
    assert r["samples"] == {"count": 2, "episodes": 3, "stride": None}
    assert len({t["episode_index"] for t in r["traces"]}) == 2


def test_verify_names_missing_cameras(tiny):
    from vlacompile.errors import EpisodeError
    from vlacompile.targets import load_target

    es = dataclasses.replace(tiny["episodes"], camera_names=("wrist",))
    with pytest.raises(EpisodeError, match="front"):
        verify_quiet(tiny["teacher"], tiny["teacher_onnx"], es, load_target("x86-cpu"))


def verify_quiet(*args, **kwargs):
    from vlacompile.verify import verify

    return verify(*args, calls=5, progress=False, log=lambda msg: None, **kwargs)
