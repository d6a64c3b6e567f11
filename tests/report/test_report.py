"""report.json / report.md / report.html / summarize on reports built from the real verify pieces."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from vlacompile.report import summarize, write_reports
from vlacompile.targets import load_target
from vlacompile.verify.accuracy import action_agreement, self_consistency
from vlacompile.verify.gates import judge
from vlacompile.verify.latency import control_rate, summarize_ms
from vlacompile.verify.roofline import estimate

HOST = "Test CPU (2 cores, Linux x86_64)"
FLOPS = {"system2": 5e9, "system1_per_step": 1e9, "system1": 4e9}
WEIGHTS = {"system2": 4e8, "system1": 2e8}


def _latency(samples, runtime):
    return {**summarize_ms(samples), "calls": len(samples), "samples_ms": samples, "runtime": runtime, "measured_on": HOST,
            "kind": "measured", "threads": 2, "peak_rss_mb": 400.0}


def _report(target_name: str) -> dict:
    rng = np.random.default_rng(0)
    target = load_target(target_name)
    teacher = rng.standard_normal((20, 8, 4))
    student = teacher + 0.05 * rng.standard_normal(teacher.shape)
    recorded = teacher + 0.3 * rng.standard_normal(teacher.shape)
    acc = action_agreement(teacher, student, recorded)
    acc["teacher_self_consistency"] = self_consistency(teacher, rng.standard_normal(teacher.shape))
    acc["measured_on"] = HOST
    lat_t = _latency(list(rng.uniform(40, 60, 50)), "torch-eager-fp32")
    lat_s = _latency(list(rng.uniform(4, 6, 50)), "onnxruntime-cpu")
    host = {"device": HOST, "matmul_gflops": 100.0, "memory_bandwidth_gbs": 20.0, "source": f"measured on {HOST} (microbenchmark)"}
    roof_s = estimate(FLOPS, WEIGHTS, target, "int8", host=host)
    roof_t = estimate(FLOPS, WEIGHTS, target, "fp32", host=host)
    measured = target.runs_on_host
    if measured:
        student_lat = {**lat_s, "estimated_for": None, "estimate_ms": None}
        p99, src = lat_s["p99_ms"], f"measured on {HOST}"
    else:
        bound = roof_s["total_ms"]["value"]
        student_lat = {"kind": "estimated", "p50_ms": bound, "p99_ms": bound, "estimate_ms": bound, "measured_on": None,
                       "estimated_for": target.name, "runtime": "tensorrt int8 (not run here)", "host_measurement": lat_s}
        p99, src = bound, f"estimated for {target.name} (roofline lower bound)"
    gates = judge(acc, lat_s if measured else None, roof_s, target, measured=measured)
    traces = [{"episode_index": e, "frame_index": 0, "task": "pick", "teacher": teacher[e].tolist(), "student": student[e].tolist(),
               "recorded": recorded[e].tolist()} for e in range(3)]
    return {
        "schema_version": "1.0",
        "vlacompile_version": "0.1.0",
        "target": target.name,
        "recipe": target.default_recipe,
        "status": gates["status"],
        "passed": gates["passed"],
        "exit_code": {"passed": 0, "failed": 1, "unverified": 3}[gates["status"]],
        "teacher": {"family": "vlacompile-reference", "params": 11_000_000, "flow_steps": 10},
        "student": {"params": 3_000_000, "flow_steps": 2, "precision": "int8", "onnx": "student.onnx"},
        "accuracy": acc,
        "latency": {"teacher": lat_t, "student": student_lat, "speedup_p50": lat_t["p50_ms"] / lat_s["p50_ms"] if measured else None,
                    "host_speedup_p50": lat_t["p50_ms"] / lat_s["p50_ms"]},
        "roofline": {"teacher": roof_t, "student": roof_s},
        "control": control_rate(p99, target.budget, source=src),
        "gates": gates,
        "samples": {"count": 20, "episodes": 3},
        "traces": traces,
        "stages": [{"stage": "distill", "params": {"steps": 10}, "seconds": 12.5, "final_loss": 0.02}, {"stage": "export", "seconds": 3.1}],
        "artifact": {"dir": "build/x", "files": [{"path": "student.onnx", "sha256": "a" * 64, "bytes": 1234}]},
        "notes": ["a note with | a pipe"],
        "nan_figure": float("nan"),
    }


@pytest.fixture(scope="module", params=["x86-cpu", "jetson-thor"])
def written(request, tmp_path_factory):
    report = _report(request.param)
    out = tmp_path_factory.mktemp(request.param)
    paths = write_reports(report, out)
    return report, out, paths


def _reject_nan(value):
    raise AssertionError(f"non-standard JSON constant {value}")


def test_writes_three_files(written):
    _, out, paths = written
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)


def test_json_has_the_stable_keys(written):
    report, out, _ = written
    data = json.loads((out / "report.json").read_text(), parse_constant=_reject_nan)
    assert data["schema_version"] == "1.0"
    assert data["target"] == report["target"]
    assert isinstance(data["passed"], bool) and data["passed"] == report["passed"]
    assert data["latency"]["teacher"]["p50_ms"] == pytest.approx(report["latency"]["teacher"]["p50_ms"])
    student = data["latency"]["student"]
    assert student["p50_ms"] == pytest.approx(report["latency"]["student"]["p50_ms"])
    assert student["p99_ms"] == pytest.approx(report["latency"]["student"]["p99_ms"])
    assert data["accuracy"]["nmse_vs_teacher"] == pytest.approx(report["accuracy"]["nmse_vs_teacher"])
    assert data["artifact"]["files"] == [{"path": "student.onnx", "sha256": "a" * 64, "bytes": 1234}]
    assert data["nan_figure"] is None
    if report["target"] == "x86-cpu":
        assert student["kind"] == "measured" and student["measured_on"] == HOST
    else:
        assert student["kind"] == "estimated" and student["measured_on"] is None
        assert student["p99_ms"] == pytest.approx(report["roofline"]["student"]["total_ms"]["value"])
        assert data["status"] in ("unverified", "failed") and data["passed"] is False


def test_json_keeps_raw_samples_out_but_a_histogram_in(written):
    report, out, _ = written
    text = (out / "report.json").read_text()
    assert "samples_ms" not in text
    data = json.loads(text)
    hist = data["latency"]["teacher"]["histogram"]
    assert sum(hist["counts"]) == 50 and len(hist["edges_ms"]) == len(hist["counts"]) + 1
    assert "samples_ms" in report["latency"]["teacher"]  # the caller's dict is not modified


def _latency_rows(md: str) -> dict[str, str]:
    section = md.split("### Latency (ms)")[1].split("###")[0]
    return {row.split("|")[1].strip(): row for row in section.splitlines() if row.startswith("| ") and not row.startswith("| model ")}


def test_markdown_marks_estimates(written):
    report, out, _ = written
    md = (out / "report.md").read_text()
    rows = _latency_rows(md)
    gate_section = md.split("### Gates")[1].split("###")[0]
    p99_gate = next(line for line in gate_section.splitlines() if line.startswith("| p99_latency_ms"))
    if report["target"] == "x86-cpu":
        assert "estimated" not in rows["student"] and f"measured on {HOST}" in rows["student"]
        assert "estimated" not in p99_gate and "measured on" in p99_gate
        verdict = {"passed": "PASSED", "failed": "FAILED"}[report["status"]]
        assert f"— {verdict}" in md.splitlines()[0]
    else:
        assert "(estimated)" in rows["student"] and "estimated for jetson-thor" in rows["student"]
        assert "(estimated)" in p99_gate and "not verified" in p99_gate
        assert "measured on" in rows["student on this host (information only)"]
        assert "estimated" not in rows["teacher"]
        if report["status"] == "unverified":
            assert "NOT VERIFIED" in md.splitlines()[0] and "exit code 3" in md
    assert "student.onnx" in md and "a" * 64 in md  # artifact with its sha256
    assert "| distill | 12.5 |" in md
    assert "- a note with | a pipe" in md  # notes are list items, not table cells


def test_html_is_self_contained_with_plots(written):
    _, out, _ = written
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert refs and all(r.startswith("data:") for r in refs), [r for r in refs if not r.startswith("data:")]
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 3  # latency distribution, per-dimension error, action traces
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for title in ("Gates", "Latency (ms)", "Accuracy", "Roofline", "Stages", "Artifact files"):
        assert f"<h2>{title}" in page


def test_html_marks_estimates():
    page_est = _render_html("jetson-thor")
    assert 'class="est"' in page_est and "estimated for jetson-thor" in page_est


def _render_html(target):
    from vlacompile.report.html import render_html

    return render_html(_report(target))


def test_summarize(written):
    report, _, _ = written
    text = summarize(report)
    assert text.splitlines()[0].startswith(f"{report['target']}: ")
    assert "NMSE vs teacher" in text
    if report["target"] == "jetson-thor":
        assert "ESTIMATED for jetson-thor" in text and "on this host" in text
    else:
        assert f"measured on {HOST}" in text and "ESTIMATED" not in text
    # The CLI summarises a report read back from JSON (no raw samples): it must work the same.
    data = json.loads(json.dumps(__import__("vlacompile.report", fromlist=["json_ready"]).json_ready(report)))
    assert summarize(data) == text


def test_a_failed_gate_is_named_in_the_summary():
    report = _report("x86-cpu")
    report["gates"]["gates"][0].update(status="fail", value=0.5)
    report["status"], report["exit_code"] = "failed", 1
    text = summarize(report)
    assert "FAILED (exit 1" in text and "failed: nmse_vs_teacher 0.5" in text


def test_report_reread_from_json_renders(tmp_path):
    """`vlacompile report DIR` and re-rendering work from report.json alone (histograms, no raw samples)."""
    report = _report("x86-cpu")
    write_reports(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    paths = write_reports(data, tmp_path / "again")
    page = paths[2].read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3
