"""Latency statistics on a fake runner with a fake clock (never on real wall-clock), and control rates."""
from __future__ import annotations

import random

import numpy as np
import pytest

from vlacompile.targets import Budget
from vlacompile.verify import latency
from vlacompile.verify.latency import control_rate, measure_latency


class FakeClock:
    def __init__(self):
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class FakeRunner:
    """get_action 'takes' the next duration from a list by advancing the fake clock."""

    def __init__(self, clock: FakeClock, durations_ms: list[float]):
        self.clock, self.durations = clock, list(durations_ms)
        self.seen: list[tuple[str, float]] = []
        self.threads = 3

    def get_action(self, obs, noise):
        self.seen.append((obs["task"], float(noise[0])))
        self.clock.ns += int(round(self.durations.pop(0) * 1e6))
        return np.zeros((4, 2), np.float32)


def _setup(monkeypatch, timed_ms, warmup_ms):
    clock = FakeClock()
    monkeypatch.setattr(latency.time, "perf_counter_ns", clock)
    runner = FakeRunner(clock, list(warmup_ms) + list(timed_ms))
    observations = [{"images": {}, "state": np.zeros(2, np.float32), "task": f"task {i}"} for i in range(3)]
    noises = [np.full(1, float(i)) for i in range(2)]
    return runner, observations, noises


def test_percentiles_are_nearest_rank_of_the_timed_calls(monkeypatch):
    timed = [float(v) for v in range(1, 101)]  # 1 ms .. 100 ms
    random.Random(0).shuffle(timed)
    runner, obs, noises = _setup(monkeypatch, timed, warmup_ms=[5000.0] * 4)  # slow warm-up calls are not counted
    r = measure_latency(runner, obs, noises, calls=100, warmup=4)
    assert r["p50_ms"] == pytest.approx(50.0)
    assert r["p90_ms"] == pytest.approx(90.0)
    assert r["p99_ms"] == pytest.approx(99.0)
    assert r["max_ms"] == pytest.approx(100.0)
    assert r["mean_ms"] == pytest.approx(50.5)
    assert r["calls"] == 100 and r["warmup"] == 4
    assert sorted(r["samples_ms"]) == pytest.approx(sorted(timed))
    assert r["threads"] == 3
    assert r["peak_rss_mb"] > 0


def test_p99_of_200_calls_is_the_198th(monkeypatch):
    timed = [1.0] * 196 + [10.0, 20.0, 30.0, 40.0]
    runner, obs, noises = _setup(monkeypatch, timed, warmup_ms=[])
    r = measure_latency(runner, obs, noises, calls=200, warmup=0)
    assert r["p99_ms"] == pytest.approx(20.0)  # ceil(0.99 * 200) = 198th smallest
    assert r["p50_ms"] == pytest.approx(1.0)
    assert r["max_ms"] == pytest.approx(40.0)


def test_observations_and_noises_are_cycled_in_order(monkeypatch):
    runner, obs, noises = _setup(monkeypatch, [1.0] * 7, warmup_ms=[1.0] * 2)
    measure_latency(runner, obs, noises, calls=7, warmup=2)
    timed = runner.seen[2:]
    assert [t for t, _ in timed] == [f"task {i % 3}" for i in range(7)]
    assert [n for _, n in timed] == [float(i % 2) for i in range(7)]


def test_measure_latency_rejects_nothing_to_time(monkeypatch):
    runner, obs, noises = _setup(monkeypatch, [1.0], warmup_ms=[])
    with pytest.raises(ValueError, match="calls"):
        measure_latency(runner, obs, noises, calls=0)
    with pytest.raises(ValueError, match="observation"):
        measure_latency(runner, [], noises, calls=1)


def test_control_rate_async_by_hand():
    b = Budget(control_hz=50, actions_per_chunk=16, execution="async", p99_latency_ms=50)
    c = control_rate(100.0, b)
    assert c["gating"] == "async"
    assert c["async"]["deadline_ms"] == pytest.approx(320.0)
    assert c["async"]["met"] is True
    assert c["async"]["slack_ms"] == pytest.approx(220.0)
    assert c["async"]["max_control_hz"] == pytest.approx(160.0)  # 16 actions per 0.1 s
    # Both models are always reported.
    assert c["sync"]["effective_control_hz"] == pytest.approx(16 / 0.42)
    assert c["sync"]["stall_ms_per_chunk"] == pytest.approx(100.0)
    late = control_rate(400.0, b)
    assert late["async"]["met"] is False and late["async"]["slack_ms"] == pytest.approx(-80.0)


def test_control_rate_sync_by_hand():
    b = Budget(control_hz=30, actions_per_chunk=8, execution="sync", p99_latency_ms=10)
    c = control_rate(10.0, b, source="measured on here")
    assert c["gating"] == "sync" and c["source"] == "measured on here"
    # A chunk takes 8/30 s to execute plus 10 ms of standing still.
    assert c["sync"]["effective_control_hz"] == pytest.approx(8 / (8 / 30 + 0.01))
    assert c["sync"]["slowdown"] == pytest.approx((8 / 30 + 0.01) / (8 / 30))
    assert c["async"]["deadline_ms"] == pytest.approx(1000 * 8 / 30)


def _identity_model(path):
    import onnx
    from onnx import TensorProto, helper

    from vlacompile.policy import CameraSpec, PolicySpec

    spec = PolicySpec(family="vlacompile-reference", cameras=(CameraSpec("front", 4, 4),), state_dim=2, action_dim=2, chunk_size=3,
                      flow_steps=1, max_tokens=4, control_hz=10.0, action_mean=(0.0, 0.0), action_std=(1.0, 1.0))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["noise"], ["actions"])], "g",
        [helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["b", 3, 2])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["b", 3, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path, spec


def test_threads_of_a_real_onnxruntime_runner(tmp_path):
    """The thread count reported is the session's (the latency depends on it)."""
    from vlacompile.backends.onnxrt import OrtRunner

    path, spec = _identity_model(tmp_path / "id.onnx")
    runner = OrtRunner(path, spec, threads=1)
    obs = [{"images": {"front": np.zeros((4, 4, 3), np.uint8)}, "state": np.zeros(2, np.float32), "task": "t"}]
    noise = [np.arange(6, dtype=np.float32).reshape(3, 2)]
    r = measure_latency(runner, obs, noise, calls=3, warmup=1)
    assert r["threads"] == 1 and r["calls"] == 3 and r["p50_ms"] > 0
    np.testing.assert_array_equal(runner.get_action(obs[0], noise[0]), noise[0])


def test_student_memory_is_measured_in_a_fresh_process(tmp_path):
    from vlacompile.verify.latency import measure_process_memory

    path, _ = _identity_model(tmp_path / "id.onnx")
    noise = np.ones((1, 3, 2), np.float32)
    m = measure_process_memory(path, {"noise": noise, "state": np.zeros((1, 2), np.float32)}, providers=["CPUExecutionProvider"], threads=1, calls=2)
    # A fresh interpreter with numpy and onnxruntime: tens of MB, not this test process's footprint
    # (which holds torch and would leak in through ru_maxrss across fork + exec).
    assert 0 < m["baseline_rss_mb"] <= m["peak_rss_mb"] < 300
    assert "fresh process" in m["scope"]
    with pytest.raises(RuntimeError, match="memory probe failed"):
        measure_process_memory(tmp_path / "missing.onnx", {"noise": noise}, providers=["CPUExecutionProvider"], threads=1)
