"""Roofline arithmetic on hand-computed cases, and gate verdicts (an estimate never passes)."""
from __future__ import annotations

import numpy as np
import pytest

from vlacompile.errors import ConfigError
from vlacompile.targets import AccuracyTolerance, Budget, DeviceFacts, TargetProfile
from vlacompile.verify.gates import judge
from vlacompile.verify.roofline import BYTES_PER_WEIGHT, estimate, measure_host, policy_weight_bytes


def _target(name="fake-jetson", bandwidth=100.0, peaks=None, budget=None, accuracy=None, kind="jetson", runtime="tensorrt"):
    return TargetProfile(
        name=name,
        description="test",
        default_recipe="none",
        device=DeviceFacts(kind=kind, runtime=runtime, name=name, precisions=("fp32", "fp16", "int8", "int4", "fp8"),
                           memory_bandwidth_gbs=bandwidth, peak_tflops=peaks if peaks is not None else {"fp16": 10.0, "int8": 20.0, "fp32": 5.0}),
        budget=budget or Budget(control_hz=50, actions_per_chunk=16, execution="async", p99_latency_ms=50, memory_mb=1000),
        accuracy=accuracy or AccuracyTolerance(max_nmse=0.05, min_cosine=0.95),
    )


def test_memory_bound_by_hand():
    # 1e9 parameters in System 2, 1e8 in System 1, INT8 (1 byte each), 100 GB/s, tiny FLOPs.
    flops = {"system2": 1e9, "system1_per_step": 1e8, "system1": 5e8}
    weights = {"system2": 4e9, "system1": 4e8}  # FP32 bytes
    r = estimate(flops, weights, _target(), "int8")
    assert r["system2"]["weight_bytes"] == pytest.approx(1e9)
    assert r["system2"]["memory_ms_per_step"] == pytest.approx(10.0)  # 1 GB / 100 GB/s
    assert r["system2"]["compute_ms_per_step"] == pytest.approx(1e9 / 20e12 * 1e3)
    assert r["system2"]["bound"] == "memory"
    assert r["system2"]["ms"]["value"] == pytest.approx(10.0)
    # The expert re-reads its 0.1 GB at each of the 5 steps.
    assert r["system1"]["steps"] == 5
    assert r["system1"]["ms"]["value"] == pytest.approx(5 * 1.0)
    assert r["total_ms"]["value"] == pytest.approx(15.0)
    assert r["total_ms"]["source"] == "estimated for fake-jetson from data-sheet figures"
    assert r["peak_tflops"]["value"] == 20.0 and r["peak_tflops"]["precision"] == "int8"
    assert r["weight_mb"] == pytest.approx(1.1e9 / 2**20)


def test_compute_bound_by_hand():
    # 2 TFLOP at 10 TFLOPS FP16 = 200 ms; weights 1 MB.
    flops = {"system2": 2e12, "system1_per_step": 1e11, "system1": 4e11}
    weights = {"system2": 2e6, "system1": 2e6}
    r = estimate(flops, weights, _target(), "fp16")
    assert r["system2"]["bound"] == "compute" and r["system1"]["bound"] == "compute"
    assert r["system2"]["ms"]["value"] == pytest.approx(200.0)
    assert r["system1"]["ms"]["value"] == pytest.approx(4 * 10.0)
    assert r["total_ms"]["value"] == pytest.approx(240.0)
    assert r["system2"]["memory_ms_per_step"] == pytest.approx(1e6 / 100e9 * 1e3)


def test_peak_falls_back_to_the_nearest_higher_precision_and_says_so():
    flops = {"system2": 2e12, "system1_per_step": 0.0, "system1": 0.0}
    weights = {"system2": 4.0, "system1": 0.0}
    fp8 = estimate(flops, weights, _target(), "fp8")  # the fake device lists no fp8 figure
    assert fp8["peak_tflops"]["precision"] == "fp16" and fp8["peak_tflops"]["value"] == 10.0
    assert "fp16 figure" in fp8["peak_tflops"]["source"] and fp8["notes"]
    int4 = estimate(flops, weights, _target(), "int4")
    assert int4["peak_tflops"]["precision"] == "int8"
    assert int4["bytes_per_weight"] == 0.5
    with pytest.raises(ConfigError, match="peak_tflops"):
        estimate(flops, weights, _target(peaks={"fp16": 1.0}), "fp32")


def test_bytes_per_weight():
    assert BYTES_PER_WEIGHT["fp32"] == 4 and BYTES_PER_WEIGHT["bf16"] == 2 and BYTES_PER_WEIGHT["fp8"] == 1
    assert BYTES_PER_WEIGHT["int4"] == 0.5 and 0.5 < BYTES_PER_WEIGHT["nvfp4"] < 0.6  # + block scales


def test_host_target_uses_the_microbenchmark():
    host_target = _target(name="x86-cpu", bandwidth=None, peaks={}, kind="cpu", runtime="onnxruntime")
    flops = {"system2": 1e9, "system1_per_step": 1e8, "system1": 2e8}
    weights = {"system2": 4e6, "system1": 4e6}
    with pytest.raises(ValueError, match="measure_host"):
        estimate(flops, weights, host_target, "fp32")
    host = {"device": "Test CPU", "matmul_gflops": 100.0, "memory_bandwidth_gbs": 10.0, "source": "measured on Test CPU (microbenchmark)"}
    r = estimate(flops, weights, host_target, "fp32", host=host)
    assert r["memory_bandwidth_gbs"] == {"value": 10.0, "source": "measured on Test CPU (microbenchmark)"}
    assert r["system2"]["ms"]["value"] == pytest.approx(10.0)  # 1 GFLOP / 100 GFLOP/s
    assert r["system1"]["ms"]["value"] == pytest.approx(2 * 1.0)
    assert "measured on Test CPU" in r["source"] and r["source"].startswith("estimated for x86-cpu")


def test_measure_host_reports_positive_figures_with_their_source():
    from vlacompile.targets import host_device_string

    h = measure_host(matmul_n=64, copy_mb=1, repeats=2)
    assert h["matmul_gflops"] > 0 and h["memory_bandwidth_gbs"] > 0
    assert h["source"] == f"measured on {host_device_string()} (microbenchmark)"


def test_policy_weight_bytes_counts_the_parts():
    from vlacompile.checkpoint import new_policy
    from vlacompile.families import get_family
    from vlacompile.families.reference import ReferenceConfig

    cfg = ReferenceConfig(image_size=16, patch_size=8, vision_heads=(1,), vision_mlp=(16,), backbone_heads=(1,), backbone_mlp=(16,),
                          expert_heads=(1,), expert_mlp=(16,), vision_width=16, backbone_width=16, expert_width=16, head_dim=8, flow_steps=3)
    p = new_policy(cfg)
    w = policy_weight_bytes(p)
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    assert w["system2"] == 4 * (count(p.module.vision) + count(p.module.backbone))
    assert w["system1"] == 4 * count(p.module.expert)
    r = estimate(get_family(p.family).flops(cfg), w, _target(), "fp16")
    assert r["system1"]["steps"] == 3
    assert r["system1"]["weight_bytes"] == w["system1"] / 2


# ----------------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------------

GOOD_ACC = {"nmse_vs_teacher": 0.01, "cosine": 0.99, "max_abs_error": 0.1, "measured_on": "Test CPU"}


def _host_target(p99=10.0, memory_mb=2000.0, execution="sync", **acc):
    return _target(name="x86-cpu", bandwidth=None, peaks={}, kind="cpu", runtime="onnxruntime",
                   budget=Budget(control_hz=30, actions_per_chunk=8, execution=execution, p99_latency_ms=p99, memory_mb=memory_mb),
                   accuracy=AccuracyTolerance(max_nmse=0.05, min_cosine=0.95, **acc))


def _by_name(result):
    return {g["name"]: g for g in result["gates"]}


def test_measured_within_budget_passes():
    lat = {"p99_ms": 8.0, "peak_rss_mb": 500.0, "measured_on": "Test CPU"}
    r = judge(GOOD_ACC, lat, None, _host_target(), measured=True)
    assert r["status"] == "passed" and r["passed"] is True
    g = _by_name(r)
    assert set(g) == {"nmse_vs_teacher", "cosine", "p99_latency_ms", "sync_control_rate_hz", "memory_mb"}
    assert all(x["status"] == "pass" and x["source"] == "measured on Test CPU" for x in g.values())
    assert g["sync_control_rate_hz"]["value"] == pytest.approx(8 / (8 / 30 + 0.008))
    assert g["sync_control_rate_hz"]["limit"] == pytest.approx(8 / (8 / 30 + 0.010))


def test_too_tight_budget_fails():
    lat = {"p99_ms": 8.0, "peak_rss_mb": 500.0, "measured_on": "Test CPU"}
    r = judge(GOOD_ACC, lat, None, _host_target(p99=5.0), measured=True)
    assert r["status"] == "failed" and r["passed"] is False
    g = _by_name(r)
    assert g["p99_latency_ms"]["status"] == "fail" and g["sync_control_rate_hz"]["status"] == "fail"
    assert g["nmse_vs_teacher"]["status"] == "pass"
    mem = judge(GOOD_ACC, lat, None, _host_target(memory_mb=100.0), measured=True)
    assert _by_name(mem)["memory_mb"]["status"] == "fail" and mem["status"] == "failed"


def test_accuracy_gates():
    lat = {"p99_ms": 1.0, "peak_rss_mb": 1.0}
    bad = {**GOOD_ACC, "nmse_vs_teacher": 0.2, "cosine": 0.9}
    g = _by_name(judge(bad, lat, None, _host_target(), measured=True))
    assert g["nmse_vs_teacher"]["status"] == "fail" and g["cosine"]["status"] == "fail"
    assert "max_abs_error" not in g
    g = _by_name(judge(GOOD_ACC, lat, None, _host_target(max_abs_error=0.05), measured=True))
    assert g["max_abs_error"]["status"] == "fail" and g["max_abs_error"]["limit"] == 0.05
    # The worst held-out sample: a good mean with one observation the student gets wrong.
    one_bad = {**GOOD_ACC, "worst_cosine": 0.4, "worst_cosine_sample": 17, "samples": 64}
    assert "worst_sample_cosine" not in _by_name(judge(one_bad, lat, None, _host_target(), measured=True))
    g = _by_name(judge(one_bad, lat, None, _host_target(min_worst_cosine=0.8), measured=True))
    assert g["worst_sample_cosine"]["status"] == "fail" and "sample 17 of 64" in g["worst_sample_cosine"]["note"]
    assert g["cosine"]["status"] == "pass"


def test_worst_cosine_is_the_lowest_sample():
    from vlacompile.verify.accuracy import action_agreement

    t = np.random.default_rng(0).normal(size=(10, 4, 3))
    s = t.copy()
    s[6] = -t[6]  # one sample reversed
    acc = action_agreement(t, s)
    assert acc["worst_cosine"] == pytest.approx(-1.0) and acc["worst_cosine_sample"] == 6
    assert acc["cosine"] == pytest.approx(0.8)


def _roof(total_ms, weight_mb=10.0):
    return {"total_ms": {"value": total_ms, "source": "estimated for fake-jetson from data-sheet figures"}, "weight_mb": weight_mb}


def test_an_estimate_is_never_a_pass():
    r = judge(GOOD_ACC, None, _roof(5.0), _target(), measured=False)
    assert r["status"] == "unverified" and r["passed"] is False
    g = _by_name(r)
    assert g["nmse_vs_teacher"]["status"] == "pass"  # accuracy really ran
    for name in ("p99_latency_ms", "async_chunk_deadline_ms", "memory_mb"):
        assert g[name]["status"] == "not_verified", name
        assert g[name]["kind"] == "estimated" and g[name]["source"].startswith("estimated for fake-jetson")
    assert g["p99_latency_ms"]["value"] == 5.0 and g["memory_mb"]["value"] == 10.0


def test_an_estimate_above_the_budget_fails():
    r = judge(GOOD_ACC, None, _roof(80.0), _target(), measured=False)
    assert r["status"] == "failed"
    g = _by_name(r)["p99_latency_ms"]
    assert g["status"] == "fail" and "cannot" in g["note"]
    assert _by_name(r)["async_chunk_deadline_ms"]["status"] == "not_verified"  # 80 ms is within the 320 ms deadline


def test_failed_accuracy_beats_unverified_latency():
    r = judge({**GOOD_ACC, "cosine": 0.5}, None, _roof(1.0), _target(), measured=False)
    assert r["status"] == "failed"


def test_no_estimate_is_not_verified():
    r = judge(GOOD_ACC, None, None, _target(), measured=False)
    assert r["status"] == "unverified"
    assert _by_name(r)["p99_latency_ms"]["value"] is None
