"""report diff on hand-made reports: noise bands per kind of figure."""
from __future__ import annotations

import copy

from vlacompile.report.diff import baseline_gates, diff_reports, render_diff_markdown

BASE = {
    "target": "x86-cpu", "status": "passed", "recipe": "r", "seed": 0,
    "accuracy": {"nmse_vs_teacher": 0.040, "nmse_standard_error": 0.002, "cosine": 0.96, "worst_cosine": 0.7, "max_abs_error": 0.3},
    "latency": {"teacher": {"kind": "measured", "p50_ms": 20.0, "p90_ms": 21.0, "p99_ms": 25.0,
                            "intervals": {"p50_ms": [19.8, 20.2], "p90_ms": [20.8, 21.3], "p99_ms": [24.0, 26.0]}},
                "student": {"kind": "measured", "p50_ms": 1.0, "p90_ms": 1.1, "p99_ms": 1.3,
                            "intervals": {"p50_ms": [0.98, 1.02], "p90_ms": [1.05, 1.15], "p99_ms": [1.2, 1.4]}}},
    "closed_loop": {"episodes": 100, "teacher": {"success_rate": 0.95, "tasks": {"reach": {"success_rate": 1.0, "episodes": 10}}},
                    "student": {"success_rate": 0.93, "tasks": {"reach": {"success_rate": 0.9, "episodes": 10}}}},
    "gates": {"gates": [{"name": "nmse_vs_teacher", "status": "pass"}]},
    "artifact": {"files": [{"path": "student.onnx", "sha256": "a"}]},
}


def test_identical_reports_move_nothing():
    d = diff_reports(BASE, copy.deepcopy(BASE))
    assert d["beyond_noise"] == [] and not any(g["status"] == "fail" for g in baseline_gates(d, "old"))


def test_noise_bands():
    new = copy.deepcopy(BASE)
    new["accuracy"]["nmse_vs_teacher"] = 0.043  # within 1.96 * sqrt(2) * 0.002 = 0.0055
    new["latency"]["student"].update(p99_ms=1.35, intervals={**new["latency"]["student"]["intervals"], "p99_ms": [1.25, 1.45]})
    new["closed_loop"]["student"]["success_rate"] = 0.90  # 3 points on 100 episodes: within noise
    d = diff_reports(BASE, new)
    by = {r["metric"]: r for r in d["metrics"]}
    assert by["accuracy.nmse_vs_teacher"]["status"] == "within noise"
    assert by["latency.student.p99_ms"]["status"] == "within noise"
    assert by["closed_loop.student.success_rate"]["status"] == "within noise"
    assert not any(g["status"] == "fail" for g in baseline_gates(d, "old"))

    new["accuracy"]["nmse_vs_teacher"] = 0.060
    new["latency"]["student"].update(p99_ms=2.0, intervals={**new["latency"]["student"]["intervals"], "p99_ms": [1.9, 2.1]})
    new["closed_loop"]["student"]["success_rate"] = 0.70
    new["artifact"]["files"][0]["sha256"] = "b"
    d = diff_reports(BASE, new)
    failed = {g["name"] for g in baseline_gates(d, "old") if g["status"] == "fail"}
    assert failed == {"baseline:accuracy.nmse_vs_teacher", "baseline:closed_loop.student.success_rate"}
    assert {r["metric"]: r for r in d["metrics"]}["latency.student.p99_ms"]["status"] == "beyond noise"  # shown, not gated
    # The student slower relative to the teacher timed beside it: a latency regression the gate sees.
    new["latency"]["student"].update(p50_ms=2.0, intervals={**new["latency"]["student"]["intervals"], "p50_ms": [1.95, 2.05]})
    failed = {g["name"] for g in baseline_gates(diff_reports(BASE, new), "old") if g["status"] == "fail"}
    assert "baseline:latency.student_over_teacher_p50" in failed
    # The whole machine slower (teacher and student alike): not a regression.
    both = copy.deepcopy(BASE)
    for who in ("teacher", "student"):
        lat = both["latency"][who]
        lat["p50_ms"] *= 1.6
        lat["intervals"] = {k: [v[0] * 1.6, v[1] * 1.6] for k, v in lat["intervals"].items()}
    assert not any(g["status"] == "fail" for g in baseline_gates(diff_reports(BASE, both), "old"))
    # A sub-millisecond student: a 0.06 ms move (24%) is jitter; a 0.35 ms one is a regression.
    tiny = copy.deepcopy(BASE)
    tiny["latency"]["student"].update(p50_ms=0.25, intervals={**tiny["latency"]["student"]["intervals"], "p50_ms": [0.245, 0.255]})
    for p50, verdict in ((0.31, False), (0.60, True)):
        moved = copy.deepcopy(tiny)
        moved["latency"]["student"].update(p50_ms=p50, intervals={**moved["latency"]["student"]["intervals"], "p50_ms": [p50 - 0.005, p50 + 0.005]})
        failed = {g["name"] for g in baseline_gates(diff_reports(tiny, moved), "old") if g["status"] == "fail"}
        assert ("baseline:latency.student_over_teacher_p50" in failed) is verdict, p50
    assert d["files"]["changed"] == ["student.onnx"]
    md = render_diff_markdown(d)
    assert "**beyond noise**" in md and "`closed_loop.student.success_rate`" in md


def test_an_improvement_never_fails_and_estimates_are_not_compared():
    new = copy.deepcopy(BASE)
    new["accuracy"]["nmse_vs_teacher"] = 0.01
    new["latency"]["student"] = {"kind": "estimated", "p50_ms": 0.1, "p99_ms": 0.1}
    d = diff_reports(BASE, new)
    assert not any(g["status"] == "fail" for g in baseline_gates(d, "old"))
    assert not any(r["metric"] == "latency.student.p99_ms" and r["new"] is not None for r in d["metrics"])
